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
    "SIZE_LIMITS",
    "as_array",
    "as_real_float64",
    "as_where",
    "check_size",
    "normalize_axes",
    "set_size_limit",
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


def as_array(x: object, name: str) -> npt.NDArray[Any]:
    """``np.asarray(x)``, with the errors a user can act on.

    A numpy masked array is refused (TypeError): its mask would be dropped silently;
    pass ``x.filled(value)``, or the mask as ``where=`` / ``mask=``. A ragged nested
    sequence is refused (ValueError) naming the argument, where numpy would say
    "setting an array element with a sequence".
    """
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array, whose mask attnspec would ignore: pass "
            f"{name}.filled(value) for the values, and the mask as where= (softmax) or "
            "mask= (sdpa; True = may attend)"
        )
    try:
        return np.asarray(x)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(
            f"{name} must be a rectangular array (nested sequences of equal lengths): {exc}"
        ) from None


#: the largest job each arithmetic accepts, in elements (softmax family: entries of x;
#: sdpa: logits, (..., Hq, L, S)), so that a mistake (a broadcast of 1e12 elements) fails
#: at once instead of running for hours. Measured on the 2-core development machine:
#: accurate about 40 ns per element (2**31: about 90 s), fast about 10 ns, exact (mpmath)
#: about 30 us (2**20: about 30 s). None: no limit. Change with :func:`set_size_limit`.
SIZE_LIMITS: dict[str, int | None] = {"fast": 2**33, "accurate": 2**31, "exact": 2**20}


def set_size_limit(precision: str, elements: int | None) -> int | None:
    """Set the size limit of ``precision`` ("fast", "accurate" or "exact"; None: no
    limit) and return the previous one."""
    if precision not in SIZE_LIMITS:
        raise ValueError(f"precision must be one of {tuple(SIZE_LIMITS)}, got {precision!r}")
    if elements is not None and (
        isinstance(elements, bool) or not isinstance(elements, int) or elements < 1
    ):
        raise ValueError(f"elements must be a positive int or None, got {elements!r}")
    old = SIZE_LIMITS[precision]
    SIZE_LIMITS[precision] = elements
    return old


def check_size(elements: int, precision: str, what: str) -> None:
    """ValueError when a job of ``elements`` exceeds the limit of ``precision``."""
    limit = SIZE_LIMITS.get(precision)
    if limit is not None and elements > limit:
        raise ValueError(
            f"{elements:.3g} {what} exceed the size limit of precision={precision!r}, "
            f"{limit} elements (attnspec.reference.inputs.SIZE_LIMITS): evaluate the work in "
            f"slices (for example a loop over the batch or head axes), or raise the limit with "
            f"attnspec.reference.inputs.set_size_limit({precision!r}, n) if the time is meant"
        )


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
    arr = as_array(x, name)
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
    if dt == np.object_ and not isinstance(x, np.ndarray) and arr.size and _all_python_reals(arr):
        # Python ints beyond int64 (2**70) in a list or scalar make an object array: they
        # are real numbers, rounded to the nearest float64 like any integer beyond 2**53
        # (an object ndarray passed as such is still refused below)
        try:
            return np.array([float(v) for v in arr.ravel().tolist()]).reshape(arr.shape)
        except OverflowError:
            raise ValueError(
                f"{name} holds an integer beyond the float64 range (about 1.8e308)"
            ) from None
    if dt.kind == "f":
        raise TypeError(
            f"{name} has dtype {dt}, wider than float64; attnspec computes in float64 "
            f"and will not round {name} silently: convert it with {name}.astype(np.float64)"
        )
    raise TypeError(
        f"{name} must hold real numbers (float16, bfloat16, float32, float64 or "
        f"integers), got dtype {dt} with shape {arr.shape}"
    )


def _all_python_reals(arr: npt.NDArray[Any]) -> bool:
    """Whether an object array holds only Python ints and floats (no bools)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in arr.ravel().tolist())


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
    w = as_array(where, name)
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
