r"""The properties of online attention, as checks of any implementation.

An online kernel provides one or both of:

* a **blocked attention** ``blocked(q, k, v, *, block_keys, **kw)``: attention with the
  keyword arguments of :func:`attnspec.sdpa` (but ``precision``), walking the keys in
  blocks of ``block_keys`` (FlashAttention, the state form of
  :mod:`attnspec.reference.online`);
* a **merge of partials** ``merge(o_a, lse_a, o_b, lse_b) -> (o, lse)`` of normalised
  results over disjoint key sets (split-KV decoding, ring attention).

:class:`OnlineImpl` holds them with the accuracy they claim. Each ``check_*`` function
takes it and an :class:`~attnspec.spec.strategies.online.OnlineCase`, compares what the
implementation computes with the direct result, :func:`attnspec.sdpa` at
``precision="accurate"``, and raises
:class:`~attnspec.spec.properties._core.PropertyViolation` with the worst entry, the bound
it broke and a call that reproduces it.

Tolerances (:mod:`attnspec.spec.tolerances.online`). A comparison with the direct result
allows the implementation's claimed bound plus the direct result's own (the accurate
claim, :math:`4u \sum_j p_{ij}|v_{jk}| + \eta`, one ulp for the lse): "fast" blocked,
:func:`~attnspec.spec.tolerances.online.online_sdpa_bound`; "accurate" blocked,
:func:`~attnspec.spec.tolerances.online.accurate_online_bound`; a merge,
:func:`~attnspec.spec.tolerances.online.merge_bound` ("fast") or
:func:`~attnspec.spec.tolerances.online.accurate_merge_bound` ("accurate") per merge,
propagated along the merge tree (:func:`_tree`); a number :math:`\rho`:
:math:`\rho \sum_j p_{ij}|v_{jk}| + \eta` and :math:`\rho \max(1, |\ell|)`. Special values
(NaN rows, infinite outputs, the lse :math:`-\infty` of an empty row) must be matched
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from attnspec.spec.properties._core import (
    Check,
    Implementation,
    PropertyViolation,
    array_repr,
    caller_name,
    same,
    tests_claims,
)
from attnspec.spec.strategies.attention import FEATURES, AttentionCase, case_visibility
from attnspec.spec.strategies.online import OnlineCase, Tree, online_cases
from attnspec.spec.tolerances import online as otol
from attnspec.spec.tolerances._core import ETA, SECOND_ORDER, U, perturbation_factor
from attnspec.spec.tolerances.attention import textbook_sdpa_bound

__all__ = [
    "BATTERY",
    "PROPERTIES",
    "OnlineImpl",
    "PropertyViolation",
    "attnspec_implementation",
    "check_block_sizes",
    "check_hidden_block",
    "check_sink_once",
    "check_split_merge_order",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True, repr=False)
class OnlineImpl(Implementation):
    """An online attention kernel: a blocked attention and/or a merge of partials.

    An :class:`~attnspec.spec.properties._core.Implementation` (``name``, ``accuracy``,
    ``call``), with:

    Attributes
    ----------
    blocked : callable, optional
        ``blocked(q, k, v, *, block_keys, **kw)`` with the keyword arguments of
        :func:`attnspec.sdpa` (but ``precision``); numpy in and out; with
        ``return_lse=True`` it returns ``(out, lse)``.
    merge : callable, optional
        ``merge(o_a, lse_a, o_b, lse_b) -> (o, lse)`` on arrays of shapes ``(*R, Ev)`` and
        ``R``.
    options : frozenset of str
        The options ``blocked`` supports, from
        :data:`~attnspec.spec.strategies.attention.FEATURES` (mask, causal, window, gqa,
        softcap, alibi, sinks, dropout, lse).

    ``features`` is ``options`` with "blocked" and "merge" for the callables it has (what
    a battery check ``needs``).
    """

    topic: ClassVar[str] = "online"

    blocked: Callable[..., Any] | None = None
    merge: Callable[..., Any] | None = None
    options: frozenset[str] = field(default_factory=lambda: frozenset(FEATURES))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocked is None and self.merge is None:
            raise ValueError("an OnlineImpl needs blocked= or merge= (or both)")
        unknown = set(self.options) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; choose from {FEATURES}")

    @property
    def features(self) -> frozenset[str]:
        have = {"blocked"} if self.blocked is not None else set()
        if self.merge is not None:
            have.add("merge")
        return frozenset(self.options) | have


def attnspec_implementation(precision: str = "accurate") -> OnlineImpl:
    """attnspec's online kernels at ``precision``.

    "fast": :func:`attnspec.reference.online.blocked_sdpa` (the state form in float64) and
    :func:`~attnspec.reference.online.merge_partials` in float64; "accurate":
    :func:`~attnspec.reference.online.split_sdpa` with accurate partials and accurate
    merges, and ``merge_partials(precision="accurate")``.
    """
    from attnspec.reference import online

    if precision not in ("accurate", "fast"):
        raise ValueError(f"precision must be 'accurate' or 'fast', got {precision!r}")

    def merge(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[F64, F64]:
        return online.merge_partials(o_a, lse_a, o_b, lse_b, precision=precision)

    if precision == "fast":

        def blocked(q: Any, k: Any, v: Any, *, block_keys: int, **kw: Any) -> Any:
            return online.blocked_sdpa(q, k, v, block_keys=block_keys, **kw)

        call = "attnspec.reference.online.blocked_sdpa({args})"
    else:

        def blocked(q: Any, k: Any, v: Any, *, block_keys: int, **kw: Any) -> Any:
            return online.split_sdpa(q, k, v, block_keys=block_keys, precision="accurate", **kw)

        call = "attnspec.reference.online.split_sdpa({args}, precision='accurate')"
    return OnlineImpl(
        name=f"attnspec.reference.online[{precision}]",
        blocked=blocked,
        merge=merge,
        accuracy=precision,
        call=call,
    )


# ---------------------------------------------------------------------------------------
# Evaluation, bounds, comparisons
# ---------------------------------------------------------------------------------------


Repro = Callable[[], str]


def _fail(impl: OnlineImpl, detail: str, reproduction: Repro) -> None:
    __tracebackhide__ = True
    raise PropertyViolation(caller_name(), impl.name, detail, reproduction())


def _blocked_repro(impl: OnlineImpl, case: AttentionCase, b: int, lse: bool) -> Repro:
    """The call of ``impl.blocked`` that reproduces a failure (built only on failure)."""

    def text() -> str:
        args = case.args() + f", block_keys={b}" + (", return_lse=True" if lse else "")
        return impl.reproduce(args) if impl.call is not None else impl.reproduce(args, "blocked")

    return text


def _merge_repro(impl: OnlineImpl, oa: F64, la: F64, ob: F64, lb: F64) -> Repro:
    """The call of ``impl.merge`` that reproduces a failure (built only on failure)."""

    def text() -> str:
        args = ", ".join(
            f"{n}={array_repr(np.asarray(a))}"
            for n, a in (("o_a", oa), ("lse_a", la), ("o_b", ob), ("lse_b", lb))
        )
        return f"{impl.name}.merge({args})"

    return text


def _copy(a: Any) -> Any:
    return a.copy() if isinstance(a, np.ndarray) else a


def _restrict(impl: OnlineImpl, case: AttentionCase, drop: tuple[str, ...] = ()) -> AttentionCase:
    """The case without the options ``impl.blocked`` lacks and those in ``drop``."""
    gone = set(drop) | (set(FEATURES) - set(impl.options))
    keys = {
        "mask": ("mask", "bias"),
        "causal": ("causal",),
        "window": ("window",),
        "softcap": ("softcap",),
        "alibi": ("alibi_slopes",),
        "sinks": ("sinks",),
        "dropout": ("dropout_mask", "dropout_p"),
    }
    kw = dict(case.kwargs)
    for feature in gone:
        for key in keys.get(feature, ()):
            kw.pop(key, None)
    q, k, v = case.q, case.k, case.v
    if "gqa" in gone and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    positional = kw.get("causal") or "window" in kw or "alibi_slopes" in kw
    if not positional and case.n_queries != case.n_keys:
        kw.pop("align", None)
    elif positional and case.n_queries != case.n_keys and "align" not in kw:
        kw["align"] = "bottom_right"
    return AttentionCase(q, k, v, kw)


def _direct(case: AttentionCase) -> tuple[F64, F64, F64, F64, F64]:
    """attnspec.sdpa at precision="accurate": output, lse, the weighted sums W (an upper
    bound), and the accurate claim's bounds on the output and the lse."""
    import attnspec

    out, lse = attnspec.sdpa(case.q, case.k, case.v, return_lse=True, **case.kwargs)
    weighted, tb = textbook_sdpa_bound(case.q, case.k, case.v, **case.kwargs)
    w_up = weighted + tb
    with np.errstate(invalid="ignore", over="ignore"):
        bound = 4 * U * w_up + ETA
        lse_bound = SECOND_ORDER * (2 * U * np.abs(lse) + ETA)
    return out, lse, w_up, bound, lse_bound


