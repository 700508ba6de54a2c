"""The property battery of the softmax family, as data, and a runner.

:data:`BATTERY` lists the checks; :func:`run_battery` runs each one under Hypothesis
against a :class:`~attnspec.spec.properties.SoftmaxFamily` with the active (or given)
settings profile and returns one :class:`CheckResult` per check, for ``attnspec verify``
to print one line each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnspec.spec import properties as props
from attnspec.spec.strategies import SoftmaxCase, softmax_cases

__all__ = ["BATTERY", "Check", "CheckResult", "run_battery"]


@dataclass(frozen=True)
class Check:
    """One named check: a property, the cases it runs on, and how many."""

    name: str
    description: str
    prop: Callable[..., None]
    #: the strategy of cases, given the family (its where / tuple-axis support)
    cases: Callable[[props.SoftmaxFamily], st.SearchStrategy[Any]]
    #: examples: this many at most (None: the profile's max_examples)
    max_examples: int | None = None
    needs_where: bool = False


@dataclass(frozen=True)
class CheckResult:
    """What running one check gave."""

    name: str
    description: str
    passed: bool
    examples: int
    seconds: float
    message: str = ""
    applicable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _cases(**kw: Any) -> Callable[[props.SoftmaxFamily], st.SearchStrategy[SoftmaxCase]]:
    def make(family: props.SoftmaxFamily) -> st.SearchStrategy[SoftmaxCase]:
        opts = {"max_side": 8, **kw}
        if not family.supports_where:
            opts["with_where"] = False
        opts.setdefault("allow_tuple_axis", family.supports_tuple_axis)
        if not family.supports_tuple_axis:
            opts["allow_tuple_axis"] = False
        return softmax_cases(**opts)

    return make


def _with_shift(family: props.SoftmaxFamily) -> st.SearchStrategy[Any]:
    shift = st.one_of(
        st.integers(-64, 64).map(float),  # usually exact for moderate logits
        st.floats(-1e3, 1e3, allow_nan=False),  # usually inexact
    )
    return st.tuples(_cases()(family), shift)


def _with_perm(family: props.SoftmaxFamily) -> st.SearchStrategy[Any]:
    @st.composite
    def make(draw: st.DrawFn) -> tuple[SoftmaxCase, list[int]]:
        case = draw(_cases()(family))
        from attnspec.spec.properties import _layout

        n = _layout(case.x.shape, case.axis).n
        return case, draw(st.permutations(range(n)))

    return make()


BATTERY: list[Check] = [
    Check(
        "sum_to_one",
        "softmax slices sum to 1 within the derived bound (Hypothesis, hard "
        "logits, profile's examples)",
        props.check_sum_to_one,
        _cases(),
    ),
    Check(
        "bounded",
        "0 <= softmax <= 1 and log_softmax <= 0, exactly (Hypothesis, hard logits)",
        props.check_bounded,
        _cases(),
    ),
    Check(
        "excluded",
        "excluded entries weigh exactly 0 and NaN/inf there never leaks "
        "(Hypothesis, random where masks)",
        props.check_excluded,
        _cases(with_where=True),
        needs_where=True,
    ),
    Check(
        "shift_invariance",
        "softmax(x + c) = softmax(x): bitwise for exact shifts, else "
        "within the derived bound (Hypothesis, hard logits, random c)",
        props.check_shift_invariance,
        _with_shift,
    ),
    Check(
        "permutation",
        "softmax(x[perm]) = softmax(x)[perm] within the derived bound "
        "(Hypothesis, random permutations)",
        props.check_permutation,
        _with_perm,
    ),
    Check(
        "order",
        "x_i > x_j => p_i >= p_j, ties equal (Hypothesis, hard logits)",
        props.check_order,
        _cases(),
    ),
    Check(
        "lse_bounds",
        "max x <= LSE <= max x + log n with rounding slack (Hypothesis)",
        props.check_lse_bounds,
        _cases(),
    ),
    Check(
        "consistency",
        "log_softmax = log(softmax) = x - LSE within bounds (Hypothesis)",
        props.check_consistency,
        _cases(max_side=4),
    ),
    Check(
        "agreement",
        "every result within the claimed bound of attnspec.exact at 50 digits "
        "(Hypothesis, at most 50 examples of up to 5 per side: mpmath is slow)",
        props.check_agreement,
        _cases(max_side=5),
        max_examples=50,
    ),
    Check(
        "special_values",
        "empty, NaN and +inf slices follow the rules exactly (Hypothesis)",
        props.check_special_values,
        _cases(),
    ),
]


def _call(check: Check, family: props.SoftmaxFamily, drawn: Any) -> None:
    if check.prop is props.check_shift_invariance:
        case, c = drawn
        check.prop(family, case.x, case.axis, case.where, c=c)
    elif check.prop is props.check_permutation:
        case, perm = drawn
        check.prop(family, case.x, case.axis, case.where, perm=perm)
    else:
        check.prop(family, drawn.x, drawn.axis, drawn.where)


def _build(
    check: Check, family: props.SoftmaxFamily, base: settings, n: int
) -> tuple[Callable[[], None], list[int]]:
    """The @given test of ``check`` on ``family`` and its example counter."""
    count = [0]

    @settings(
        base,
        max_examples=n,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=[
            *base.suppress_health_check,
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
        ],
    )
    @given(check.cases(family))
    def run(drawn: Any) -> None:
        count[0] += 1
        _call(check, family, drawn)

    return run, count


def run_battery(
    family: props.SoftmaxFamily,
    profile_settings: settings | None = None,
    checks: list[Check] | None = None,
) -> list[CheckResult]:
    """Run ``checks`` (default :data:`BATTERY`) on ``family``; one result per check.

    ``profile_settings`` (default: the active Hypothesis profile) sets the examples per
    check; a check's own ``max_examples`` caps it. A failure is shrunk by Hypothesis; its
    message holds the property's explanation and a reproduction.
    """
    base = profile_settings if profile_settings is not None else settings()
    results = []
    for check in checks if checks is not None else BATTERY:
        if check.needs_where and not family.supports_where:
            results.append(
                CheckResult(
                    check.name,
                    check.description,
                    True,
                    0,
                    0.0,
                    "not applicable: no where= support",
                    applicable=False,
                )
            )
            continue
        n = (
            base.max_examples
            if check.max_examples is None
            else min(base.max_examples, check.max_examples)
        )
        run, count = _build(check, family, base, n)
        t0 = time.perf_counter()
        try:
            run()
        except AssertionError as exc:  # PropertyViolation, shrunk
            results.append(
                CheckResult(
                    check.name,
                    check.description,
                    False,
                    count[0],
                    time.perf_counter() - t0,
                    str(exc),
                )
            )
            continue
        except Exception as exc:  # the implementation raised: a failure too
            results.append(
                CheckResult(
                    check.name,
                    check.description,
                    False,
                    count[0],
                    time.perf_counter() - t0,
                    f"{type(exc).__name__}: {exc}",
                )
            )
            continue
        results.append(
            CheckResult(check.name, check.description, True, count[0], time.perf_counter() - t0)
        )
    return results
