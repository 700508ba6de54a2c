r"""Hypothesis strategies for whole attention problems: shapes, visibility, modifiers, numbers.

:func:`attention_cases` draws an :class:`AttentionCase`, the inputs of one call of
:func:`attnspec.sdpa` (``q``, ``k``, ``v`` and keyword arguments). It reaches:

* **shapes**: 0 to 2 batch dimensions that broadcast between q, k and v (sides of 1
  against larger ones); grouped-query and multi-query attention (``Hq = G * Hkv``,
  ``Hkv = 1``); ``L != S`` (more queries than keys and fewer); ``E != Ev``; 2-D
  single-head inputs; ``L = 0`` and ``S = 0`` (one case in ten may have them);
* **visibility**: bool masks of several broadcast shapes, with and without fully hidden
  rows; causal with both alignments (``align`` is given whenever ``L != S`` needs it,
  sometimes when ``L == S``); windows with one side None; biases with ``-inf`` entries;
* **modifiers**: ALiBi slopes (0 included), sinks, softcap, dropout keep-masks with
  ``dropout_p`` in [0, 0.9];
* **numbers** (:data:`MAGNITUDES`, one regime per case): moderate; logits up to 1e3 apart
  (beyond exp's range); q.k sharing a large offset of 1e6 and 1e12 (the logits are all
  about that large, their differences moderate); q and k scaled by 1e150 and 1e-150 (so
  that the logits are moderate but the entries are not), both by 1e-160 (products
  underflow); values of huge (1e300) and tiny (1e-300, subnormal) magnitude;
* **poison**: NaN and +-inf at hidden positions only (values and keys of keys no query
  sees, queries of rows that see nothing, bias entries hidden by the mask or causal):
  the definition says they never reach the output.

Every strategy is tested in ``tests/test_attention_strategies.py`` to reach what this
docstring says (``hypothesis.find``).
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

from attnspec.reference.attention import SdpaOptions

__all__ = [
    "FEATURES",
    "MAGNITUDES",
    "AttentionCase",
    "attention_cases",
    "case_visibility",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

#: what an implementation may support; "mask" covers bool masks and additive biases
FEATURES = ("mask", "causal", "window", "gqa", "softcap", "alibi", "sinks", "dropout", "lse")

#: the number regimes :func:`attention_cases` draws from
MAGNITUDES = (
    "moderate",
    "wide",
    "offset1e6",
    "offset1e12",
    "scaled1e150",
    "tiny_qk",
    "values_huge",
    "values_tiny",
)

#: the keyword arguments of each feature
_FEATURE_KEYS = {
    "mask": ("mask", "bias"),
    "causal": ("causal",),
    "window": ("window",),
    "softcap": ("softcap",),
    "alibi": ("alibi_slopes",),
    "sinks": ("sinks",),
    "dropout": ("dropout_mask", "dropout_p"),
}


def _arr_repr(a: Any) -> str:
    from attnspec.spec.properties._core import array_repr

    return array_repr(np.asarray(a))


@dataclass(frozen=True)
class AttentionCase:
    """The inputs of one call: ``q``, ``k``, ``v`` (float64) and keyword arguments.

    ``kwargs`` hold the keyword arguments of :func:`attnspec.sdpa` but ``precision`` and
    ``return_lse`` (the checks choose those); they are sdpa's options, validated when the
    case is made (:class:`~attnspec.reference.attention.SdpaOptions`, :attr:`options`).
    ``repr`` is a call that reproduces it.
    """

    q: F64
    k: F64
    v: F64
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options  # noqa: B018 - validates the keyword arguments (SdpaOptions)

    @property
    def options(self) -> SdpaOptions:
        """The keyword arguments as sdpa's validated options."""
        return SdpaOptions.from_kwargs(self.kwargs)

    def __repr__(self) -> str:
        qkv = ", ".join(f"{n}={_arr_repr(getattr(self, n))}" for n in ("q", "k", "v"))
        kw = ", ".join(
            f"{key!r}: {_arr_repr(val) if isinstance(val, np.ndarray) else repr(val)}"
            for key, val in self.kwargs.items()
        )
        return f"AttentionCase({qkv}, kwargs={{{kw}}})"

    def args(self) -> str:
        """``q=..., k=..., v=..., **kwargs`` as Python source."""
        parts = [f"{n}={_arr_repr(getattr(self, n))}" for n in ("q", "k", "v")]
        for key, val in self.kwargs.items():
            text = _arr_repr(val) if isinstance(val, np.ndarray) else repr(val)
            parts.append(f"{key}={text}")
        return ", ".join(parts)

    def features(self) -> set[str]:
        """The features this case uses (see :data:`FEATURES`; "lse" is never used)."""
        used = {f for f, keys in _FEATURE_KEYS.items() if any(_on(self.kwargs, k) for k in keys)}
        if self.q.ndim >= 3 and self.k.ndim >= 3 and self.q.shape[-3] != self.k.shape[-3]:
            used.add("gqa")
        return used

    def with_kwargs(self, **kw: Any) -> AttentionCase:
        """A copy with ``kw`` set (None removes a keyword)."""
        new = {**self.kwargs}
        for key, val in kw.items():
            if val is None:
                new.pop(key, None)
            else:
                new[key] = val
        return replace(self, kwargs=new)

    @property
    def n_queries(self) -> int:
        return int(self.q.shape[-2])

    @property
    def n_keys(self) -> int:
        return int(self.k.shape[-2])

    @property
    def logits_shape(self) -> tuple[int, ...]:
        """``(..., Hq, L, S)``, or ``(L, S)`` for 2-D inputs."""
        if self.q.ndim == 2 and self.k.ndim == 2:
            return (self.n_queries, self.n_keys)
        batch = np.broadcast_shapes(self.q.shape[:-3], self.k.shape[:-3], self.v.shape[:-3])
        return (*batch, self.q.shape[-3], self.n_queries, self.n_keys)


