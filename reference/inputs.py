"""Input checks at the API boundary: dtypes, axes and masks.

Every public function of :mod:`attnspec.reference` calls these before it computes
anything, so that a mistake is reported once, in one wording, naming the argument,
what it got and what was expected. The checks never modify their input: arrays are
converted to float64 copies (or read-only views when already float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "as_real_float64",
    "as_where",
    "normalize_axes",
]

F64 = npt.NDArray[np.float64]


def _is_ml_dtypes_float(dtype: np.dtype[Any]) -> bool:
    """True for the ml_dtypes floating types (bfloat16, float8_*, ...)."""
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is a declared dependency
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return dtype.kind == "V"


def as_real_float64(x: object, name: str) -> F64:
    """Return ``x`` as a float64 array, refusing what is not a real number.

    Accepted: float16, bfloat16 and the other ml_dtypes floats, float32, float64,
    signed and unsigned integers, and Python numbers and nested sequences of them.
    Each value converts to float64 exactly, except integers beyond 2**53, which
    round to the nearest float64.

    Refused with a TypeError: bool (a mask passed where numbers are expected is
    almost always a mistake), complex, object, string and datetime arrays, and
    floating types wider than float64 (converting them would round silently).
    """
    arr = np.asarray(x)
    dt = arr.dtype
    if dt == np.bool_:
        raise TypeError(
            f"{name} must hold real numbers (floating or integer), got a bool array of "
            f"shape {arr.shape}; convert it explicitly (e.g. {name}.astype(float)) if "
            "the values are meant as numbers"
        )
    if (dt.kind in "fiu" and dt.itemsize <= 8) or _is_ml_dtypes_float(dt):
        # float64 input is passed through as it is (not even marked read-only:
        # numpy's argmax is several times slower on read-only arrays); the
        # definitions copy before they write, and the tests check that no input
        # is modified.
        return arr.astype(np.float64, copy=False)
    if dt.kind == "f":
        raise TypeError(
            f"{name} has dtype {dt}, wider than float64; attnspec computes in float64 "
            f"and will not round {name} silently: convert it with {name}.astype(np.float64)"
        )
    raise TypeError(
        f"{name} must hold real numbers (float16, bfloat16, float32, float64 or "
        f"integers), got dtype {dt} with shape {arr.shape}"
    )


def normalize_axes(axis: object, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Turn ``axis`` (an int, a tuple of ints, or None for all) into sorted axes.

    Raises TypeError for something that is not an integer, ValueError for an axis
    out of range for an array of ``ndim`` dimensions or named twice.
    """
    if axis is None:
        return tuple(range(ndim))
    items: Sequence[object]
    if isinstance(axis, tuple | list):
        items = axis
    else:
        items = (axis,)
    out: list[int] = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise TypeError(f"{name} must be an int, a tuple of ints or None, got {axis!r}")
        ai = int(a)
        if not -ndim <= ai < ndim:
            raise ValueError(
                f"{name}={axis!r} is out of range for an array with {ndim} dimension(s): "
                f"each axis must lie in [{-ndim}, {ndim - 1}]"
            )
        out.append(ai % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis more than once")
    return tuple(sorted(out))


def as_where(where: object, shape: tuple[int, ...], name: str = "where") -> npt.NDArray[np.bool_]:
    """Return ``where`` as a bool array broadcast to ``shape`` (True = included).

    Raises TypeError when ``where`` is not boolean and ValueError when it does not
    broadcast to ``shape``; the message names both shapes.
    """
    w = np.asarray(where)
    if w.dtype != np.bool_:
        raise TypeError(
            f"{name} must be a bool array (True = included), got dtype {w.dtype}; "
            f"a numeric {name} is refused because 0/1 and additive masks are easy to confuse"
        )
    try:
        return np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(
            f"{name} with shape {w.shape} does not broadcast to the shape of x, {shape}"
        ) from None
