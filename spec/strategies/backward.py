r"""Hypothesis strategies for backward problems: an attention case, the upstream gradients,
and slices for the gradients of the softmax family.

:func:`backward_cases` draws a :class:`BackwardCase`: an
:class:`~attnspec.spec.strategies.attention.AttentionCase` (drawn by
:func:`~attnspec.spec.strategies.attention.attention_cases`, reused, not copied), the
gradient ``dout`` of the output (its shape ``(..., Hq, L, Ev)``) and, optionally, the
gradient ``dlse`` of the lse output (shape ``(..., Hq, L)``). It reaches:

* every shape, visibility, modifier and poison of ``attention_cases`` restricted to the
  features given, in the number regimes of :data:`BACKWARD_MAGNITUDES`;
* **fully hidden rows** (``hidden_rows``): a query row that sees no key in any batch or
  head, with NaN in its query when the case is poisoned and has no sink;
* **upstream gradients**: ``dout`` in [-3, 3] (float32-representable entries, so that
  central differences can step exactly), all zeros in one case in eight; ``dlse``
  likewise, or None.

The regimes: all of :data:`~attnspec.spec.strategies.attention.MAGNITUDES` but
``offset1e12``: there the float64 logits carry absolute errors near :math:`10^{-4}`, the
relative error of the weights exceeds the :math:`2^{-20}` under which
:func:`~attnspec.spec.tolerances.backward.fast_backward_bound` (a first-order bound)
holds. Upstream gradients stay moderate so that no gradient overflows: with values up to
:math:`3 \cdot 10^{300}` (``values_huge``), :math:`|dP| \le 3.6 \cdot 10^{301}` and
:math:`|dQ| < 10^{303}`.

:func:`family_grad_cases` draws a :class:`FamilyGradCase`: a
:class:`~attnspec.spec.strategies.softmax.SoftmaxCase` (finite logits, any regime, with
or without ``where``) and upstream gradients ``g`` (the shape of ``x``) and ``g_lse``
(the shape of ``logsumexp(x, axis)``).

Every strategy is tested in ``tests/test_backward_properties.py`` to reach what this
docstring says (``hypothesis.find``); bad arguments raise
:class:`hypothesis.errors.InvalidArgument` when the strategy is built.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

from attnspec.spec.strategies.attention import (
    FEATURES,
    MAGNITUDES,
    AttentionCase,
    attention_cases,
)
from attnspec.spec.strategies.softmax import SoftmaxCase, softmax_cases

__all__ = [
    "BACKWARD_FEATURES",
    "BACKWARD_MAGNITUDES",
    "BackwardCase",
    "FamilyGradCase",
    "backward_cases",
    "family_grad_cases",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

#: what a backward implementation may support: the attention features (``lse``: the
#: backward takes ``dlse``) and ``family``: the gradients of softmax, log_softmax and
#: logsumexp
BACKWARD_FEATURES = (*FEATURES, "family")

#: the number regimes of :func:`backward_cases` (module docstring: why not offset1e12)
BACKWARD_MAGNITUDES = tuple(m for m in MAGNITUDES if m != "offset1e12")


def _arr_repr(a: Any) -> str:
    from attnspec.spec.properties._core import array_repr

    return array_repr(np.asarray(a))


@dataclass(frozen=True)
class BackwardCase:
    """One backward problem: the forward inputs ``case`` and the upstream gradients.

    ``dout`` has the output's shape ``(..., Hq, L, Ev)`` (``(L, Ev)`` for 2-D inputs);
    ``dlse`` (None: not used) the lse's ``(..., Hq, L)``. ``repr`` is a call that
    reproduces it.
    """

    case: AttentionCase
    dout: F64
    dlse: F64 | None = None

    def __post_init__(self) -> None:
        want = (*self.case.logits_shape[:-1], self.case.v.shape[-1])
        if self.dout.shape != want:
            raise ValueError(f"dout must have the output's shape {want}, got {self.dout.shape}")
        if self.dlse is not None and self.dlse.shape != want[:-1]:
            raise ValueError(f"dlse must have the lse's shape {want[:-1]}, got {self.dlse.shape}")

    def __repr__(self) -> str:
        return f"BackwardCase({self.args()})"

    def args(self) -> str:
        """``q=..., k=..., v=..., dout=..., [dlse=...,] **kwargs`` as Python source."""
        parts = [f"{n}={_arr_repr(getattr(self.case, n))}" for n in ("q", "k", "v")]
        parts.append(f"dout={_arr_repr(self.dout)}")
        if self.dlse is not None:
            parts.append(f"dlse={_arr_repr(self.dlse)}")
        for key, val in self.case.kwargs.items():
            text = _arr_repr(val) if isinstance(val, np.ndarray) else repr(val)
            parts.append(f"{key}={text}")
        return ", ".join(parts)

    def features(self) -> set[str]:
        """The features this problem uses ("lse" when it has a ``dlse``)."""
        used = self.case.features()
        if self.dlse is not None:
            used.add("lse")
        return used

    def with_case(self, case: AttentionCase, **kw: Any) -> BackwardCase:
        """The same upstream gradients (or those in ``kw``: dout, dlse) with ``case``."""
        return replace(self, case=case, **kw)

    @property
    def q(self) -> F64:
        return self.case.q

    @property
    def k(self) -> F64:
        return self.case.k

    @property
    def v(self) -> F64:
        return self.case.v

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.case.kwargs


@dataclass(frozen=True)
class FamilyGradCase:
    """A slice problem for the softmax family's gradients: ``x``, ``axis``, ``where``
    (those of a :class:`~attnspec.spec.strategies.softmax.SoftmaxCase`), ``g`` of the
    shape of ``x`` and ``g_lse`` of the shape of ``logsumexp(x, axis)``."""

    x: F64
    axis: int | tuple[int, ...] | None
    where: Bools | None
    g: F64
    g_lse: F64 = field(repr=False)

    def __repr__(self) -> str:
        w = "" if self.where is None else f", where={_arr_repr(self.where)}"
        return (
            f"FamilyGradCase(x={_arr_repr(self.x)}, axis={self.axis!r}{w}, "
            f"g={_arr_repr(self.g)}, g_lse={_arr_repr(self.g_lse)})"
        )


# ---------------------------------------------------------------------------------------
# Argument checks (when a strategy is built)
# ---------------------------------------------------------------------------------------


def _got(name: str, value: object) -> str:
    return f"{name}={value!r} (type={type(value).__name__})"


def _check_features(features: object) -> frozenset[str]:
    if isinstance(features, (str, bytes)) or not isinstance(features, (AbstractSet, Sequence)):
        raise InvalidArgument(
            f"Expected a set or tuple of names from {BACKWARD_FEATURES!r} but got "
            + _got("features", features)
        )
    unknown = sorted(str(f) for f in features if f not in BACKWARD_FEATURES)
    if unknown:
        raise InvalidArgument(
            f"Expected features from {BACKWARD_FEATURES!r} but got features={features!r}, "
            f"with unknown {unknown!r}"
        )
    return frozenset(str(f) for f in features)


def _check_flag(value: object, name: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"Expected a bool or None but got {_got(name, value)}")


def _check_side(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"Expected an int but got {_got(name, value)}")
    if value < 1:
        raise InvalidArgument(f"Expected {name} >= 1 but got {name}={value!r}")


# ---------------------------------------------------------------------------------------
# Backward problems
# ---------------------------------------------------------------------------------------


def _upstream(draw: st.DrawFn, shape: tuple[int, ...]) -> F64:
    if draw(st.integers(0, 7)) == 0:
        return np.zeros(shape)
    return np.array(
        draw(hnp.arrays(np.float64, shape, elements=st.floats(-3.0, 3.0, width=32))),
        dtype=np.float64,
    )


def _hide_a_row(draw: st.DrawFn, case: AttentionCase, poison: bool) -> AttentionCase:
    """``case`` with one query row hidden from every key, in every batch and head (a full
    mask); with ``poison`` and no sink, NaN in that row's query."""
    shape = case.logits_shape
    if shape[-2] == 0:
        return case
    mask = np.ones(shape, dtype=bool)
    if case.kwargs.get("mask") is not None:
        mask = np.broadcast_to(np.asarray(case.kwargs["mask"], dtype=bool), shape).copy()
    row = draw(st.integers(0, shape[-2] - 1))
    mask[..., row, :] = False
    q = case.q
    if poison and case.kwargs.get("sinks") is None:
        q = q.copy()
        q[..., row, draw(st.integers(0, q.shape[-1] - 1))] = np.nan
    return AttentionCase(q, case.k, case.v, {**case.kwargs, "mask": mask})


