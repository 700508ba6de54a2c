"""Hypothesis strategies for the softmax family: logits, axes, masks and dtypes.

Built on :mod:`hypothesis.extra.numpy`. :func:`logits` reaches the hard cases of softmax
numerics by drawing a *regime* per array (moderate, wide, huge, near underflow,
subnormal, ties) and then, optionally, sprinkling special values (+-inf, NaN, -0.0);
:func:`softmax_cases` combines logits with an axis and a ``where`` mask into a
:class:`SoftmaxCase`. Every strategy is tested in ``tests/test_strategies.py`` to reach
what its docstring says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
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


@st.composite
def logits(
    draw: st.DrawFn,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    regime: str | None = None,
    allow_nan: bool = True,
    allow_infinity: bool = True,
) -> F64:
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
    NaN (about one array in three). ``shape`` defaults to :func:`shapes`.
    """
    if shape is None:
        shape = shapes()
    shp = draw(shape) if isinstance(shape, st.SearchStrategy) else tuple(shape)
    reg = regime if regime is not None else draw(st.sampled_from(REGIMES))
    if reg not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES!r}, got {reg!r}")
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
    # drawn side by side (hnp.array_shapes favours sides of 1 and 2 strongly)
    return st.integers(min_dims, max_dims).flatmap(
        lambda nd: st.tuples(*[st.integers(min_side, max_side)] * nd)
    )


def axes_for(ndim: int, *, allow_tuple: bool = True) -> st.SearchStrategy[Any]:
    """A valid ``axis`` for an array of ``ndim`` dimensions: an int (negative ones too),
    and with ``allow_tuple`` a tuple of distinct axes or None (all axes)."""
    ints = st.integers(-ndim, ndim - 1)
    if not allow_tuple:
        return ints
    return st.one_of(ints, hnp.valid_tuple_axes(ndim, min_size=1), st.none())


@st.composite
def where_masks(draw: st.DrawFn, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """A bool mask that broadcasts to ``shape``: of that shape or a broadcastable one
    (fewer dimensions, sides of 1), all True, all False, or random."""
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
    pool = [d for d in DTYPES if d.kind in "fV"] if floats_only else list(DTYPES)
    return st.sampled_from(pool)


@st.composite
def softmax_cases(
    draw: st.DrawFn,
    *,
    regime: str | None = None,
    allow_nan: bool = True,
    allow_infinity: bool = True,
    with_where: bool | None = None,
    allow_tuple_axis: bool = True,
    max_side: int = 6,
    max_dims: int = 3,
) -> SoftmaxCase:
    """A :class:`SoftmaxCase`: :func:`logits`, an axis from :func:`axes_for` and a mask
    from :func:`where_masks` (``with_where``: always, never, or None: half the time).

    About one case in ten may have empty sides (and so empty slices or an empty x).
    """
    # one case in ten may have empty sides; the others have at least one entry per side
    min_side = 0 if draw(st.integers(0, 9)) == 0 else 1
    shape = draw(shapes(max_dims=max_dims, min_side=min_side, max_side=max_side))
    x = draw(logits(shape, regime=regime, allow_nan=allow_nan, allow_infinity=allow_infinity))
    axis = draw(axes_for(len(shape), allow_tuple=allow_tuple_axis))
    use_where = draw(st.booleans()) if with_where is None else with_where
    where = draw(where_masks(shape)) if use_where else None
    return SoftmaxCase(x=x, axis=axis, where=where)
