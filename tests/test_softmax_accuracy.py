"""precision="accurate" is faithful: every result within 1 ulp of the exact value.

The tolerance 1 ulp is the specification itself (faithful rounding: the result is one
of the two float64 numbers that bracket the exact value), not a fudge factor.
Expected values come from attnspec.exact (Arb balls, certified to 50 digits; where no
precision up to MAX_BITS decides a rounding, as for a tie minus e**-1e308, the ball's
midpoint: undecided="midpoint", within far less than an ulp); the oracle itself is checked
against 80 digits on the same cases.
"""

from __future__ import annotations

from collections.abc import Callable

import mpmath
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import attnspec
from attnspec.spec.tolerances.softmax import ulp_error

KINDS = ("softmax", "log_softmax", "logsumexp")
FAITHFUL = 1.0  # ulp: the goal of precision="accurate" (faithful rounding)

_TINY = mpmath.mpf(2) ** -1074
_OVERFLOW = (2 - mpmath.mpf(2) ** -53) * mpmath.mpf(2) ** 1023  # rounds to inf from here


def ulps(computed: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """ulp_error, with two cases spec.tolerance.ulp_error does not handle yet.

    Exact values below the smallest subnormal (e**-1e308) have ulp 2**-1074 (ulp_of_exact
    loops for a very long time on them); exact values beyond the float64 range
    (log_softmax of [1e308, -1e308] is -2e308) round to infinity, which is then 0 ulp.
    """
    c = np.asarray(computed, dtype=np.float64)
    e = np.asarray(exact, dtype=object)
    c, e = np.broadcast_arrays(c, e)
    out = np.empty(c.shape)
    with mpmath.workdps(60):
        for idx in np.ndindex(c.shape):
            y = mpmath.mpf(e[idx])
            ci = float(c[idx])
            if mpmath.isfinite(y) and abs(y) < _TINY:
                out[idx] = float(abs(mpmath.mpf(ci) - y) / _TINY)
            elif mpmath.isfinite(y) and abs(y) >= _OVERFLOW:
                out[idx] = 0.0 if ci == float(mpmath.sign(y)) * np.inf else np.inf
            else:
                out[idx] = float(ulp_error(ci, y))
    return out


def assert_faithful(kind: str, x: np.ndarray, where: np.ndarray | None = None) -> None:
    __tracebackhide__ = True
    got = getattr(attnspec, kind)(x, where=where)
    exact = getattr(attnspec.exact, kind)(x, where=where, dps=50, undecided="midpoint")
    err = ulps(got, exact)
    worst = float(np.max(err)) if err.size else 0.0
    if not worst <= FAITHFUL:
        i = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(
            f"{kind} off by {worst:.3g} ulp at {i}: got {np.asarray(got)[i]!r}, exact "
            f"{exact[i]} [attnspec.{kind}(x={x.tolist() if x.size < 20 else x!r}, where=...)]"
        )


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# Each hard case: a name that reads like the spec, and the rows (with an optional mask).
CASES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray | None]]] = {
    "rows spanning +-1e3 (x - max rounds in float64)": lambda: (
        _rng(1).uniform(-1e3, 1e3, (6, 40)),
        None,
    ),
    "magnitudes up to 1e308 (x - max overflows)": lambda: (
        np.array([[1e308, -1e308, 0.0], [1e308, 1e308, -1e308], [-1e308, -1e308, -1e308]]),
        None,
    ),
    "values near the underflow threshold and subnormal outputs": lambda: (
        np.array(
            [[0.0, -708.0, -720.0, -740.0, -744.0, -745.1], [0.0, -700.0, -720.5, -730.25, 5, 5]]
        ),
        None,
    ),
    "many terms below the underflow threshold adding up in s'": lambda: (
        np.stack([[0.0] + [-745.0] * 10, [0.0] + [-744.9] * 9 + [-700.0], [0.0] + [-746.0] * 10]),
        None,
    ),
    "ties of the maximum": lambda: (np.array([[3.0] * 5 + [1.0] * 3, [0.0] * 8]), None),
    "-inf entries": lambda: (
        np.array([[0.0, -np.inf, 1.0, -np.inf], [-np.inf, -np.inf, -np.inf, 2.5]]),
        None,
    ),
    "where masks (excluded entries hold NaN and inf)": lambda: (
        np.array([[np.nan, 1.0, np.inf, -2.0, 0.5], [3.0, 2.0, 1.0, 0.0, -1.0]]),
        np.array([[False, True, False, True, True], [True, False, True, False, True]]),
    ),
    "log_softmax of the max when s' is tiny ([0, -720])": lambda: (
        np.array([[0.0, -720.0], [0.0, -700.0], [0.0, -40.0]]),
        None,
    ),
    "30*randn rows": lambda: (30.0 * _rng(2).standard_normal((8, 30)), None),
    "logsumexp near 0 (x = full(n, -log n))": lambda: (
        np.stack([np.full(12, -np.log(12.0)), np.full(12, -np.log(12.0) + 2.0**-50)]),
        None,
    ),
    "logsumexp near 0 of log-probabilities": lambda: (
        np.log(_rng(3).dirichlet(np.ones(9), size=3)),
        None,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_accurate_is_faithful_on_hard_case(case: str, kind: str) -> None:
    x, where = CASES[case]()
    assert_faithful(kind, x, where)


@pytest.mark.parametrize("n", [1000, 4096])
def test_logsumexp_of_full_n_minus_log_n_is_faithful(n: int) -> None:
    # lse = log n - fl(log n): a value of about 1e-16 that float64 log cannot see.
    assert_faithful("logsumexp", np.full((1, n), -np.log(float(n))))


def test_long_row_of_1e5_entries_is_faithful() -> None:
    # n = 1e5: the summation of s' (extract_sum) at its largest tested length. Errors are
    # measured on the logsumexp and on a sample of 64 entries of softmax and log_softmax
    # (ulp_error of 1e5 mpmath numbers is slow; the entries are computed alike).
    x = _rng(4).uniform(-40.0, 40.0, (1, 100_000))
    assert_faithful("logsumexp", x)
    pick = _rng(5).choice(x.shape[1], 64, replace=False)
    pick[0] = int(np.argmax(x))
    for kind in ("softmax", "log_softmax"):
        got = getattr(attnspec, kind)(x)[0, pick]
        exact = getattr(attnspec.exact, kind)(x, dps=50, undecided="midpoint")[0, pick]
        assert float(np.max(ulps(got, exact))) <= FAITHFUL


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_exact_oracle_agrees_with_itself_at_50_and_80_digits(case: str) -> None:
    # The 50-digit values must agree with 80-digit ones far below the 1-ulp resolution
    # the tests use: within 2**-40 ulp (50 digits is 166 bits, 113 beyond float64).
    x, where = CASES[case]()
    for kind in KINDS:
        e50 = getattr(attnspec.exact, kind)(x, where=where, dps=50, undecided="midpoint")
        e80 = getattr(attnspec.exact, kind)(x, where=where, dps=80, undecided="midpoint")
        with mpmath.workdps(90):
            for a, b in zip(np.ravel(e50), np.ravel(e80), strict=True):
                if mpmath.isnan(b) or mpmath.isinf(b) or b == 0:
                    assert a == b or (mpmath.isnan(a) and mpmath.isnan(b))
                elif abs(b) < _TINY:
                    assert abs(a - b) <= _TINY * mpmath.mpf(2) ** -40
                else:
                    assert abs(a - b) <= abs(b) * mpmath.mpf(2) ** (-52 - 40)


# --- random hard rows --------------------------------------------------------------

_scales = st.sampled_from([1.0, 30.0, 1e3, 1e5, 1e300])


@st.composite
def hard_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows mixing wide ranges, ties, -inf entries, near-underflow gaps and masks."""
    n = draw(st.integers(1, 24))
    scale = draw(_scales)
    base = draw(
        st.lists(
            st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False), min_size=n, max_size=n
        )
    )
    x = np.array(base) * scale
    shift = draw(st.sampled_from([0.0, -745.0, -720.0, 700.0, -1e308 / scale * 0.0]))
    x = x + shift
    if n > 1 and draw(st.booleans()):  # ties with the maximum
        x[draw(st.integers(0, n - 1))] = np.max(x)
    if n > 2 and draw(st.booleans()):  # -inf entries
        x[draw(st.integers(0, n - 1))] = -np.inf
    if n > 1 and draw(st.booleans()):  # an entry at the underflow edge of the max
        x[draw(st.integers(0, n - 1))] = np.max(x[np.isfinite(x)], initial=0.0) - draw(
            st.sampled_from([708.4, 744.4, 745.1, 720.0])
        )
    if n > 2 and draw(st.booleans()):  # several terms rounding to the subnormal grid
        x[: n // 2] = np.max(x[np.isfinite(x)], initial=0.0) - 744.9
    where = None
    if draw(st.booleans()):
        where = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return x[None, :], None if where is None else where[None, :]


@given(hard_rows(), st.sampled_from(KINDS))
@example((np.array([[0.0, -720.0]]), None), "log_softmax")
@example((np.array([[1e308, -1e308]]), None), "logsumexp")
@example((np.full((1, 7), -np.log(7.0)), None), "logsumexp")
@example((np.array([[-np.inf, -np.inf]]), None), "softmax")
def test_accurate_is_faithful_on_random_hard_rows(
    row: tuple[np.ndarray, np.ndarray | None], kind: str
) -> None:
    x, where = row
    assert_faithful(kind, x, where)


# --- the fast path's sum of the others (issue 6) -----------------------------------------
# Rows whose other terms are far below the maximum's e^0 = 1: the benchmark's cancelling
# rows (benchmarks/softmax_bench.py, adversarial_rows) and scipy's regression case gh-18295.
TINY_OTHERS = [[0.0, -40.0], [0.0, -720.0], [0.0, -745.0], [3.0, -50.0, -60.0]]


def test_fast_logsumexp_of_0_and_minus_40_keeps_the_tiny_sum() -> None:
    # log1p(e^-40) = 4.24835425529158898630e-18 (mpmath at 50 digits), correctly rounded
    # to 4.248354255291589e-18; scipy.special.logsumexp returns it too (scipy gh-18295).
    got = float(attnspec.logsumexp(np.array([0.0, -40.0]), precision="fast"))
    assert got == 4.248354255291589e-18


@pytest.mark.parametrize("row", TINY_OTHERS, ids=str)
def test_fast_results_of_rows_with_tiny_others_meet_the_relative_bound(row: list[float]) -> None:
    from attnspec.spec.properties.softmax import attnspec_family, check_agreement
    from attnspec.spec.tolerances.softmax import error_bound

    x = np.array(row)
    check_agreement(attnspec_family("fast"), x)
    # and the bound is relative: it would not let log_softmax at the maximum (about -s')
    # or logsumexp (about a + s') come out as -0 or a with s' lost. (Not where s' is
    # subnormal, e^-745: there the bound is the absolute (n + 2) 2**-1074 of underflow.)
    with mpmath.workdps(50):
        s = mpmath.fsum(mpmath.exp(mpmath.mpf(v) - mpmath.mpf(row[0])) for v in row[1:])
    for kind in ("log_softmax", "logsumexp"):
        rel, absolute = error_bound(kind, "fast", x[None, :], np.ones((1, len(row)), dtype=bool))
        allowed = float(rel[0, 0]) * (abs(row[0]) + float(s)) + float(absolute[0, 0])
        if row[0] == 0.0 and s > 2.0**-1022:
            assert allowed < float(s) / 2, (kind, allowed, float(s))
