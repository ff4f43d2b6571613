"""Unit-diagonal banded SPD blocks laid end to end, factored and solved by LAPACK.

The slicer extraction's preconditioner holds one banded block of the normal matrix per
wavelength plane (the couplings between neighbouring spaxels, see
:mod:`iris_tasks.ifs.extract`). In cube order the samples of a plane are contiguous, so the
B blocks of length L are one banded matrix of order n = B L whose couplings across block
boundaries are zero: one LAPACK ``dpbtrf`` factors all of them and one ``dpbtrs`` applies
their inverse, without the transposes and the per-position Python loops of
:class:`iris_tasks.ifs.extract._Band` (measured 2026-12-08 on the 4096^2 slicer shape,
L = 3872, B = 4080, 10 bands: 0.4 s per solve against 0.75 s).

A block that is not (numerically) positive definite - a band-truncated block of nearly
invisible slicer pairs - falls back to the identity (the diagonal of the unit-diagonal block),
as :class:`~iris_tasks.ifs.extract._Band` does: ``dpbtrf`` stops at the first non-positive
pivot, that block is replaced and the factorisation restarts at the next block (the blocks are
independent, so the factor of the rest does not depend on it).
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy.linalg import lapack

log = logging.getLogger(__name__)

__all__ = ["PIVOT_TOL", "EndToEndBand", "band_rows", "band_storage"]

# A squared pivot of a unit-diagonal block below this is a breakdown: the block is (numerically)
# not positive definite (the same threshold as extract._Band). LAPACK only stops at pivots <= 0,
# so smaller positive ones are caught after the factorisation.
PIVOT_TOL = 1e-10


def band_storage(n: int, kd: int) -> np.ndarray:
    """Zeroed LAPACK upper band storage for a band of order n and width kd: (kd + 1, n + kd),
    Fortran order. Coupling C[q, q + e] lives at [kd - e, q + e]; the kd extra columns keep
    the views of :func:`band_rows` and :meth:`EndToEndBand.factor_rows` inside the buffer."""
    return np.zeros((kd + 1, n + kd), order="F")


def band_rows(ab: np.ndarray) -> list[np.ndarray]:
    """Views ``rows[e - 1][q]`` = C[q, q + e] (q in [0, n)) into band storage ``ab``: a caller
    can fill the couplings in place (no second copy of the band)."""
    kd = ab.shape[0] - 1
    n = ab.shape[1] - kd
    return [ab[kd - e, e:e + n] for e in range(1, kd + 1)]


class EndToEndBand:
    """B unit-diagonal banded SPD blocks of length L, laid end to end (n = B L), factored.

    Parameters
    ----------
    rows : list of ndarray
        ``rows[e - 1][q]`` = C[q, q + e] for q in [0, n) (any shape with n elements, e.g. the
        cube's (nwave, plane)); must be 0 where q and q + e lie in different blocks. The list
        is emptied as the rows are copied into the factor's storage, so that where the caller
        holds no other reference each row is freed once copied (at 4k each is 126 MB).
    block : int
        L, the length of a block.
    scale : ndarray, optional
        (n,) ``D^-1/2``: the rows are couplings of N, normalised here to
        ``C[q, q + e] = N[q, q + e] scale[q] scale[q + e]`` (unit diagonal).
    what : str
        Name used in the log message about failed blocks.
    level : int
        Logging level of that message.
    storage : ndarray, optional
        Band storage of :func:`band_storage` already holding the couplings (filled through
        :func:`band_rows`); normalised and factored in place, ``rows`` is then ignored. Saves
        the copy: at 4k the 10 bands of the slicer's planes are 1.3 GB.

    Attributes
    ----------
    kd : int
        Band width (0: the identity).
    failed : ndarray of bool
        (B,) blocks that fell back to the identity.
    """

    def __init__(self, rows: list[np.ndarray], block: int, scale: np.ndarray | None = None,
                 what: str = "banded preconditioner", level: int = logging.WARNING,
                 storage: np.ndarray | None = None):
        self.kd = kd = len(rows) if storage is None else storage.shape[0] - 1
        self.L = L = int(block)
        self.failed = np.zeros(0, bool)
        if storage is not None:
            self.n = storage.shape[1] - kd
        else:
            self.n = int(scale.size) if scale is not None else (rows[0].size if rows else 0)
        if not kd:
            return
        n = self.n
        if n % L:
            raise ValueError(f"{n} samples are not whole blocks of {L}")
        B = n // L
        # LAPACK upper band storage: ab[kd + i - j, j] = U[i, j], i.e. U[q, q + e] at
        # ab[kd - e, q + e] (see band_storage).
        bad = FloatingPointError("banded preconditioner: non-finite couplings in N (the pixel "
                                 "weights or the trace's profile weights)")
        if storage is None:
            ab = band_storage(n, kd)
            for e in range(1, kd + 1):
                r = rows.pop(0).reshape(-1)
                if not np.isfinite(r).all():
                    raise bad
                ab[kd - e, e:n] = r[: n - e]
                del r
        else:
            ab = storage
            for e in range(1, kd + 1):
                if not np.isfinite(ab[kd - e, e:n]).all():
                    raise bad
        ab[:, n:] = 0.0
        if scale is not None:
            for e in range(1, kd + 1):
                dst = ab[kd - e, e:n]
                dst *= scale[: n - e]
                dst *= scale[e:]
        ab[kd, :n] = 1.0
        self._ab = ab
        self.ab = ab[:, :n]  # F-contiguous view: what LAPACK sees
        failed = np.zeros(B, bool)
        first = np.full(B, -1)
        start = 0
        while start < n:
            sub = self.ab[:, start:]
            c, info = lapack.dpbtrf(sub, lower=0, overwrite_ab=1)
            if not np.shares_memory(c, sub):  # pragma: no cover - f2py copied: write it back
                sub[...] = c
            if info == 0:
                break
            if info < 0:  # pragma: no cover - an argument error is a bug here
                raise ValueError(f"dpbtrf: argument {-info} illegal")
            q = start + info - 1  # the failing position (0-based)
            b = q // L
            failed[b] = True
            first[b] = q - b * L
            self._identity(b)
            start = (b + 1) * L
        # pivots LAPACK accepted but that are too small to trust (the factor's entries grow
        # by 1/pivot): those blocks too
        piv = self.ab[kd].reshape(B, L)
        tiny = ~(piv * piv > PIVOT_TOL)  # NaN too
        small = tiny.any(axis=1) & ~failed
        for b in np.flatnonzero(small):
            first[b] = int(np.argmax(tiny[b]))
            self._identity(b)
        failed |= small
        finite = np.isfinite(self.ab).reshape(kd + 1, B, L).all(axis=(0, 2))
        for b in np.flatnonzero(~finite):  # not expected with finite input
            first[b] = max(first[b], 0)
            self._identity(b)
        failed |= ~finite
        self.failed = failed
        nfail = int(failed.sum())
        if nfail:
            # a principal block of N is positive definite, but a nearly singular one can become
            # indefinite once the couplings beyond the band are dropped; CG still solves with
            # the exact N, slower
            log.log(level, "%s: %d of %d blocks (length %d, %d band(s)) not positive definite, "
                    "first failing pivot at position %d (median); the diagonal is used for "
                    "them", what, nfail, B, L, kd, int(np.median(first[first >= 0])))

    def _identity(self, b: int) -> None:
        sl = slice(b * self.L, (b + 1) * self.L)
        self.ab[: self.kd, sl] = 0.0
        self.ab[self.kd, sl] = 1.0

    def solve(self, y: np.ndarray) -> None:
        """y <- C^-1 y in place (y: C-contiguous float64 with n elements)."""
        if not self.kd:
            return
        col = y.reshape(-1, 1)  # a view: (n, 1) is F-contiguous too, so LAPACK works in place
        x, info = lapack.dpbtrs(self.ab, col, lower=0, overwrite_b=1)
        if not np.shares_memory(x, y):  # pragma: no cover - f2py copied
            col[...] = x

    def factor_rows(self) -> list[np.ndarray]:
        """u[e] = U[q, q + e] as (L, B) views (position in the block, block), e = 0..kd."""
        kd, L = self.kd, self.L
        B = self.ab.shape[1] // L
        step = self._ab.itemsize
        base = self._ab.reshape(-1, order="F")  # a view (F-contiguous buffer)
        return [as_strided(base[kd + e * kd:], shape=(L, B),
                           strides=((kd + 1) * step, L * (kd + 1) * step), writeable=False)
                for e in range(kd + 1)]

    def diag_inverse(self) -> np.ndarray:
        """diag(C^-1) as (B, L) by Takahashi's recurrence Z = U^-1 U^-T:
        Z[p, p+e] = (delta_e0 / U_pp - sum_t U[p, p+t] Z[p+t, p+e]) / U_pp, vectorised over
        the blocks; only the kd + 1 latest positions of Z are kept (a ring), not all of it."""
        if not self.kd:
            return np.ones(self.n)
        kd, L = self.kd, self.L
        out_all = np.ones(self.n)
        keep = np.flatnonzero(~self.failed)
        if not keep.size:
            # every block fell back to the identity (the error estimate's band of a
            # builder-made slicer model): its inverse's diagonal is 1, no recurrence needed
            # (measured 2026-12-08: 1.4 s of the setup at 2048^2)
            return out_all
        u = self.factor_rows()
        if keep.size < 0.5 * len(self.failed):  # only the blocks that were factored
            u = [v[:, keep] for v in u]
        B = u[0].shape[1]
        ring = np.zeros((kd + 1, kd + 1, B))  # ring[p % (kd + 1), e] = Z[p, p + e]
        out = np.empty((L, B))
        acc = np.empty(B)
        for p in range(L - 1, -1, -1):
            top = min(kd, L - 1 - p)
            here = ring[p % (kd + 1)]
            for e in range(top, -1, -1):
                acc[:] = 0.0
                for t in range(1, top + 1):
                    acc += u[t][p] * ring[(p + min(t, e)) % (kd + 1), abs(e - t)]
                here[e] = ((1.0 / u[0][p] - acc) if e == 0 else -acc) / u[0][p]
            here[top + 1:] = 0.0
            out[p] = here[0]
        if B == len(self.failed):
            return out.T.reshape(-1)
        out_all.reshape(-1, L)[keep] = out.T
        return out_all