def _on(kwargs: dict[str, Any], key: str) -> bool:
    val = kwargs.get(key)
    if key == "causal":
        return bool(val)
    if key == "dropout_p":
        return val is not None and float(val) > 0
    return val is not None


def case_visibility(case: AttentionCase) -> Bools:
    """Which key each query sees, by the definition: mask, causal, window and bias -inf.

    Shape :attr:`AttentionCase.logits_shape` (broadcast). The sink is not included.
    """
    from attnspec.reference.visibility import alignment_offset, check_window, visible

    kw = case.kwargs
    shape = case.logits_shape
    n_q, n_k = case.n_queries, case.n_keys
    seen = np.ones(shape, dtype=bool)
    if kw.get("mask") is not None:
        seen = seen & np.asarray(kw["mask"], dtype=bool)
    if kw.get("bias") is not None:
        seen = seen & ~(np.asarray(kw["bias"], dtype=np.float64) == -np.inf)
    win = check_window(kw.get("window"))
    causal = bool(kw.get("causal", False))
    if causal or win is not None:
        offset = alignment_offset(n_q, n_k, kw.get("align"), "causal")
        pattern = visible(n_q, n_k, causal=causal, window=win, offset=offset)
        assert pattern is not None
        seen = seen & pattern
    return np.broadcast_to(seen, shape).copy()


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shapes:
    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]


@st.composite
def _shapes(draw: st.DrawFn, gqa: bool, max_side: int, max_width: int = 4) -> _Shapes:
    empty = draw(st.integers(0, 9)) == 0
    lo = 0 if empty else 1
    n_q = draw(st.integers(lo, max_side))
    n_k = draw(st.integers(lo, max_side))
    width = draw(st.integers(1, max_width))
    width_v = draw(st.integers(1, max_width))
    if draw(st.integers(0, 7)) == 0:  # 2-D: one head
        return _Shapes((n_q, width), (n_k, width), (n_k, width_v))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3)) if gqa else 1
    hq = hkv * groups
    n_batch = draw(st.integers(0, 2))
    batch = tuple(draw(st.integers(1, 3)) for _ in range(n_batch))

    def broadcast_of(b: tuple[int, ...]) -> tuple[int, ...]:
        # a suffix of b, each side kept or replaced by 1
        keep = draw(st.integers(0, len(b)))
        return tuple(1 if draw(st.booleans()) else side for side in b[len(b) - keep :])

    qb = batch
    kb = broadcast_of(batch)
    vb = kb if draw(st.booleans()) else broadcast_of(batch)
    return _Shapes((*qb, hq, n_q, width), (*kb, hkv, n_k, width), (*vb, hkv, n_k, width_v))


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------