def backward_cases(
    *,
    features: frozenset[str] | set[str] | tuple[str, ...] = BACKWARD_FEATURES,
    magnitude: str | None = None,
    max_side: int = 4,
    max_width: int = 4,
    poison: bool | None = None,
    hidden_rows: bool | None = None,
    dlse: bool | None = None,
) -> st.SearchStrategy[BackwardCase]:
    """A :class:`BackwardCase` using only ``features`` (default: all).

    ``magnitude``: one of :data:`BACKWARD_MAGNITUDES`, or None to draw one (moderate half
    the time). ``max_side`` bounds L and S, ``max_width`` E and Ev (both at least 1).
    ``poison``: NaN/inf at hidden positions (as
    :func:`~attnspec.spec.strategies.attention.attention_cases`). ``hidden_rows``: hide one
    query row entirely, always (``features`` must include mask), never, or (None) in one
    case in four where the features allow. ``dlse``: draw the lse's gradient always
    (``features`` must include lse), never, or (None) half the time where they allow.
    """
    feats = _check_features(features)
    if magnitude is not None and magnitude not in BACKWARD_MAGNITUDES:
        raise InvalidArgument(
            f"Expected None or one of {BACKWARD_MAGNITUDES!r} but got "
            + _got("magnitude", magnitude)
        )
    _check_side(max_side, "max_side")
    _check_side(max_width, "max_width")
    for name, value in (("poison", poison), ("hidden_rows", hidden_rows), ("dlse", dlse)):
        _check_flag(value, name)
    if hidden_rows is True and "mask" not in feats:
        raise InvalidArgument(
            f"hidden_rows=True needs the feature 'mask' but got features={features!r}"
        )
    if dlse is True and "lse" not in feats:
        raise InvalidArgument(f"dlse=True needs the feature 'lse' but got features={features!r}")
    attention = feats & set(FEATURES)
    # built now, so that attention_cases checks poison against the features here
    forward = {
        m: attention_cases(
            features=attention,
            magnitude=m,
            max_side=max_side,
            max_width=max_width,
            poison=poison,
        )
        for m in ((magnitude,) if magnitude is not None else BACKWARD_MAGNITUDES)
    }
    return _backward_cases(
        forward=forward,
        hide="mask" in feats and hidden_rows is not False,
        always_hide=hidden_rows is True,
        poison=poison,
        with_lse="lse" in feats and dlse is not False,
        always_lse=dlse is True,
    )


