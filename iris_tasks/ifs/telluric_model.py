"""TelluricModel: the ``telluric`` reference (an IFS spectral response) as a datamodel.

It belongs beside the other reference models in :mod:`iris_tasks.datamodels.models` (and in
its ``MODEL_CLASSES``/``REFERENCE_MODELS``, so ``open_model`` recognises the file by REFTYPE);
until then the telluric step and builder open it with this class directly.
"""

from __future__ import annotations

from ..datamodels import ReferenceFileModel
from ..datamodels._integration import SCHEMA_URI_PREFIX

__all__ = ["TelluricModel"]


class TelluricModel(ReferenceFileModel):
    """Response (atmosphere x telescope x instrument) per wavelength, from a standard star."""

    schema_url = SCHEMA_URI_PREFIX + "telluric.schema"
    reftype = "telluric"
