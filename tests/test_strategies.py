"""The strategies of attnspec.spec.strategies.softmax reach what their docstrings say.

Each hard case is found with hypothesis.find (which fails with NoSuchExample when a
strategy cannot reach it), and every drawn case is checked to be valid. Every public
strategy checks its arguments when it is built: a bad one raises InvalidArgument at the
call, before anything is drawn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from attnspec.reference.inputs import normalize_axes
from attnspec.spec.strategies.softmax import (
    DTYPES,
    REGIMES,
    SoftmaxCase,
    axes_for,
    dtypes,
    logits,
    shapes,
    softmax_cases,
    where_masks,
)

# find() explores until it succeeds; this many tries is ample for every case below
FIND = settings(max_examples=2000, database=None, derandomize=True)


def _finds(strategy: st.SearchStrategy[Any], condition: Any) -> Any:
    return find(strategy, condition, settings=FIND)


def _incl(case: SoftmaxCase) -> np.ndarray:
    return case.x if case.where is None else case.x[np.broadcast_to(case.where, case.x.shape)]


def _subnormal_term(x: np.ndarray) -> np.ndarray:
    """Where e^(x_j - max x) is subnormal: max - x_j in (708.4, 744.4)."""
    with np.errstate(over="ignore"):  # max - x overflows to inf for +-1e308: not subnormal
        gap = np.max(x) - x
    return (gap > 708.4) & (gap < 744.4)


REACHES = {
    "a logit beyond +-1e3 (huge)": lambda c: (
        np.nanmax(np.abs(np.where(np.isinf(c.x), 0, c.x)), initial=0) > 1e300
    ),
    "a wide row (range > 709.78, exp of the difference overflows)": lambda c: (
        np.ptp(c.x[np.isfinite(c.x)]) > 710 if np.isfinite(c.x).sum() > 1 else False
    ),
    "a row whose other terms are subnormal": lambda c: (
        c.x.size >= 2 and np.isfinite(c.x).all() and bool(np.any(_subnormal_term(c.x)))
    ),
    "a subnormal logit": lambda c: bool(np.any((c.x != 0) & (np.abs(c.x) < 2.0**-1022))),
    "-0.0": lambda c: bool(np.any((c.x == 0) & np.signbit(c.x))),
    "a tie of the maximum": lambda c: (
        c.x.size >= 2 and np.isfinite(c.x).all() and int(np.sum(c.x == np.max(c.x))) >= 2
    ),
    "+inf": lambda c: bool(np.any(c.x == np.inf)),
    "-inf": lambda c: bool(np.any(c.x == -np.inf)),
    "NaN": lambda c: bool(np.any(np.isnan(c.x))),
    "an excluded entry": lambda c: c.where is not None and not np.all(c.where),
    "a fully excluded slice of a non-empty x": lambda c: (
        c.where is not None and c.x.size > 0 and not np.any(c.where)
    ),
    "an empty slice": lambda c: c.x.size == 0,
    "a where of fewer dimensions than x": lambda c: c.where is not None and c.where.ndim < c.x.ndim,
    "a where with a side of 1 broadcast": lambda c: (
        c.where is not None
        and c.where.ndim == c.x.ndim
        and any(w == 1 and s != 1 for w, s in zip(c.where.shape, c.x.shape, strict=True))
    ),
    "a negative int axis": lambda c: isinstance(c.axis, int) and c.axis < 0,
    "a tuple of two axes": lambda c: isinstance(c.axis, tuple) and len(c.axis) == 2,
    "axis=None": lambda c: c.axis is None,
    "a 3-d x": lambda c: c.x.ndim == 3,
}


@pytest.mark.parametrize("what", list(REACHES))
def test_softmax_cases_reach(what: str) -> None:
    found = _finds(softmax_cases(), REACHES[what])
    assert REACHES[what](found)


@pytest.mark.parametrize("regime", REGIMES)
def test_each_regime_is_reached_and_finite_without_specials(regime: str) -> None:
    x = _finds(
        logits(shapes(min_side=2), regime=regime, allow_nan=False, allow_infinity=False),
        lambda x: x.size >= 2,
    )
    assert np.isfinite(x).all()


def test_underflow_regime_puts_terms_below_the_normal_range() -> None:
    x = _finds(
        logits((3,), regime="underflow", allow_nan=False, allow_infinity=False),
        lambda x: bool(np.any(np.exp(x - x.max()) < 2.0**-1022)),
    )
    assert (x.max() - x).max() >= 700


@given(case=softmax_cases())
def test_cases_are_valid(case: SoftmaxCase) -> None:
    assert case.x.dtype == np.float64
    axes = normalize_axes(case.axis, case.x.ndim)  # raises for an invalid axis
    assert all(0 <= a < case.x.ndim for a in axes)
    if case.where is not None:
        assert case.where.dtype == np.bool_
        np.broadcast_to(case.where, case.x.shape)  # raises if it does not broadcast


@given(case=softmax_cases(allow_nan=False, allow_infinity=False, with_where=False))
def test_without_specials_and_where(case: SoftmaxCase) -> None:
    assert np.isfinite(case.x).all()
    assert case.where is None


@given(data=st.data(), ndim=st.integers(1, 4))
def test_int_axes_only(data: st.DataObject, ndim: int) -> None:
    axis = data.draw(axes_for(ndim, allow_tuple=False))
    assert isinstance(axis, int) and -ndim <= axis < ndim


@given(data=st.data(), shape=shapes(max_dims=4))
def test_where_masks_broadcast(data: st.DataObject, shape: tuple[int, ...]) -> None:
    w = data.draw(where_masks(shape))
    assert w.dtype == np.bool_ and np.broadcast_to(w, shape).shape == shape


def test_dtypes_reach_every_accepted_dtype() -> None:
    seen = set()
    for d in DTYPES:
        seen.add(_finds(dtypes(), lambda t, d=d: t == d))
    assert np.dtype(ml_dtypes.bfloat16) in seen and np.dtype(np.uint8) in seen
    assert len(seen) == len(DTYPES)


@given(dtypes(floats_only=True))
def test_floats_only(d: np.dtype[Any]) -> None:
    assert d.kind in "fV"


# ---------------------------------------------------------------------------------------
# Arguments are checked when a strategy is built, not when it is drawn from
# ---------------------------------------------------------------------------------------

_BOOL = "Expected a bool but got "
_SHAPE = "Expected None, a strategy of shapes or a tuple of non-negative ints but got "
_MASK_SHAPE = "Expected a tuple of non-negative ints but got "
_INT = "Expected an int but got "
_REGIME = f"Expected None or one of {REGIMES!r} but got "


def _bad(strategy: Callable[..., Any], kwargs: dict[str, Any], message: str, why: str) -> Any:
    return pytest.param(strategy, kwargs, message, id=f"{strategy.__name__}-{why}")


#: (strategy, keyword arguments, a fragment of the message); the ids say what is wrong
BAD_ARGUMENTS = [
    # logits
    _bad(logits, {"shape": 3}, _SHAPE + "shape=3 (type=int)", "shape-an-int"),
    _bad(logits, {"shape": "3"}, _SHAPE + "shape='3' (type=str)", "shape-a-str"),
    _bad(logits, {"shape": (2, -1)}, _SHAPE + "shape=(2, -1)", "shape-negative-side"),
    _bad(logits, {"shape": (2.0,)}, _SHAPE + "shape=(2.0,)", "shape-float-side"),
    _bad(logits, {"shape": (True, 2)}, _SHAPE + "shape=(True, 2)", "shape-bool-side"),
    _bad(logits, {"regime": "bogus"}, _REGIME + "regime='bogus' (type=str)", "regime-unknown"),
    _bad(logits, {"regime": 1}, _REGIME + "regime=1 (type=int)", "regime-an-int"),
    _bad(logits, {"allow_nan": 1}, _BOOL + "allow_nan=1 (type=int)", "allow_nan-an-int"),
    _bad(logits, {"allow_nan": None}, _BOOL + "allow_nan=None", "allow_nan-None"),
    _bad(logits, {"allow_infinity": "yes"}, _BOOL + "allow_infinity='yes'", "allow_infinity-str"),
    # shapes
    _bad(shapes, {"min_dims": -1}, "Expected min_dims >= 0 but got min_dims=-1", "min_dims-neg"),
    _bad(shapes, {"min_dims": 1.0}, _INT + "min_dims=1.0 (type=float)", "min_dims-float"),
    _bad(shapes, {"max_dims": True}, _INT + "max_dims=True (type=bool)", "max_dims-bool"),
    _bad(shapes, {"max_dims": None}, _INT + "max_dims=None", "max_dims-None"),
    _bad(
        shapes,
        {"min_dims": 4, "max_dims": 3},
        "Expected min_dims <= max_dims but got min_dims=4 > max_dims=3",
        "min_dims-above-max_dims",
    ),
    _bad(shapes, {"min_side": -1}, "Expected min_side >= 0 but got min_side=-1", "min_side-neg"),
    _bad(shapes, {"min_side": False}, _INT + "min_side=False (type=bool)", "min_side-bool"),
    _bad(shapes, {"max_side": 2.5}, _INT + "max_side=2.5 (type=float)", "max_side-float"),
    _bad(shapes, {"max_side": -1}, "Expected max_side >= 0 but got max_side=-1", "max_side-neg"),
    _bad(
        shapes,
        {"min_side": 3, "max_side": 2},
        "Expected min_side <= max_side but got min_side=3 > max_side=2",
        "min_side-above-max_side",
    ),
    # axes_for
    _bad(axes_for, {"ndim": 0}, "Expected ndim >= 1 but got ndim=0", "ndim-zero"),
    _bad(axes_for, {"ndim": -2}, "Expected ndim >= 1 but got ndim=-2", "ndim-negative"),
    _bad(axes_for, {"ndim": True}, _INT + "ndim=True (type=bool)", "ndim-bool"),
    _bad(axes_for, {"ndim": 2.0}, _INT + "ndim=2.0 (type=float)", "ndim-float"),
    _bad(axes_for, {"ndim": (2, 3)}, _INT + "ndim=(2, 3) (type=tuple)", "ndim-a-shape"),
    _bad(
        axes_for,
        {"ndim": 2, "allow_tuple": 1},
        _BOOL + "allow_tuple=1 (type=int)",
        "allow_tuple-int",
    ),
    _bad(
        axes_for, {"ndim": 2, "allow_tuple": None}, _BOOL + "allow_tuple=None", "allow_tuple-None"
    ),
    # where_masks
    _bad(where_masks, {"shape": None}, _MASK_SHAPE + "shape=None", "shape-None"),
    _bad(where_masks, {"shape": 2}, _MASK_SHAPE + "shape=2 (type=int)", "shape-an-int"),
    _bad(where_masks, {"shape": (2, -1)}, _MASK_SHAPE + "shape=(2, -1)", "shape-negative-side"),
    _bad(where_masks, {"shape": (1.5,)}, _MASK_SHAPE + "shape=(1.5,)", "shape-float-side"),
    _bad(where_masks, {"shape": (False,)}, _MASK_SHAPE + "shape=(False,)", "shape-bool-side"),
    _bad(where_masks, {"shape": st.just((2,))}, _MASK_SHAPE + "shape=just((2,))", "shape-strategy"),
    # dtypes
    _bad(dtypes, {"floats_only": 1}, _BOOL + "floats_only=1 (type=int)", "floats_only-int"),
    _bad(dtypes, {"floats_only": "no"}, _BOOL + "floats_only='no'", "floats_only-str"),
    # softmax_cases
    _bad(softmax_cases, {"regime": "bogus"}, _REGIME + "regime='bogus'", "regime-unknown"),
    _bad(softmax_cases, {"regime": ("huge",)}, _REGIME + "regime=('huge',)", "regime-a-tuple"),
    _bad(softmax_cases, {"allow_nan": 0}, _BOOL + "allow_nan=0 (type=int)", "allow_nan-int"),
    _bad(
        softmax_cases,
        {"allow_infinity": None},
        _BOOL + "allow_infinity=None",
        "allow_infinity-None",
    ),
    _bad(
        softmax_cases,
        {"with_where": 1},
        "Expected a bool or None but got with_where=1 (type=int)",
        "with_where-int",
    ),
    _bad(
        softmax_cases,
        {"with_where": "always"},
        "Expected a bool or None but got with_where='always'",
        "with_where-str",
    ),
    _bad(
        softmax_cases,
        {"allow_tuple_axis": None},
        _BOOL + "allow_tuple_axis=None",
        "allow_tuple_axis-None",
    ),
    _bad(softmax_cases, {"max_side": 0}, "Expected max_side >= 1 but got max_side=0", "max_side-0"),
    _bad(softmax_cases, {"max_side": True}, _INT + "max_side=True (type=bool)", "max_side-bool"),
    _bad(softmax_cases, {"max_side": 2.5}, _INT + "max_side=2.5 (type=float)", "max_side-float"),
    _bad(softmax_cases, {"max_dims": 0}, "Expected max_dims >= 1 but got max_dims=0", "max_dims-0"),
    _bad(softmax_cases, {"max_dims": False}, _INT + "max_dims=False (type=bool)", "max_dims-bool"),
    _bad(softmax_cases, {"max_dims": "3"}, _INT + "max_dims='3' (type=str)", "max_dims-str"),
]


@pytest.mark.parametrize(("strategy", "kwargs", "message"), BAD_ARGUMENTS)
def test_bad_argument_is_refused_at_build(
    strategy: Callable[..., Any], kwargs: dict[str, Any], message: str
) -> None:
    """The call itself raises: nothing is drawn (no .example(), find or given)."""
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        strategy(**kwargs)


#: every public strategy with its default (or minimal) arguments, and some valid others
VALID = {
    "logits()": lambda: logits(),
    "logits(list shape, regime)": lambda: logits([2, 3], regime="ties", allow_nan=False),
    "logits(shape strategy)": lambda: logits(shapes(min_side=1), allow_infinity=False),
    "shapes()": lambda: shapes(),
    "shapes(numpy ints, no dims)": lambda: shapes(np.int64(0), 0, np.int64(2), 2),
    "axes_for(1)": lambda: axes_for(1),
    "axes_for(numpy int)": lambda: axes_for(np.int64(3), allow_tuple=True),
    "where_masks(())": lambda: where_masks(()),
    "where_masks([2, 0])": lambda: where_masks([2, 0]),
    "dtypes()": lambda: dtypes(),
    "softmax_cases()": lambda: softmax_cases(),
    "softmax_cases(smallest)": lambda: softmax_cases(max_side=1, max_dims=1, with_where=True),
}


@pytest.mark.parametrize("build", list(VALID.values()), ids=list(VALID))
def test_valid_arguments_build_and_draw(build: Callable[[], st.SearchStrategy[Any]]) -> None:
    find(build(), lambda _: True, settings=FIND)
