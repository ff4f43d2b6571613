"""IRIS datamodels, DQ flags and FITS I/O (JWST conventions)."""

from . import _asdf_cache, dqflags
from .io import IrisFileError, guess_model_class, open_model
from .models import (
    CRDS_OBSERVATORY,
    MODEL_CLASSES,
    REFERENCE_MODELS,
    CubeModel,
    DarkModel,
    FlatModel,
    GainModel,
    IfsTraceModel,
    ImageModel,
    IpcModel,
    IrisDataModel,
    LinearityModel,
    MaskModel,
    PhotomModel,
    RampModel,
    ReadnoiseModel,
    ReferenceFileModel,
    SaturationModel,
    TelluricModel,
)

__all__ = [
    "CRDS_OBSERVATORY", "MODEL_CLASSES", "REFERENCE_MODELS", "CubeModel", "DarkModel",
    "FlatModel", "GainModel", "IfsTraceModel", "ImageModel", "IpcModel", "IrisDataModel", "IrisFileError",
    "LinearityModel", "MaskModel", "PhotomModel", "RampModel", "ReadnoiseModel", "ReferenceFileModel",
    "SaturationModel", "TelluricModel", "dqflags", "guess_model_class", "open_model",
]

_asdf_cache.install()
