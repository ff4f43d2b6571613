"""The slicer extraction's banded preconditioner blocks (iris_tasks.ifs.extract._Band): blocks
that are not positive definite are detected, fall back to the diagonal with a logged warning,
and leave no inf/NaN (nor a floating-point warning) behind - small arrays only."""

import logging
import warnings

import numpy as np
import pytest

from iris_tasks.ifs.banded import EndToEndBand
from iris_tasks.ifs.extract import _Band


def _blocks(L: int, couplings: list[tuple[float, ...]]) -> list[np.ndarray]:
    """rows[e - 1][p, b] = C_b[p, p + e]: Toeplitz unit-diagonal bands, one per column b."""
    kd = len(couplings[0])
    rows = [np.zeros((L, len(couplings))) for _ in range(kd)]
    for b, cs in enumerate(couplings):
        for e, c in enumerate(cs, start=1):
            rows[e - 1][: L - e, b] = c
    return rows


def _dense(rows: list[np.ndarray], b: int) -> np.ndarray:
    L = rows[0].shape[0]
    c = np.eye(L)
    for e, r in enumerate(rows, start=1):
        c += np.diag(r[: L - e, b], e) + np.diag(r[: L - e, b], -e)
    return c


def test_blocks_that_are_not_positive_definite_fall_back_to_the_diagonal(caplog):
    """A unit-diagonal band with strong alternating couplings (what a band-truncated block of
    nearly invisible slicer pairs looks like) is indefinite; before 2026-12-07 its factorisation
    went on with the indefinite entries until they overflowed ('overflow encountered in square',
    then NaN), only for the result to be thrown away."""
    L = 120
    couplings = [(0.3, 0.05, 0.0),  # positive definite, well conditioned
                 (-0.9, 0.5, 0.0),  # indefinite (symbol 1 - 1.8 cos t + cos 2t < 0)
                 (-0.95, 0.6, -0.3),  # indefinite
                 (-0.66, 0.2, -0.02)]  # positive definite, nearly singular near t = pi
    rows = _blocks(L, couplings)
    spd = [np.linalg.eigvalsh(_dense(rows, b)).min() > 0 for b in range(len(couplings))]
    assert spd == [True, False, False, True]
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # any RuntimeWarning (overflow, invalid) fails the test
        band = _Band([r.copy() for r in rows])
    assert band.failed.tolist() == [False, True, True, False]
    assert np.isfinite(band.u).all()
    assert "2 of 4 blocks" in caplog.text and "not positive definite" in caplog.text
    for b, ok in enumerate(spd):
        u = np.zeros((L, L))
        for e in range(band.kd + 1):
            u += np.diag(band.u[e][: L - e, b], e)
        if ok:  # the exact Cholesky factor
            np.testing.assert_allclose(u.T @ u, _dense(rows, b), atol=1e-12)
        else:  # the diagonal (unit, the blocks are normalised)
            np.testing.assert_array_equal(u, np.eye(L))
    # the preconditioner's solves and the error estimate stay finite
    y = np.random.default_rng(0).normal(size=(L, len(couplings)))
    band.solve_t(y)
    band.solve_n(y)
    assert np.isfinite(y).all()
    z = band.diag_inverse((L, len(couplings)))
    assert np.isfinite(z).all() and (z > 0).all()
    np.testing.assert_allclose(z[:, 0], np.diag(np.linalg.inv(_dense(rows, 0))), rtol=1e-10)


def test_non_finite_couplings_are_an_error():
    rows = _blocks(10, [(0.2,), (0.1,)])
    rows[0][3, 1] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite couplings"):
        _Band(rows)


def _end_to_end(rows: list[np.ndarray]) -> list[np.ndarray]:
    """The (L, B) rows of _blocks as cube-order rows: block b's positions contiguous."""
    return [np.ascontiguousarray(r.T).reshape(-1) for r in rows]


def test_lapack_blocks_laid_end_to_end_match_the_vectorised_ones(caplog):
    """EndToEndBand (LAPACK on the blocks laid end to end, the preconditioner's x blocks since
    2026-12-08) gives the same factor, solves, failed blocks and diag of the inverse as _Band,
    and leaves no inf/NaN behind where blocks are indefinite (the factorisation restarts at the
    next block)."""
    L = 120
    couplings = [(0.3, 0.05, 0.0), (-0.9, 0.5, 0.0), (-0.95, 0.6, -0.3), (-0.66, 0.2, -0.02),
                 (0.1, 0.0, 0.0)]
    rows = _blocks(L, couplings)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        ref = _Band([r.copy() for r in rows])
        band = EndToEndBand(_end_to_end(rows), L)
    assert band.failed.tolist() == ref.failed.tolist() == [False, True, True, False, False]
    assert np.isfinite(band.ab).all()
    assert caplog.text.count("2 of 5 blocks") == 2
    u = band.factor_rows()
    for e in range(band.kd + 1):
        np.testing.assert_allclose(u[e][: L - e], ref.u[e][: L - e], rtol=1e-12, atol=1e-14)
    y = np.random.default_rng(1).normal(size=(L, len(couplings)))
    flat = np.ascontiguousarray(y.T).reshape(-1)
    band.solve(flat)
    ref.solve_t(y)
    ref.solve_n(y)
    np.testing.assert_allclose(flat.reshape(len(couplings), L).T, y, rtol=1e-10, atol=1e-12)
    z = band.diag_inverse().reshape(len(couplings), L).T
    np.testing.assert_allclose(z, ref.diag_inverse((L, len(couplings))), rtol=1e-10)
    # the normalisation by D^-1/2 done on the way in
    scale = np.linspace(0.5, 2.0, L * len(couplings))
    raw = [r / scale / np.roll(scale, -e) for e, r in enumerate(_end_to_end(rows), start=1)]
    scaled = EndToEndBand(raw, L, scale=scale, level=logging.DEBUG)
    np.testing.assert_allclose(scaled.ab, band.ab, rtol=1e-12, atol=1e-15)


def test_lapack_blocks_non_finite_couplings_are_an_error():
    rows = _end_to_end(_blocks(10, [(0.2,), (0.1,)]))
    rows[0][13] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite couplings"):
        EndToEndBand(rows, 10)
