"""Accurate products (reference/matmul.py) and error-free transformations (reference/eft.py).

Every expected value is computed exactly with Python's ``fractions.Fraction``: a float64 is
a dyadic rational, so sums and products of float64 values are exact rationals, with no
working precision to choose and no library to trust. Each test checks the bound stated in
the module docstring of :mod:`attnspec.reference.matmul`:

* ``dot_exact``: ``|hi + lo - tau a b| <= 2**-104 |tau| sum |a b| + 2**-140 |tau| max|a_i|
  max|b_j| + 2**-1074``, and ``|lo| <= ulp(hi) / 2``;
* ``dot_dd``: ``|hi + lo - P v| <= 2**-56 sum |p| |v| + 2**-1074``, and ``hi`` alone within
  ``(2**-53 + 2**-56) sum |p| |v| + 2**-1074``: no term in ``max|p_i| max|v_k|``, so that a
  value at a key of weight 0 (a hidden key) plays no part in the bound.

The adversarial inputs (cancellation, shared offsets of 1e6 and 1e12, 1e+-150 scaling,
subnormals, zeros, rows spanning hundreds of binades, a dominant key whose value is 0) are
those of the project's accuracy study (docs/performance.md).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnspec.reference import eft
from attnspec.reference.matmul import DD_CERTIFICATE, dot_dd, dot_exact

TINY = Fraction(2) ** -1074  # the smallest subnormal: the last term of both bounds
FLOOR = Fraction(2) ** -140  # the term relative to the row and column maxima (dot_exact)


def _fr(x: float) -> Fraction:
    return Fraction(float(x))


def _check_normalized(hi: float, lo: float) -> None:
    """|lo| <= ulp(hi) / 2: hi is the float64 nearest to hi + lo (up to a tie, see dot_exact)."""
    __tracebackhide__ = True
    if math.isinf(hi):
        assert lo == 0.0, f"hi={hi!r} is infinite but lo={lo!r}"
    else:
        assert abs(lo) <= abs(float(np.spacing(hi))) / 2, f"lo={lo!r} exceeds ulp(hi={hi!r})/2"


def _check_exact(
    a: np.ndarray, b: np.ndarray, hi: np.ndarray, lo: np.ndarray, tau: float = 1.0
) -> float:
    """Assert the dot_exact bound on every entry (2-D); return the worst error / bound."""
    __tracebackhide__ = True
    t = _fr(tau)
    L, n = a.shape
    S = b.shape[1]
    assert hi.shape == lo.shape == (L, S)
    worst = 0.0
    for i in range(L):
        alpha = max((abs(_fr(v)) for v in a[i]), default=Fraction(0))
        for j in range(S):
            terms = [_fr(a[i, k]) * _fr(b[k, j]) for k in range(n)]
            c = t * sum(terms, Fraction(0))
            beta = max((abs(_fr(b[k, j])) for k in range(n)), default=Fraction(0))
            bound = (
                Fraction(2) ** -104 * abs(t) * sum((abs(x) for x in terms), Fraction(0))
                + FLOOR * abs(t) * alpha * beta
                + TINY
            )
            err = abs(_fr(hi[i, j]) + _fr(lo[i, j]) - c)
            assert err <= bound, (
                f"dot_exact entry ({i}, {j}): hi={hi[i, j]!r} lo={lo[i, j]!r} exact={float(c)!r}"
                f" error {float(err)!r} > bound {float(bound)!r} [tau={tau!r}]"
            )
            _check_normalized(hi[i, j], lo[i, j])
            worst = max(worst, float(err / bound))
    return worst


def _check_dd(
    ph: np.ndarray, pl: np.ndarray, v: np.ndarray, hi: np.ndarray, lo: np.ndarray
) -> None:
    """Assert the dot_dd bound on every entry (2-D)."""
    __tracebackhide__ = True
    L, S = ph.shape
    Ev = v.shape[1]
    assert hi.shape == lo.shape == (L, Ev)
    for i in range(L):
        p = [_fr(ph[i, j]) + _fr(pl[i, j]) for j in range(S)]
        for k in range(Ev):
            terms = [p[j] * _fr(v[j, k]) for j in range(S)]
            c = sum(terms, Fraction(0))
            mass = sum((abs(x) for x in terms), Fraction(0))
            floors = TINY  # no term in max|p| max|v|: hidden keys must not matter
            err = abs(_fr(hi[i, k]) + _fr(lo[i, k]) - c)
            bound = _fr(DD_CERTIFICATE) * mass + floors
            assert err <= bound, (
                f"dot_dd entry ({i}, {k}): hi={hi[i, k]!r} lo={lo[i, k]!r} exact={float(c)!r}"
                f" error {float(err)!r} > bound {float(bound)!r}"
            )
            err_hi = abs(_fr(hi[i, k]) - c)
            bound_hi = (Fraction(2) ** -53 + _fr(DD_CERTIFICATE)) * mass + floors
            assert err_hi <= bound_hi, f"dot_dd entry ({i}, {k}): hi alone out of its bound"
            _check_normalized(hi[i, k], lo[i, k])


def _dd_weights(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Softmax-like weights as a double-double: plain softmax plus a lo part of ~2**-54 p."""
    with np.errstate(under="ignore"):  # weights below 2**-1074 are 0, as intended
        p = np.exp(x - x.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        lo = rng.uniform(-1.0, 1.0, p.shape) * p * 2.0**-54
    return eft.two_sum(p, lo)


# ---------------------------------------------------------------------------------------------
# eft: the transformations are error-free
# ---------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@given(finite, finite)
@example(1e300, -1e-300)
@example(0.1, 0.2)
@example(2.0**-1074, -(2.0**-1074))
@example(1.0, 2.0**-60)
@example(2.0**-1074, 1.0)
def test_two_sum_is_exact(a: float, b: float) -> None:
    s, e = eft.two_sum(np.float64(a), np.float64(b))
    assert float(s) == a + b
    assert _fr(s) + _fr(e) == _fr(a) + _fr(b)


@given(finite, finite)
def test_fast_two_sum_is_exact_when_a_dominates(a: float, b: float) -> None:
    if abs(a) < abs(b):
        a, b = b, a
    s, e = eft.fast_two_sum(np.float64(a), np.float64(b))
    assert _fr(s) + _fr(e) == _fr(a) + _fr(b)


bounded = st.floats(min_value=-(2.0**990), max_value=2.0**990, allow_nan=False)


@given(bounded)
@example(1.0 + 2.0**-52)
@example(-(2.0**990) * (2 - 2.0**-52))
@example(1.0 - 2.0**-53)
def test_split_is_exact_with_26_bit_head(a: float) -> None:
    h, lo = eft.split(np.float64(a))
    assert _fr(h) + _fr(lo) == _fr(a)
    if h != 0:
        m, _ = math.frexp(float(h))
        assert (m * 2**26).is_integer(), f"head {h!r} has more than 26 bits"


@given(bounded, bounded)
@example(1.0 + 2.0**-52, 1.0 - 2.0**-53)
@example(0.1, 10.0)
@example(134217729.0, 134217729.0)
def test_two_prod_is_exact_above_the_underflow_threshold(a: float, b: float) -> None:
    prod = _fr(a) * _fr(b)
    # the documented range: no overflow, error term above the subnormals (Boldo 2006)
    assume(prod == 0 or Fraction(2) ** -969 <= abs(prod) < Fraction(2) ** 1023)
    p, e = eft.two_prod(np.float64(a), np.float64(b))
    assert float(p) == a * b
    assert _fr(p) + _fr(e) == prod


# ---------------------------------------------------------------------------------------------
# dot_exact
# ---------------------------------------------------------------------------------------------

TAUS = [None, 0.125, 1 / math.sqrt(7.0), -0.3, 2.0**-600, 3.0]


@pytest.mark.parametrize("tau", TAUS, ids=lambda t: f"scale={t!r}")
def test_dot_exact_random_within_bound(tau: float | None) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 9))
    b = rng.standard_normal((9, 5))
    hi, lo = dot_exact(a, b, scale=tau)
    _check_exact(a, b, hi, lo, 1.0 if tau is None else tau)


