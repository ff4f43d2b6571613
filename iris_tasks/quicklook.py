"""Quicklook PNGs of raw ramps, reduced images and IFS cubes.

* raw ramp (SCI uint16, ``(nramps, nreads, ny, nx)`` or ``(nreads, ny, nx)``): last read minus
  first read of the first ramp, i.e. the accumulated signal without the bias/kTC offset;
* image (SCI float, ``(ny, nx)``): as is;
* cube (SCI float, ``(nwave, ny, nx)``): mean over wavelength (a white-light image).

DQ pixels with DO_NOT_USE are blanked (drawn in the "bad" colour) before the thumbnail is
block-averaged (NaN-aware) down to at most ``size`` pixels on the long side, stretched with a
zscale interval and written with matplotlib's Agg canvas (no pyplot state, so thread-safe).
A 4096x4096 image takes a few tenths of a second.

    make_quicklook("iris_0001_cal.fits", "iris_0001_ql.png")
    python -m iris_tasks.quicklook iris_0001_raw.fits iris_0001_cal.fits -o pair.png
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError

log = logging.getLogger(__name__)

# DQ bit DO_NOT_USE (JWST value, as in iris_tasks.datamodels.dqflags); kept local so previews
# work on any FITS file without the datamodels package.
DO_NOT_USE = 1

STRETCHES = ("zscale", "asinh", "minmax", "percentile")
_DPI = 100
_BAD_COLOR = "#7a1f5c"


class QuicklookError(BadInputError, ValueError):
    """The input cannot be previewed; the message names the input and the problem."""


@dataclass(frozen=True)
class Quicklook:
    """What :func:`make_quicklook` wrote."""

    path: Path
    kind: str  # "ramp" | "image" | "cube"
    shape: tuple[int, ...]  # shape of the input SCI array
    vmin: float
    vmax: float
    title: str
    png_size: tuple[int, int]  # (width, height) in pixels


@dataclass
class Preview:
    """A 2-D float32 image ready for display plus what is known about where it came from."""

    image: np.ndarray
    kind: str
    shape: tuple[int, ...]
    header: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def default_title(self) -> str:
        parts = [str(self.header.get(k)) for k in ("OBSNAME", "DETECTOR") if self.header.get(k)]
        if self.name:
            parts.append(self.name)
        label = {"ramp": "last-first read", "cube": "collapsed cube"}.get(self.kind)
        title = "  ".join(parts)
        if label:
            return f"{title}  ({label})" if title else label
        return title or self.kind


# -- loading --------------------------------------------------------------------------------

def _ramp_signal(section: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Last minus first read of ramp 0; reads only those two planes from disk."""
    if len(shape) == 4:
        nreads = shape[1]
        first = np.asarray(section[0, 0], dtype=np.float32)
        if nreads < 2:
            return first
        return np.asarray(section[0, nreads - 1], dtype=np.float32) - first
    nreads = shape[0]
    first = np.asarray(section[0], dtype=np.float32)
    if nreads < 2:
        return first
    return np.asarray(section[nreads - 1], dtype=np.float32) - first


def _mask_dq(data: np.ndarray, dq: np.ndarray | None) -> np.ndarray:
    data = np.array(data, dtype=np.float32, copy=True)
    if dq is not None and dq.shape == data.shape:
        data[(np.asarray(dq).astype(np.uint32) & DO_NOT_USE) != 0] = np.nan
    elif dq is not None:
        log.warning("DQ shape %s does not match data %s; not masking", dq.shape, data.shape)
    return data


