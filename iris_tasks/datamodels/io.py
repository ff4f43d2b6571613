"""Open IRIS files as the right datamodel, with errors that name the file and the problem."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from astropy.io import fits

from .models import MODEL_CLASSES, REFERENCE_MODELS, IrisDataModel, RampModel

log = logging.getLogger(__name__)


class IrisFileError(ValueError):
    """A file that cannot be read as an IRIS product; the message names file and problem."""


def guess_model_class(path: str | os.PathLike) -> type[IrisDataModel]:
    """Model class for a FITS file from DATAMODL, else REFTYPE, else the SCI shape."""
    path = Path(path)
    try:
        with fits.open(path, memmap=True) as hdul:
            header = hdul[0].header
            datamodl = header.get("DATAMODL")
            if datamodl in MODEL_CLASSES:
                return MODEL_CLASSES[datamodl]
            reftype = str(header.get("REFTYPE", "")).lower()
            if reftype in REFERENCE_MODELS:
                return REFERENCE_MODELS[reftype]
            if "SCI" not in hdul:
                raise IrisFileError(f"{path}: no SCI extension and no DATAMODL/REFTYPE keyword")
            naxis = hdul["SCI"].header.get("NAXIS", 0)
    except OSError as exc:
        raise IrisFileError(f"{path}: not a readable FITS file ({exc})") from exc
    from .models import CubeModel, ImageModel

    by_ndim = {4: RampModel, 3: RampModel, 2: ImageModel}
    if naxis == 3 and str(header.get("OBSTYPE", "")) == "SCI" and header.get("IFSMODE") not in (None, "N/A"):
        return CubeModel
    if naxis not in by_ndim:
        raise IrisFileError(f"{path}: SCI has {naxis} axes; expected 2 (image) or 4 (ramp)")
    return by_ndim[naxis]


def open_model(path: str | os.PathLike, model_class: type[IrisDataModel] | None = None) -> IrisDataModel:
    """Open ``path`` as an IRIS datamodel (its own class unless ``model_class`` is given)."""
    path = Path(path)
    if not path.exists():
        raise IrisFileError(f"{path}: file not found")
    cls = model_class or guess_model_class(path)
    try:
        model = cls(str(path))
    except Exception as exc:  # stdatamodels raises many types; the caller needs the file name
        raise IrisFileError(f"{path}: cannot open as {cls.__name__}: {exc}") from exc
    if isinstance(model, RampModel) and model.data.ndim == 3:
        # A single ramp written without the ramp axis: give every consumer the 4-D layout.
        model.data = model.data[None]
    return model