def _normal(draw: st.DrawFn, shape: tuple[int, ...], lim: float = 3.0) -> F64:
    return np.array(
        draw(hnp.arrays(np.float64, shape, elements=st.floats(-lim, lim, width=32))),
        dtype=np.float64,
    )


def _numbers(draw: st.DrawFn, sh: _Shapes, magnitude: str) -> tuple[F64, F64, F64, dict[str, Any]]:
    q, k, v = _normal(draw, sh.q), _normal(draw, sh.k), _normal(draw, sh.v)
    extra: dict[str, Any] = {}
    if magnitude == "wide":
        q = q * 30.0
        k = k * 30.0
        extra["scale"] = 1.0
    elif magnitude in ("offset1e6", "offset1e12"):
        # q_0 k_0 = offset for every pair: the logits share it
        root = 1e3 if magnitude == "offset1e6" else 1e6
        q[..., 0] = root
        k[..., 0] = root
        extra["scale"] = 1.0
    elif magnitude == "scaled1e150":
        up = draw(st.booleans())
        q = q * (1e150 if up else 1e-150)
        k = k * (1e-150 if up else 1e150)
    elif magnitude == "tiny_qk":
        q = q * 1e-160
        k = k * 1e-160
    elif magnitude == "values_huge":
        v = v * 1e300
    elif magnitude == "values_tiny":
        v = v * draw(st.sampled_from([1e-300, 2.0**-1070, 2.0**-1074 * 3]))
    return q, k, v, extra


# ---------------------------------------------------------------------------------------
# Visibility and modifiers
# ---------------------------------------------------------------------------------------


