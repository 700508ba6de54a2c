"""The strategies of attnspec.spec.strategies.softmax reach what their docstrings say.

Each hard case is found with hypothesis.find (which fails with NoSuchExample when a
strategy cannot reach it), and every drawn case is checked to be valid.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

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


def test_unknown_regime_is_refused() -> None:
    with pytest.raises(ValueError, match="regime must be one of"):
        find(logits((2,), regime="bogus"), lambda x: True, settings=FIND)
