"""What the properties of every topic share: the violation, comparisons, reproductions.

One copy of each helper, used by :mod:`attnspec.spec.properties.softmax` and
:mod:`attnspec.spec.properties.attention` (and the topics to come).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import mpmath
import numpy as np
import numpy.typing as npt

__all__ = [
    "PropertyViolation",
    "abs_error",
    "array_repr",
    "caller_name",
    "float_repr",
    "same",
    "two_sum_error",
]

F64 = npt.NDArray[np.float64]
_DBL_MAX = float(np.finfo(np.float64).max)


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
    body = np.array2string(
        a,
        separator=", ",
        threshold=limit + 1,
        max_line_width=10**6,
        formatter={"float_kind": float_repr, "bool": lambda b: str(bool(b))},  # type: ignore[arg-type]
    )
    return f"np.array({body})"