def test_dot_exact_is_better_than_plain_float64() -> None:
    # guards the test above: plain float64 misses the 2**-104 bound on these inputs
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 9))
    b = rng.standard_normal((9, 5))
    with pytest.raises(AssertionError):
        _check_exact(a, b, a @ b, np.zeros((4, 5)))


def test_dot_exact_cancellation_row_equal_to_minus_another() -> None:
    rng = np.random.default_rng(2)
    r = rng.standard_normal(16)
    a = np.stack([r, -r, r + 1e-9 * rng.standard_normal(16)])
    b = rng.standard_normal((16, 6))
    hi, lo = dot_exact(a, b)
    _check_exact(a, b, hi, lo)
    assert np.array_equal(hi[0], -hi[1]) and np.array_equal(lo[0], -lo[1])


def test_dot_exact_total_cancellation_is_exact() -> None:
    # 1e16 + 1 - 1e16 and x.y - x.y: exact results 1 and 0
    a = np.array([[1e16, 1.0, -1e16], [0.1, 0.7, -0.1]])
    b = np.array([[1.0], [1.0], [1.0]])
    hi, lo = dot_exact(a, b)
    assert (hi[0, 0], lo[0, 0]) == (1.0, 0.0)
    assert _fr(hi[1, 0]) + _fr(lo[1, 0]) == _fr(0.1) - _fr(0.1) + _fr(0.7)
    _check_exact(a, b, hi, lo)


