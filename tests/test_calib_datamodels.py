"""Integration: references written by iris_tasks.datamodels, selected for a model's header
through the exact call stpipe makes (crds.getreferences with model.crds_observatory)."""

from __future__ import annotations

import crds
import pytest

from iris_tasks.calib.testing import temporary_cache

models = pytest.importorskip("iris_tasks.datamodels.models")


def test_datamodel_reference_selected_for_datamodel_header(tmp_path):
    with temporary_cache(tmp_path / "crds") as calib:
        dark = models.DarkModel()
        dark.meta.instrument.name = "IRIS"
        dark.meta.instrument.detector = "IMG2"
        dark.meta.exposure.readpatt = "CDS2"
        dark.meta.useafter = "2025-01-01T00:00:00"
        dark.meta.description = "test dark"
        dark.meta.author = "test"
        dark.meta.pedigree = "SIMULATION"
        dark.save(tmp_path / "dark.fits")
        context = calib.publish_references([tmp_path / "dark.fits"], "datamodel dark")

        science = models.ImageModel()
        science.meta.instrument.name = "IRIS"
        science.meta.instrument.detector = "IMG2"
        science.meta.exposure.readpatt = "CDS2"
        science.meta.observation.date = "2025-03-01"
        science.meta.observation.time = "01:02:03.000"
        assert science.crds_observatory == calib.CRDS_OBSERVATORY
        params = science.get_crds_parameters()
        found = crds.getreferences(params, reftypes=["dark"], observatory=science.crds_observatory)
        assert found == calib.get_references(params, ["dark"], context=context)
