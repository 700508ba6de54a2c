"""Hypothesis strategies for the softmax family: logits, axes, masks and dtypes.

Built on :mod:`hypothesis.extra.numpy`. :func:`logits` reaches the hard cases of softmax
numerics by drawing a *regime* per array (moderate, wide, huge, near underflow,
subnormal, ties) and then, optionally, sprinkling special values (+-inf, NaN, -0.0);
:func:`softmax_cases` combines logits with an axis and a ``where`` mask into a
:class:`SoftmaxCase`. Every strategy is tested in ``tests/test_strategies.py`` to reach
what its docstring says.

Like :mod:`hypothesis.extra.numpy`, every public strategy checks its arguments, but
when it is built (called), not when a value is drawn: a bad one raises
:class:`hypothesis.errors.InvalidArgument` naming the argument, its value and what was
expected.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

__all__ = [
    "DTYPES",
    "REGIMES",
    "SoftmaxCase",
    "axes_for",
    "dtypes",
    "logits",
    "shapes",
    "softmax_cases",
    "where_masks",
]

F64 = npt.NDArray[np.float64]

#: the regimes :func:`logits` draws from
REGIMES = ("moderate", "wide", "huge", "underflow", "subnormal", "ties")

#: input dtypes the API accepts: float16, bfloat16, float32, float64 and integers
DTYPES: tuple[np.dtype[Any], ...] = tuple(
    np.dtype(d)
    for d in (
        np.float16,
        ml_dtypes.bfloat16,
        np.float32,
        np.float64,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
    )
)

_SMALLEST_SUBNORMAL = 2.0**-1074
_SMALLEST_NORMAL = 2.0**-1022


@dataclass(frozen=True)
class SoftmaxCase:
    """One call's inputs: ``x`` (float64), ``axis`` and ``where`` (bool or None)."""

    x: F64
    axis: int | tuple[int, ...] | None = -1
    where: npt.NDArray[np.bool_] | None = None

    def __repr__(self) -> str:
        w = "" if self.where is None else f", where={self.where.tolist()!r}"
        return f"SoftmaxCase(x={self.x.tolist()!r}, axis={self.axis!r}{w})"


# ---------------------------------------------------------------------------------------
# Argument checks: at build time, in the style of hypothesis.extra.numpy
# ---------------------------------------------------------------------------------------


def _got(name: str, value: object) -> str:
    return f"{name}={value!r} (type={type(value).__name__})"


def _check_bool(value: object, name: str, *, allow_none: bool = False) -> None:
    """InvalidArgument unless ``value`` is a bool (or None, with ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        expected = "a bool or None" if allow_none else "a bool"
        raise InvalidArgument(f"Expected {expected} but got {_got(name, value)}")


def _check_int(value: object, name: str, *, at_least: int) -> None:
    """InvalidArgument unless ``value`` is an integer (not a bool) >= ``at_least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"Expected an int but got {_got(name, value)}")
    if value < at_least:
        raise InvalidArgument(f"Expected {name} >= {at_least} but got {name}={value!r}")


def _check_order(lo: int, hi: int, lo_name: str, hi_name: str) -> None:
    """InvalidArgument unless ``lo <= hi``."""
    if lo > hi:
        raise InvalidArgument(
            f"Expected {lo_name} <= {hi_name} but got {lo_name}={lo!r} > {hi_name}={hi!r}"
        )


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    """InvalidArgument unless ``value`` is None or one of ``choices``."""
    if value is None:
        return
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"Expected None or one of {choices!r} but got {_got(name, value)}")


def _is_shape(value: object) -> bool:
    """A tuple or list of non-negative ints (not bools), as hnp.arrays takes."""
    return isinstance(value, (tuple, list)) and all(
        isinstance(side, int) and not isinstance(side, bool) and side >= 0 for side in value
    )


def _regime_elements(regime: str) -> st.SearchStrategy[float]:
    """Finite float64 values of one regime."""
    if regime == "moderate":
        return st.floats(-10.0, 10.0, allow_nan=False)
    if regime == "wide":
        return st.floats(-1e3, 1e3, allow_nan=False)
    if regime == "huge":
        return st.one_of(
            st.floats(-1e308, 1e308, allow_nan=False, allow_infinity=False),
            st.sampled_from([1e308, -1e308, 1.7976931348623157e308, -1.7976931348623157e308]),
        )
    if regime == "subnormal":
        return st.one_of(
            st.floats(-_SMALLEST_NORMAL, _SMALLEST_NORMAL, allow_subnormal=True),
            st.sampled_from([0.0, -0.0, _SMALLEST_SUBNORMAL, -_SMALLEST_SUBNORMAL]),
        )
    raise ValueError(f"no elements for regime {regime!r}")