@pytest.mark.parametrize("offset", [1e6, 1e12], ids=lambda o: f"offset={o:g}")
@pytest.mark.parametrize("tau", [0.125, 1 / math.sqrt(10.0)], ids=lambda t: f"scale={t:.4g}")
def test_dot_exact_shared_logit_offset(offset: float, tau: float) -> None:
    # q.k = offset + O(1) for every pair: the logits share a huge offset
    rng = np.random.default_rng(3)
    E = 10
    q = rng.standard_normal((5, E))
    k = rng.standard_normal((6, E))
    q[:, 0] = math.sqrt(offset)
    k[:, 0] = math.sqrt(offset)
    hi, lo = dot_exact(q, k.T, scale=tau)
    _check_exact(q, k.T, hi, lo, tau)


@pytest.mark.parametrize(
    ("sa", "sb"),
    [(1e150, 1e-150), (1e-150, 1e-150), (1e150, 1e150), (1e-150, 1e150), (1e-200, 1e-200)],
    ids=lambda s: f"{s:g}",
)
def test_dot_exact_extreme_scaling(sa: float, sb: float) -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 7)) * sa
    b = rng.standard_normal((7, 4)) * sb
    hi, lo = dot_exact(a, b, scale=0.3)
    _check_exact(a, b, hi, lo, 0.3)


def test_dot_exact_overflowing_product_is_inf_with_zero_lo() -> None:
    a = np.array([[1e200, 1e200]])
    b = np.array([[1e200], [1e200]])
    hi, lo = dot_exact(a, b)
    assert hi[0, 0] == np.inf and lo[0, 0] == 0.0


def test_dot_exact_subnormals_and_zeros() -> None:
    tiny = 2.0**-1074
    a = np.array([[tiny, 3 * tiny, 0.0], [0.0, 0.0, 0.0], [1.0, tiny, -1e-310]])
    b = np.array([[1.0, tiny, 0.0], [2.0, 1e-310, 0.0], [1e300, 1.0, 0.0]])
    for tau in (1.0, 0.7):
        hi, lo = dot_exact(a, b, scale=tau)
        _check_exact(a, b, hi, lo, tau)
    hi, lo = dot_exact(a, b)
    assert (hi[0, 0], lo[0, 0]) == (7 * tiny, 0.0)
    assert not hi[1].any() and not lo[1].any()
    assert not hi[:, 2].any() and not lo[:, 2].any()


def test_dot_exact_rows_spanning_many_binades() -> None:
    # the large entries meet zeros, so everything rests on the tiny ones (recursion)
    a = np.array([[1.0, 2.0**-80 * (1 + 2.0**-52), 2.0**-300 * (1 - 2.0**-53), 2.0**-900]])
    b = np.array([[0.0, 1.0], [1.0 + 2.0**-52, 0.0], [3.0, 0.0], [1.0 / 3.0, 1.0]])
    for tau in (1.0, 0.1):
        hi, lo = dot_exact(a, b, scale=tau)
        worst = _check_exact(a, b, hi, lo, tau)
        assert worst < 2.0**-1  # well inside the bound, not at its edge
    b2 = b.T.copy()
    hi, lo = dot_exact(b2, a.T)
    _check_exact(b2, a.T, hi, lo)