def _blocked_bounds(impl: OnlineImpl, case: AttentionCase, b: int) -> tuple[F64, F64]:
    """The bounds ``impl`` claims for its blocked attention on ``case`` with blocks of ``b``."""
    kw = case.kwargs
    if impl.accuracy == "fast":
        _, bound, lse_b = otol.online_sdpa_bound(case.q, case.k, case.v, block_keys=b, **kw)
    elif impl.accuracy == "accurate":
        _, bound, lse_b = otol.accurate_online_bound(case.q, case.k, case.v, block_keys=b, **kw)
    else:
        rho = float(impl.accuracy)
        weighted, tb = textbook_sdpa_bound(case.q, case.k, case.v, **kw)
        bound = rho * (weighted + tb) + ETA
        rq = otol.row_quantities(case.q, case.k, **kw)
        lse_b = rho * np.maximum(1.0, rq["M"]) * SECOND_ORDER
    return bound, lse_b


def _call_blocked(impl: OnlineImpl, case: AttentionCase, b: int) -> tuple[F64, F64 | None, bool]:
    """``impl.blocked`` on copies of the case; shapes checked; (out, lse or None, lse?)."""
    __tracebackhide__ = True
    assert impl.blocked is not None
    want_lse = "lse" in impl.options
    kw = {key: _copy(val) for key, val in case.kwargs.items()}
    if want_lse:
        kw["return_lse"] = True
    res = impl.blocked(case.q.copy(), case.k.copy(), case.v.copy(), block_keys=b, **kw)
    out, lse = res if want_lse else (res, None)
    out = np.asarray(out, dtype=np.float64)
    shape = (*case.logits_shape[:-1], case.v.shape[-1])
    if out.shape != shape:
        _fail(
            impl,
            f"returned shape {out.shape}, expected {shape}",
            _blocked_repro(impl, case, b, want_lse),
        )
    if lse is not None:
        lse = np.asarray(lse, dtype=np.float64)
        if lse.shape != case.logits_shape[:-1]:
            _fail(
                impl,
                f"lse has shape {lse.shape}, expected {case.logits_shape[:-1]}",
                _blocked_repro(impl, case, b, True),
            )
    return out, lse, want_lse