def _collapse_cube(cube: np.ndarray, dq: np.ndarray | None) -> np.ndarray:
    masked = _mask_dq(cube, dq)
    with np.errstate(invalid="ignore", divide="ignore"):
        finite = np.isfinite(masked)
        total = np.where(finite, masked, 0).sum(axis=0, dtype=np.float64)
        count = finite.sum(axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _from_arrays(sci: np.ndarray, dq: np.ndarray | None, *, integer: bool, name: str,
                 header: dict[str, Any]) -> Preview:
    shape = tuple(int(n) for n in sci.shape)
    ndim = len(shape)
    if ndim == 4 or (ndim == 3 and integer):
        # Raw reads are unsigned integers; 3-D float data is a cube.
        image = _ramp_signal(sci, shape)
        return Preview(image, "ramp", shape, header, name)
    if ndim == 3:
        return Preview(_collapse_cube(np.asarray(sci), dq), "cube", shape, header, name)
    if ndim == 2:
        return Preview(_mask_dq(np.asarray(sci), dq), "image", shape, header, name)
    raise QuicklookError(f"{name or 'input'}: cannot preview a {ndim}-D array (expected 2, 3 or 4)")


_HEADER_KEYS = ("OBSNAME", "OBSTYPE", "DETECTOR", "FILTER", "IFSMODE", "DATE-OBS", "TIME-OBS",
                "EXPTIME", "BUNIT", "DATAMODL")


def _from_hdul(hdul: Any, name: str) -> Preview:
    header = {k: hdul[0].header.get(k) for k in _HEADER_KEYS if k in hdul[0].header}
    if "SCI" in hdul:
        sci_hdu = hdul["SCI"]
    else:
        # Plain FITS images (e.g. from other tools): the first HDU with at least 2 axes.
        candidates = [h for h in hdul if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) >= 2]
        if not candidates:
            raise QuicklookError(f"{name}: no SCI extension and no image HDU to preview")
        sci_hdu = candidates[0]
    naxis = int(sci_hdu.header.get("NAXIS", 0))
    shape = tuple(int(sci_hdu.header[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    if "BUNIT" in sci_hdu.header:
        header["BUNIT"] = sci_hdu.header["BUNIT"]
    integer = int(sci_hdu.header.get("BITPIX", -32)) > 0
    if naxis == 4 or (naxis == 3 and integer):
        # Ramps can be hundreds of MB: read only the two planes needed, via .section.
        return Preview(_ramp_signal(sci_hdu.section, shape), "ramp", shape, header, name)
    dq = hdul["DQ"].data if "DQ" in hdul else None
    return _from_arrays(sci_hdu.data, dq, integer=integer, name=name, header=header)


def load_preview(data_or_path: Any, *, dq: np.ndarray | None = None) -> Preview:
    """Turn a FITS path, an HDUList, a datamodel-like object (``.data``/``.dq``) or an array
    into a 2-D :class:`Preview`."""
    from astropy.io import fits

    if isinstance(data_or_path, (str, os.PathLike)):
        path = Path(data_or_path)
        if not path.is_file():
            raise QuicklookError(f"{path}: file not found")
        try:
            # memmap=False: astropy refuses to memory-map scaled (BZERO) uint16 ramps, and
            # .section then reads just the planes we ask for.
            with fits.open(path, memmap=False) as hdul:
                return _from_hdul(hdul, path.name)
        except QuicklookError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise QuicklookError(f"{path}: not a readable FITS file ({exc})") from exc
    if isinstance(data_or_path, fits.HDUList):
        name = Path(data_or_path.filename()).name if data_or_path.filename() else ""
        return _from_hdul(data_or_path, name)
    if isinstance(data_or_path, np.ndarray):
        arr = data_or_path
        return _from_arrays(arr, dq, integer=np.issubdtype(arr.dtype, np.integer), name="", header={})
    data = getattr(data_or_path, "data", None)
    if isinstance(data, np.ndarray):
        model_dq = getattr(data_or_path, "dq", None)
        model_dq = model_dq if isinstance(model_dq, np.ndarray) and model_dq.size else dq
        name = str(getattr(getattr(data_or_path, "meta", None), "filename", "") or "")
        return _from_arrays(data, model_dq, integer=np.issubdtype(data.dtype, np.integer),
                            name=name, header={})
    raise QuicklookError(f"cannot preview an object of type {type(data_or_path).__name__}")


# -- image processing -----------------------------------------------------------------------

def block_average(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over ``f x f`` blocks so the long side is at most ``size``; NaNs are ignored
    (a block with no finite pixel stays NaN). Edges are padded, not cropped."""
    ny, nx = image.shape
    f = max(1, math.ceil(max(ny, nx) / size))
    if f == 1:
        return image.astype(np.float32, copy=False)
    ny2, nx2 = math.ceil(ny / f) * f, math.ceil(nx / f) * f
    finite = np.isfinite(image)
    total = np.zeros((ny2, nx2), dtype=np.float32)
    total[:ny, :nx] = np.where(finite, image, 0)
    count = np.zeros((ny2, nx2), dtype=np.float32)
    count[:ny, :nx] = finite
    s = total.reshape(ny2 // f, f, nx2 // f, f).sum(axis=(1, 3))
    c = count.reshape(ny2 // f, f, nx2 // f, f).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / c, np.nan).astype(np.float32)


def display_limits(image: np.ndarray, stretch: str = "zscale") -> tuple[float, float]:
    from astropy.visualization import MinMaxInterval, PercentileInterval, ZScaleInterval

    if stretch not in STRETCHES:
        raise QuicklookError(f"unknown stretch {stretch!r}; choose one of {STRETCHES}")
    values = image[np.isfinite(image)]
    if values.size == 0:
        return 0.0, 1.0
    interval = {"zscale": ZScaleInterval(), "asinh": ZScaleInterval(),
                "minmax": MinMaxInterval(), "percentile": PercentileInterval(99.5)}[stretch]
    vmin, vmax = (float(v) for v in interval.get_limits(values))
    if not vmax > vmin:  # flat image: give the colour map some room
        vmin, vmax = vmin - 1.0, vmax + 1.0
    return vmin, vmax


# -- rendering ------------------------------------------------------------------------------

def _draw(ax: Any, thumb: np.ndarray, stretch: str, title: str, fontsize: float,
          note: str = "") -> tuple[float, float]:
    import matplotlib as mpl
    from astropy.visualization import AsinhStretch, ImageNormalize, LinearStretch

    vmin, vmax = display_limits(thumb, stretch)
    # clip=False: clipping inside the norm turns NaN into a valid value and would paint
    # masked pixels white; out-of-range values take the colour map's end colours instead.
    norm = ImageNormalize(vmin=vmin, vmax=vmax, clip=False,
                          stretch=AsinhStretch(0.1) if stretch == "asinh" else LinearStretch())
    gray = mpl.colormaps["gray"]
    cmap = gray.with_extremes(bad=_BAD_COLOR, under=gray(0.0), over=gray(1.0))
    ax.set_facecolor("black")
    ax.imshow(np.ma.masked_invalid(thumb), origin="lower", cmap=cmap, norm=norm,
              interpolation="nearest")
    ax.set_axis_off()
    box = {"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"}
    ax.text(0.01, 0.99, title, transform=ax.transAxes, va="top", ha="left", color="white",
            fontsize=fontsize, bbox=box, wrap=False, clip_on=True)
    if not np.isfinite(thumb).any():
        note = "no valid pixels"
    info = note or f"{stretch} [{vmin:.4g}, {vmax:.4g}]"
    ax.text(0.01, 0.01, info, transform=ax.transAxes, va="bottom", ha="left", color="white",
            fontsize=fontsize * 0.85, bbox=box, clip_on=True)
    return vmin, vmax


def _save(fig: Any, out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    # Write beside the target and rename: a UI polling the file never sees half a PNG.
    tmp = out_png.with_name(f".{out_png.name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, dpi=_DPI, format="png", facecolor="black")
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)


def _png_shape(ny: int, nx: int, size: int) -> tuple[int, int]:
    if nx >= ny:
        return size, max(1, round(size * ny / nx))
    return max(1, round(size * nx / ny)), size


def make_quicklook(
    data_or_path: Any,
    out_png: str | os.PathLike[str],
    *,
    title: str | None = None,
    size: int = 512,
    stretch: str = "zscale",
    dq: np.ndarray | None = None,
) -> Quicklook:
    """Write a PNG preview of a raw ramp, image or cube; the long side is ``size`` pixels."""
    from matplotlib.figure import Figure

    if size < 16:
        raise QuicklookError(f"size must be at least 16 pixels, got {size}")
    if stretch not in STRETCHES:
        raise QuicklookError(f"unknown stretch {stretch!r}; choose one of {STRETCHES}")
    prev = load_preview(data_or_path, dq=dq)
    thumb = block_average(prev.image, size)
    width, height = _png_shape(*prev.image.shape, size)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    text = title if title is not None else prev.default_title()
    vmin, vmax = _draw(ax, thumb, stretch, text, fontsize=max(5.0, 8.0 * size / 512))
    out = Path(out_png)
    _save(fig, out)
    log.info("quicklook %s -> %s (%s %s)", prev.name or prev.kind, out, prev.kind, prev.shape)
    return Quicklook(out, prev.kind, prev.shape, vmin, vmax, text, (width, height))


def make_thumbnail_pair(
    raw: Any,
    reduced: Any,
    out_png: str | os.PathLike[str],
    *,
    size: int = 512,
    stretch: str = "zscale",
    titles: Sequence[str] | None = None,
) -> Path:
    """Raw (left) and reduced (right) side by side, each in a ``size`` x ``size`` panel."""
    from matplotlib.figure import Figure

    previews = [load_preview(raw), load_preview(reduced)]
    fig = Figure(figsize=(2 * size / _DPI, size / _DPI), dpi=_DPI)
    for i, prev in enumerate(previews):
        ax = fig.add_axes((0.5 * i, 0, 0.5, 1))
        text = titles[i] if titles else prev.default_title()
        _draw(ax, block_average(prev.image, size), stretch, text, fontsize=max(5.0, 8.0 * size / 512))
    out = Path(out_png)
    _save(fig, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_tasks.quicklook",
                                     description="PNG quicklook of an IRIS FITS file (two files: side by side)")
    parser.add_argument("inputs", nargs="+", type=Path, help="FITS file, or raw and reduced")
    parser.add_argument("-o", "--output", type=Path, help="PNG (default: <input stem>_ql.png)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--stretch", choices=STRETCHES, default="zscale")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    if len(args.inputs) > 2:
        parser.error("give one file, or two (raw and reduced)")
    out = args.output or args.inputs[-1].with_name(args.inputs[-1].stem + "_ql.png")
    try:
        if len(args.inputs) == 2:
            make_thumbnail_pair(*args.inputs, out, size=args.size, stretch=args.stretch)
        else:
            make_quicklook(args.inputs[0], out, size=args.size, stretch=args.stretch, title=args.title)
    except QuicklookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
