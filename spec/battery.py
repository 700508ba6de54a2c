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

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

from attnspec.spec import TOPICS
from attnspec.spec.properties._core import Check

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


def _given(
    strategy: st.SearchStrategy[Any],
    body: Callable[[Any], None],
    base: settings,
    n: int,
    seed: int | None = None,
) -> tuple[Callable[[], None], list[int]]:
    """``body`` as a Hypothesis test over ``strategy`` with ``n`` examples (drawn with
    ``seed`` where one is given), and its example counter (shared by the softmax and the
    attention batteries)."""
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

    if seed is not None:
        run = hseed(seed)(run)
    return run, count


def _build(
    check: Check, impl: Any, base: settings, n: int, seed: int | None = None
) -> tuple[Callable[[], None], list[int]]:
    """The @given test of ``check`` on ``impl`` and its example counter."""

    def body(drawn: Any) -> None:
        args, kwargs = check.arguments(drawn)
        check.prop(impl, *args, **kwargs)

    return _given(check.cases(impl), body, base, n, seed)


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
    seed: int | None = None,
) -> list[CheckResult]:
    """Run ``checks`` (default: the battery of ``impl``'s topic, :data:`BATTERIES`) on
    ``impl``; one result per check; ``seed`` fixes the examples drawn (None: Hypothesis's
    own choice).

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
        run, count = _build(check, impl, base, n, seed)
        results.append(_run_one(check.name, check.description, run, count))
    return results


def run_attention_battery(
    impl: Any,
    profile_settings: settings | None = None,
    checks: list[Check] | None = None,
) -> list[CheckResult]:
    """:func:`run_battery` with :data:`ATTENTION_BATTERY` by default."""
    return run_battery(impl, profile_settings, ATTENTION_BATTERY if checks is None else checks)


#: topic -> its battery: ``BATTERY`` of attnspec.spec.properties.<topic>, for every topic
BATTERIES: dict[str, list[Check]] = {
    topic: importlib.import_module(f"attnspec.spec.properties.{topic}").BATTERY for topic in TOPICS
}
#: the softmax and attention batteries, by their former names
BATTERY = BATTERIES["softmax"]
ATTENTION_BATTERY = BATTERIES["attention"]
#: the attention checks are :class:`Check` too (the name is kept for callers)
AttentionCheck = Check


def _battery_of(impl: Any) -> list[Check]:
    try:
        return BATTERIES[impl.topic]
    except (AttributeError, KeyError):
        raise ValueError(
            f"{impl!r} is not an Implementation of a topic in {TOPICS}; pass checks="
        ) from None