def _worst(a: F64, b: F64, allowed: Any) -> tuple[int, ...] | None:
    """The index where ``a`` and ``b`` differ most beyond ``allowed`` (None: they agree).

    Equal values (NaN with NaN, equal infinities) agree; otherwise the difference must be
    at most ``allowed`` (so a special value against anything else never agrees, unless
    the bound is infinite and both are not NaN)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    allow = np.broadcast_to(np.asarray(allowed, dtype=np.float64), a.shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.where(same(a, b), 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        bad = (diff > 0) & ~(diff <= allow)
        if not bad.any():
            return None
        ratio = np.where(bad, diff / np.where(allow > 0, allow, ETA), 0.0)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), ratio.shape))


def _agree(
    impl: OnlineImpl, what: str, got: F64, want: F64, allowed: Any, reproduction: Repro
) -> None:
    __tracebackhide__ = True
    at = _worst(got, want, allowed)
    if at is None:
        return
    g, w = np.broadcast_arrays(got, want)
    allow = np.broadcast_to(np.asarray(allowed, dtype=np.float64), g.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = abs(float(g[at]) - float(w[at]))
    _fail(
        impl,
        f"{what} at index {at}: {float(g[at])!r}, direct {float(w[at])!r}, |difference| = "
        f"{diff:.3g} > allowed {float(allow[at]):.3g}",
        reproduction,
    )


def _against_direct(
    impl: OnlineImpl,
    what: str,
    out: F64,
    lse: F64 | None,
    bound: Any,
    lse_bound: Any,
    direct: tuple[F64, F64, F64, F64, F64],
    reproduction: Repro,
) -> None:
    """``out`` (and ``lse``) within their bounds plus the direct result's of it."""
    __tracebackhide__ = True
    d_out, d_lse, _, d_bound, d_lse_bound = direct
    _agree(impl, f"output {what}", out, d_out, np.asarray(bound) + d_bound, reproduction)
    if lse is not None:
        _agree(impl, f"lse {what}", lse, d_lse, np.asarray(lse_bound) + d_lse_bound, reproduction)