@pytest.mark.parametrize(("L", "E", "S"), [(3, 1, 4), (3, 0, 4), (0, 5, 4), (3, 5, 0), (1, 1, 1)])
def test_dot_exact_small_and_empty_shapes(L: int, E: int, S: int) -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal((L, E))
    b = rng.standard_normal((E, S))
    hi, lo = dot_exact(a, b, scale=0.3)
    assert hi.shape == lo.shape == (L, S)
    _check_exact(a, b, hi, lo, 0.3)
    if E == 0:
        assert not hi.any() and not lo.any()


def test_dot_exact_many_columns_in_blocks() -> None:
    # more columns than one column block (2048), with a column spanning many binades
    rng = np.random.default_rng(9)
    a = rng.standard_normal((2, 3))
    b = rng.standard_normal((3, 2100))
    b[:, 2090] = [1.0, 2.0**-200, 0.0]
    hi, lo = dot_exact(a, b, scale=0.3)
    _check_exact(a, b, hi, lo, 0.3)


def test_dot_exact_broadcasts_batch_dimensions_like_matmul() -> None:
    rng = np.random.default_rng(6)
    a = rng.standard_normal((2, 1, 3, 4))
    b = rng.standard_normal((3, 4, 5))
    hi, lo = dot_exact(a, b, scale=0.5)
    assert hi.shape == lo.shape == np.matmul(a, b).shape == (2, 3, 3, 5)
    for i in range(2):
        for j in range(3):
            _check_exact(a[i, 0], b[j], hi[i, j], lo[i, j], 0.5)


def test_dot_exact_non_finite_rows_give_the_float64_product() -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 4))
    b = rng.standard_normal((4, 3))
    a[1, 2] = np.inf
    b[0, 2] = np.nan
    hi, lo = dot_exact(a, b, scale=2.0)
    assert np.isinf(hi[1, :2]).all() and np.isnan(hi[:, 2]).all()
    assert not lo[1].any() and not lo[:, 2].any()
    good = [0, 2]
    _check_exact(a[good][:, :], b[:, :2], hi[good][:, :2], lo[good][:, :2], 2.0)


def test_dot_exact_does_not_modify_its_inputs() -> None:
    rng = np.random.default_rng(8)
    a = rng.standard_normal((3, 4))
    b = rng.standard_normal((4, 3))
    a0, b0 = a.copy(), b.copy()
    dot_exact(a, b, scale=0.3)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


@pytest.mark.parametrize(
    ("a", "b", "kw", "exc", "match"),
    [
        (np.ones(3), np.ones((3, 2)), {}, ValueError, r"a must have at least 2 dimensions"),
        (np.ones((2, 3)), np.ones((4, 2)), {}, ValueError, r"inner dimensions differ"),
        (np.ones((2, 2, 3)), np.ones((3, 3, 2)), {}, ValueError, r"do not broadcast"),
        (np.ones((2, 3)), np.ones((3, 2)), {"scale": np.inf}, ValueError, r"scale must be finite"),
        (np.ones((2, 3)), np.ones((3, 2)), {"scale": "x"}, TypeError, r"scale must be a real"),
        (np.ones((2, 3), bool), np.ones((3, 2)), {}, TypeError, r"a must hold real numbers"),
    ],
    ids=["1-d", "inner", "batch", "scale-inf", "scale-str", "bool"],
)
def test_dot_exact_rejects_bad_input(a, b, kw, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        dot_exact(a, b, **kw)


magnitudes = st.floats(min_value=-1e150, max_value=1e150, allow_nan=False, allow_subnormal=True)


@st.composite
def operand_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    L = draw(st.integers(1, 3))
    E = draw(st.integers(0, 5))
    S = draw(st.integers(1, 3))
    a = draw(hnp.arrays(np.float64, (L, E), elements=magnitudes))
    b = draw(hnp.arrays(np.float64, (E, S), elements=magnitudes))
    return a, b


@given(operand_pairs(), st.sampled_from([1.0, 0.125, 0.1, -1 / math.sqrt(3.0)]))
@example((np.array([[1e150, 1.0, -1e150]]), np.array([[1.0], [1e-150], [1.0]])), 0.1)
@example((np.array([[2.0**-1074, 1e-300]]), np.array([[1e150], [-1e150]])), 0.1)
@example((np.array([[2001.875]]), np.array([[2.22507386e-311]])), 1.0)  # lo rounded to a tie
def test_dot_exact_bound_hypothesis(ab: tuple[np.ndarray, np.ndarray], tau: float) -> None:
    a, b = ab
    hi, lo = dot_exact(a, b, scale=tau)
    _check_exact(a, b, hi, lo, tau)


# ---------------------------------------------------------------------------------------------
# dot_dd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spread", [1.0, 10.0, 100.0], ids=lambda s: f"logits={s:g}*randn")
def test_dot_dd_softmax_weights_within_bound(spread: float) -> None:
    rng = np.random.default_rng(10)
    ph, pl = _dd_weights(spread * rng.standard_normal((4, 40)), rng)
    v = rng.standard_normal((40, 3))
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)


