"""The kernels' hand-written exp/log/log1p against NumPy in float64, in ulps of each type.

They replace libm calls so that loops vectorise; every loss value rests on them.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from lossgrad.kernels._explog import fexp_nonpositive, flog, flog1p_unit, polynomial
from lossgrad.kernels._numerics import fconst, fma
from lossgrad.kernels._special import log1p_diff_of
from lossgrad.kernels.multiclass import _first_max

RNG = np.random.default_rng(3)
TOP32 = float(np.finfo(np.float32).max)


@numba.njit
def _apply_exp(a, out):  # type: ignore[no-untyped-def]
    for i in range(a.size):
        out[i] = fexp_nonpositive(a[i])


@numba.njit
def _apply_log(a, out):  # type: ignore[no-untyped-def]
    for i in range(a.size):
        out[i] = flog(a[i])


@numba.njit
def _apply_log1p(a, out):  # type: ignore[no-untyped-def]
    for i in range(a.size):
        out[i] = flog1p_unit(a[i])


def _run(fn, a: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.empty_like(a)
    fn(a, out)
    return out


def _ulps(got: np.ndarray, want: np.ndarray, dtype: type) -> float:
    """Error in units of the last place of ``dtype`` at the reference value."""
    spacing = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - want) / spacing))


@pytest.mark.parametrize(("dtype", "low"), [(np.float32, -87.3), (np.float64, -708.3)])
def test_exp_of_nonpositive_arguments(dtype: type, low: float) -> None:
    a = np.concatenate([RNG.uniform(low, 0.0, 200_000), RNG.uniform(-1e-3, 0.0, 1000)])
    a = a.astype(dtype)
    assert _ulps(_run(_apply_exp, a), np.exp(a.astype(np.float64)), dtype) <= 1.5
    special = np.array([0.0, -0.0, -1e4, -np.inf, np.nan], dtype=dtype)
    got = _run(_apply_exp, special)
    assert got[:4].tolist() == [1.0, 1.0, 0.0, 0.0] and np.isnan(got[4])


@pytest.mark.parametrize(("dtype", "span"), [(np.float32, 87.0), (np.float64, 700.0)])
def test_log(dtype: type, span: float) -> None:
    a = np.exp(RNG.uniform(-span, span, 200_000)).astype(dtype)
    a = np.concatenate([a, (1.0 + RNG.uniform(-1e-3, 1e-3, 1000)).astype(dtype)])
    want = np.log(a.astype(np.float64))
    got = _run(_apply_log, a)
    # near log = 0 an absolute bound in ulps of 1 is the meaningful one
    far = np.abs(want) > 0.5
    assert _ulps(got[far], want[far], dtype) <= 2.0
    assert np.max(np.abs(got[~far] - want[~far])) <= 2.0 * np.finfo(dtype).eps
    tiny = np.finfo(dtype).smallest_subnormal
    special = np.array([0.0, -1.0, np.inf, np.nan, tiny], dtype=dtype)
    got = _run(_apply_log, special)
    assert got[0] == -np.inf and np.isnan(got[1]) and got[2] == np.inf and np.isnan(got[3])
    assert got[4] == pytest.approx(np.log(float(tiny)), rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log1p_on_the_unit_interval(dtype: type) -> None:
    a = np.concatenate([RNG.uniform(0.0, 1.0, 200_000),
                        np.exp(RNG.uniform(-80.0, 0.0, 20_000))]).astype(dtype)
    bound = 2.0 if dtype is np.float32 else 3.0  # float64: log(1 + u) plus a correction
    assert _ulps(_run(_apply_log1p, a), np.log1p(a.astype(np.float64)), dtype) <= bound
    ends = _run(_apply_log1p, np.array([0.0, 1.0], dtype=dtype))
    assert ends[0] == 0.0
    assert ends[1] == pytest.approx(np.log(2.0), rel=2 * float(np.finfo(dtype).eps))


@numba.njit
def _fma_of(a, b, c):  # type: ignore[no-untyped-def]
    return fma(a, b, c), a * b + c


@pytest.mark.parametrize(("dtype", "bits"), [(np.float32, 24), (np.float64, 53)])
def test_fma_rounds_once(dtype: type, bits: int) -> None:
    """(1 + u)^2 - (1 + 2u) with u^2 below half an ulp of 1: a separate multiply rounds u^2
    away, the fused one keeps it. The polynomials' Horner steps are these fused steps, so
    their bits do not depend on how the compiler would have contracted them."""
    u = dtype(2.0 ** -(bits // 2 + 1))
    one = dtype(1.0)
    fused, separate = _fma_of(one + u, one + u, -(one + dtype(2.0) * u))
    assert fused == u * u
    assert separate == dtype(0.0)



@numba.njit
def _horner_loop(x, coeffs):  # type: ignore[no-untyped-def]
    p = fconst(x, coeffs[0])
    for k in range(1, len(coeffs)):
        p = fma(x, p, fconst(x, coeffs[k]))
    return p


_COEFFS = tuple(float(c) for c in RNG.standard_normal(14))
_POLY = polynomial(_COEFFS)


@numba.njit
def _apply_polynomial(a, out, loop):  # type: ignore[no-untyped-def]
    for i in range(a.size):
        out[i] = _horner_loop(a[i], _COEFFS) if loop else _POLY(a[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_polynomial_is_the_horner_loop_written_out(dtype: type) -> None:
    """``polynomial`` writes Horner's steps out so that element loops vectorise; its bits
    must be those of the loop over the coefficients."""
    a = RNG.uniform(-2.0, 2.0, 10_000).astype(dtype)
    written, looped = np.empty_like(a), np.empty_like(a)
    _apply_polynomial(a, written, False)
    _apply_polynomial(a, looped, True)
    assert written.tobytes() == looped.tobytes()


@numba.njit
def _log1p_diffs(u, v, like):  # type: ignore[no-untyped-def]
    out = np.empty(u.size)
    for i in range(u.size):
        out[i] = log1p_diff_of(u[i], v[i], like)
    return out


def test_log1p_difference_of_float32_values_is_one_log() -> None:
    """MSLE's log(1 + u) - log(1 + v) for float32 inputs (u, v >= 1e-7, in float64) is one
    log of (1 + u) / (1 + v): within a few ulps of 1 of an 80-bit reference at any size,
    where the difference of two logs errs by their magnitude's ulps (~8e-15 at 1e30)."""
    u = np.concatenate([RNG.uniform(1e-7, 1e-3, 100_000), RNG.uniform(0.0, 10.0, 100_000),
                        np.exp(RNG.uniform(-16.0, 88.0, 100_000)),
                        [2.0**24, 2.0**53, 2.0**60, TOP32]])
    u = np.maximum(u.astype(np.float32).astype(np.float64), 1e-7)
    near = np.minimum(u * (1.0 + RNG.uniform(-1e-6, 1e-6, u.size)), TOP32).astype(np.float32)
    for v in (RNG.permutation(u), np.maximum(near.astype(np.float64), 1e-7)):
        got = _log1p_diffs(u, v, np.float32(1.0))
        ld = np.longdouble
        want = np.log1p(u.astype(ld)) - np.log1p(v.astype(ld))
        err = np.abs(got.astype(ld) - want)
        assert np.all(err <= 2.3e-16 + 4.5e-16 * np.abs(want)), float(err.max())
    # float64 values take flog1p of each.
    a, b = RNG.uniform(0.0, 5.0, 1000), RNG.uniform(0.0, 5.0, 1000)
    np.testing.assert_allclose(_log1p_diffs(a, b, 1.0), np.log1p(a) - np.log1p(b),
                               rtol=0, atol=1e-15)