# ---------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------


@tests_claims("online-rescale-exact", "online-any-partition", "online-merge-monoid")
def check_block_sizes(impl: OnlineImpl, ocase: OnlineCase, block_keys: int | None = None) -> None:
    r"""Claims ``online-rescale-exact`` and ``online-any-partition``: blocked attention with
    any block size gives the direct result, within the claimed bound
    (:func:`~attnspec.spec.tolerances.online.online_sdpa_bound` for "fast") plus the direct
    result's.

    ``block_keys`` (default: the case's) may be smaller than, equal to or larger than
    :math:`S`; when it does not divide :math:`S` the last block is short. A row with
    nothing visible must give output 0 and lse :math:`-\infty` exactly; NaN rows and
    infinite outputs must match exactly.
    """
    __tracebackhide__ = True
    if impl.blocked is None:
        return
    case = _restrict(impl, ocase.case)
    b = ocase.block_keys if block_keys is None else int(block_keys)
    out, lse, want_lse = _call_blocked(impl, case, b)
    bound, lse_b = _blocked_bounds(impl, case, b)
    repro = _blocked_repro(impl, case, b, want_lse)
    _against_direct(impl, f"with blocks of {b} keys", out, lse, bound, lse_b, _direct(case), repro)


def _merge_claim(impl: OnlineImpl, oa: F64, la: F64, ob: F64, lb: F64) -> tuple[F64, F64]:
    """The bound ``impl`` claims for one merge of the given partials."""
    if impl.accuracy == "fast":
        return otol.merge_bound(oa, la, ob, lb)
    if impl.accuracy == "accurate":
        return otol.accurate_merge_bound(oa, la, ob, lb)
    rho = float(impl.accuracy)
    ell = np.logaddexp(la, lb)
    with np.errstate(invalid="ignore", over="ignore"):
        wa = np.where(la == -np.inf, 0.0, np.exp(la - ell))[..., None]
        wb = np.where(lb == -np.inf, 0.0, np.exp(lb - ell))[..., None]
        weighted = np.where(wa > 0, wa * np.abs(oa), 0.0) + np.where(wb > 0, wb * np.abs(ob), 0)
    return rho * weighted + ETA, rho * np.maximum(1.0, np.abs(ell)) * SECOND_ORDER


