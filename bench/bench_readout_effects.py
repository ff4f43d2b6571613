"""What the readout's detector-effect corrections gain, on the simulator's frames (accuracy,
not speed; prints tables, asserts nothing).

    .venv/bin/python bench/bench_readout_effects.py            # refpix, flicker, snowballs
    .venv/bin/python bench/bench_readout_effects.py refpix     # or: flicker, snowballs,
                                                               # frame, common, ipc

* refpix: bad reference pixels (hot, dead, noisy; a fraction of the border, half of them in
  the mask reference): slope / truth and pulls of clean pixels for the plain correction,
  the mask alone, the outlier test alone and both.
* flicker: 1/f and alternating column noise left in an imager slope image, before and after
  ``clean_flicker``, on held-out background pixels against the same frame without them;
  star aperture fluxes.
* snowballs: pulls of the pixels in snowball halos with the two-point test alone and with
  ``expand_snowballs``.
* frame: the picture-frame effect (edge pattern with a drift or a per-read jitter): slope
  residual by distance from the edge after the reference pixels, ``clean_flicker`` and
  ``correct_picture_frame`` (the readout step's ``picture_frame``).
* frame-cost: ``correct_picture_frame``'s time at 4096^2 (scale fitted and given) against a
  same-run numpy copy of a 4096^2 x 10 uint16 ramp, with the machine reference.
* ipc: the ipc reference builder on simulated darks with an asymmetric kernel.
* common: noise common to all output channels at the pixel rate: stripe power and the
  power common to the channels at the same read position, before and after
  ``clean_flicker``.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import numpy as np

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from iris_tasks.simulate import detector as sim
from iris_tasks.steps import readout as ro


def _kw(det: sim.DetectorModel, nch: int) -> dict:
    coef, _ = det.linearity_coefficients()
    return dict(gain=det.gain, read_noise=det.read_noise, saturation=det.saturation_reference(),
                nonlinearity=coef, refpix_channels=nch, dqflags=DQ)


def bench_refpix(size: int = 256, nch: int = 32) -> None:
    print(f"bad reference pixels: {size}^2, {nch} channels ({size // nch}-column), 10 reads, "
          "100 e-/s, all noise incl. 1/f, no cosmic rays")
    print(f"  {'border bad':>10s} {'method':18s} {'slope/truth':>11s} {'pull mean':>9s} "
          f"{'pull rms':>8s} {'left out':>8s} {'found':>6s}")
    for frac in (0.0, 0.01, 0.03, 0.05):
        det = sim.DetectorModel.for_detector("IMG1", size=size, seed=3, nchan=nch,
                                             bad_refpix_fraction=frac)
        reads, truth = sim.simulate_ramp(det, 100.0, nreads=10, rng=7, cosmic_rays=False)
        true = truth["rate_e_per_s"] / det.gain
        clean = det.active & ~det.hot & ~det.dead & ~det.low_qe
        for label, kw in (("plain (before)", dict(refpix_reject=None)),
                          ("mask only", dict(refpix_reject=None,
                                             refpix_mask=det.bad_refpix_mask())),
                          ("outlier test only", {}),
                          ("mask + test", dict(refpix_mask=det.bad_refpix_mask()))):
            res = rc.process_ramp(reads, truth["read_times"], **_kw(det, nch), **kw)
            ok = clean & ((res.dq & (DQ["DO_NOT_USE"] | DQ["JUMP_DET"] | DQ["SATURATED"])) == 0)
            pull = (res.slope - true)[ok] / res.err[ok]
            print(f"  {100 * frac:9.0f}% {label:18s} {res.slope[ok].mean() / true[ok].mean():11.4f} "
                  f"{pull.mean():+9.3f} {pull.std():8.3f} {len(res.refpix.excluded[0]):8d} "
                  f"{res.refpix.rejected:6d}")


def _scene(n: int, rng: np.random.Generator, nstar: int = 40, sky: float = 5.0):
    yy, xx = np.mgrid[:n, :n]
    img = np.full((n, n), sky)
    stars = []
    for _ in range(nstar):
        y0, x0 = rng.uniform(12, n - 12, 2)
        f = 10 ** rng.uniform(2.5, 4.5)
        img += f / (2 * np.pi * 1.5**2) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 4.5)
        stars.append((y0, x0))
    return img.astype(np.float32), stars


def _means(x: np.ndarray, use: np.ndarray, nch: int, cols: slice = slice(None)) -> tuple:
    ny, nx = x.shape
    chw = nx // nch
    u = use.reshape(ny, nch, chw)[:, :, cols]
    n = u.sum(axis=2)
    m = np.where(use, x, 0).reshape(ny, nch, chw)[:, :, cols].sum(axis=2) / np.maximum(n, 1)
    return m, n


def _powers(resid: np.ndarray, err: np.ndarray, use: np.ndarray, nch: int) -> tuple[float, float]:
    """(row stripe power, ACN power), each over its white-noise expectation."""
    m, n = _means(resid, use, nch)
    w, _ = _means(err**2, use, nch)
    ok = n >= 8
    m = m - np.array([m[ok[:, c], c].mean() for c in range(nch)])
    stripe = (m[ok] ** 2).mean() / (w[ok] / n[ok]).mean()
    me, ne = _means(resid, use, nch, slice(0, None, 2))
    mo, no = _means(resid, use, nch, slice(1, None, 2))
    we, _ = _means(err**2, use, nch, slice(0, None, 2))
    wo, _ = _means(err**2, use, nch, slice(1, None, 2))
    ok = (ne >= 4) & (no >= 4)
    acn = ((me - mo)[ok] ** 2).mean() / (we[ok] / ne[ok] + wo[ok] / no[ok]).mean()
    return stripe, acn


def _aperture(img: np.ndarray, stars: list, r: float = 5.0) -> np.ndarray:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([np.where((yy - y) ** 2 + (xx - x) ** 2 <= r * r, img, 0).sum()
                     for y, x in stars])


def bench_flicker(size: int = 512, nch: int = 8, onef: float = 2.0, acn: float = 1.0,
                  seeds: tuple[int, ...] = (1, 2, 3)) -> None:
    print(f"1/f and ACN: {size}^2, {nch} channels ({size // nch}-column), 10 reads, sky 5 e-/s "
          f"+ 40 stars, 1/f {onef} DN and ACN {acn} DN rms per read; powers over the white "
          "expectation on held-out background pixels (half, not used by the cleaning)")
    print(f"  {'seed':>4s} {'frame':8s} {'rows':>10s} {'stripes':>14s} {'ACN':>14s} "
          f"{'star flux change':>17s} {'star err vs truth':>18s}")
    held_flag = DQ["OTHER_BAD_PIXEL"]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        img, stars = _scene(size, rng)
        det = sim.DetectorModel.for_detector("IMG1", size=size, seed=2, nchan=nch, acn_rms=acn,
                                             onef_rms=onef)
        held = np.random.default_rng(11).random(det.shape) < 0.5
        for label, noise in (("white", ["poisson", "read", "ktc"]), ("1/f+ACN", True)):
            reads, truth = sim.simulate_ramp(det, img, nreads=10, noise=noise, rng=5 + seed,
                                             cosmic_rays=False)
            true = truth["rate_e_per_s"] / det.gain
            res = rc.process_ramp(reads, truth["read_times"], **_kw(det, nch))
            use = ((img < 5.5) & det.active & ~det.hot & ~det.dead & ~det.low_qe & held
                   & ((res.dq & DQ["DO_NOT_USE"]) == 0))
            # what the side reference columns (11-row running mean) remove: without them
            nos = rc.process_ramp(reads, truth["read_times"], **_kw(det, nch), refpix_smooth=0)
            s_n, a_n = _powers(nos.slope - true, nos.err, use, nch)
            print(f"  {seed:4d} {label:8s} {'no sides':>10s} {s_n:6.2f}          {a_n:6.2f}"
                  "          (top/bottom channel offsets only)")
            for rows in (64, 256, 4 * size):
                cleaned = res.slope.copy()
                ro.clean_flicker(cleaned, res.err, res.dq | np.where(held, held_flag, 0).astype(
                    np.uint32), channels=nch, smooth_rows=rows,
                    skip_flags=ro.FLICKER_SKIP_FLAGS | held_flag)
                s0, a0 = _powers(res.slope - true, res.err, use, nch)
                s1, a1 = _powers(cleaned - true, res.err, use, nch)
                err_ap = np.sqrt(_aperture(res.err**2, stars))
                at = _aperture(true, stars)
                f0, f1 = _aperture(res.slope, stars), _aperture(cleaned, stars)
                ch = (f1 - f0) / err_ap
                print(f"  {seed:4d} {label:8s} {rows:10d} {s0:6.2f} -> {s1:5.2f} {a0:6.2f} -> "
                      f"{a1:5.2f} {ch.mean():+8.2f} +- {ch.std() / np.sqrt(len(ch)):4.2f} "
                      f"{np.std((f0 - at) / err_ap):8.2f} -> {np.std((f1 - at) / err_ap):5.2f}")


def bench_snowballs(size: int = 256, nch: int = 8, rate: float = 8.0) -> None:
    print(f"snowballs: {size}^2, {nch} channels, 10 reads, 20 e-/s, white noise, "
          f"{rate} snowballs / cm^2 / s, no other cosmic rays")
    for seed in (8, 9, 10):
        det = sim.DetectorModel.for_detector("IMG1", size=size, seed=3, nchan=nch,
                                             snowball_rate=rate, cr_rate=0.0)
        reads, truth = sim.simulate_ramp(det, 20.0, nreads=10, noise=["poisson", "read", "ktc"],
                                         rng=seed, cosmic_rays=True)
        maps = ro.detector_maps(gain=det.gain, read_noise=det.read_noise,
                                saturation=det.saturation_reference(),
                                nonlinearity=det.linearity_coefficients()[0])
        res = ro.process(reads, truth["read_times"], maps, mode="utr", channels=nch)
        true = truth["rate_e_per_s"] / det.gain
        sb = truth["snowballs"]
        yy, xx = np.mgrid[:size, :size]
        core = np.zeros(det.shape, bool)
        halo = np.zeros(det.shape, bool)
        for y, x, r in zip(sb["y"], sb["x"], sb["radius"], strict=True):
            d = np.hypot(yy + 0.5 - y, xx + 0.5 - x)
            core |= d <= r
            halo |= (d > r) & (d <= 2 * r + 3)
        halo &= ~core & det.active & ~det.hot & ~det.dead & ~det.low_qe
        after = copy.deepcopy(res)
        ev = ro.expand_snowballs(reads, truth["read_times"], after, maps, channels=nch)
        for label, r in (("two-point test", res), ("+ expand_snowballs", after)):
            ok = halo & ((r.dq & DQ["DO_NOT_USE"]) == 0)
            z = (r.slope - true)[ok] / r.err[ok]
            print(f"  seed {seed} ({len(sb['y'])} snowballs, {len(ev.y)} found) {label:19s} "
                  f"halo pixels {ok.sum():5d}: pull mean {z.mean():+.2f}, > 3 sigma "
                  f"{100 * np.mean(z > 3):4.1f} %, JUMP_DET {100 * np.mean(r.dq[ok] & DQ['JUMP_DET'] > 0):3.0f} %, "
                  f"median err {np.median(r.err[ok]):.3f} DN/s")


def _edge_bins(n: int) -> list[tuple[str, np.ndarray]]:
    y = np.arange(n)
    d = np.minimum.outer(np.minimum(y, n - 1 - y), np.minimum(y, n - 1 - y))
    edges = (4, 8, 16, 32, 64, n)
    return [(f"{a}-{b}" if b < n else f">={a}", (d >= a) & (d < b))
            for a, b in zip(edges[:-1], edges[1:], strict=True) if a < n // 2]


def bench_frame(size: int = 256, nch: int = 8, rms: float = 2.0, drift: float = 0.2,
                scale: float = 16.0, seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> None:
    """Picture frame: slope residual against the truth by distance from the edge."""
    print(f"picture frame: {size}^2, {nch} channels, 10 x 1.4 s reads, sky 5 e-/s, white noise; "
          f"edge pattern exp(-d / {scale:g} px) with a drift of {drift:g} DN/s over the ramp, or "
          f"a jitter of {rms:g} DN rms per read; mean slope - truth (DN/s) over clean pixels "
          f"by distance d from the edge (px): mean over {len(seeds)} frames and, in brackets, "
          "the rms of the frames' values (frame-to-frame scatter of that region's mean)")
    bins = _edge_bins(size)
    print(f"  {'frame':12s} {'correction':22s} " + " ".join(f"{b:>15s}" for b, _ in bins))
    rows: dict[tuple[str, str], list[list[float]]] = {}
    fits: dict[str, list[tuple[float, float, float]]] = {}
    for seed in seeds:
        for label, kw in (("white", {}),
                          ("drift", dict(picture_frame_drift=drift, picture_frame_scale=scale)),
                          ("jitter", dict(picture_frame_rms=rms, picture_frame_scale=scale))):
            det = sim.DetectorModel.for_detector("IMG1", size=size, seed=2, nchan=nch, **kw)
            reads, truth = sim.simulate_ramp(det, 5.0, nreads=10, rng=20 + seed,
                                             noise=["poisson", "read", "ktc"], cosmic_rays=False)
            true = truth["rate_e_per_s"] / det.gain
            clean = det.active & ~det.hot & ~det.dead & ~det.low_qe
            res = rc.process_ramp(reads, truth["read_times"], **_kw(det, nch))
            nos = rc.process_ramp(reads, truth["read_times"], **_kw(det, nch), refpix_smooth=0)
            cleaned = res.slope.copy()
            ro.clean_flicker(cleaned, res.err, res.dq, channels=nch)
            framed = res.slope.copy()
            pf = ro.correct_picture_frame(framed, res.dq, channels=nch,
                                          excluded=res.refpix.excluded)
            fits.setdefault(label, []).append((pf.amplitude, pf.amplitude_err, pf.scale))
            for corr, slope in (("refpix (default)", res.slope),
                                ("refpix, no side cols", nos.slope),
                                ("+ clean_flicker", cleaned),
                                ("+ picture frame", framed)):
                ok = clean & np.isfinite(slope)
                rows.setdefault((label, corr), []).append(
                    [float((slope - true)[ok & m].mean()) for _, m in bins])
    for (label, corr), v in rows.items():
        a = np.asarray(v)
        cells = [f"{m:+7.3f} ({e:5.3f})" for m, e in
                 zip(a.mean(axis=0), np.sqrt((a**2).mean(axis=0)), strict=True)]
        print(f"  {label:12s} {corr:22s} " + " ".join(cells))
    print("  picture-frame correction (the readout step's picture_frame option): fitted edge "
          "amplitude A +- its error (DN/s) and scale (px) per frame")
    for label, v in fits.items():
        print(f"  {label:12s} " + "  ".join(f"{a:+.3f}+-{e:.3f} s={sc:.1f}" for a, e, sc in v))


def bench_frame_cost(size: int = 4096, nch: int = 32, repeat: int = 3) -> None:
    """CPU and wall time of correct_picture_frame on a size^2 slope image."""
    import os
    import sys
    import time

    sys.path.insert(0, os.path.dirname(__file__))
    from stack_cpu import format_reference, machine_reference

    print(f"picture-frame correction cost: {size}^2 float32 slopes, {nch} channels; best of "
          f"{repeat}; load {os.getloadavg()[0]:.1f}; {format_reference(machine_reference(0.5))}")
    rng = np.random.default_rng(1)
    slope = (5.0 + rng.standard_normal((size, size), dtype=np.float32)).astype(np.float32)
    dq = np.zeros((size, size), np.uint32)
    ramp = np.ones((10, size, size), np.uint16)
    dst = np.empty_like(ramp)

    def best(fn) -> tuple[float, float]:
        out = []
        for _ in range(repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            out.append((time.perf_counter() - w0, time.process_time() - c0))
        return min(out)

    copy_w, copy_c = best(lambda: np.copyto(dst, ramp))
    print(f"  numpy copy of the 10-read ramp    {copy_w:6.3f} s wall {copy_c:6.3f} s CPU")
    for label, kw in (("scale fitted (7-scale grid)", {}), ("scale given", dict(scale=16.0))):
        w, c = best(lambda kw=kw: ro.correct_picture_frame(slope.copy(), dq, channels=nch, **kw))
        print(f"  {label:33s} {w:6.3f} s wall {c:6.3f} s CPU = {c / copy_c:4.2f}x the copy "
              "(CPU; includes a 64 MB slope copy)")


def _common_power(resid: np.ndarray, err: np.ndarray, use: np.ndarray, nch: int,
                  pos: np.ndarray) -> float:
    """Mean square of the residual averaged over the channels at the same (row, position in
    the read order), over its white-noise expectation: what is common to all channels at the
    same time, after each (row, channel)'s mean is removed."""
    ny, nx = resid.shape
    chw = nx // nch
    x = np.where(use, resid, 0.0).reshape(ny, nch, chw)
    u = use.reshape(ny, nch, chw).astype(np.float64)
    # remove each (row, channel)'s mean (the stripes, measured separately)
    n_rc = np.maximum(u.sum(axis=2, keepdims=True), 1)
    x = (x - x.sum(axis=2, keepdims=True) / n_rc) * u
    w = np.where(use, err**2, 0.0).reshape(ny, nch, chw)
    order = pos.reshape(nch, chw)
    xs = np.take_along_axis(x, order[None].argsort(axis=2).repeat(ny, 0), axis=2)
    us = np.take_along_axis(u, order[None].argsort(axis=2).repeat(ny, 0), axis=2)
    ws = np.take_along_axis(w, order[None].argsort(axis=2).repeat(ny, 0), axis=2)
    n = us.sum(axis=1)
    ok = n >= nch // 2
    m = xs.sum(axis=1)[ok] / n[ok]
    return float((m**2).mean() / (ws.sum(axis=1)[ok] / n[ok] ** 2).mean())