def logits(
    shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    regime: str | None = None,
    allow_nan: bool = True,
    allow_infinity: bool = True,
) -> st.SearchStrategy[F64]:
    """float64 logits that reach the hard cases of softmax numerics.

    One regime per array (``regime=None``: drawn from :data:`REGIMES`):

    * ``moderate``: uniform-ish in [-10, 10];
    * ``wide``: in [-1e3, 1e3], differences far beyond the 709.78 where ``exp`` overflows;
    * ``huge``: anywhere in +-1e308 and the extremes +-1.797e308, so that ``x - max``
      overflows;
    * ``underflow``: a base value plus offsets in [-760, -700] with one offset 0, so that
      the other terms ``e^{x_j - max}`` are subnormal or round to 0;
    * ``subnormal``: subnormal logits, +-0.0 and +-2**-1074 (softmax of values that are
      all but equal);
    * ``ties``: every entry one of at most three values (ties of the maximum included).

    Then, with ``allow_infinity``/``allow_nan``, some entries may become +inf, -inf or
    NaN (about one array in three). ``shape`` (a tuple of non-negative ints, or a
    strategy of them) defaults to :func:`shapes`.
    """
    if not (shape is None or isinstance(shape, st.SearchStrategy) or _is_shape(shape)):
        raise InvalidArgument(
            "Expected None, a strategy of shapes or a tuple of non-negative ints but got "
            + _got("shape", shape)
        )
    _check_choice(regime, "regime", REGIMES)
    _check_bool(allow_nan, "allow_nan")
    _check_bool(allow_infinity, "allow_infinity")
    return _logits(shape, regime=regime, allow_nan=allow_nan, allow_infinity=allow_infinity)


@st.composite
def _logits(
    draw: st.DrawFn,
    shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None,
    *,
    regime: str | None,
    allow_nan: bool,
    allow_infinity: bool,
) -> F64:
    """:func:`logits`, its arguments checked."""
    if shape is None:
        shape = shapes()
    shp = draw(shape) if isinstance(shape, st.SearchStrategy) else tuple(shape)
    reg = regime if regime is not None else draw(st.sampled_from(REGIMES))
    size = int(np.prod(shp, dtype=np.int64))
    if reg == "ties":
        pool = draw(
            st.lists(st.floats(-50.0, 50.0, allow_nan=False), min_size=1, max_size=3, unique=True)
        )
        x = draw(hnp.arrays(np.float64, shp, elements=st.sampled_from(pool)))
    elif reg == "underflow":
        base = draw(st.floats(-1e3, 1e3, allow_nan=False))
        offsets = draw(hnp.arrays(np.float64, shp, elements=st.floats(-760.0, -700.0)))
        if size:
            offsets.reshape(-1)[draw(st.integers(0, size - 1))] = 0.0
        x = base + offsets
    else:
        x = draw(hnp.arrays(np.float64, shp, elements=_regime_elements(reg)))
    x = np.array(x, dtype=np.float64)
    specials = [
        v
        for v, ok in ((np.inf, allow_infinity), (-np.inf, allow_infinity), (np.nan, allow_nan))
        if ok
    ]
    if specials and size and draw(st.integers(0, 2)) == 0:
        n_special = draw(st.integers(1, min(size, 3)))
        for _ in range(n_special):
            x.reshape(-1)[draw(st.integers(0, size - 1))] = draw(st.sampled_from(specials))
    return x


def shapes(
    min_dims: int = 1, max_dims: int = 3, min_side: int = 0, max_side: int = 6
) -> st.SearchStrategy[tuple[int, ...]]:
    """Array shapes, empty sides (0) included by default; small, so the exact reference
    stays fast."""
    _check_int(min_dims, "min_dims", at_least=0)
    _check_int(max_dims, "max_dims", at_least=0)
    _check_order(min_dims, max_dims, "min_dims", "max_dims")
    _check_int(min_side, "min_side", at_least=0)
    _check_int(max_side, "max_side", at_least=0)
    _check_order(min_side, max_side, "min_side", "max_side")
    # drawn side by side (hnp.array_shapes favours sides of 1 and 2 strongly)
    return st.integers(min_dims, max_dims).flatmap(
        lambda nd: st.tuples(*[st.integers(min_side, max_side)] * nd)
    )