def _call_merge(impl: OnlineImpl, oa: F64, la: F64, ob: F64, lb: F64) -> tuple[F64, F64]:
    __tracebackhide__ = True
    assert impl.merge is not None
    o, lse = impl.merge(oa.copy(), la.copy(), ob.copy(), lb.copy())
    o, lse = np.asarray(o, dtype=np.float64), np.asarray(lse, dtype=np.float64)
    if o.shape != oa.shape or lse.shape != la.shape:
        _fail(
            impl,
            f"merge returned shapes {o.shape} and {lse.shape}, expected {oa.shape} and {la.shape}",
            _merge_repro(impl, oa, la, ob, lb),
        )
    return o, lse


@dataclass
class _Node:
    """A partial in a merge tree: its computed value, its bounds, its keys."""

    o: F64
    lse: F64
    bound: F64  # on |o - exact o|
    lse_bound: F64  # on |lse - exact lse|
    keys: Bools  # (S,): the keys it covers
    sink: bool = False  # the sink leaf


def _weighted_of(case: AttentionCase, keys: Bools, sink: bool) -> F64:
    r"""An upper bound of :math:`\sum_j p^X_{ij} |v_{jk}|` for attention over ``keys`` (with
    the sink when ``sink``)."""
    kw = dict(case.kwargs)
    if not sink:
        kw.pop("sinks", None)
    base = kw.get("mask")
    kw["mask"] = keys if base is None else (np.asarray(base, dtype=bool) & keys)
    weighted, tb = textbook_sdpa_bound(case.q, case.k, case.v, **kw)
    return weighted + tb


def _tree(
    impl: OnlineImpl, case: AttentionCase, tree: Tree, leaves: list[_Node], sink_leaf: bool
) -> _Node:
    r"""Merge ``leaves`` along ``tree`` with ``impl.merge``, and bound the result.

    At a node with children :math:`A, B` (computed :math:`\hat o_X, \hat\ell_X` within
    :math:`E_X, e_X` of their exact values): the merge's own claim :math:`E_m, e_m` on its
    computed inputs; the exact merge of the computed inputs differs from the exact merge of
    the exact ones by at most :math:`\sum_X \hat w_X E_X + (e^{2\max(e_A, e_B)} - 1)
    W_{A \cup B}` (each weight moves by a factor within :math:`e^{\pm 2\max e_X}`,
    :math:`\sum_X w_X |o_X| \le W_{A \cup B}`); :math:`e = e_m + \max(e_A, e_B)` (logaddexp
    is 1-Lipschitz in the max norm).
    """
    __tracebackhide__ = True
    if isinstance(tree, int):
        return leaves[tree]
    a = _tree(impl, case, tree[0], leaves, sink_leaf)
    b = _tree(impl, case, tree[1], leaves, sink_leaf)
    o, lse = _call_merge(impl, a.o, a.lse, b.o, b.lse)
    e_m, el_m = _merge_claim(impl, a.o, a.lse, b.o, b.lse)
    keys = a.keys | b.keys
    sink = a.sink or b.sink
    w_up = _weighted_of(case, keys, sink and sink_leaf)
    with np.errstate(invalid="ignore", over="ignore"):
        ell = np.logaddexp(a.lse, b.lse)
        wa = np.where(a.lse == -np.inf, 0.0, np.exp(a.lse - ell))[..., None]
        wb = np.where(b.lse == -np.inf, 0.0, np.exp(b.lse - ell))[..., None]
        e_max = np.maximum(a.lse_bound, b.lse_bound)
        moved = perturbation_factor(e_max)[..., None] * w_up
        carried = np.where(wa > 0, wa * a.bound, 0.0) + np.where(wb > 0, wb * b.bound, 0.0)
        bound = e_m + SECOND_ORDER * carried + np.where(w_up == 0, 0.0, moved)
        lse_bound = el_m + e_max
    bound = np.where(np.isnan(bound), np.inf, bound)
    return _Node(o, lse, bound, np.where(np.isnan(lse_bound), np.inf, lse_bound), keys, sink)


