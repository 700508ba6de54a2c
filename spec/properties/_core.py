"""What the properties of every topic share: the violation, comparisons, reproductions.

One copy of each helper, used by :mod:`attnspec.spec.properties.softmax` and
:mod:`attnspec.spec.properties.attention` (and the topics to come).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import mpmath
import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from attnspec.spec.tolerances._core import ACCURACIES, Accuracy

__all__ = [
    "ACCURACIES",
    "Accuracy",
    "Arguments",
    "Check",
    "Implementation",
    "PropertyViolation",
    "abs_error",
    "array_repr",
    "caller_name",
    "check_accuracy",
    "claims_of",
    "float_repr",
    "same",
    "tests_claims",
    "two_sum_error",
]

F64 = npt.NDArray[np.float64]
CheckFn = TypeVar("CheckFn", bound=Callable[..., None])
_DBL_MAX = float(np.finfo(np.float64).max)


def check_accuracy(accuracy: object) -> Accuracy:
    """``accuracy`` if it is a claim of :data:`ACCURACIES` or a number >= 0, else ValueError."""
    if isinstance(accuracy, str):
        if accuracy not in ACCURACIES:
            raise ValueError(
                f"accuracy must be one of {ACCURACIES!r} or a number >= 0, got {accuracy!r}"
            )
        return accuracy
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float | np.floating):
        raise ValueError(
            f"accuracy must be one of {ACCURACIES!r} or a number >= 0, got {accuracy!r}"
        )
    if not float(accuracy) >= 0:
        raise ValueError(f"an explicit accuracy must be a number >= 0, got {accuracy!r}")
    return float(accuracy)


class PropertyViolation(AssertionError):
    """A property does not hold; the message says where and how, and how to reproduce it."""

    def __init__(self, prop: str, implementation: str, detail: str, reproduction: str) -> None:
        self.property = prop
        self.family = implementation  # the name it had for the softmax family
        self.implementation = implementation
        self.detail = detail
        self.reproduction = reproduction
        super().__init__(
            f"{prop} fails for {implementation}: {detail}\n  reproduce: {reproduction}"
        )


@dataclass(frozen=True, repr=False)
class Implementation:
    """A thing that claims to compute one topic's functions, and what it claims.

    Each topic's properties take their own subclass (:class:`~attnspec.spec.properties.
    softmax.SoftmaxFamily`, :class:`~attnspec.spec.properties.attention.AttentionImpl`),
    which adds the callables and the capabilities; the name, the accuracy claim and the
    form of a reproduction are the same for every topic.

    Attributes
    ----------
    name : str
        Shown in messages and reports.
    accuracy : "accurate", "fast" or a number >= 0
        The claim it is held to (:data:`ACCURACIES`; the bounds are in each topic's
        tolerances module).
    call : str, optional
        How a reproduction is written: a format string with ``{args}`` (and ``{kind}``
        for a topic of several functions). Default: ``name.kind(args)`` or ``name(args)``.
    """

    #: the topic whose functions it computes (each subclass sets it)
    topic: ClassVar[str] = ""

    name: str
    accuracy: Accuracy = field(default="fast", kw_only=True)
    call: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        check_accuracy(self.accuracy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, accuracy={self.accuracy!r})"

    def reproduce(self, args: str, kind: str | None = None) -> str:
        """The call that reproduces a failure, with the arguments ``args`` (source)."""
        if self.call is not None:
            return self.call.format(kind=kind, args=args)
        return f"{self.name}.{kind}({args})" if kind else f"{self.name}({args})"


def caller_name() -> str:
    """The name of the property being checked: the nearest ``check_*`` frame, without
    its prefix (``"property"`` when called from elsewhere)."""
    for frame in inspect.stack()[1:]:
        if frame.function.startswith("check_"):
            return frame.function[len("check_") :]
    return "property"


def same(a: Any, b: Any) -> Any:
    """Elementwise bitwise equality with NaN equal to NaN (and -0.0 equal to 0.0)."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def two_sum_error(a: F64, b: F64) -> F64:
    """The rounding error of fl(a + b), exactly (Knuth's TwoSum); 0 where not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
    return np.where(np.isfinite(s) & np.isfinite(a), err, 0.0)


def abs_error(c: float, y: Any) -> Any:
    """|c - y| in mpmath, with the conventions of rounding: 0 for equal specials (equal
    infinities, NaN and NaN) and for an infinite c where the exact y is beyond the float64
    range with the same sign; any other disagreement about a special value is inf."""
    if math.isnan(c) or mpmath.isnan(y):
        return mpmath.mpf(0) if (math.isnan(c) and mpmath.isnan(y)) else mpmath.inf
    if math.isinf(c):
        if mpmath.isinf(y) or abs(y) > _DBL_MAX:
            return mpmath.mpf(0) if (c > 0) == (y > 0) else mpmath.inf
        return mpmath.inf
    if mpmath.isinf(y):
        return mpmath.inf
    return abs(mpmath.mpf(c) - y)


def float_repr(v: float) -> str:
    """A float as Python source (``np.nan``, ``np.inf``, ``-np.inf`` or its repr)."""
    if math.isnan(v):
        return "np.nan"
    if math.isinf(v):
        return "np.inf" if v > 0 else "-np.inf"
    return repr(float(v))


def array_repr(a: npt.NDArray[Any], limit: int = 400) -> str:
    """An array as Python source that rebuilds it exactly (``np.array([...])``), or a
    placeholder naming its shape when it has more than ``limit`` entries."""
    if a.size > limit:
        return f"<array of shape {a.shape}, too large to print>"
    if a.size == 0:  # np.array([]) would lose the shape
        return f"np.zeros({a.shape!r}, dtype={a.dtype.name!r})"
    body = np.array2string(
        a,
        separator=", ",
        threshold=limit + 1,
        max_line_width=10**6,
        formatter={"float_kind": float_repr, "bool": lambda b: str(bool(b))},  # type: ignore[arg-type]
    )
    return f"np.array({body})"


def tests_claims(*names: str) -> Callable[[CheckFn], CheckFn]:
    """Mark a property with the claims of :mod:`attnspec.spec.derivations` it tests on an
    implementation (none: it tests the definition as a whole, e.g. agreement with the
    exact arithmetic). tests/test_claims_coverage.py requires every claim to be tested by
    some property or listed in :data:`attnspec.spec.properties.SYMBOLIC_ONLY`."""

    def mark(check: CheckFn) -> CheckFn:
        check.claims = tuple(names)  # type: ignore[attr-defined]
        return check

    return mark


def claims_of(check: Callable[..., None]) -> tuple[str, ...]:
    """The claims a property tests (:func:`tests_claims`); AttributeError if unmarked."""
    return tuple(check.claims)  # type: ignore[attr-defined]


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