def axes_for(ndim: int, *, allow_tuple: bool = True) -> st.SearchStrategy[Any]:
    """A valid ``axis`` for an array of ``ndim`` dimensions: an int (negative ones too),
    and with ``allow_tuple`` a tuple of distinct axes or None (all axes)."""
    _check_int(ndim, "ndim", at_least=1)
    _check_bool(allow_tuple, "allow_tuple")
    ndim = int(ndim)  # hnp.valid_tuple_axes takes a plain int
    ints = st.integers(-ndim, ndim - 1)
    if not allow_tuple:
        return ints
    return st.one_of(ints, hnp.valid_tuple_axes(ndim, min_size=1), st.none())


def where_masks(shape: Sequence[int]) -> st.SearchStrategy[npt.NDArray[np.bool_]]:
    """A bool mask that broadcasts to ``shape`` (a tuple of non-negative ints): of that
    shape or a broadcastable one (fewer dimensions, sides of 1), all True, all False, or
    random."""
    if not _is_shape(shape):
        raise InvalidArgument(
            "Expected a tuple of non-negative ints but got " + _got("shape", shape)
        )
    return _where_masks(shape)


@st.composite
def _where_masks(draw: st.DrawFn, shape: Sequence[int]) -> npt.NDArray[np.bool_]:
    """:func:`where_masks`, its argument checked."""
    # a suffix of shape's dimensions, each side kept or replaced by 1
    k = draw(st.integers(0, len(shape)))
    suffix = shape[len(shape) - k :]
    mshape = tuple(1 if draw(st.booleans()) else side for side in suffix)
    kind = draw(st.sampled_from(("random", "all", "none")))
    if kind == "all":
        return np.ones(mshape, dtype=bool)
    if kind == "none":
        return np.zeros(mshape, dtype=bool)
    return np.asarray(draw(hnp.arrays(np.bool_, mshape)), dtype=bool)


def dtypes(*, floats_only: bool = False) -> st.SearchStrategy[np.dtype[Any]]:
    """Input dtypes: float16, bfloat16 (ml_dtypes), float32, float64, and signed and
    unsigned integers of every width (unless ``floats_only``)."""
    _check_bool(floats_only, "floats_only")
    pool = [d for d in DTYPES if d.kind in "fV"] if floats_only else list(DTYPES)
    return st.sampled_from(pool)


def softmax_cases(
    *,
    regime: str | None = None,
    allow_nan: bool = True,
    allow_infinity: bool = True,
    with_where: bool | None = None,
    allow_tuple_axis: bool = True,
    max_side: int = 6,
    max_dims: int = 3,
) -> st.SearchStrategy[SoftmaxCase]:
    """A :class:`SoftmaxCase`: :func:`logits`, an axis from :func:`axes_for` and a mask
    from :func:`where_masks` (``with_where``: always, never, or None: half the time).

    ``max_side`` and ``max_dims`` (both at least 1) bound the shape. About one case in
    ten may have empty sides (and so empty slices or an empty x).
    """
    _check_choice(regime, "regime", REGIMES)
    _check_bool(allow_nan, "allow_nan")
    _check_bool(allow_infinity, "allow_infinity")
    _check_bool(with_where, "with_where", allow_none=True)
    _check_bool(allow_tuple_axis, "allow_tuple_axis")
    _check_int(max_side, "max_side", at_least=1)
    _check_int(max_dims, "max_dims", at_least=1)
    return _softmax_cases(
        regime=regime,
        allow_nan=allow_nan,
        allow_infinity=allow_infinity,
        with_where=with_where,
        allow_tuple_axis=allow_tuple_axis,
        max_side=max_side,
        max_dims=max_dims,
    )


@st.composite
def _softmax_cases(
    draw: st.DrawFn,
    *,
    regime: str | None,
    allow_nan: bool,
    allow_infinity: bool,
    with_where: bool | None,
    allow_tuple_axis: bool,
    max_side: int,
    max_dims: int,
) -> SoftmaxCase:
    """:func:`softmax_cases`, its arguments checked."""
    # one case in ten may have empty sides; the others have at least one entry per side
    min_side = 0 if draw(st.integers(0, 9)) == 0 else 1
    shape = draw(shapes(max_dims=max_dims, min_side=min_side, max_side=max_side))
    x = draw(logits(shape, regime=regime, allow_nan=allow_nan, allow_infinity=allow_infinity))
    axis = draw(axes_for(len(shape), allow_tuple=allow_tuple_axis))
    use_where = draw(st.booleans()) if with_where is None else with_where
    where = draw(where_masks(shape)) if use_where else None
    return SoftmaxCase(x=x, axis=axis, where=where)