def _partials(case: AttentionCase, parts: tuple[tuple[int, ...], ...]) -> list[_Node]:
    """The partial of each part: attnspec.sdpa (accurate) with the mask restricted to it
    (no sink), with the accurate claim's bounds."""
    import attnspec

    kw = dict(case.kwargs)
    kw.pop("sinks", None)
    base = kw.get("mask")
    keys = np.arange(case.n_keys)
    out = []
    for part in parts:
        inside = np.isin(keys, np.asarray(part, dtype=np.int64))
        pk = {**kw, "mask": inside if base is None else (np.asarray(base, dtype=bool) & inside)}
        o, lse = attnspec.sdpa(case.q, case.k, case.v, return_lse=True, **pk)
        weighted, tb = textbook_sdpa_bound(case.q, case.k, case.v, **pk)
        with np.errstate(invalid="ignore", over="ignore"):
            bound = 4 * U * (weighted + tb) + ETA
            lse_bound = SECOND_ORDER * (2 * U * np.abs(lse) + ETA)
        lse_bound = np.where(np.isfinite(lse_bound), lse_bound, 0.0)  # -inf, NaN: exact
        out.append(_Node(o, lse, bound, lse_bound, inside))
    return out


def _sink_leaf(case: AttentionCase, like: _Node) -> _Node | None:
    """The sink as a partial :math:`(0, \\sigma_h)` (exact), or None without sinks."""
    sinks = case.kwargs.get("sinks")
    if sinks is None:
        return None
    sig = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[..., None], like.lse.shape).copy()
    zero = np.zeros(like.o.shape)
    return _Node(zero, sig, zero, np.zeros(sig.shape), np.zeros(case.n_keys, dtype=bool), True)


@tests_claims(
    "online-merge-monoid", "online-any-partition", "online-partials-merge", "online-merge-rounding"
)
def check_split_merge_order(impl: OnlineImpl, ocase: OnlineCase) -> None:
    r"""Claims ``online-any-partition``, ``online-merge-monoid``, ``online-partials-merge``
    and ``online-merge-rounding`` (the bound of each merge of the tree): the partials of
    any partition of the keys (parts contiguous or not, possibly empty or fully hidden),
    merged with ``impl.merge`` along any tree, give the direct result.

    The partials are attnspec.sdpa (accurate) over each part (the mask restricted to it);
    a sink is one more partial :math:`(0, \sigma_h)`, merged last. Allowed: the tree's
    bound (:func:`_tree`, from the merge's claim at every node) plus the direct result's.
    """
    __tracebackhide__ = True
    if impl.merge is None:
        return
    case = ocase.case
    leaves = _partials(case, ocase.parts)
    tree: Tree = ocase.tree
    sink = _sink_leaf(case, leaves[0])
    if sink is not None:
        leaves.append(sink)
        tree = (tree, len(leaves) - 1)
    root = _tree(impl, case, tree, leaves, sink is not None)

    def repro() -> str:
        return f"{impl.name}.merge along tree {tree!r} over parts {ocase.parts!r} of {case!r}"

    _against_direct(
        impl,
        f"merged along {tree!r}",
        root.o,
        root.lse,
        root.bound,
        root.lse_bound,
        _direct(case),
        repro,
    )


def _materialise(case: AttentionCase) -> AttentionCase:
    """Causal and window visibility folded into an explicit mask, ALiBi dropped: positions
    move when keys are prepended."""
    kw = dict(case.kwargs)
    kw.pop("alibi_slopes", None)
    if kw.get("causal") or kw.get("window") is not None:
        seen = case_visibility(case.with_kwargs(bias=None, alibi_slopes=None))
        kw.pop("causal", None)
        kw.pop("window", None)
        kw["mask"] = seen
    kw.pop("align", None)  # nothing positional is left
    return AttentionCase(case.q, case.k, case.v, kw)


