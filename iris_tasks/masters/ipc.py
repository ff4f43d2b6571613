"""IPC reference: the 3x3 inter-pixel capacitance kernel of a detector -> ``ipc``.

Two sources:

* :func:`build_ipc` measures the kernel on rate images (``_rate``) that hold isolated
  single-pixel sources: the hot pixels of darks (their charge is collected in one pixel, so
  what their neighbours show above the local background is the coupling), or a laboratory
  frame of single-pixel illumination. Each source gives the 3x3 cut-out above the
  background of the 16 pixels around it (a 5x5 ring); the kernel is the sum of the cut-outs
  over the sum of their totals (the sources weighted by their charge, which is right when the
  background noise dominates), its uncertainty from the scatter of the per-source kernels.
  Not assumed symmetric: the horizontal and vertical couplings of an H4RG differ, and the
  kernel keeps whatever asymmetry the data show.
* :func:`ipc_reference` writes a kernel measured elsewhere (acceptance tests: Fe-55 or
  single-pixel-reset data), with its source in DESCRIP and PEDIGREE.

Convention (the readout step's, :func:`iris_tasks.steps.readout.check_ipc_kernel`):
``data[1 + dy, 1 + dx]`` is the fraction of a pixel's charge that its neighbour at row offset
dy and column offset dx shows; the kernel sums to 1.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..datamodels import ImageModel, IpcModel
from ..datamodels.dqflags import pixel
from ..steps.readout import check_ipc_kernel
from .common import MasterBuildError, save_master

log = logging.getLogger(__name__)

__all__ = [
    "IpcMeasurement",
    "MasterIpc",
    "build_ipc",
    "ipc_filename",
    "ipc_reference",
    "measure_ipc",
    "save_ipc",
]

# Pixels whose rate does not describe their charge (the 5x5 cut-out of a source must be free
# of them). HOT is not among them: hot pixels are the sources.
IPC_SKIP_FLAGS: int = (
    pixel["DO_NOT_USE"]
    | pixel["SATURATED"]
    | pixel["JUMP_DET"]
    | pixel["REFERENCE_PIXEL"]
    | pixel["DEAD"]
    | pixel["NO_GAIN_VALUE"]
)


@dataclass
class IpcMeasurement:
    """Kernel (3x3, sum 1), its 1-sigma error, the number of sources and their kernels."""

    kernel: np.ndarray
    err: np.ndarray
    nsources: int
    per_source: np.ndarray = field(repr=False)


@dataclass
class MasterIpc:
    """A built ipc reference and its QA numbers."""

    model: IpcModel
    qa: dict[str, float] = field(default_factory=dict)


def _sources(
    rate: np.ndarray, dq: np.ndarray, border: int, nsigma: float, max_neighbour: float
) -> np.ndarray:
    """(n, 3, 3) background-subtracted cut-outs of the isolated single-pixel sources."""
    from scipy import ndimage

    ny, nx = rate.shape
    bad = ~np.isfinite(rate) | ((dq & np.uint32(IPC_SKIP_FLAGS)) != 0)
    r = np.where(bad, 0.0, rate).astype(np.float64)
    good = r[~bad]
    if good.size < 100:
        return np.zeros((0, 3, 3))
    med = float(np.median(good))
    sigma = 1.4826 * float(np.median(np.abs(good - med)))
    if not sigma > 0:
        return np.zeros((0, 3, 3))
    peak = (r - med > nsigma * sigma) & ~bad
    peak &= r == ndimage.maximum_filter(r, size=3, mode="constant")
    m = border + 2
    peak[:m] = peak[-m:] = False
    peak[:, :m] = peak[:, -m:] = False
    ys, xs = np.nonzero(peak)
    if ys.size == 0:
        return np.zeros((0, 3, 3))
    off = np.arange(-2, 3)
    cut = r[ys[:, None, None] + off[None, :, None], xs[:, None, None] + off[None, None, :]]
    cbad = bad[ys[:, None, None] + off[None, :, None], xs[:, None, None] + off[None, None, :]]
    ring = np.ones((5, 5), bool)
    ring[1:4, 1:4] = False
    bg = np.median(cut[:, ring], axis=1)
    c = cut - bg[:, None, None]
    centre = c[:, 2, 2]
    inner = c[:, 1:4, 1:4].copy()
    inner[:, 1, 1] = -np.inf
    ok = ~cbad.any(axis=(1, 2))
    # isolated: no neighbour holds more than max_neighbour of the centre (a source spread
    # over two pixels, or two sources side by side, would), and nothing in the ring stands
    # out (another source next to it)
    ok &= inner.max(axis=(1, 2)) < max_neighbour * centre
    ok &= np.abs(c[:, ring]).max(axis=1) < nsigma * sigma + max_neighbour * centre
    ok &= centre > nsigma * sigma
    return c[ok, 1:4, 1:4]


def measure_ipc(
    rates: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    border: int = 4,
    nsigma: float = 20.0,
    max_neighbour: float = 0.15,
    min_sources: int = 20,
) -> IpcMeasurement:
    """The IPC kernel from ``(rate, dq)`` images holding isolated single-pixel sources.

    A source is a local maximum more than ``nsigma`` robust sigma above the image median
    (20: a lower threshold adds faint sources that hardly improve the error, and whose
    selection on an upward fluctuation of the centre biases the couplings low),
    whose 5x5 cut-out has no flagged pixel, no neighbour above ``max_neighbour`` of its
    centre (IPC is a few per cent; a real star or a two-pixel event is not a point source)
    and nothing else standing out in the outer ring. ValueError when fewer than
    ``min_sources`` are found.
    """
    cuts = [
        _sources(np.asarray(r), np.asarray(d, np.uint32), border, nsigma, max_neighbour)
        for r, d in rates
    ]
    c = np.concatenate(cuts) if cuts else np.zeros((0, 3, 3))
    n = len(c)
    if n < min_sources:
        raise ValueError(
            f"{n} isolated single-pixel sources found (at least {min_sources} "
            f"needed above {nsigma:g} sigma): not enough to measure the IPC kernel"
        )
    tot = c.sum(axis=(1, 2))
    keep = tot > 0
    c, tot = c[keep], tot[keep]
    kernel = c.sum(axis=0) / tot.sum()
    per = c / tot[:, None, None]
    # error of the ratio of sums, from the spread of the per-source kernels about it,
    # each source weighted by its total (delta method)
    w = tot / tot.sum()
    resid = per - kernel[None]
    err = np.sqrt((w[:, None, None] ** 2 * resid**2).sum(axis=0) * len(c) / max(len(c) - 1, 1))
    return IpcMeasurement(kernel=kernel, err=err, nsources=int(len(c)), per_source=per)


def _fill(
    ref: IpcModel,
    kernel: np.ndarray,
    err: np.ndarray | None,
    *,
    detector: str,
    useafter: str,
    pedigree: str,
    description: str,
    author: str,
    method: str,
    det_id: str | None = None,
    nsources: int | None = None,
) -> None:
    ref.data = kernel.astype(np.float32)
    ref.err = (np.zeros((3, 3)) if err is None else err).astype(np.float32)
    meta = ref.meta
    meta.instrument.name = "IRIS"
    meta.instrument.detector = detector
    if det_id:
        meta.instrument.det_id = det_id
    meta.reftype = "IPC"
    meta.useafter = useafter
    meta.pedigree = pedigree
    meta.description = description
    meta.author = author
    meta.ipc.method = method
    if nsources is not None:
        meta.ipc.nsources = int(nsources)
    meta.ipc.alpha_x = round(float(kernel[1, 0] + kernel[1, 2]) / 2, 6)
    meta.ipc.alpha_y = round(float(kernel[0, 1] + kernel[2, 1]) / 2, 6)


def ipc_reference(
    kernel,
    *,
    detector: str,
    useafter: str,
    source: str,
    pedigree: str = "GROUND",
    err=None,
    det_id: str | None = None,
    author: str = "iris_tasks.masters",
) -> IpcModel:
    """An ``ipc`` reference holding a kernel measured elsewhere (``source``: where it comes
    from, e.g. the detector's acceptance-test report; it goes into DESCRIP). The kernel is
    checked (3x3, sum 1, centre above the neighbours: :func:`check_ipc_kernel`)."""
    k = check_ipc_kernel(kernel, f"IPC kernel for {detector} ({source})")
    if not source:
        raise ValueError("ipc_reference: say where the kernel comes from (source=)")
    ref = IpcModel()
    _fill(
        ref,
        k / k.sum(),
        None if err is None else np.asarray(err, np.float64),
        detector=detector,
        useafter=useafter,
        pedigree=pedigree,
        description=f"IPC kernel of {detector}: {source}",
        author=author,
        method="GIVEN",
        det_id=det_id,
    )
    return ref


def build_ipc(
    frames: Sequence[str | os.PathLike | ImageModel],
    *,
    useafter: str | None = None,
    nsigma: float = 20.0,
    max_neighbour: float = 0.15,
    min_sources: int = 20,
    author: str = "iris_tasks.masters",
) -> MasterIpc:
    """The ``ipc`` reference of one detector from rate images (paths or models) with
    isolated single-pixel sources: hot pixels of darks, or single-pixel illumination.

    All frames must be of one DETECTOR. USEAFTER: ``useafter``, else the first frame's
    exposure start. MasterBuildError names the file and the problem (mixed detectors, not a
    rate image, too few sources).
    """
    if not frames:
        raise MasterBuildError("build_ipc: no frames given")
    pairs, labels, detectors, first = [], [], set(), None
    for f in frames:
        owned = not isinstance(f, ImageModel)
        label = os.path.basename(str(f)) if owned else (f.meta.filename or "frame")
        try:
            model = ImageModel(os.fspath(f)) if owned else f
        except Exception as exc:
            raise MasterBuildError(f"{label}: cannot be read as a rate image ({exc})") from exc
        try:
            if (
                model.meta.cal_step.readout != "COMPLETE"
                or model.data is None
                or model.data.ndim != 2
            ):
                raise MasterBuildError(
                    f"{label}: not a rate image (S_READOU="
                    f"{model.meta.cal_step.readout}); build_ipc measures _rate "
                    "frames"
                )
            detectors.add(str(model.meta.instrument.detector))
            if first is None:
                obs = model.meta.observation
                first = (
                    str(model.meta.instrument.detector),
                    model.meta.instrument.det_id,
                    f"{obs.date}T{str(obs.time or '00:00:00')[:8]}",
                    str(obs.date),
                )
            dq = model.dq if model.dq is not None else np.zeros(model.data.shape, np.uint32)
            pairs.append((np.array(model.data, np.float32), np.array(dq, np.uint32)))
            labels.append(label)
        finally:
            if owned:
                model.close()
    if len(detectors) > 1:
        raise MasterBuildError(
            f"build_ipc: frames of several detectors ({', '.join(sorted(detectors))}): "
            f"{', '.join(labels)}"
        )
    try:
        m = measure_ipc(pairs, nsigma=nsigma, max_neighbour=max_neighbour, min_sources=min_sources)
    except ValueError as exc:
        raise MasterBuildError(f"{', '.join(labels)}: {exc}") from None
    try:
        k = check_ipc_kernel(m.kernel, f"IPC kernel measured on {', '.join(labels)}")
    except ValueError as exc:
        raise MasterBuildError(str(exc)) from None
    detector, det_id, start, date = first
    ref = IpcModel()
    _fill(
        ref,
        k,
        m.err,
        detector=detector,
        det_id=det_id,
        useafter=useafter or start,
        pedigree=f"INFLIGHT {date} {date}",
        description=f"IPC kernel of {detector} from {m.nsources} isolated single-pixel sources "
        f"in {len(labels)} frame(s)",
        author=author,
        method="POINTS",
        nsources=m.nsources,
    )
    ref.meta.provenance.parents = ",".join(labels)[:68]
    qa = {
        "nsources": float(m.nsources),
        "alpha_x": ref.meta.ipc.alpha_x,
        "alpha_y": ref.meta.ipc.alpha_y,
        "alpha_err": float(math.hypot(m.err[1, 0], m.err[1, 2]) / 2),
    }
    log.info(
        "IPC kernel of %s from %d sources: alpha_x %.5f, alpha_y %.5f",
        detector,
        m.nsources,
        qa["alpha_x"],
        qa["alpha_y"],
    )
    return MasterIpc(model=ref, qa=qa)


def ipc_filename(master: MasterIpc | IpcModel) -> str:
    """``iris_<detector>_<useafter>_ipc.fits``."""
    m = (master.model if isinstance(master, MasterIpc) else master).meta
    when = str(m.useafter or "unknown").replace("-", "").replace(":", "")
    return f"iris_{m.instrument.detector}_{when}_ipc.fits".lower()


def save_ipc(master: MasterIpc | IpcModel, out_dir: str | os.PathLike) -> Path:
    model = master.model if isinstance(master, MasterIpc) else master
    return save_master(model, out_dir, ipc_filename(master))
