"""Open IRIS files as the right datamodel, with errors that name the file and the problem.

FITS files are read through one memory map and every image array is converted to native
byte order once, in a single pass, before stdatamodels sees it (:func:`read_native_hdulist`).
stdatamodels' own path (``fits.open(memmap=False)``) reads each array into a big-endian
buffer and astropy then copies pseudo-unsigned arrays (uint16 ramps, uint32 DQ) once more
and subtracts BZERO in a further pass; the big-endian float arrays it leaves behind make
every later numpy operation swap bytes again. For a 4096^2 x 10-read ramp that was ~1-2 s
of the ~0.1 s the bytes need.

References are read by every task, so they can also be kept in a native-byte-order cache
(:func:`read_cached_native_hdulist`): one ``.npy`` per image HDU, memory-mapped copy-on-write.
A task then maps page-cache pages every earlier task already read instead of byte-swapping
~1.2 GB of 4096^2 references into fresh memory - which costs each forked task seconds on a VM
whose freed memory goes back to the host (virtio-balloon free page reporting), where first
touching a page runs at ~0.4 GiB/s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..errors import BadInputError
from .models import MODEL_CLASSES, REFERENCE_MODELS, IrisDataModel, RampModel

log = logging.getLogger(__name__)

_FITS_SUFFIXES = (".fits", ".fit", ".fts")


class IrisFileError(BadInputError, ValueError):
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


def native_cache_entry(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The cache directory for ``path``'s arrays: named after the file and a digest of its
    resolved path, size and modification time, so a rewritten file never matches an old entry."""
    path = Path(path)
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return Path(cache_dir) / f"{path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"


def _image_hdus(hdul: fits.HDUList) -> list[int]:
    return [i for i, hdu in enumerate(hdul)
            if isinstance(hdu, fits.ImageHDU | fits.PrimaryHDU) and hdu.header.get("NAXIS")]


def _write_native_entry(entry: Path, hdul: fits.HDUList) -> None:
    """Write ``hdul``'s native arrays as ``entry`` atomically (a temp directory renamed into
    place), so a reader sees a whole entry or none; a concurrent writer's entry wins."""
    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index = {}
        for i in _image_hdus(hdul):
            np.save(tmp / f"hdu{i}.npy", hdul[i].data, allow_pickle=False)
            index[str(i)] = {"shape": list(hdul[i].data.shape), "dtype": hdul[i].data.dtype.str}
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_cached_native_hdulist(path: str | os.PathLike, cache_dir: str | os.PathLike) -> fits.HDUList | None:
    """Like :func:`read_native_hdulist`, with the native arrays kept in ``cache_dir``.

    The first call converts the file and writes the entry; later calls (any process) map the
    entry's arrays copy-on-write, so a caller that changes an array in place changes only its
    own pages. An entry that is unreadable or does not match the file's headers is rebuilt;
    a cache that cannot be written costs speed only (logged), never the read.
    """
    path = Path(path)
    entry = native_cache_entry(path, cache_dir)
    if (entry / "index.json").is_file():
        hdul = fits.open(path, memmap=True, do_not_scale_image_data=True)
        try:
            index = json.loads((entry / "index.json").read_text())
            wanted = _image_hdus(hdul)
            if sorted(int(k) for k in index) != wanted:
                raise ValueError("the entry lists other HDUs than the file has")
            for i in wanted:
                arr = np.load(entry / f"hdu{i}.npy", mmap_mode="c", allow_pickle=False)
                if tuple(arr.shape) != tuple(hdul[i].shape):
                    raise ValueError(f"HDU {i}: cached shape {arr.shape}, file {hdul[i].shape}")
                hdul[i].data = np.asarray(arr)
            return hdul
        except (OSError, ValueError) as exc:
            hdul.close()
            log.warning("%s: native cache entry %s unusable (%s); rebuilding it", path, entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    hdul = read_native_hdulist(path)
    if hdul is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            _write_native_entry(entry, hdul)
        except OSError as exc:
            log.warning("%s: cannot write the native cache entry %s (%s); reading without it",
                        path, entry, exc)
    return hdul


def open_model(path: str | os.PathLike, model_class: type[IrisDataModel] | None = None, *,
               native_cache: str | os.PathLike | None = None) -> IrisDataModel:
    """Open ``path`` as an IRIS datamodel (its own class unless ``model_class`` is given).

    ``native_cache``: a directory where the file's arrays are kept in native byte order for
    later opens (:func:`read_cached_native_hdulist`); for files read again and again, such as
    references. The model's arrays are then copy-on-write memory maps.
    """
    path = Path(path)
    if not path.exists():
        raise IrisFileError(f"{path}: file not found")
    hdul = None
    if path.suffix.lower() in _FITS_SUFFIXES:
        try:
            hdul = read_cached_native_hdulist(path, native_cache) if native_cache else \
                read_native_hdulist(path)
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