def _prepend_hidden(case: AttentionCase, b: int, poison: bool) -> AttentionCase:
    """``b`` keys put before the others, hidden from every query by the mask; with
    ``poison`` their keys hold NaN and their values and bias NaN, +inf and -inf (key by
    key, in turn), else 0."""
    q, k, v = case.q, case.k, case.v
    fills = np.array([np.nan, np.inf, -np.inf] if poison else [0.0])
    per_key = fills[np.arange(b) % fills.size]
    kk = np.full((*k.shape[:-2], b, k.shape[-1]), np.nan if poison else 0.0)
    vv = np.broadcast_to(per_key[:, None], (*v.shape[:-2], b, v.shape[-1]))
    kw = dict(case.kwargs)
    shape = case.logits_shape
    pad = (*shape[:-1], b)
    base = np.broadcast_to(np.asarray(kw.get("mask", True), dtype=bool), shape)
    kw["mask"] = np.concatenate([np.zeros(pad, dtype=bool), base], axis=-1)
    if kw.get("bias") is not None:
        bias = np.broadcast_to(np.asarray(kw["bias"], dtype=np.float64), shape)
        kw["bias"] = np.concatenate([np.broadcast_to(per_key, pad), bias], axis=-1)
    if kw.get("dropout_mask") is not None:
        keep = np.broadcast_to(np.asarray(kw["dropout_mask"], dtype=bool), shape)
        kw["dropout_mask"] = np.concatenate([np.ones(pad, dtype=bool), keep], axis=-1)
    return AttentionCase(q, np.concatenate([kk, k], axis=-2), np.concatenate([vv, v], axis=-2), kw)


@tests_claims("online-hidden-block", "online-merge-monoid")
def check_hidden_block(impl: OnlineImpl, ocase: OnlineCase) -> None:
    r"""Claim ``online-hidden-block``: a fully hidden block changes nothing, and whatever it
    holds never reaches the result.

    Blocked attention: a first block of ``block_keys`` keys hidden from every query (the
    case's causal and window rules folded into the mask, ALiBi dropped: positions move)
    with NaN in its keys and NaN, +inf and -inf in its values and bias gives **bitwise**
    the result with 0 there (the same operations on the same visible numbers), and the
    direct result of
    the case without the block within the bounds. A merge: merging a partial with the
    empty partial :math:`(\mathrm{NaN}, -\infty)`, on either side, gives the partial within
    the merge's claim (:math:`w = 1` and 0 exactly for any sane formula), and two empty
    partials give :math:`(0, -\infty)` exactly.
    """
    __tracebackhide__ = True
    case = ocase.case
    b = ocase.block_keys
    if impl.blocked is not None and "mask" in impl.options:
        base = _materialise(_restrict(impl, case))
        zero = _prepend_hidden(base, b, poison=False)
        out0, lse0, want_lse = _call_blocked(impl, zero, b)
        bad = _prepend_hidden(base, b, poison=True)
        out, lse, _ = _call_blocked(impl, bad, b)
        repro = _blocked_repro(impl, bad, b, want_lse)
        what = "with NaN and infinities in a hidden first block vs 0 there"
        _agree(impl, f"output {what}", out, out0, 0.0, repro)
        if lse is not None and lse0 is not None:
            _agree(impl, f"lse {what}", lse, lse0, 0.0, repro)
        bound, lse_b = _blocked_bounds(impl, zero, b)
        _against_direct(
            impl,
            "with a hidden first block",
            out0,
            lse0,
            bound,
            lse_b,
            _direct(base),
            _blocked_repro(impl, zero, b, want_lse),
        )
    if impl.merge is not None:
        (part,) = _partials(case, (tuple(range(case.n_keys)),))
        o, lse = part.o, part.lse
        poison = np.full(o.shape, np.nan)
        empty = np.full(lse.shape, -np.inf)
        for left in (True, False):
            args = (o, lse, poison, empty) if left else (poison, empty, o, lse)
            got_o, got_l = _call_merge(impl, *args)
            e, el = _merge_claim(impl, *args)
            repro = _merge_repro(impl, *args)
            side = "after" if left else "before"
            _agree(
                impl, f"output of a partial merged with the empty one {side} it", got_o, o, e, repro
            )
            _agree(
                impl, f"lse of a partial merged with the empty one {side} it", got_l, lse, el, repro
            )
        got_o, got_l = _call_merge(impl, poison, empty, poison, empty)
        repro = _merge_repro(impl, poison, empty, poison, empty)
        _agree(impl, "output of two empty partials merged", got_o, np.zeros(o.shape), 0.0, repro)
        _agree(impl, "lse of two empty partials merged", got_l, empty, 0.0, repro)