@numba.njit
def _first_max_rows(v, skip):  # type: ignore[no-untyped-def]
    out = np.empty((v.shape[0], 2))
    for i in range(v.shape[0]):
        at, best = _first_max(v[i], skip[i])
        out[i, 0] = at
        out[i, 1] = best
    return out


def _first_max_reference(row: np.ndarray, skip: int) -> tuple[int, float]:
    candidates = [k for k in range(row.size) if k != skip]
    if not candidates:
        return -1, -np.inf
    numbers = [k for k in candidates if not np.isnan(row[k])]
    if not numbers:
        return candidates[0], float(row[candidates[0]])
    best = max(float(row[k]) for k in numbers)
    return next(k for k in numbers if row[k] == best), best


@pytest.mark.parametrize("classes", [1, 2, 10, 15, 16, 17, 1000])
def test_first_max_of_short_and_long_rows(classes: int) -> None:
    """The hinges' argmax: a scalar scan below 16 classes, two vector passes from 16 on.
    Both must give the first index of the largest value over k != skip, passing over NaNs
    (a row of NaNs gives its first candidate), with ties and -inf rows."""
    rows = RNG.integers(-3, 4, size=(300, classes)).astype(np.float64)  # many ties
    rows[::7] = -np.inf
    rows[1::11, 0] = np.nan
    rows[2::13] = np.nan
    skip = RNG.integers(-1, classes, size=300)
    got = _first_max_rows(rows, skip)
    for i in range(300):
        at, best = _first_max_reference(rows[i], int(skip[i]))
        assert got[i, 0] == at, (i, rows[i], skip[i])
        assert got[i, 1] == best or (np.isnan(best) and np.isnan(got[i, 1]))
