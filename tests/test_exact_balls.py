"""attnspec.exact in ball arithmetic (Arb, through python-flint; issue 8).

What is promised (reference/exact.py): every result is the midpoint of a ball proved to
contain the exact value of the definition; it is returned only when the ball decides its
float64 rounding and ``dps`` digits, else the evaluation is repeated at twice the
precision, up to MAX_BITS, and then UndecidedRounding. ``to_float64`` rounds once,
correctly (ties to even), subnormals included.

Expected values: float64 constants written as powers of two (exact), the nearest float64
of a dyadic number by the definition of rounding to nearest, ties to even (IEEE 754-2019,
4.3.1), and the mpmath backend (the ground truth of earlier versions, an independent
evaluation of the same definition) where stated.
"""

from __future__ import annotations

import math
from fractions import Fraction

import flint
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnspec
from attnspec import exact
from attnspec.reference import exact as ref_exact
from attnspec.reference.rounding import UndecidedRounding, nearest, round_ball
from attnspec.spec.strategies.attention import AttentionCase, attention_cases
from attnspec.spec.strategies.softmax import SoftmaxCase, softmax_cases

TINY = 2.0**-1074  # the smallest subnormal


def _mpf(man: int, exp: int) -> mpmath.mpf:
    return mpmath.mpf(man) * mpmath.mpf(2) ** exp


# --- to_float64: one rounding -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        # just above half the smallest subnormal: nearer 2**-1074 than 0
        ((2**125 + 1, -1075 - 125), TINY),
        # exactly half: a tie between 0 and 2**-1074, to even (0)
        ((1, -1075), 0.0),
        # 1.5 * 2**-1074: a tie between 1 and 2 times 2**-1074, to even (2)
        ((3, -1075), 2 * TINY),
        # just below half: 0
        ((2**125 - 1, -1075 - 125), 0.0),
        # a tie in the normal range: 1 + 2**-53 between 1 and 1 + 2**-52, to even (1)
        ((2**53 + 1, -53), 1.0),
        # 1 + 3 * 2**-54: nearer 1 + 2**-52
        ((2**54 + 3, -54), 1.0 + 2.0**-52),
        # negative: the same magnitude, the sign kept
        ((-(2**125 + 1), -1075 - 125), -TINY),
    ],
)
def test_to_float64_rounds_once_below_the_normal_range(value: tuple[int, int], want: float) -> None:
    man, exp = value
    with mpmath.workdps(100):
        x = _mpf(man, exp)
        assert exact.to_float64(np.array([x], dtype=object)).tolist() == [want]
    assert nearest(man, exp) == want
    assert math.copysign(1.0, nearest(man, exp)) == math.copysign(1.0, want)


def test_to_float64_rounds_python_ints_beyond_the_range_to_infinity() -> None:
    # 2**1024 - 2**970 is the largest float64 plus half its ulp: it and above round to
    # infinity (the tie goes to even: the largest float64's significand is odd)
    got = exact.to_float64([10**400, -(10**400), 2**1024 - 2**970, 2**1024 - 2**970 - 1])
    assert got.tolist() == [math.inf, -math.inf, math.inf, float(np.finfo(np.float64).max)]


def test_to_float64_of_a_ball_rounds_only_when_the_ball_decides() -> None:
    flint.ctx.prec, saved = 200, flint.ctx.prec
    try:
        third = flint.arb(1) / 3
        assert exact.to_float64(np.array([third], dtype=object)).tolist() == [1 / 3]
        # a ball that holds the tie 1 + 2**-53 rounds to 1 or to 1 + 2**-52
        straddle = flint.arb(1) + flint.arb(2) ** -53 + flint.arb(0, 2.0**-80)
        assert round_ball(straddle) is None
        with pytest.raises(UndecidedRounding, match="does not determine its float64"):
            exact.to_float64(np.array([straddle], dtype=object))
    finally:
        flint.ctx.prec = saved


# --- results: decided, and equal to the mpmath backend's --------------------------------


def _agree_or_straddle(got: np.ndarray, mp: np.ndarray, what: str) -> None:
    """``got`` (the balls, rounded) equals the mpmath backend's values at 60 digits
    (``mp``, object arrays of mpf) rounded, except where the mpmath value lies within
    1e-55 (relative) of the midpoint between two neighbouring float64 and the two
    roundings are those neighbours: there 60 digits do not decide, and the balls did
    (an lse just above a tie: test_lse_just_above_a_tie_rounds_up)."""
    want = exact.to_float64(mp)
    differ = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    for at in map(tuple, np.argwhere(differ)):
        g, w = float(got[at]), float(want[at])
        assert math.nextafter(w, g) == g, f"{what} at {at}: {g!r} against mpmath's {w!r}"
        with mpmath.workdps(60):
            m, mid = mp[at], (mpmath.mpf(g) + mpmath.mpf(w)) / 2
            assert abs(m - mid) <= mpmath.mpf(10) ** -55 * abs(m), (what, at, g, w)