def bench_common(size: int = 256, nch: int = 8, rms: float = 2.0,
                 seeds: tuple[int, ...] = (1, 2, 3)) -> None:
    """Correlated noise between channels at the pixel rate: stripe power and the power common
    to all channels at the same pixel time, on held-out background pixels."""
    print(f"correlated noise between channels: {size}^2, {nch} channels ({size // nch}-column), "
          f"10 reads, sky 5 e-/s + 40 stars; common 1/f at the pixel rate {rms:g} DN rms per "
          "read (12 overhead pixel times per row); powers over the white expectation on "
          "held-out background pixels (stripes: per (row, channel); common: the mean over "
          "the channels at the same row and read position, each (row, channel) mean removed)")
    print(f"  {'seed':>4s} {'frame':10s} {'stripes':>16s} {'common':>16s}")
    held_flag = DQ["OTHER_BAD_PIXEL"]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        img, _ = _scene(size, rng)
        held = np.random.default_rng(11).random((size, size)) < 0.5
        for label, kw, noise in (("white", {}, ["poisson", "read", "ktc"]),
                                 ("common", dict(common_noise_rms=rms, onef_rms=0.0), True),
                                 ("1/f (4/row)", dict(onef_rms=rms), True)):
            det = sim.DetectorModel.for_detector("IMG1", size=size, seed=2, nchan=nch, **kw)
            reads, truth = sim.simulate_ramp(det, img, nreads=10, noise=noise, rng=5 + seed,
                                             cosmic_rays=False)
            true = truth["rate_e_per_s"] / det.gain
            res = rc.process_ramp(reads, truth["read_times"], **_kw(det, nch))
            use = ((img < 5.5) & det.active & ~det.hot & ~det.dead & ~det.low_qe & held
                   & ((res.dq & DQ["DO_NOT_USE"]) == 0))
            cleaned = res.slope.copy()
            ro.clean_flicker(cleaned, res.err, res.dq | np.where(held, held_flag, 0).astype(
                np.uint32), channels=nch, skip_flags=ro.FLICKER_SKIP_FLAGS | held_flag)
            # each column's position in its channel's read order (odd channels right to left)
            col = np.arange(size)
            chw = size // nch
            ch = col // chw
            pos = np.where(ch % 2 == 1, chw - 1 - (col - ch * chw), col - ch * chw)
            s0, _ = _powers(res.slope - true, res.err, use, nch)
            s1, _ = _powers(cleaned - true, res.err, use, nch)
            c0 = _common_power(res.slope - true, res.err, use, nch, pos)
            c1 = _common_power(cleaned - true, res.err, use, nch, pos)
            print(f"  {seed:4d} {label:10s} {s0:6.2f} -> {s1:6.2f} {c0:6.2f} -> {c1:6.2f}")


