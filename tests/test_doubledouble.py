"""The double-double primitives of attnspec.reference.doubledouble, against exact values.

Error bounds are the ones derived in
the docstrings of reference/doubledouble.py; expected values come from mpmath at 60
digits, far beyond the bounds checked (2**-106 is about 1e-32).
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from attnspec.reference import doubledouble as ddm
from attnspec.reference.doubledouble import DD, DoubleDouble


def _rel(dd_hi: float, dd_lo: float, exact: object) -> float:
    """|hi + lo - exact| / |exact| in mpmath at 60 digits."""
    with mpmath.workdps(60):
        y = mpmath.mpf(exact)
        return float(abs(mpmath.mpf(dd_hi) + mpmath.mpf(dd_lo) - y) / abs(y))


# The error-free transformations themselves (TwoSum, Fast2Sum, Veltkamp's split,
# TwoProduct) live in attnspec.reference.eft and are tested in tests/test_matmul.py.


def test_exp_rows_relative_error_below_derived_bound() -> None:
    # Bound 2**-62.3 derived in exp_rows' docstring, for results above 2**-969 (below,
    # lo is subnormal: next test); low parts as large as a shift d = x - max carries.
    rng = np.random.default_rng(20261125)
    h = np.concatenate([rng.uniform(-671.0, 0.0, 400), -(10.0 ** rng.uniform(-20, 0, 100))])
    lo = h * rng.uniform(-1.0, 1.0, h.size) * 2.0**-53
    hi2, lo2 = ddm.exp_rows(h, lo)
    with mpmath.workdps(60):
        worst = max(
            _rel(a, b, mpmath.exp(mpmath.mpf(x) + mpmath.mpf(y)))
            for a, b, x, y in zip(hi2, lo2, h, lo, strict=True)
        )
    assert worst <= 2.0**-62.3


def test_exp_rows_near_underflow_within_half_a_subnormal_ulp_and_a_bit() -> None:
    # Results below 2**-969: each part rounded once to the subnormal grid, in all
    # <= 2**-1075, plus the relative error 2**-62.3 of a value below 2**-969
    # (exp_rows' docstring); the bound is taken with 2**-1022 for the second term
    # where the value is subnormal and 2**-969 above.
    h = np.concatenate([np.linspace(-745.0, -708.5, 301), np.linspace(-708.0, -671.0, 101)])
    hi2, lo2 = ddm.exp_rows(h, None)
    with mpmath.workdps(60):
        for a, b, x in zip(hi2, lo2, h, strict=True):
            err = abs(mpmath.mpf(a) + mpmath.mpf(b) - mpmath.exp(mpmath.mpf(x)))
            assert err <= mpmath.mpf(2) ** -1075 + mpmath.mpf(2) ** (-969 - 62)


def test_exp_rows_special_arguments() -> None:
    hi2, lo2 = ddm.exp_rows(np.array([-np.inf, -746.0, -1e300, 0.0]), None)
    assert hi2.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert lo2.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_expm1_precise_relative_error() -> None:
    # Bound 2**-88 stated in expm1_precise's docstring.
    rng = np.random.default_rng(7)
    y = np.concatenate([rng.uniform(0.0, 12.0, 100), 10.0 ** rng.uniform(-300, 0, 100), [0.5]])
    m = ddm.expm1_precise(y)
    with mpmath.workdps(60):
        worst = max(
            _rel(a, b, mpmath.expm1(mpmath.mpf(v))) for a, b, v in zip(m.hi, m.lo, y, strict=True)
        )
    assert worst <= 2.0**-88


def test_log1p_relative_error_including_tiny_arguments() -> None:
    # Bound 2**-88 (DoubleDouble.log1p docstring); tiny s' is the log_softmax-of-the-max
    # case, where log(1 + s') ~ s' must keep its relative accuracy.
    rng = np.random.default_rng(8)
    s = np.concatenate([rng.uniform(0.0, 1e5, 100), 10.0 ** rng.uniform(-300, 0, 100)])
    s_lo = s * rng.uniform(-1.0, 1.0, s.size) * 2.0**-54
    out = DoubleDouble().log1p(DD(s[:, None], s_lo[:, None]))
    with mpmath.workdps(60):
        worst = max(
            _rel(a, b, mpmath.log1p(mpmath.mpf(v) + mpmath.mpf(w)))
            for a, b, v, w in zip(out.hi[:, 0], out.lo[:, 0], s, s_lo, strict=True)
        )
    assert worst <= 2.0**-88
    assert out.hi[0, 0] == out.hi[0, 0]  # no NaN


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 5000, 65537])
def test_extract_sum_relative_error(n: int) -> None:
    # Bound 2**(2M+2) n^2 u^3 + n u^2 (extract_sum docstring), u = 2**-53, 2**M >= 2(n+2);
    # terms spread over 600 binades, like e^{d_j} of a wide row.
    rng = np.random.default_rng(n)
    hi = np.exp(rng.uniform(-700.0, 0.0, (3, n)))
    lo = hi * rng.uniform(-1.0, 1.0, (3, n)) * 2.0**-53
    out = ddm.extract_sum(hi, lo)
    m = (n + 2).bit_length() + 1
    u = 2.0**-53
    bound = 2.0 ** (2 * m + 2) * n**2 * u**3 + n * u**2
    if n * n * 2.0 ** (m + 2) <= 2.0**40:  # one extraction level (extract_sum docstring)
        bound = n * n * 2.0 ** (m + 2) * u**2 + n * u**2
    with mpmath.workdps(60):
        for r in range(3):
            exact = mpmath.fsum([mpmath.mpf(v) for v in hi[r]] + [mpmath.mpf(v) for v in lo[r]])
            assert _rel(out.hi[r, 0], out.lo[r, 0], exact) <= bound


def test_extract_sum_of_nothing_and_of_zeros() -> None:
    out = ddm.extract_sum(np.zeros((2, 5)), None)
    assert out.hi.tolist() == [[0.0], [0.0]]


def test_div_by_row_divisor_relative_error() -> None:
    # Reciprocal by one Newton step (2**-100) and the product's dropped terms (3u^2):
    # the bound 2**-100 + 3 * 2**-106 < 2**-99.
    rng = np.random.default_rng(9)
    a = DD(rng.uniform(0.0, 1.0, (4, 50)), rng.uniform(-1, 1, (4, 50)) * 2.0**-60)
    b = DD(1.0 + rng.uniform(0.0, 1e5, (4, 1)), rng.uniform(-1, 1, (4, 1)) * 2.0**-40)
    q = DoubleDouble().div(a, b)
    with mpmath.workdps(60):
        for idx in np.ndindex(4, 50):
            exact = (mpmath.mpf(a.hi[idx]) + mpmath.mpf(a.lo[idx])) / (
                mpmath.mpf(b.hi[idx[0], 0]) + mpmath.mpf(b.lo[idx[0], 0])
            )
            assert _rel(q.hi[idx], q.lo[idx], exact) <= 2.0**-99


def test_shift_of_overflowing_and_infinite_entries_has_no_nan() -> None:
    arith = DoubleDouble()
    x = np.array([[-1e308, -np.inf, 0.0, 1e308]])
    a = np.array([[1e308]])
    d = arith.sub(arith.lift(x), arith.lift(a))
    assert d.hi.tolist() == [[-np.inf, -np.inf, -1e308, 0.0]]
    assert d.lo is not None and d.lo.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_scratch_pool_never_hands_out_a_live_array() -> None:
    pool = ddm.Scratch()
    a = pool.fresh((3,))
    b = pool.fresh((3,))
    assert a is not b
    view = b[1:]
    del b
    c = pool.fresh((3,))  # b is still referenced through its view
    assert c is not a and c.base is None and view.base is not c


def test_mul_of_double_doubles_relative_error() -> None:
    # dd_mul's bound, about 5u^2 (u = 2**-53): asserted as 2**-103.
    rng = np.random.default_rng(10)
    a = DD(rng.standard_normal(200), rng.standard_normal(200) * 2.0**-60)
    b = DD(rng.standard_normal(200) * 1e3, None)
    out = DoubleDouble().mul(a, b)
    with mpmath.workdps(60):
        for i in range(200):
            exact = (mpmath.mpf(a.hi[i]) + mpmath.mpf(a.lo[i])) * mpmath.mpf(b.hi[i])
            assert _rel(out.hi[i], out.lo[i], exact) <= 2.0**-103


def test_mul_keeps_ieee_special_values() -> None:
    out = DoubleDouble().mul(
        DD(np.array([np.inf, 1e300, 2.0]), None), DD(np.array([0.0, 1e300, 3.0]), None)
    )
    assert np.isnan(out.hi[0]) and out.hi[1] == np.inf and out.hi[2] == 6.0
    assert out.lo is not None and out.lo.tolist() == [0.0, 0.0, 0.0]


def test_tanh_relative_error_and_special_values() -> None:
    # expm1_precise's 2**-88, through one double-double division: asserted as 2**-86.
    x = np.concatenate([np.linspace(-45.0, 45.0, 181), [1e-300, -1e-20, 0.0]])
    out = DoubleDouble().tanh(DD(x, None))
    with mpmath.workdps(60):
        for h, lo, v in zip(out.hi, out.lo, x, strict=True):
            exact = mpmath.tanh(mpmath.mpf(v))
            if exact == 0:
                assert h == 0.0 and lo == 0.0
            else:
                assert _rel(h, lo, exact) <= 2.0**-86
    nan = DoubleDouble().tanh(DD(np.array([np.nan, np.inf, -np.inf]), None))
    assert np.isnan(nan.hi[0]) and nan.hi[1:].tolist() == [1.0, -1.0]
