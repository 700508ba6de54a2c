"""The property batteries of every topic, as data, and one runner.

A battery is a list of :class:`Check`: a property of :mod:`attnspec.spec.properties`, the
strategy of what it is run on, the features it needs and how to call it. :data:`BATTERY`
holds the softmax checks, :data:`ATTENTION_BATTERY` the attention checks (:data:`BATTERIES`
by topic). :func:`run_battery` runs each check under Hypothesis against an
:class:`~attnspec.spec.properties._core.Implementation` of the topic, with the active (or
given) settings profile, and returns one :class:`CheckResult` per check, for ``attnspec
verify`` to print one line each. A check whose features the implementation lacks is
reported as not applicable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnspec.spec.properties import softmax as props
from attnspec.spec.strategies.softmax import SoftmaxCase, softmax_cases

__all__ = [
    "ATTENTION_BATTERY",
    "BATTERIES",
    "BATTERY",
    "AttentionCheck",
    "Check",
    "CheckResult",
    "run_attention_battery",
    "run_battery",
]

#: a drawn value -> the property's arguments after the implementation, and keywords
Arguments = Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]


def _the_case(drawn: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (drawn,), {}


@dataclass(frozen=True)
class Check:
    """One named check: a property ``prop(impl, case, **keywords)``, the strategy of what
    it runs on, the features it needs, and how many examples."""

    name: str
    description: str
    prop: Callable[..., None]
    #: the strategy of drawn values, given the implementation (its features)
    cases: Callable[[Any], st.SearchStrategy[Any]]
    #: examples: this many at most (None: the profile's max_examples)
    max_examples: int | None = None
    #: the features the implementation must have (else: not applicable)
    needs: frozenset[str] = frozenset()
    #: a drawn value -> the property's arguments after the implementation
    arguments: Arguments = _the_case


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
        from attnspec.spec.properties.softmax import slice_layout

        n = slice_layout(case.x.shape, case.axis).n
        return case, draw(st.permutations(range(n)))

    return make()


def _case_and(keyword: str) -> Arguments:
    """Arguments for a drawn ``(case, value)``: the case, and ``keyword=value``."""
    return lambda drawn: ((drawn[0],), {keyword: drawn[1]})


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
        needs=frozenset({"where"}),
    ),
    Check(
        "shift_invariance",
        "softmax(x + c) = softmax(x): bitwise for exact shifts, else "
        "within the derived bound (Hypothesis, hard logits, random c)",
        props.check_shift_invariance,
        _with_shift,
        arguments=_case_and("c"),
    ),
    Check(
        "permutation",
        "softmax(x[perm]) = softmax(x)[perm] within the derived bound "
        "(Hypothesis, random permutations)",
        props.check_permutation,
        _with_perm,
        arguments=_case_and("perm"),
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


def _given(
    strategy: st.SearchStrategy[Any], body: Callable[[Any], None], base: settings, n: int
) -> tuple[Callable[[], None], list[int]]:
    """``body`` as a Hypothesis test over ``strategy`` with ``n`` examples, and its
    example counter (shared by the softmax and the attention batteries)."""
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
            HealthCheck.data_too_large,
        ],
    )
    @given(strategy)
    def run(drawn: Any) -> None:
        count[0] += 1
        body(drawn)

    return run, count


def _build(check: Check, impl: Any, base: settings, n: int) -> tuple[Callable[[], None], list[int]]:
    """The @given test of ``check`` on ``impl`` and its example counter."""

    def body(drawn: Any) -> None:
        args, kwargs = check.arguments(drawn)
        check.prop(impl, *args, **kwargs)

    return _given(check.cases(impl), body, base, n)


def _not_applicable(name: str, description: str, why: str) -> CheckResult:
    """The result of a check the implementation has no feature for: passed, 0 examples."""
    return CheckResult(name, description, True, 0, 0.0, why, applicable=False)


def _examples(base: settings, cap: int | None) -> int:
    """The profile's examples per check, capped by the check's own ``max_examples``."""
    return base.max_examples if cap is None else min(base.max_examples, cap)


def _run_one(name: str, description: str, run: Callable[[], None], count: list[int]) -> CheckResult:
    """Run one built check; a violation (shrunk by Hypothesis) or an exception the
    implementation raised is a failure, reported with its message."""
    t0 = time.perf_counter()
    try:
        run()
    except AssertionError as exc:  # PropertyViolation, shrunk
        message = str(exc)
    except Exception as exc:  # the implementation raised: a failure too
        message = f"{type(exc).__name__}: {exc}"
    else:
        return CheckResult(name, description, True, count[0], time.perf_counter() - t0)
    return CheckResult(name, description, False, count[0], time.perf_counter() - t0, message)


def run_battery(
    impl: Any,
    profile_settings: settings | None = None,
    checks: list[Check] | None = None,
) -> list[CheckResult]:
    """Run ``checks`` (default: the battery of ``impl``'s topic, :data:`BATTERIES`) on
    ``impl``; one result per check.

    ``profile_settings`` (default: the active Hypothesis profile) sets the examples per
    check; a check's own ``max_examples`` caps it. A failure is shrunk by Hypothesis; its
    message holds the property's explanation and a reproduction.
    """
    base = profile_settings if profile_settings is not None else settings()
    results = []
    for check in checks if checks is not None else _battery_of(impl):
        missing = check.needs - set(impl.features)
        if missing:
            why = f"not applicable: needs {sorted(missing)}"
            if missing == {"where"}:
                why = "not applicable: no where= support"
            results.append(_not_applicable(check.name, check.description, why))
            continue
        n = _examples(base, check.max_examples)
        run, count = _build(check, impl, base, n)
        results.append(_run_one(check.name, check.description, run, count))
    return results


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------

#: the attention checks are :class:`Check` too (the name is kept for callers)
AttentionCheck = Check


def _attention_checks() -> list[Check]:
    from attnspec.spec.properties import attention as ap
    from attnspec.spec.strategies.attention import attention_cases

    def c(
        name: str, text: str, needs: tuple[str, ...] = (), n: int | None = 25, side: int = 4
    ) -> Check:
        def cases(impl: Any) -> st.SearchStrategy[Any]:
            return attention_cases(features=impl.features, max_side=side)

        return Check(name, text, ap.PROPERTIES[name], cases, n, frozenset(needs))

    return [
        c("weights_convex", "rows of P sum to 1; outputs within the visible values' range"),
        c("empty_rows", "a row that sees nothing: output exactly 0, lse -inf (sigma with a sink)"),
        c("query_permutation", "permuting queries permutes outputs and lse"),
        c("key_value_permutation", "permuting keys and values together changes nothing"),
        c("key_shift", "K + 1 u^T: same output, lse + tau q.u (bound: the logit perturbation)"),
        c("value_affine", "V + 1 c^T -> O + 1 c^T and V W -> O W"),
        c("scale_zero", "scale 0: the mean of the visible values, lse log n"),
        c("default_scale", "no scale = scale 1/sqrt(E)"),
        c("causal_prefix", "causal: the first t outputs = attention over the first t", ("causal",)),
        c("kv_cache", "bottom-right decoding = the last rows of causal attention", ("causal",)),
        c("alignments", "top_left = bottom_right = no align when L = S"),
        c("hidden_key", "mask False = bias -inf = key removed", ("mask",)),
        c("gqa_repeat", "GQA = kv heads repeated (h -> h // G)", ("gqa",)),
        c("sink_as_key", "a sink = an extra key with logit sigma and value 0", ("sinks", "mask")),
        c("alibi_causal", "causal ALiBi = bias m j (lse - m(i + o))", ("alibi", "causal", "mask")),
        c(
            "softcap_range",
            "softcap: lse in [log n - c, log n + c], weight ratios <= e^2c",
            ("softcap",),
        ),
        c(
            "dropout",
            "keep-mask: all True & p = 0 is none; P kappa/(1-p); expectation",
            ("dropout",),
            n=15,
        ),
        c("split_merge", "attention over two key blocks merged by their lse", ("mask", "lse")),
        c("lse_bounds", "max s <= lse <= max s + log n", ("lse",)),
        c("hidden_values", "NaN/inf at hidden positions never reach the output (bitwise)"),
        c(
            "agreement",
            "within the claimed bound of attnspec.exact at 50 digits (mpmath is slow: at most "
            "15 examples, L, S <= 3)",
            n=15,
            side=3,
        ),
    ]


#: the attention checks, in the order of the claims of spec/derivations/attention.py;
#: Hypothesis, at most 25 examples each (L, S <= 4): the whole battery must run in well
#: under 30 s per precision with the ci profile on 2 cores
ATTENTION_BATTERY: list[AttentionCheck] = _attention_checks()


def run_attention_battery(
    impl: Any,
    profile_settings: settings | None = None,
    checks: list[Check] | None = None,
) -> list[CheckResult]:
    """:func:`run_battery` with :data:`ATTENTION_BATTERY` by default."""
    return run_battery(impl, profile_settings, ATTENTION_BATTERY if checks is None else checks)


#: topic -> its battery
BATTERIES: dict[str, list[Check]] = {"softmax": BATTERY, "attention": ATTENTION_BATTERY}


def _battery_of(impl: Any) -> list[Check]:
    from attnspec.spec.properties.attention import AttentionImpl

    return BATTERIES["attention" if isinstance(impl, AttentionImpl) else "softmax"]