def _with_sinks(case: AttentionCase) -> AttentionCase:
    """The case with sinks (its own, or 0.5, -1, 0.5, ... per query head)."""
    if case.kwargs.get("sinks") is not None:
        return case
    if case.q.ndim == 2 and case.k.ndim == 2:
        return case.with_kwargs(sinks=np.array(0.5))
    hq = case.q.shape[-3]
    return case.with_kwargs(sinks=np.array([0.5 if h % 2 == 0 else -1.0 for h in range(hq)]))


@tests_claims("online-sink-once")
def check_sink_once(impl: OnlineImpl, ocase: OnlineCase) -> None:
    r"""Claim ``online-sink-once``: a sink enters once, however many blocks there are.

    Blocked attention with sinks (the case's, or 0.5 and -1 per head) and blocks of at
    most :math:`\lceil S/2 \rceil` keys (so that there are two blocks or more when
    :math:`S \ge 2`) gives the direct result within the bounds. A merge: the partial of
    all keys without the sink, merged with :math:`(0, \sigma_h)`, gives the direct result
    with the sink.
    """
    __tracebackhide__ = True
    case = _with_sinks(ocase.case)
    if impl.blocked is not None and "sinks" in impl.options:
        fit = _restrict(impl, case)
        b = max(1, min(ocase.block_keys, math.ceil(fit.n_keys / 2)))
        out, lse, want_lse = _call_blocked(impl, fit, b)
        bound, lse_b = _blocked_bounds(impl, fit, b)
        _against_direct(
            impl,
            f"with a sink and blocks of {b} keys",
            out,
            lse,
            bound,
            lse_b,
            _direct(fit),
            _blocked_repro(impl, fit, b, want_lse),
        )
    if impl.merge is not None:
        leaves = _partials(case, (tuple(range(case.n_keys)),))
        sink = _sink_leaf(case, leaves[0])
        assert sink is not None
        root = _tree(impl, case, (0, 1), [*leaves, sink], True)

        def repro() -> str:
            return f"{impl.name}.merge of the sink-free partial and (0, sinks) for {case!r}"

        _against_direct(
            impl,
            "of the partial merged with the sink",
            root.o,
            root.lse,
            root.bound,
            root.lse_bound,
            _direct(case),
            repro,
        )


#: name -> check; the online battery's vocabulary
PROPERTIES: dict[str, Callable[..., None]] = {
    "block_sizes": check_block_sizes,
    "split_merge_order": check_split_merge_order,
    "hidden_block": check_hidden_block,
    "sink_once": check_sink_once,
}


def _online_checks() -> list[Check]:
    def c(name: str, text: str, needs: tuple[str, ...] = (), n: int = 25) -> Check:
        def cases(impl: Any) -> st.SearchStrategy[Any]:
            opts = getattr(impl, "options", frozenset(FEATURES))
            return online_cases(features=frozenset(opts), max_side=4, max_width=3)

        return Check(name, text, PROPERTIES[name], cases, n, frozenset(needs))

    return [
        c("block_sizes", "blocked attention, any block size = the direct result", ("blocked",)),
        c(
            "split_merge_order",
            "partials of any split of the keys, merged in any order = the direct result",
            ("merge",),
        ),
        c("hidden_block", "a fully hidden block changes nothing (NaN/inf there never reach)"),
        c("sink_once", "a sink enters once, however many blocks", ("sinks",)),
    ]


#: the online checks, 25 examples each at most (L, S <= 4): the whole battery runs in a few
#: seconds with the ci profile
BATTERY: list[Check] = _online_checks()