def test_dot_dd_is_better_than_plain_float64() -> None:
    # guards the test above: plain float64 P @ V misses the 2**-56 bound
    rng = np.random.default_rng(10)
    ph, pl = _dd_weights(rng.standard_normal((4, 40)), rng)
    v = rng.standard_normal((40, 3))
    with pytest.raises(AssertionError):
        _check_dd(ph, pl, v, ph @ v, np.zeros((4, 3)))


@pytest.mark.parametrize("gap", [20.0, 45.0, 300.0], ids=lambda g: f"gap={g:g}")
def test_dot_dd_dominant_key_with_zero_value(gap: float) -> None:
    # the accuracy study's trap: the truncation error scales with max|v|, but the mass
    # sum p|v| sits on keys of weight ~e**-gap; the certificate must catch it
    rng = np.random.default_rng(11)
    S = 30
    x = -gap + rng.standard_normal((3, S))
    x[:, 0] = 0.0
    ph, pl = _dd_weights(x, rng)
    v = rng.standard_normal((S, 4))
    v[0] = 0.0
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)


def test_dot_dd_cancelling_values() -> None:
    # values of both signs whose weighted sum nearly vanishes
    rng = np.random.default_rng(12)
    S = 20
    ph, pl = _dd_weights(np.zeros((2, S)), rng)
    v = rng.standard_normal((S, 2))
    v[S // 2 :] = -v[: S // 2]
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)


@pytest.mark.parametrize(("sv",), [(1e150,), (1e-150,), (1e-300,)], ids=lambda s: f"v*{s:g}")
def test_dot_dd_extreme_value_scaling(sv: float) -> None:
    rng = np.random.default_rng(13)
    ph, pl = _dd_weights(10 * rng.standard_normal((3, 12)), rng)
    v = rng.standard_normal((12, 3)) * sv
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)


@pytest.mark.parametrize(("L", "S", "Ev"), [(2, 0, 3), (0, 4, 3), (2, 4, 0), (2, 1, 1)])
def test_dot_dd_small_and_empty_shapes(L: int, S: int, Ev: int) -> None:
    rng = np.random.default_rng(14)
    ph, pl = _dd_weights(rng.standard_normal((L, S)), rng) if S else (np.zeros((L, 0)),) * 2
    v = rng.standard_normal((S, Ev))
    hi, lo = dot_dd(ph, pl, v)
    assert hi.shape == lo.shape == (L, Ev)
    _check_dd(ph, pl, v, hi, lo)


def test_dot_dd_broadcasts_and_handles_non_finite() -> None:
    rng = np.random.default_rng(15)
    ph, pl = _dd_weights(rng.standard_normal((2, 1, 3, 6)), rng)
    v = rng.standard_normal((4, 6, 2))
    v[1, 0, 1] = np.nan
    hi, lo = dot_dd(ph, pl, v)
    assert hi.shape == (2, 4, 3, 2)
    assert np.isnan(hi[:, 1, :, 1]).all() and not lo[:, 1, :, 1].any()
    for i in range(2):
        for j in (0, 2, 3):
            _check_dd(ph[i, 0], pl[i, 0], v[j], hi[i, j], lo[i, j])