@settings(max_examples=60, deadline=None)
@given(case=softmax_cases())
def test_softmax_family_agrees_with_the_mpmath_backend(case: SoftmaxCase) -> None:
    x, axis, where = case.x, case.axis, case.where
    for kind in ("softmax", "log_softmax", "logsumexp"):
        f = getattr(exact, kind)
        got = exact.to_float64(f(x, axis, where=where))
        mp = np.asarray(f(x, axis, where=where, backend="mpmath", dps=60), dtype=object)
        _agree_or_straddle(got, mp, kind)


@settings(max_examples=60, deadline=None)
@given(case=attention_cases(max_side=4))
def test_sdpa_agrees_with_the_mpmath_backend(case: AttentionCase) -> None:
    kw = dict(case.kwargs, return_lse=True)
    got = exact.sdpa(case.q, case.k, case.v, **kw)
    mp = exact.sdpa(case.q, case.k, case.v, backend="mpmath", dps=60, **kw)
    for name, g, m in zip(("out", "lse"), got, mp, strict=True):
        _agree_or_straddle(exact.to_float64(g), m, name)


def test_lse_just_above_a_tie_rounds_up() -> None:
    # logits s0 = 1.5 * (1 + 3 * 2**-52) = 1.5 + 4.5 * 2**-52 (exact: a product of two
    # float64) and -600: the lse is s0 + log1p(e**(-600 - s0)), about 1e-261 above the tie
    # between 1.5 + 4 * 2**-52 and 1.5 + 5 * 2**-52, so it rounds up. mpmath at 60 digits
    # loses the 1e-261, sees the tie and rounds to even (down): the ground truth of
    # earlier versions was wrong here; the balls decide at a higher precision
    q = np.array([[1.5]])
    k = np.array([[1 + 3 * 2.0**-52], [-400.0]])
    v = np.zeros((2, 1))
    _, lse = exact.sdpa(q, k, v, scale=1.0, return_lse=True)
    assert exact.to_float64(lse).tolist() == [1.5 + 5 * 2.0**-52]
    _, lse60 = exact.sdpa(q, k, v, scale=1.0, return_lse=True, backend="mpmath", dps=60)
    assert exact.to_float64(lse60).tolist() == [1.5 + 4 * 2.0**-52]


def test_results_hold_dps_digits() -> None:
    # softmax([1, 2, 3]) at dps=50 and at dps=100: the first within 1e-50 of the second
    a = exact.softmax([1.0, 2.0, 3.0], dps=50)
    b = exact.softmax([1.0, 2.0, 3.0], dps=100)
    with mpmath.workdps(110):
        for x, y in zip(a, b, strict=True):
            assert abs(x - y) <= mpmath.mpf(10) ** -50 * abs(y)


# --- Ziv: more precision where the first does not decide ---------------------------------


def test_an_exact_zero_reached_by_cancellation_is_decided_by_rationals() -> None:
    # equal logits: weights 1/3, values 1, -1, 0: the output is exactly 0; its ball
    # [0 +- r] would decide only once r < 2**-1074 * 10**-50 (over 1240 bits); the second
    # evaluation, in rationals while they last, has it exactly
    q = np.zeros((1, 1))
    k = np.zeros((3, 1))
    v = np.array([[1.0], [-1.0], [0.0]])
    with ref_exact.recording_precision() as bits:
        out = exact.sdpa(q, k, v)
    assert out[0, 0] == 0
    assert exact.to_float64(out).tolist() == [[0.0]]
    assert len(bits) == 1 and bits[0][0] == 2 and bits[0][1] < 1240  # two evaluations


def test_a_tie_reached_through_a_weight_of_one_third_rounds_to_even() -> None:
    # weights 1/3 each, values 1.5, 1.5, 3 * 2**-53: the exact output (3 + 3 * 2**-53)/3
    # = 1 + 2**-53 is a tie between 1 and 1 + 2**-52 (to even: 1); no ball around 1/3
    # decides it, the rational evaluation does
    q = np.zeros((1, 1))
    k = np.zeros((3, 1))
    v = np.array([[1.5], [1.5], [3 * 2.0**-53]])
    out = exact.sdpa(q, k, v)
    assert exact.to_float64(out).tolist() == [[1.0]]
    with mpmath.workdps(80):
        assert out[0, 0] == 1 + mpmath.mpf(2) ** -53  # the mpf is the exact rational
    # an exact weight gives an exact ball already: the tie (1 + 2**-53)/2 = 0.5 + 2**-54 (two
    # keys, weights 1/2) between 0.5 and 0.5 + 2**-53 rounds to even, 0.5
    tie = exact.sdpa(np.zeros((1, 1)), np.zeros((2, 1)), np.array([[1.0], [2.0**-53]]))
    assert exact.to_float64(tie).tolist() == [[float(Fraction(1, 2) + Fraction(1, 2**54))]]
    assert exact.to_float64(tie).tolist() == [[0.5]]