# an H4RG-like asymmetric kernel (= tests/test_readout_ipc.py's KASYM)
KASYM = np.array([[0.0015, 0.0140, 0.0005],
                  [0.0230, 0.0000, 0.0170],
                  [0.0005, 0.0120, 0.0015]])
KASYM[1, 1] = 1.0 - KASYM.sum()


def bench_ipc(size: int = 1024, nframes: int = 3) -> None:
    """The ipc builder on simulated darks (hot pixels as the sources)."""
    from iris_tasks.datamodels import ImageModel
    from iris_tasks.masters.ipc import build_ipc

    print(f"IPC kernel from darks: {nframes} darks of {size}^2, 10 x 10 s reads, all noise and "
          "cosmic rays, an asymmetric kernel; build_ipc on their rate images")
    det = sim.DetectorModel.for_detector("IMG1", size=size, seed=4, nchan=32, ipc_kernel=KASYM)
    maps = ro.detector_maps(gain=det.gain, read_noise=det.read_noise,
                            saturation=det.saturation_reference(),
                            nonlinearity=det.linearity_coefficients()[0])
    frames = []
    for i in range(nframes):
        reads, truth = sim.simulate_ramp(det, None, nreads=10, read_time=10.0, rng=i)
        res = ro.process(reads, truth["read_times"], maps, mode="utr", channels=32)
        m = ImageModel(data=res.slope, err=res.err, dq=res.dq)
        m.meta.cal_step.readout = "COMPLETE"
        m.meta.instrument.detector = "IMG1"
        m.meta.observation.date, m.meta.observation.time = "2026-12-07", "03:00:00"
        frames.append(m)
    master = build_ipc(frames)
    k, e = master.model.data, master.model.err
    print(f"  sources {master.model.meta.ipc.nsources}")
    for name, (i, j) in (("up", (0, 1)), ("left", (1, 0)), ("right", (1, 2)), ("down", (2, 1)),
                         ("centre", (1, 1))):
        print(f"  {name:7s} measured {k[i, j]:.5f} +- {e[i, j]:.5f}  truth {KASYM[i, j]:.5f}  "
              f"pull {(k[i, j] - KASYM[i, j]) / max(e[i, j], 1e-12):+.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", nargs="*", default=["refpix", "flicker", "snowballs"])
    ap.add_argument("--onef", type=float, default=2.0, help="flicker: 1/f DN rms per read")
    ap.add_argument("--acn", type=float, default=1.0, help="flicker: ACN DN rms per read")
    ap.add_argument("--frame-rms", type=float, default=2.0,
                    help="frame: picture-frame amplitude, DN rms per read")
    ap.add_argument("--frame-drift", type=float, default=0.2,
                    help="frame: picture-frame drift, DN/s")
    ap.add_argument("--frame-scale", type=float, default=16.0, help="frame: scale (px)")
    ap.add_argument("--common", type=float, default=2.0,
                    help="common: pixel-rate common noise, DN rms per read")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)
    for w in a.which:
        if w == "flicker":
            bench_flicker(onef=a.onef, acn=a.acn)
        elif w == "frame":
            bench_frame(rms=a.frame_rms, drift=a.frame_drift, scale=a.frame_scale)
        elif w == "frame-cost":
            bench_frame_cost()
        elif w == "common":
            bench_common(rms=a.common)
        elif w == "ipc":
            bench_ipc()
        else:
            {"refpix": bench_refpix, "snowballs": bench_snowballs}[w]()


if __name__ == "__main__":
    main()