def test_dot_dd_rejects_bad_input_and_keeps_inputs() -> None:
    with pytest.raises(ValueError, match=r"p_hi and p_lo must have the same shape"):
        dot_dd(np.ones((2, 3)), np.ones((2, 4)), np.ones((3, 1)))
    with pytest.raises(ValueError, match=r"inner dimensions differ"):
        dot_dd(np.ones((2, 3)), np.ones((2, 3)), np.ones((4, 1)))
    rng = np.random.default_rng(16)
    ph, pl = _dd_weights(rng.standard_normal((3, 5)), rng)
    v = rng.standard_normal((5, 2))
    copies = [x.copy() for x in (ph, pl, v)]
    dot_dd(ph, pl, v)
    assert all(np.array_equal(x, c) for x, c in zip((ph, pl, v), copies, strict=True))


weights = st.floats(min_value=0.0, max_value=1.0, allow_subnormal=True)
values = st.floats(min_value=-1e100, max_value=1e100, allow_nan=False, allow_subnormal=True)


@st.composite
def dd_operands(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    L = draw(st.integers(1, 3))
    S = draw(st.integers(1, 6))
    Ev = draw(st.integers(1, 3))
    hi = draw(hnp.arrays(np.float64, (L, S), elements=weights))
    rel = draw(hnp.arrays(np.float64, (L, S), elements=st.floats(-1.0, 1.0)))
    with np.errstate(under="ignore"):  # a lo part below the subnormals is 0, which is fine
        lo = hi * rel * 2.0**-54
    hi, lo = eft.two_sum(hi, lo)
    v = draw(hnp.arrays(np.float64, (S, Ev), elements=values))
    return hi, lo, v


@given(dd_operands())
@example((np.array([[1.0, 2.0**-70]]), np.zeros((1, 2)), np.array([[0.0], [1.0]])))
@example((np.array([[0.5, 2.0**-1074]]), np.zeros((1, 2)), np.array([[0.0], [1e100]])))
def test_dot_dd_bound_hypothesis(ops: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ph, pl, v = ops
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)


def test_dot_dd_mid_size_against_exact() -> None:
    # enough rows and keys for several row blocks and realistic certificate values
    rng = np.random.default_rng(17)
    ph, pl = _dd_weights(3 * rng.standard_normal((6, 300)), rng)
    v = rng.standard_normal((300, 2))
    v[ph.argmax(axis=1)[0]] = 0.0
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)


@pytest.mark.parametrize("big", [1e100, 1e300], ids=lambda b: f"hidden={b:g}")
def test_dot_dd_keys_of_weight_zero_do_not_count(big: float) -> None:
    # Keys of weight 0 (hidden) hold huge values: for a whole block (the value is
    # dropped, the factor scaled again) and for some rows only (other rows weight the
    # key, so it sets the column scale). The bound has no term in max|v|.
    rng = np.random.default_rng(18)
    L, S = 6, 9
    ph, pl = _dd_weights(rng.standard_normal((L, S)) - 40.0 * (rng.random((L, S)) < 0.3), rng)
    v = rng.standard_normal((S, 3))
    v[2] = big * rng.choice([-1.0, 1.0], 3)
    v[5] = big / 7.0
    ph[:, 2] = pl[:, 2] = 0.0  # hidden from every row
    ph[:3, 5] = pl[:3, 5] = 0.0  # hidden from rows 0-2, weighted by rows 3-5
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)
    # a key hidden from every row, its value far above the others, takes no part at
    # all: the same bits with 0 there (closer values only change how v is sliced)
    v[5] = rng.standard_normal(3)
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)
    tame = v.copy()
    tame[2] = 0.0
    hi0, lo0 = dot_dd(ph, pl, tame)
    assert np.array_equal(hi, hi0) and np.array_equal(lo, lo0)


@pytest.mark.parametrize("tiny", [2.0**-1000, 2.0**-1021, 2.0**-1060], ids=lambda t: f"p={t!r}")
def test_dot_dd_tiny_weight_at_the_largest_value(tiny: float) -> None:
    # The largest value of a column sits at a key of weight far below the row's largest:
    # in units of max p * max|v| the product falls below 2**-1022, where float64 rounds
    # absolutely; the rows are then computed from their own terms.
    ph = np.array([[1.0, tiny, 0.0], [0.5, 0.25, tiny], [tiny, 0.0, 1.0]])
    pl = np.zeros_like(ph)
    v = np.array([[0.0, 1e-300], [1e300, 1.5], [3.0, -1e200]])
    hi, lo = dot_dd(ph, pl, v)
    _check_dd(ph, pl, v, hi, lo)
