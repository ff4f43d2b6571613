"""asdf entry point: serves the IRIS schemas under http://tmt.org/schemas/iris_datamodel/."""

import importlib.resources

from asdf.resource import DirectoryResourceMapping

SCHEMA_URI_PREFIX = "http://tmt.org/schemas/iris_datamodel/"


def get_resource_mappings() -> list:
    schemas = importlib.resources.files("iris_tasks.datamodels") / "schemas"
    return [DirectoryResourceMapping(schemas, SCHEMA_URI_PREFIX, filename_pattern="*.yaml",
                                     stem_filename=True)]