def test_logits_near_1e300_that_differ_by_one_are_resolved() -> None:
    # q.k = 1e300 + 1 and 1e300 + 2 (products exact, sums not in float64): the weights
    # are those of logits 1 and 2, softmax([1, 2])
    q = np.array([[1e150, 1.0]])
    k = np.array([[1e150, 1.0], [1e150, 2.0]])
    v = np.array([[0.0], [1.0]])
    out = exact.to_float64(exact.sdpa(q, k, v, scale=1.0))
    want = exact.to_float64(exact.softmax([1.0, 2.0]))[1]
    assert out.tolist() == [[want]]


# --- special values stay the definition's ------------------------------------------------


def test_hidden_nan_and_exact_zero_weights_stay_exact() -> None:
    q = np.ones((1, 1))
    k = np.array([[np.nan], [0.0]])
    v = np.array([[np.nan], [2.0]])
    out, lse = exact.sdpa(q, k, v, mask=np.array([False, True]), return_lse=True)
    assert out[0, 0] == 2 and lse[0] == 0  # one visible key: weight exactly 1
    w = exact.softmax([0.0, -np.inf, np.nan], where=[True, True, False])
    assert [float(x) for x in w] == [1.0, 0.0, 0.0]
    nan_row = exact.softmax([np.nan, 1.0, -np.inf])
    assert math.isnan(float(nan_row[0])) and float(nan_row[2]) == 0.0


def test_infinite_logits_keep_their_sign_through_the_arithmetic() -> None:
    # Arb alone has no signed infinity (arb(inf) + 1 is the whole line): a logit of +inf
    # from q * k must still make the +inf row of the definition
    got = exact.to_float64(exact.sdpa([[np.inf]], [[1.0], [-1.0]], [[3.0], [5.0]], scale=1.0))
    assert (
        got.tolist()
        == attnspec.sdpa([[np.inf]], [[1.0], [-1.0]], [[3.0], [5.0]], scale=1.0).tolist()
    )
    assert got.tolist() == [[3.0]]


def test_backend_is_checked() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        exact.softmax([1.0], backend="flint")


@given(st.integers(-(2**70), 2**70), st.integers(-1200, 1000))
def test_nearest_is_the_correctly_rounded_quotient(man: int, exp: int) -> None:
    # Fraction -> float rounds correctly (CPython's int true division); beyond the
    # range it raises OverflowError, which is the infinity of the sign
    try:
        want = float(Fraction(man) * Fraction(2) ** exp)
    except OverflowError:
        want = math.copysign(math.inf, man)
    assert nearest(man, exp) == want


def test_equal_logits_through_a_softcap_give_exactly_equal_weights() -> None:
    # found by the fuzzer's thorough run: logits c tanh(1/c) of equal keys are equal but
    # irrational; the rational evaluation numbers equal computations alike, so they shift
    # to exactly 0 and the weights are exactly 1/2. The output (1 + 2**-53)/2 = 0.5 + 2**-54
    # is a tie between 0.5 and 0.5 + 2**-53: to even, 0.5 (fractions.Fraction agrees)
    q = np.ones((1, 1))
    k = np.ones((2, 1))
    v = np.array([[1.0], [2.0**-53]])
    out = exact.sdpa(q, k, v, softcap=5.0)
    assert exact.to_float64(out).tolist() == [[float(Fraction(1, 2) + Fraction(1, 2**54))]]
    assert exact.to_float64(out).tolist() == [[0.5]]
    # and with a bias added after the softcap, equal on both keys, the same
    out_b = exact.sdpa(q, k, v, softcap=5.0, bias=np.array([0.25, 0.25]))
    assert exact.to_float64(out_b).tolist() == [[0.5]]


def test_a_tie_minus_a_tiny_term_decides_and_keeps_its_rounding_in_few_bits() -> None:
    # found by the fuzzer's thorough run: log_softmax of -9007199254732202 in a slice
    # whose maximum is 8791 is d - log1p(s) with d = -9007199254740993 (an odd integer
    # above 2**53: a tie between -...992 and -...994) and log1p(s) about 2e**-8791 > 0:
    # the value lies just beyond the tie, so it rounds to -9007199254740994. It decides
    # at a raised precision (about 12700 bits); the mpf returned keeps 50 digits and 64
    # bits more, rounded in the direction that keeps the float64 rounding
    x = np.array([0.0, -9007199254732202.0, 8791.0, 0.0])
    y = exact.log_softmax(x)
    assert exact.to_float64(y)[1] == -9007199254740994.0
    assert max(v._mpf_[3] for v in y) <= ref_exact._bits(ref_exact.DEFAULT_DPS) + 64
