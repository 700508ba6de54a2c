"""Every property of the softmax family on every arithmetic, and each property's power
to fail on a deliberately broken softmax.

The families: attnspec precision="fast" (the bounds of the shifted float64 algorithm),
precision="accurate" (faithful: within 1 ulp) and attnspec.exact at 50 digits rounded to
float64 (correctly rounded, so faithful). Bounds come from attnspec.spec.tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import attnspec
from attnspec.spec.properties import softmax as P
from attnspec.spec.strategies.softmax import SoftmaxCase, softmax_cases

FAMILIES = {
    "fast": P.attnspec_family("fast"),
    "accurate": P.attnspec_family("accurate"),
    "exact": P.exact_family(50),
}
family_param = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))

# small cases: the exact family evaluates mpmath elementwise
cases = softmax_cases(max_side=4, max_dims=2)


def _c(x: Any, axis: Any = -1, where: Any = None) -> SoftmaxCase:
    return SoftmaxCase(
        np.asarray(x, dtype=np.float64), axis, None if where is None else np.asarray(where)
    )


#: the special cases every property is pinned to (ids say what each reaches)
SPECIAL = {
    "nan": _c([np.nan, 1.0, 2.0]),
    "two +inf and a finite": _c([np.inf, np.inf, 1.0]),
    "+inf and -inf": _c([np.inf, -np.inf]),
    "all -inf": _c([-np.inf, -np.inf]),
    "-0.0 and 0.0": _c([-0.0, 0.0]),
    "huge logits +-1e308": _c([1e308, -1e308, 0.0]),
    "gap of 1000": _c([1000.0, 0.0]),
    "tiny s' (log_softmax of the max)": _c([0.0, -720.0]),
    "subnormal terms": _c([-745.0, 0.0, -700.0]),
    "fully masked row": _c([[1.0, 2.0], [3.0, 4.0]], -1, [[False, False], [True, False]]),
    "NaN and inf at excluded entries": _c([np.nan, 1.0, np.inf], -1, [False, True, False]),
    "empty slices": _c(np.zeros((2, 0))),
    "tuple axis": _c(np.arange(12.0).reshape(2, 3, 2), (0, 2)),
}


def with_special_examples(test: Callable[..., None]) -> Callable[..., None]:
    """Pin every case of SPECIAL as an @example of a test with a ``case`` argument."""
    for case in SPECIAL.values():
        test = example(case=case)(test)
    return test


def run(check: Callable[..., None], family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    check(family, case.x, case.axis, case.where)


@family_param
@given(case=cases)
@with_special_examples
def test_sum_to_one(family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    run(P.check_sum_to_one, family, case)


@family_param
@given(case=cases)
@with_special_examples
def test_bounded(family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    run(P.check_bounded, family, case)


@family_param
@given(case=softmax_cases(max_side=4, max_dims=2, with_where=True))
@with_special_examples
def test_excluded_entries_weigh_zero_and_never_leak(
    family: P.SoftmaxFamily, case: SoftmaxCase
) -> None:
    run(P.check_excluded, family, case)


@family_param
@given(
    case=cases,
    c=st.one_of(st.integers(-64, 64).map(float), st.floats(-1e3, 1e3, allow_nan=False)),
)
@example(case=_c([0.5, 0.25, -3.0]), c=1.0)  # exact shift: bitwise
@example(case=_c([0.1, 0.7, -3.3]), c=1e3 / 3)  # inexact shift: bounded
@example(case=_c([1e308, -1e308, 0.0]), c=1e300)
@example(case=SPECIAL["nan"], c=2.0)
@example(case=SPECIAL["two +inf and a finite"], c=-5.0)
def test_shift_invariance(family: P.SoftmaxFamily, case: SoftmaxCase, c: float) -> None:
    P.check_shift_invariance(family, case.x, case.axis, case.where, c=c)


@family_param
@given(case=cases, seed=st.integers(0, 2**32 - 1))
@example(case=_c([1.0, 2.0, 3.0, 4.0, 5.0]), seed=1)
@example(case=SPECIAL["huge logits +-1e308"], seed=2)
@example(case=SPECIAL["fully masked row"], seed=3)
@example(case=SPECIAL["two +inf and a finite"], seed=4)
@example(case=SPECIAL["tuple axis"], seed=5)
def test_permutation_equivariance(family: P.SoftmaxFamily, case: SoftmaxCase, seed: int) -> None:
    n = int(np.prod([case.x.shape[a] for a in _axes(case)], dtype=np.int64))
    perm = np.random.default_rng(seed).permutation(n).tolist()
    P.check_permutation(family, case.x, case.axis, case.where, perm=perm)


def _axes(case: SoftmaxCase) -> tuple[int, ...]:
    from attnspec.reference.inputs import normalize_axes

    return normalize_axes(case.axis, case.x.ndim)


@family_param
@given(case=cases)
@with_special_examples
@example(case=_c([3.0, 1.0, 3.0, 1.0, 2.0]))  # ties
def test_order_preservation(family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    run(P.check_order, family, case)


@family_param
@given(case=cases)
@with_special_examples
def test_lse_bounds(family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    run(P.check_lse_bounds, family, case)


@family_param
@given(case=cases)
@with_special_examples
def test_log_softmax_consistent_with_softmax_and_lse(
    family: P.SoftmaxFamily, case: SoftmaxCase
) -> None:
    run(P.check_consistency, family, case)


@family_param
@given(case=softmax_cases(max_side=4, max_dims=2))
@with_special_examples
def test_agreement_with_exact(family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    """fast: within the derived bound; accurate and exact: within 1 ulp (faithful)."""
    run(P.check_agreement, family, case)


@family_param
@given(case=cases)
@with_special_examples
def test_special_values(family: P.SoftmaxFamily, case: SoftmaxCase) -> None:
    run(P.check_special_values, family, case)


# ---------------------------------------------------------------------------------------
# Each property can fail: deliberately broken implementations
# ---------------------------------------------------------------------------------------


def _fast(kind: str) -> Callable[..., Any]:
    f = getattr(attnspec, kind)
    return lambda x, axis, where: f(x, axis, where=where, precision="fast")


def _broken(accuracy: str = "fast", **fns: Callable[..., Any]) -> P.SoftmaxFamily:
    parts = {k: fns.get(k, _fast(k)) for k in ("softmax", "log_softmax", "logsumexp")}
    return P.SoftmaxFamily(name="broken", accuracy=accuracy, **parts)


def _naive_softmax(x: Any, axis: Any, where: Any) -> Any:
    """No max-shift: exp overflows above 709.78."""
    # the overflow is the defect under test: silence its warning
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(np.where(where, x, -np.inf) if where is not None else x)
        return e / e.sum(axis=axis, keepdims=True)


def _wrong_axis(x: Any, axis: Any, where: Any) -> Any:
    return attnspec.softmax(x, 0, where=where, precision="fast")


def _mask_after(x: Any, axis: Any, where: Any) -> Any:
    """Applies where by multiplying afterwards: NaN at an excluded entry leaks."""
    p = attnspec.softmax(x, axis, precision="fast")
    # NaN * 0 is the defect under test
    with np.errstate(invalid="ignore"):
        return p * where if where is not None else p


def _nudge(ulps: int) -> Callable[..., Any]:
    def f(x: Any, axis: Any, where: Any) -> Any:
        p = attnspec.softmax(x, axis, where=where, precision="fast")
        for _ in range(ulps):
            p = np.nextafter(p, np.inf)
        return p

    return f


def _division_free(x: Any, axis: Any, where: Any) -> Any:
    """exp(x - LSE): error grows like |LSE| u (Blanchard, Higham & Higham 2021)."""
    lse = attnspec.logsumexp(x, axis, where=where, keepdims=True, precision="fast")
    return np.exp(x - lse)


def _abs_logits(kind: str) -> Callable[..., Any]:
    return lambda x, axis, where: getattr(attnspec, kind)(
        np.abs(x), axis, where=where, precision="fast"
    )


def _index_bias(x: Any, axis: Any, where: Any) -> Any:
    return attnspec.softmax(x + 1e-3 * np.arange(x.shape[-1]), axis, where=where, precision="fast")


def _negative_dust(x: Any, axis: Any, where: Any) -> Any:
    return attnspec.softmax(x, axis, where=where, precision="fast") - 1e-300


def _lse_off(x: Any, axis: Any, where: Any) -> Any:
    return attnspec.logsumexp(x, axis, where=where, precision="fast") - 1e-3


def _lse_below_max(x: Any, axis: Any, where: Any) -> Any:
    lse = attnspec.logsumexp(x, axis, where=where, precision="fast")
    return lse - 1.0 - 1e-10 * np.abs(lse)


def _log_softmax_unnormalised(x: Any, axis: Any, where: Any) -> Any:
    return x - np.max(x, axis=axis, keepdims=True)


def _nan_for_inf(x: Any, axis: Any, where: Any) -> Any:
    p = attnspec.softmax(x, axis, where=where, precision="fast")
    return np.where(np.isinf(x).any(axis=axis, keepdims=True), np.nan, p)


_X = np.array([[0.5, -1.25, 2.0, 0.0], [3.0, 1.0, 3.0, -2.0]])

BROKEN = [
    (
        "naive softmax overflows",
        _broken(softmax=_naive_softmax),
        P.check_sum_to_one,
        np.array([1000.0, 0.0]),
        {},
    ),
    (
        "naive softmax vs exact",
        _broken(softmax=_naive_softmax),
        P.check_agreement,
        np.array([1000.0, 0.0]),
        {},
    ),
    ("wrong axis", _broken(softmax=_wrong_axis), P.check_sum_to_one, _X, {}),
    (
        "NaN leaks from an excluded entry",
        _broken(softmax=_mask_after),
        P.check_excluded,
        np.array([np.nan, 1.0, 2.0]),
        {"where": np.array([False, True, True])},
    ),
    (
        "2 ulp error claimed faithful",
        _broken("accurate", softmax=_nudge(2)),
        P.check_agreement,
        _X,
        {},
    ),
    (
        "division-free softmax at logits near 1e12",
        _broken(softmax=_division_free),
        P.check_agreement,
        np.array([1e12, 1e12 - 1.5, 1e12 - 3.0]),
        {},
    ),
    (
        "not shift invariant",
        _broken(softmax=_abs_logits("softmax")),
        P.check_shift_invariance,
        _X,
        {"c": -4.0},
    ),
    ("position-dependent", _broken(softmax=_index_bias), P.check_permutation, _X, {}),
    ("order not preserved", _broken(softmax=_abs_logits("softmax")), P.check_order, _X, {}),
    (
        "negative weights",
        _broken(softmax=_negative_dust),
        P.check_bounded,
        np.array([0.0, -800.0]),
        {},
    ),
    (
        "LSE below max x",
        _broken(logsumexp=_lse_off),
        P.check_lse_bounds,
        np.array([0.0, -800.0]),
        {},
    ),
    (
        "log_softmax without LSE",
        _broken(log_softmax=_log_softmax_unnormalised),
        P.check_consistency,
        _X,
        {},
    ),
    (
        "+inf row gives NaN",
        _broken(softmax=_nan_for_inf),
        P.check_special_values,
        np.array([np.inf, 1.0]),
        {},
    ),
]


@pytest.mark.parametrize(
    ("family", "check", "x", "kwargs"),
    [pytest.param(f, c, x, kw, id=name) for name, f, c, x, kw in BROKEN],
)
def test_property_catches_broken_softmax(
    family: P.SoftmaxFamily, check: Callable[..., None], x: Any, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(P.PropertyViolation) as info:
        check(family, x, **kwargs)
    assert "reproduce: broken." in str(info.value)


def test_fast_bound_is_not_met_by_a_faithful_claim() -> None:
    """The fast path is not faithful: the faithful bound catches it on a known row.

    [700, 0.3]: the shift 0.3 - 700 rounds (error up to u * 700), which e^d turns into a
    relative error of that size: softmax of the second entry is 299 ulps off (mpmath at
    50 digits), as is log_softmax of the first (-log1p(e^{-699.7}) is tiny).
    """
    fast_as_faithful = P.SoftmaxFamily(
        "fast-claiming-faithful",
        _fast("softmax"),
        _fast("log_softmax"),
        _fast("logsumexp"),
        accuracy="accurate",
    )
    with pytest.raises(P.PropertyViolation, match="softmax"):
        P.check_agreement(fast_as_faithful, np.array([700.0, 0.3]))
    P.check_agreement(FAMILIES["fast"], np.array([700.0, 0.3]))  # within the fast bound


def test_violation_message_names_worst_element_bound_and_reproduction() -> None:
    family = _broken("accurate", softmax=_nudge(3))
    with pytest.raises(P.PropertyViolation) as info:
        P.check_agreement(family, np.array([0.0, 1.0]))
    msg = str(info.value)
    assert "softmax at index" in msg and "ulp" in msg and "accurate bound" in msg
    assert "broken.softmax(x=np.array([0.0, 1.0]), axis=-1)" in msg
    assert info.value.property == "agreement"


# ---------------------------------------------------------------------------------------
# The battery runner
# ---------------------------------------------------------------------------------------


def test_battery_runs_checks_and_reports_a_failure() -> None:
    from hypothesis import settings

    from attnspec.spec.battery import BATTERY, run_battery

    few = settings(max_examples=30, derandomize=True, database=None, deadline=None)

    def quiet(kind: str) -> Callable[..., Any]:
        f = _lse_below_max if kind == "logsumexp" else _fast(kind)

        def g(x: Any, axis: Any, where: Any) -> Any:
            # the runner is under test here, not the reference's floating-point warnings
            # (x - max overflows for +-1e308: the property tests above report that)
            with np.errstate(all="ignore"):
                return f(x, axis, where)

        return g

    broken = _broken(
        softmax=quiet("softmax"), log_softmax=quiet("log_softmax"), logsumexp=quiet("logsumexp")
    )
    chosen = [c for c in BATTERY if c.name in ("excluded", "lse_bounds")]
    results = run_battery(broken, few, chosen)
    assert [r.name for r in results] == [c.name for c in chosen]
    by_name = {r.name: r for r in results}
    assert by_name["excluded"].passed and by_name["excluded"].examples == 30
    assert not by_name["lse_bounds"].passed
    assert "reproduce: broken.logsumexp(" in by_name["lse_bounds"].message
    assert all(r.description and r.seconds >= 0 for r in results)


def test_checks_take_a_case_like_every_topic() -> None:
    """check(impl, case) is the signature of every topic's checks; x, axis, where works too."""
    from attnspec.spec.strategies.softmax import SoftmaxCase

    case = SoftmaxCase(np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]]), -1, None)
    P.check_agreement(FAMILIES["accurate"], case)
    broken = _broken("accurate", softmax=_nudge(3))
    for call in (
        lambda: P.check_agreement(broken, case),
        lambda: P.check_agreement(broken, case.x),
    ):
        with pytest.raises(P.PropertyViolation, match="softmax at index"):
            call()