@st.composite
def _backward_cases(
    draw: st.DrawFn,
    *,
    forward: dict[str, st.SearchStrategy[AttentionCase]],
    hide: bool,
    always_hide: bool,
    poison: bool | None,
    with_lse: bool,
    always_lse: bool,
) -> BackwardCase:
    """:func:`backward_cases`, its arguments checked and its forward strategies built."""
    names = list(forward)
    if len(names) == 1:
        name = names[0]
    else:
        name = "moderate" if draw(st.booleans()) else draw(st.sampled_from(names[1:]))
    case = draw(forward[name])
    if hide and (always_hide or draw(st.integers(0, 3)) == 0):
        poisoned = bool(poison) if poison is not None else draw(st.booleans())
        case = _hide_a_row(draw, case, poisoned)
    out_shape = (*case.logits_shape[:-1], case.v.shape[-1])
    dout = _upstream(draw, out_shape)
    dl = None
    if with_lse and (always_lse or draw(st.booleans())):
        dl = _upstream(draw, out_shape[:-1])
    return BackwardCase(case, dout, dl)


# ---------------------------------------------------------------------------------------
# The softmax family
# ---------------------------------------------------------------------------------------


def family_grad_cases(
    *,
    regime: str | None = None,
    with_where: bool | None = None,
    allow_tuple_axis: bool = True,
    max_side: int = 6,
    max_dims: int = 3,
) -> st.SearchStrategy[FamilyGradCase]:
    """A :class:`FamilyGradCase`: a finite :class:`~attnspec.spec.strategies.softmax.
    SoftmaxCase` (:func:`~attnspec.spec.strategies.softmax.softmax_cases` with the same
    arguments, no NaN or infinity: excluded entries come from ``where``) and upstream
    gradients in [-3, 3]."""
    slices = softmax_cases(
        regime=regime,
        allow_nan=False,
        allow_infinity=False,
        with_where=with_where,
        allow_tuple_axis=allow_tuple_axis,
        max_side=max_side,
        max_dims=max_dims,
    )
    return _family_grad_cases(slices)


@st.composite
def _family_grad_cases(draw: st.DrawFn, slices: st.SearchStrategy[SoftmaxCase]) -> FamilyGradCase:
    from attnspec.reference.inputs import normalize_axes

    case = draw(slices)
    x = np.asarray(case.x, dtype=np.float64)
    axes = normalize_axes(case.axis, x.ndim)
    reduced = tuple(n for a, n in enumerate(x.shape) if a not in axes)
    g = _upstream(draw, x.shape)
    g_lse = _upstream(draw, reduced)
    return FamilyGradCase(x, case.axis, case.where, g, g_lse)