def _suffix_shape(draw: st.DrawFn, full: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``full``: (L, S), (1, S), or the full shape."""
    kind = draw(st.sampled_from(("LS", "1S", "full")))
    if kind == "LS":
        return full[-2:]
    if kind == "1S":
        return (1, full[-1])
    return full


@st.composite
def _mask(draw: st.DrawFn, full: tuple[int, ...], empty_rows: bool | None) -> Bools:
    shape = _suffix_shape(draw, full)
    size = int(np.prod(shape, dtype=np.int64))
    if size == 0:
        return np.ones(shape, dtype=bool)
    # mostly True, so that most rows see something
    m = np.array(
        draw(hnp.arrays(np.bool_, shape, elements=st.sampled_from([True, True, True, False]))),
        dtype=bool,
    )
    force = draw(st.booleans()) if empty_rows is None else empty_rows
    if force and shape[-2] > 0:
        m[..., draw(st.integers(0, shape[-2] - 1)), :] = False
    if draw(st.integers(0, 3)) == 0 and shape[-1] > 0:  # a key no query sees
        m[..., draw(st.integers(0, shape[-1] - 1))] = False
    return m


@st.composite
def _bias(draw: st.DrawFn, full: tuple[int, ...]) -> F64:
    shape = _suffix_shape(draw, full)
    b = np.array(
        draw(hnp.arrays(np.float64, shape, elements=st.floats(-4.0, 4.0, width=32))),
        dtype=np.float64,
    )
    if b.size and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            b.reshape(-1)[draw(st.integers(0, b.size - 1))] = -np.inf
    return b


@st.composite
def _modifiers(
    draw: st.DrawFn, sh: _Shapes, features: frozenset[str], full: tuple[int, ...]
) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    n_q, n_k = full[-2], full[-1]
    on = {f: f in features and draw(st.booleans()) for f in FEATURES}
    if on["mask"]:
        if draw(st.booleans()):
            kw["mask"] = draw(_mask(full, None))
        if draw(st.booleans()):
            kw["bias"] = draw(_bias(full))
    if on["causal"]:
        kw["causal"] = True
    if on["window"]:
        side = st.one_of(st.none(), st.integers(0, 3))
        kw["window"] = (draw(side), draw(side))
    if on["softcap"]:
        kw["softcap"] = draw(st.sampled_from([0.5, 1.0, 5.0, 30.0, 50.0]))
    if on["alibi"]:
        n_heads = full[-3] if len(full) > 2 else 1
        slopes = [draw(st.sampled_from([0.0, 2.0**-8, 0.25, 0.5, 1.0])) for _ in range(n_heads)]
        kw["alibi_slopes"] = np.array(slopes, dtype=np.float64).reshape((n_heads,)[: len(full) - 2])
    if on["sinks"]:
        shape = (full[-3],) if len(full) > 2 else ()
        kw["sinks"] = np.array(
            draw(hnp.arrays(np.float64, shape, elements=st.floats(-4.0, 4.0, width=32))),
            dtype=np.float64,
        )
    if on["dropout"]:
        kw["dropout_p"] = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
        kw["dropout_mask"] = np.array(draw(hnp.arrays(np.bool_, full)), dtype=bool)
    needs = kw.get("causal") or "window" in kw or "alibi_slopes" in kw
    if needs and n_q != n_k:
        kw["align"] = draw(st.sampled_from(("top_left", "bottom_right")))
    elif draw(st.integers(0, 3)) == 0:
        kw["align"] = draw(st.sampled_from(("top_left", "bottom_right")))
    return kw


def _poison(draw: st.DrawFn, case: AttentionCase) -> AttentionCase:
    """NaN and +-inf at positions the definition hides (see the module docstring).

    Keys and rows hidden only by a bias of -inf are not poisoned: ``attnspec.sdpa`` adds
    the bias before it decides visibility, so NaN + (-inf) = NaN there (reported to the
    lead; :func:`attnspec.spec.properties.attention.check_hidden_values` shows it).
    """
    seen = case_visibility(case.with_kwargs(bias=None))
    q, k, v = case.q.copy(), case.k.copy(), case.v.copy()
    bad = st.sampled_from([np.nan, np.inf, -np.inf])
    kw = dict(case.kwargs)
    if seen.size == 0:
        return case
    # keys that no query of any head or batch sees: their k and v
    hidden_keys = ~seen.reshape(-1, seen.shape[-1]).any(axis=0)
    for j in np.flatnonzero(hidden_keys):
        if draw(st.booleans()):
            v[..., j, draw(st.integers(0, v.shape[-1] - 1))] = draw(bad)
        if draw(st.booleans()):
            k[..., j, draw(st.integers(0, k.shape[-1] - 1))] = np.nan
    # queries whose row sees nothing, in every batch and head: their q (no sink)
    if kw.get("sinks") is None:
        rows = seen.reshape(-1, seen.shape[-2], seen.shape[-1]).any(axis=(0, 2))
        for i in np.flatnonzero(~rows):
            if draw(st.booleans()):
                q[..., i, 0] = np.nan
    # bias entries hidden by the mask, causal or window (not by the bias itself)
    if kw.get("bias") is not None and draw(st.booleans()):
        b = np.array(kw["bias"], dtype=np.float64)
        others = case_visibility(case.with_kwargs(bias=None))
        full_hidden = ~others
        # an entry of b is shared by the positions it broadcasts to: all must be hidden
        lead = full_hidden.ndim - b.ndim
        reduced = np.all(full_hidden, axis=tuple(range(lead))) if lead else full_hidden
        axes = tuple(a for a in range(b.ndim) if b.shape[a] == 1 and reduced.shape[a] != 1)
        if axes:
            reduced = np.all(reduced, axis=axes, keepdims=True)
        spots = np.flatnonzero(reduced.reshape(-1))
        if spots.size:
            b.reshape(-1)[spots[: draw(st.integers(1, min(3, spots.size)))]] = draw(bad)
            kw["bias"] = b
    return AttentionCase(q, k, v, kw)


# ---------------------------------------------------------------------------------------
# The public strategy: arguments checked when it is built
# ---------------------------------------------------------------------------------------

#: the features that hide positions, where ``poison`` puts NaN and inf
_HIDING = ("mask", "causal", "window")


def _got(name: str, value: object) -> str:
    return f"{name}={value!r} (type={type(value).__name__})"


def _check_features(features: object) -> frozenset[str]:
    """``features`` as a frozenset; InvalidArgument unless it is a collection (a set,
    tuple or list, not a str) of names from :data:`FEATURES`."""
    if isinstance(features, (str, bytes)) or not isinstance(features, (AbstractSet, Sequence)):
        raise InvalidArgument(
            f"Expected a set or tuple of names from {FEATURES!r} but got "
            + _got("features", features)
        )
    odd = [f for f in features if not isinstance(f, str)]
    if odd:
        raise InvalidArgument(
            f"Expected feature names (str) from {FEATURES!r} but got features={features!r}, "
            f"with {odd!r}"
        )
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise InvalidArgument(
            f"Expected features from {FEATURES!r} but got features={features!r}, with "
            f"unknown {unknown!r}"
        )
    return frozenset(features)


def _check_attention_args(
    features: object, magnitude: object, max_side: object, poison: object, max_width: object = 4
) -> frozenset[str]:
    """InvalidArgument for a bad argument of :func:`attention_cases`; the features."""
    feats = _check_features(features)
    if magnitude is not None and (not isinstance(magnitude, str) or magnitude not in MAGNITUDES):
        raise InvalidArgument(
            f"Expected None or one of {MAGNITUDES!r} but got {_got('magnitude', magnitude)}"
        )
    if isinstance(max_side, bool) or not isinstance(max_side, numbers.Integral):
        raise InvalidArgument(f"Expected an int but got {_got('max_side', max_side)}")
    if max_side < 1:
        raise InvalidArgument(f"Expected max_side >= 1 but got max_side={max_side!r}")
    if isinstance(max_width, bool) or not isinstance(max_width, numbers.Integral):
        raise InvalidArgument(f"Expected an int but got {_got('max_width', max_width)}")
    if max_width < 1:
        raise InvalidArgument(f"Expected max_width >= 1 but got max_width={max_width!r}")
    if poison is not None and not isinstance(poison, bool):
        raise InvalidArgument(f"Expected a bool or None but got {_got('poison', poison)}")
    if poison is True and not feats & set(_HIDING):
        raise InvalidArgument(
            f"poison=True needs a feature that hides positions, one of {_HIDING!r}, but got "
            f"features={features!r}: nothing would be poisoned"
        )
    return feats


def attention_cases(
    *,
    features: frozenset[str] | set[str] | tuple[str, ...] = FEATURES,
    magnitude: str | None = None,
    max_side: int = 4,
    poison: bool | None = None,
    max_width: int = 4,
) -> st.SearchStrategy[AttentionCase]:
    """An :class:`AttentionCase` using only ``features`` (default: all of them).

    ``magnitude``: one of :data:`MAGNITUDES`, or None to draw one (moderate half the
    time). ``max_side`` (at least 1) bounds L and S, ``max_width`` (at least 1) E and
    Ev (the exact reference, in balls, takes about 0.1 s at L = S = E = 64).
    ``poison``: put NaN/inf at hidden positions always (``features`` must
    then include mask, causal or window), never, or (None) in one case in three.

    Bad arguments raise :class:`hypothesis.errors.InvalidArgument` here, when the
    strategy is built, not when a case is drawn.
    """
    feats = _check_attention_args(features, magnitude, max_side, poison, max_width)
    return _attention_cases(
        features=feats,
        magnitude=magnitude,
        max_side=max_side,
        poison=poison,
        max_width=max_width,
    )


@st.composite
def _attention_cases(
    draw: st.DrawFn,
    *,
    features: frozenset[str],
    magnitude: str | None,
    max_side: int,
    poison: bool | None,
    max_width: int = 4,
) -> AttentionCase:
    """:func:`attention_cases`, its arguments checked."""
    feats = frozenset(features)
    sh = draw(_shapes("gqa" in feats, max_side, max_width))
    if magnitude is None:
        magnitude = "moderate" if draw(st.booleans()) else draw(st.sampled_from(MAGNITUDES[1:]))
    q, k, v, kw = _numbers(draw, sh, magnitude)
    case = AttentionCase(q, k, v, kw)
    kw.update(draw(_modifiers(sh, feats, case.logits_shape)))
    case = AttentionCase(q, k, v, kw)
    use_poison = (draw(st.integers(0, 2)) == 0) if poison is None else poison
    if use_poison:
        case = _poison(draw, case)
    return case
