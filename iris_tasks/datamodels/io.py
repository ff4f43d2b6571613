"""Open IRIS files as the right datamodel, with errors that name the file and the problem.

FITS files are read through one memory map and every image array is converted to native
byte order once, in a single pass, before stdatamodels sees it (:func:`read_native_hdulist`).
stdatamodels' own path (``fits.open(memmap=False)``) reads each array into a big-endian
buffer and astropy then copies pseudo-unsigned arrays (uint16 ramps, uint32 DQ) once more
and subtracts BZERO in a further pass; the big-endian float arrays it leaves behind make
every later numpy operation swap bytes again. For a 4096^2 x 10-read ramp that was ~1-2 s
of the ~0.1 s the bytes need.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from .models import MODEL_CLASSES, REFERENCE_MODELS, IrisDataModel, RampModel

log = logging.getLogger(__name__)

_FITS_SUFFIXES = (".fits", ".fit", ".fts")


class IrisFileError(ValueError):
    """A file that cannot be read as an IRIS product; the message names file and problem."""


def _class_from_hdulist(hdul: fits.HDUList, path: Path) -> type[IrisDataModel]:
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
    from .models import CubeModel, ImageModel

    by_ndim = {4: RampModel, 3: RampModel, 2: ImageModel}
    if naxis == 3 and str(header.get("OBSTYPE", "")) == "SCI" and header.get("IFSMODE") not in (None, "N/A"):
        return CubeModel
    if naxis not in by_ndim:
        raise IrisFileError(f"{path}: SCI has {naxis} axes; expected 2 (image) or 4 (ramp)")
    return by_ndim[naxis]


def guess_model_class(path: str | os.PathLike) -> type[IrisDataModel]:
    """Model class for a FITS file from DATAMODL, else REFTYPE, else the SCI shape."""
    path = Path(path)
    try:
        with fits.open(path, memmap=True) as hdul:
            return _class_from_hdulist(hdul, path)
    except OSError as exc:
        raise IrisFileError(f"{path}: not a readable FITS file ({exc})") from exc


def _native_image(hdu: fits.ImageHDU | fits.PrimaryHDU) -> np.ndarray | None:
    """The HDU's array in native byte order (one pass over the mapped bytes), or None when
    its scaling (BSCALE/BLANK/other BZERO) needs astropy's general conversion.

    ``hdu`` comes from a file opened with ``do_not_scale_image_data=True``: ``hdu.data`` is
    the raw big-endian memory map.
    """
    header = hdu.header
    raw = hdu.data
    if raw is None:
        return None
    bzero = header.get("BZERO", 0)
    bscale = header.get("BSCALE", 1)
    if bscale != 1 or "BLANK" in header:
        return None
    if bzero == 0:
        return raw.astype(raw.dtype.newbyteorder("="))
    bits = raw.dtype.itemsize * 8
    if raw.dtype.kind == "i" and bzero == 1 << (bits - 1):
        # Pseudo-unsigned (FITS stores uintN as intN - 2**(N-1)): adding BZERO modulo 2**N
        # is flipping the sign bit, done in place on the native copy.
        out = raw.view(f">u{raw.dtype.itemsize}").astype(f"=u{raw.dtype.itemsize}")
        out ^= out.dtype.type(1 << (bits - 1))
        return out
    return None


def read_native_hdulist(path: str | os.PathLike) -> fits.HDUList | None:
    """``path`` opened with every image array already in memory in native byte order.

    Returns None when some array is scaled in a way this fast path does not handle (the
    caller then lets stdatamodels read the file its own way). The file is memory-mapped only
    while the arrays are converted; the returned list holds plain in-memory arrays.
    """
    hdul = fits.open(path, memmap=True, do_not_scale_image_data=True)
    try:
        for hdu in hdul:
            if not isinstance(hdu, fits.ImageHDU | fits.PrimaryHDU) or not hdu.header.get("NAXIS"):
                continue
            native = _native_image(hdu)
            if native is None:
                hdul.close()
                return None
            hdu.data = native
    except Exception:
        hdul.close()
        raise
    return hdul


def open_model(path: str | os.PathLike, model_class: type[IrisDataModel] | None = None) -> IrisDataModel:
    """Open ``path`` as an IRIS datamodel (its own class unless ``model_class`` is given)."""
    path = Path(path)
    if not path.exists():
        raise IrisFileError(f"{path}: file not found")
    hdul = None
    if path.suffix.lower() in _FITS_SUFFIXES:
        try:
            hdul = read_native_hdulist(path)
        except OSError as exc:
            raise IrisFileError(f"{path}: not a readable FITS file ({exc})") from exc
    try:
        if hdul is not None:
            cls = model_class or _class_from_hdulist(hdul, path)
        else:
            cls = model_class or guess_model_class(path)
        try:
            model = cls(hdul) if hdul is not None else cls(str(path))
        except Exception as exc:  # stdatamodels raises many types; the caller needs the file name
            raise IrisFileError(f"{path}: cannot open as {cls.__name__}: {exc}") from exc
    finally:
        if hdul is not None:
            hdul.close()
    if hdul is not None:
        model.meta.filename = path.name  # what stdatamodels sets when it opens a path itself
    if isinstance(model, RampModel) and model.data.ndim == 3:
        # A single ramp written without the ramp axis: give every consumer the 4-D layout.
        model.data = model.data[None]
    return model
