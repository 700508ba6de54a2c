r"""The properties of scaled dot-product attention, as checks of any implementation.

Each ``check_*`` function takes an :class:`AttentionImpl` (a callable with the signature
of :func:`attnspec.sdpa` that takes and returns numpy arrays, the features it supports
and the accuracy it claims) and an :class:`~attnspec.spec.strategies.attention.AttentionCase`,
evaluates the implementation, and raises
:class:`~attnspec.spec.properties.softmax.PropertyViolation` with the worst entry, the bound it
broke and a call that reproduces it. Each check states one of the claims proved in
:mod:`attnspec.spec.derivations.attention` (named in its docstring) so that it can be
tested on an implementation rather than on symbols.

A check uses only what it needs of the case: it drops the modifiers its claim does not
hold with (said in its docstring: e.g. a key shift changes the output under a softcap)
and features the implementation lacks are dropped likewise (:func:`_fit`). Causal and
window visibility are folded into an explicit mask where a check moves positions
(permutations, removing a key).

Tolerances. Every comparison of two computed results allows the sum of their error
bounds against the exact values (:func:`output_bound`), plus, where the inputs of the
two calls differ by a rounding, the effect of that rounding on the exact result
(:func:`attnspec.spec.tolerances.attention.perturbation_factor`). The bounds:

* "accurate": :func:`attnspec.spec.tolerances.attention.accurate_sdpa_bound` for the
  output, one ulp for the lse;
* "fast": :func:`attnspec.spec.tolerances.attention.textbook_sdpa_bound` and
  :func:`~attnspec.spec.tolerances.attention.textbook_lse_bound`;
* a number :math:`\rho`: :math:`|\hat o_{ik} - o_{ik}| \le \rho \sum_j p_{ij}|v_{jk}|
  + \eta` and :math:`|\hat\ell_i - \ell_i| \le \rho \max(1, |\ell_i|)`.

:math:`\sum_j p_{ij}|v_{jk}|` is taken from the textbook bound (the fast reference on
:math:`|V|`, raised by its own error bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import mpmath
import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from attnspec.spec.properties._core import (
    Check,
    Implementation,
    PropertyViolation,
    abs_error,
    caller_name,
    same,
    tests_claims,
    two_sum_error,
)
from attnspec.spec.strategies.attention import (
    FEATURES,
    AttentionCase,
    attention_cases,
    case_visibility,
)
from attnspec.spec.tolerances import attention as atol

__all__ = [
    "PROPERTIES",
    "AttentionImpl",
    "PropertyViolation",
    "attnspec_impl",
    "check_agreement",
    "check_alibi_causal",
    "check_alignments",
    "check_causal_prefix",
    "check_default_scale",
    "check_dropout",
    "check_empty_rows",
    "check_gqa_repeat",
    "check_hidden_key",
    "check_hidden_values",
    "check_key_shift",
    "check_key_value_permutation",
    "check_kv_cache",
    "check_lse_bounds",
    "check_query_permutation",
    "check_scale_zero",
    "check_sink_as_key",
    "check_softcap_range",
    "check_split_merge",
    "check_value_affine",
    "check_weights_convex",
    "exact_impl",
    "output_bound",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
SdpaFn = Callable[..., Any]
U = atol.U
ETA = atol.ETA
_SO = atol.SECOND_ORDER


@dataclass(frozen=True, repr=False)
class AttentionImpl(Implementation):
    """One implementation of attention, and what it claims.

    An :class:`~attnspec.spec.properties._core.Implementation` (``name``, ``accuracy``,
    ``call``), with:

    Attributes
    ----------
    fn : callable
        ``fn(q, k, v, **kwargs)`` with the keyword arguments of :func:`attnspec.sdpa`
        (but ``precision``); numpy arrays in, numpy arrays out; with
        ``return_lse=True`` it returns ``(out, lse)``.
    features : frozenset of str
        What it supports, from :data:`~attnspec.spec.strategies.attention.FEATURES`:
        mask (bool masks and additive biases), causal, window, gqa, softcap, alibi, sinks,
        dropout (an explicit keep-mask), lse.
    accuracy : "accurate", "fast" or a number
        The bound it claims (see the module docstring).
    floor : float
        For "accurate": the :math:`f` of
        :func:`~attnspec.spec.tolerances.attention.accurate_sdpa_bound` (0: the claim of
        :func:`attnspec.sdpa`).
    call : str, optional
        How a reproduction is written: a format string with ``{args}``.
    """

    topic: ClassVar[str] = "attention"

    fn: SdpaFn
    features: frozenset[str] = field(default_factory=lambda: frozenset(FEATURES))
    floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; choose from {FEATURES}")

    def reproduction(self, case: AttentionCase, lse: bool = False) -> str:
        return self.reproduce(case.args() + (", return_lse=True" if lse else ""))


def attnspec_impl(precision: str = "accurate") -> AttentionImpl:
    """:func:`attnspec.sdpa` at ``precision`` ("accurate" or "fast"), every feature."""
    import attnspec

    if precision not in ("accurate", "fast"):
        raise ValueError(f"precision must be 'accurate' or 'fast', got {precision!r}")

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        return attnspec.sdpa(q, k, v, precision=precision, **kw)

    return AttentionImpl(
        name=f"attnspec.sdpa[{precision}]",
        fn=fn,
        accuracy=precision,
        call=f"attnspec.sdpa({{args}}, precision={precision!r})",
    )


def exact_impl(dps: int = 50) -> AttentionImpl:
    """attnspec.exact.sdpa at ``dps`` digits rounded to float64: correctly rounded, so it
    meets the "accurate" claim (with ``undecided="midpoint"``: where no precision up to
    attnspec.exact.MAX_BITS decides the rounding, the ball's midpoint, within far less
    than the claim of the exact value)."""
    from attnspec import exact

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        res = exact.sdpa(q, k, v, dps=dps, undecided="midpoint", **kw)
        if kw.get("return_lse"):
            return tuple(exact.to_float64(r) for r in res)
        return exact.to_float64(res)

    return AttentionImpl(
        name=f"attnspec.exact.sdpa[dps={dps}]",
        fn=fn,
        accuracy="accurate",
        call=(
            "attnspec.exact.to_float64(attnspec.exact.sdpa({args}, "
            f"dps={dps}, undecided='midpoint'))"
        ),
    )


# ---------------------------------------------------------------------------------------
# Evaluation, bounds, comparisons
# ---------------------------------------------------------------------------------------


def _fail(impl: AttentionImpl, case: AttentionCase, detail: str, lse: bool = False) -> None:
    __tracebackhide__ = True
    raise PropertyViolation(caller_name(), impl.name, detail, impl.reproduction(case, lse))


def _copy(a: Any) -> Any:
    return a.copy() if isinstance(a, np.ndarray) else a


def _eval(impl: AttentionImpl, case: AttentionCase, lse: bool = False) -> tuple[F64, F64 | None]:
    """Call ``impl`` on (copies of) the case; check the shapes; float64 results."""
    __tracebackhide__ = True
    want_lse = lse and "lse" in impl.features
    kw = {key: _copy(val) for key, val in case.kwargs.items()}
    if want_lse:
        kw["return_lse"] = True
    res = impl.fn(case.q.copy(), case.k.copy(), case.v.copy(), **kw)
    out, ls = res if want_lse else (res, None)
    out = np.asarray(out, dtype=np.float64)
    shape = (*case.logits_shape[:-1], case.v.shape[-1])
    if out.shape != shape:
        _fail(impl, case, f"returned shape {out.shape}, expected {shape}", want_lse)
    if ls is not None:
        ls = np.asarray(ls, dtype=np.float64)
        if ls.shape != case.logits_shape[:-1]:
            _fail(impl, case, f"lse has shape {ls.shape}, expected {case.logits_shape[:-1]}", True)
    return out, ls


def _weighted_up(case: AttentionCase, v: F64 | None = None) -> tuple[F64, F64]:
    r"""Upper bounds of :math:`\sum_j p_{ij}|v_{jk}|` and :math:`\max_{j\ vis}|v_{jk}|`."""
    vv = case.v if v is None else v
    weighted, bound = atol.textbook_sdpa_bound(case.q, case.k, vv, **case.kwargs)
    data = atol.logit_data(case.q, case.k, **case.kwargs)
    vmax = atol.visible_value_max(vv, data, case.q.ndim == 2 and case.k.ndim == 2)
    return weighted + bound, vmax


def output_bound(
    impl: AttentionImpl, case: AttentionCase, lse: F64 | None = None, v: F64 | None = None
) -> tuple[F64, F64 | None]:
    """The bound on ``|computed - exact|`` ``impl`` claims: for the output, and for the lse
    (given the computed ``lse``; None without). ``v`` replaces the case's values."""
    if impl.accuracy == "fast":
        _, out_b = atol.textbook_sdpa_bound(
            case.q, case.k, case.v if v is None else v, **case.kwargs
        )
        lse_b = None if lse is None else atol.textbook_lse_bound(case.q, case.k, **case.kwargs)
        return out_b, lse_b
    w, vmax = _weighted_up(case, v)
    if impl.accuracy == "accurate":
        out_b = atol.accurate_sdpa_bound(w, vmax, impl.floor)
        # one ulp of the exact value, from the computed one: |c - y| <= 2u|y| + eta and
        # |y| <= |c| + |c - y| (tolerance.faithful_bound)
        lse_b = None if lse is None else _SO * (2 * U * np.abs(lse) + ETA) / (1 - 2 * U)
    else:
        rho = float(impl.accuracy)
        out_b = rho * w + ETA
        lse_b = None if lse is None else rho * np.maximum(1.0, np.abs(lse)) * _SO
    if lse_b is not None:
        lse_b = np.where(np.isfinite(lse_b), lse_b, np.inf)
    return out_b, lse_b


def _compare(
    impl: AttentionImpl,
    case: AttentionCase,
    what: str,
    a: Any,
    b: Any,
    allowed: Any,
    rows: Bools | None = None,
    lse: bool = False,
) -> None:
    """Fail unless ``a`` and ``b`` agree within ``allowed`` (bitwise where it is 0)."""
    __tracebackhide__ = True
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    allowed = np.broadcast_to(np.asarray(allowed, dtype=np.float64), a.shape)
    with np.errstate(invalid="ignore"):
        diff = np.where(same(a, b), 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        # a NaN bound allows nothing but equality
        bad = (diff > 0) & ~(diff <= allowed) & ~(allowed == np.inf)
    if rows is not None:
        bad = bad & np.broadcast_to(rows, bad.shape)
    if bad.any():
        # the ratio only ranks the failures: inf is fine
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = np.where(bad, diff / np.where(allowed > 0, allowed, ETA), 0.0)
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        at_t = tuple(int(i) for i in at)
        _fail(
            impl,
            case,
            f"{what} at index {at_t}: {a[at]!r} vs {b[at]!r}, |difference| = "
            f"{float(diff[at]):.3g} > allowed {float(allowed[at]):.3g}",
            lse,
        )


def _evaluated(impl: AttentionImpl, case: AttentionCase) -> tuple[F64, F64 | None, Any, Any]:
    """``impl`` on ``case``: output, lse (None without the feature), and the bounds it
    claims on each (:func:`output_bound`)."""
    __tracebackhide__ = True
    out, lse = _eval(impl, case, lse=True)
    bound, lse_bound = output_bound(impl, case, lse)
    return out, lse, bound, lse_bound


def _agree(
    impl: AttentionImpl, case: AttentionCase, other: AttentionCase, what: str, lse_what: str
) -> None:
    """``impl`` gives the same output and lse on ``other`` as on ``case``, within the sum
    of the two results' bounds (the claim is an identity of the exact values)."""
    __tracebackhide__ = True
    base = _evaluated(impl, case)
    _agree_evaluated(impl, other, what, lse_what, _evaluated(impl, other), base)


Evaluated = tuple[F64, "F64 | None", Any, Any]


def _agree_evaluated(
    impl: AttentionImpl, other: AttentionCase, what: str, lse_what: str, a: Evaluated, b: Evaluated
) -> None:
    """The comparison of :func:`_agree` on two results of :func:`_evaluated` (``a`` of
    ``other``, the case a reproduction shows)."""
    __tracebackhide__ = True
    out_a, lse_a, e_a, el_a = a
    out_b, lse_b, e_b, el_b = b
    _compare(impl, other, what, out_a, out_b, e_a + e_b)
    if lse_a is not None and lse_b is not None and el_a is not None and el_b is not None:
        _compare(impl, other, lse_what, lse_a, lse_b, el_a + el_b, lse=True)


def _fit(impl: AttentionImpl, case: AttentionCase, drop: tuple[str, ...] = ()) -> AttentionCase:
    """The case without the features ``impl`` lacks and those named in ``drop``."""
    gone = set(drop) | (set(FEATURES) - set(impl.features))
    kw = dict(case.kwargs)
    keys = {
        "mask": ("mask", "bias"),
        "causal": ("causal",),
        "window": ("window",),
        "softcap": ("softcap",),
        "alibi": ("alibi_slopes",),
        "sinks": ("sinks",),
        "dropout": ("dropout_mask", "dropout_p"),
    }
    for feature in gone:
        for key in keys.get(feature, ()):
            kw.pop(key, None)
    q, k, v = case.q, case.k, case.v
    if "gqa" in gone and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)
    if not (kw.get("causal") or "window" in kw or "alibi_slopes" in kw):
        if case.n_queries != case.n_keys:
            kw.pop("align", None)
    elif case.n_queries != case.n_keys and "align" not in kw:
        kw["align"] = "bottom_right"
    return AttentionCase(q, k, v, kw)


def _full(a: Any, shape: tuple[int, ...]) -> Any:
    return np.broadcast_to(np.asarray(a), shape).copy()


def _materialise(case: AttentionCase) -> AttentionCase:
    """Causal and window visibility folded into an explicit (full-shape) mask."""
    kw = dict(case.kwargs)
    if not (kw.get("causal") or kw.get("window") is not None):
        return case
    seen = case_visibility(case.with_kwargs(bias=None))
    kw.pop("causal", None)
    kw.pop("window", None)
    if "alibi_slopes" not in kw:
        kw.pop("align", None)
    kw["mask"] = seen
    return AttentionCase(case.q, case.k, case.v, kw)


def _identity_values(case: AttentionCase) -> F64:
    """Values ``I_S`` (per kv head): the output is then the weight matrix P itself."""
    s = case.n_keys
    return np.broadcast_to(np.eye(s), (*case.v.shape[:-2], s, s)).copy()


def _regular_rows(case: AttentionCase, out: F64) -> Bools:
    """Rows that see something and whose output is finite (shape of the output's rows)."""
    seen = case_visibility(case)
    has = seen.any(axis=-1) | (case.kwargs.get("sinks") is not None)
    return np.asarray(has & np.isfinite(out).all(axis=-1))


def _with_values(case: AttentionCase, v: F64) -> AttentionCase:
    return replace(case, v=v)


def _take(a: Any, axis: int, index: Any) -> Any:
    """``a`` indexed along ``axis`` (from the end) where that side is not 1 (broadcast)."""
    if a is None or not isinstance(a, np.ndarray) or a.ndim < -axis or a.shape[axis] == 1:
        return a
    return np.take(a, index, axis=axis)


def _rowwise(case: AttentionCase, index: Any, q_rows: bool = True) -> dict[str, Any]:
    """Keyword arrays with their query axis (-2) indexed by ``index``."""
    kw = dict(case.kwargs)
    for key in ("mask", "bias", "dropout_mask"):
        if kw.get(key) is not None:
            kw[key] = _take(np.asarray(kw[key]), -2, index)
    return kw


def _colwise(kw: dict[str, Any], index: Any) -> dict[str, Any]:
    kw = dict(kw)
    for key in ("mask", "bias", "dropout_mask"):
        if kw.get(key) is not None:
            kw[key] = _take(np.asarray(kw[key]), -1, index)
    return kw


# ---------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------


@tests_claims("weights-convex", "sink-rescales")
def check_weights_convex(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``weights-convex``: each row of weights sums to one and every output lies in
    the range of the visible values of its column.

    The weights are read as the output for the values :math:`V = I_S` (then
    :math:`O = P`); their sum, taken exactly (``math.fsum``), is within
    :math:`\sum_j E_{ij}` of 1 (:math:`E` the bound of each weight), or at most 1 with a
    sink (:math:`1 - e^{\sigma - \ell}`, claim ``sink-rescales``). The output lies in
    :math:`[\min_j v_{jk} - E_{ik}, \max_j v_{jk} + E_{ik}]` over the visible keys (0
    joins them with a sink). Dropout is dropped (it rescales the weights).
    """
    __tracebackhide__ = True
    case = _fit(impl, case, ("dropout",))
    eye = _identity_values(case)
    pcase = _with_values(case, eye)
    p, _ = _eval(impl, pcase)
    e_p, _ = output_bound(impl, pcase)
    regular = _regular_rows(case, np.zeros((*case.logits_shape[:-1], 1)))
    sink = case.kwargs.get("sinks") is not None
    flat_p = p.reshape(math.prod(p.shape[:-1]), p.shape[-1])
    flat_e = np.broadcast_to(e_p, p.shape).reshape(flat_p.shape)
    for r, ok in enumerate(regular.reshape(-1)):
        if not ok:
            continue
        total = math.fsum(flat_p[r].tolist())
        # the weights' bounds, and u for fsum's one rounding (Shewchuk 1997)
        slack = float(np.sum(flat_e[r])) * _SO + U
        low = 0.0 if sink else 1.0 - slack
        if not (low <= total <= 1.0 + slack):
            at = tuple(int(i) for i in np.unravel_index(r, p.shape[:-1]))
            want = "in [0, 1]" if sink else "1"
            _fail(
                impl,
                pcase,
                f"the weights of row {at} sum to {total!r}, expected {want} within {slack:.3g}",
            )
    out, _ = _eval(impl, case)
    e_o, _ = output_bound(impl, case)
    seen = case_visibility(case)
    vv = case.v if case.v.ndim >= 3 or case.q.ndim >= 3 else case.v[None]
    if case.q.ndim == 2 and case.k.ndim == 2:
        seen = seen[None]
    vv = np.repeat(vv, seen.shape[-3] // vv.shape[-3], axis=-3)
    with np.errstate(invalid="ignore"):
        vis = seen[..., :, :, None]
        lo = np.min(np.where(vis, vv[..., None, :, :], np.inf), axis=-2, initial=np.inf)
        hi = np.max(np.where(vis, vv[..., None, :, :], -np.inf), axis=-2, initial=-np.inf)
    if case.q.ndim == 2 and case.k.ndim == 2:
        lo, hi = lo[0], hi[0]
    if sink:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    rows = _regular_rows(case, out)[..., None] & np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore", over="ignore"):
        below = np.where(rows, (lo - e_o) - out, 0.0)
        above = np.where(rows, out - (hi + e_o), 0.0)
    excess = np.maximum(below, above)
    if (excess > 0).any():
        worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
        _fail(
            impl,
            case,
            f"output at {tuple(int(i) for i in worst)} is {out[worst]!r}, outside the visible "
            f"values' range [{lo[worst]!r}, {hi[worst]!r}] by {float(excess[worst]):.3g} "
            f"(> bound {float(np.broadcast_to(e_o, out.shape)[worst]):.3g})",
        )


@tests_claims("empty-row")
def check_empty_rows(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``empty-row``: a row that sees nothing gives output exactly 0 and lse
    :math:`-\infty`; with a sink, output 0 and lse :math:`\sigma_h` (within the lse bound).

    Exact: no rounding is involved (an empty sum is 0). This includes the rows that
    bottom-right alignment leaves without keys when :math:`L > S` (claim ``alignments``).
    """
    __tracebackhide__ = True
    case = _fit(impl, case)
    out, lse = _eval(impl, case, lse=True)
    seen = case_visibility(case)
    empty = np.asarray(~seen.any(axis=-1))
    if not empty.any():
        return
    bad = empty[..., None] & ~(out == 0.0)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), bad.shape)
        _fail(impl, case, f"row {at[:-1]} sees no key, yet its output is {out[at]!r}, not 0")
    if lse is None:
        return
    sinks = case.kwargs.get("sinks")
    if sinks is None:
        bad_l = empty & ~(lse == -np.inf)
        if bad_l.any():
            at = np.unravel_index(int(np.argmax(bad_l)), bad_l.shape)
            _fail(impl, case, f"row {at} sees no key, yet its lse is {lse[at]!r}, not -inf", True)
        return
    sig = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[..., None], lse.shape)
    _, e_l = output_bound(impl, case, lse)
    _compare(impl, case, "lse of an empty row with a sink vs the sink", lse, sig, e_l, empty, True)


@tests_claims("query-permutation-equivariance")
def check_query_permutation(impl: AttentionImpl, case: AttentionCase, perm: Any = None) -> None:
    r"""Claim ``query-permutation-equivariance``: permuting the queries (and the rows of
    mask, bias and keep-mask) permutes the outputs and the lse.

    Causal and window visibility are folded into the mask first (they are positional);
    ALiBi is dropped. Allowed: the sum of the two results' bounds (the rows are computed
    independently, but an implementation may block them differently).
    """
    __tracebackhide__ = True
    case = _materialise(_fit(impl, case, ("alibi",)))
    n = case.n_queries
    pi = np.arange(n)[::-1] if perm is None else np.asarray(perm, dtype=np.intp)
    kw = _rowwise(case, pi)
    moved = AttentionCase(np.take(case.q, pi, axis=-2), case.k, case.v, kw)
    out, lse, e1, el1 = _evaluated(impl, case)
    out2, lse2, e2, el2 = _evaluated(impl, moved)
    inv = np.argsort(pi)
    back = np.take(out2, inv, axis=-2)
    e2b = np.take(np.broadcast_to(e2, out2.shape), inv, axis=-2)
    _compare(impl, moved, "output after permuting the queries back", back, out, e1 + e2b)
    if lse is not None and lse2 is not None and el1 is not None and el2 is not None:
        lback = np.take(lse2, inv, axis=-1)
        allowed = el1 + np.take(np.broadcast_to(el2, lse2.shape), inv, axis=-1)
        _compare(impl, moved, "lse after permuting the queries back", lback, lse, allowed, lse=True)


@tests_claims("key-value-permutation-invariance")
def check_key_value_permutation(impl: AttentionImpl, case: AttentionCase, perm: Any = None) -> None:
    r"""Claim ``key-value-permutation-invariance``: permuting keys and values together
    (and the columns of mask, bias and keep-mask) changes nothing.

    Causal and window visibility are folded into the mask first; ALiBi is dropped (it
    depends on positions). Not bitwise: the order of the sums changes. Allowed: the sum of
    the two results' bounds.
    """
    __tracebackhide__ = True
    case = _materialise(_fit(impl, case, ("alibi",)))
    n = case.n_keys
    pi = np.arange(n)[::-1] if perm is None else np.asarray(perm, dtype=np.intp)
    kw = _colwise(case.kwargs, pi)
    moved = AttentionCase(case.q, np.take(case.k, pi, axis=-2), np.take(case.v, pi, axis=-2), kw)
    _agree(impl, case, moved, "output with keys and values permuted", "lse with keys permuted")


def _tau(case: AttentionCase) -> float:
    scale = case.kwargs.get("scale")
    return 1.0 / math.sqrt(case.q.shape[-1]) if scale is None else float(scale)


def _per_row_q_dot(case: AttentionCase, vec: F64) -> F64:
    r""":math:`\max_j |\tau| \sum_e |q_{ie}| |w_{je}|` per row, for a (..., Hkv, S, E) ``vec``."""
    q = case.q if case.q.ndim >= 3 or case.k.ndim >= 3 else case.q[None]
    w = vec if vec.ndim >= 3 or case.q.ndim >= 3 else vec[None]
    w = np.repeat(np.abs(w), q.shape[-3] // w.shape[-3], axis=-3)
    with np.errstate(invalid="ignore", over="ignore"):
        d = abs(_tau(case)) * (np.abs(q) @ np.swapaxes(w, -1, -2))
        seen = case_visibility(case)
        if case.q.ndim == 2 and case.k.ndim == 2:
            seen = seen[None]
        out = np.max(np.where(seen, d, 0.0), axis=-1, initial=0.0) * _SO
    return out[0] if (case.q.ndim == 2 and case.k.ndim == 2) else out


@tests_claims("key-shift-invariance")
def check_key_shift(impl: AttentionImpl, case: AttentionCase, shift: Any = None) -> None:
    r"""Claim ``key-shift-invariance``: :math:`K + \mathbf{1}u^\top` gives the same output;
    the lse moves by :math:`\tau\, q_i \cdot u`.

    Not with a softcap (tanh is not a shift) nor a sink (its logit does not move): both
    are dropped. :math:`\mathrm{fl}(k_j + u)` rounds: the exact logits of the shifted
    keys differ from :math:`s_{ij} + \tau q_i\cdot u` by at most :math:`\delta_i =
    |\tau| \max_j \sum_e |q_{ie}||r_{je}|` with :math:`r` the rounding errors (TwoSum,
    exact), so the output may move by
    :func:`~attnspec.spec.tolerances.attention.perturbation_factor`
    :math:`(\delta_i) \sum_j p_{ij}|v_{jk}|` and the lse by :math:`\delta_i`, besides the
    two results' bounds. Default shift: :math:`u = (1.5, -0.75, \dots)` alternating.
    """
    __tracebackhide__ = True
    case = _fit(impl, case, ("softcap", "sinks"))
    width = case.q.shape[-1]
    u = (
        np.array([1.5 if e % 2 == 0 else -0.75 for e in range(width)])
        if shift is None
        else np.asarray(shift, dtype=np.float64)
    )
    with np.errstate(invalid="ignore"):  # NaN poison at hidden keys stays NaN
        k2 = case.k + u
    # the exact rounding error of each shifted key (0 where it is not finite)
    err = two_sum_error(case.k, np.broadcast_to(u, case.k.shape))
    moved = replace(case, k=k2)
    out, lse, e1, el1 = _evaluated(impl, case)
    out2, lse2, e2, el2 = _evaluated(impl, moved)
    delta = _per_row_q_dot(case, err)
    w, _ = _weighted_up(case)
    allowed = e1 + e2 + atol.perturbation_factor(delta)[..., None] * w
    _compare(impl, moved, "output with every key shifted", out2, out, allowed)
    if lse is None or lse2 is None or el1 is None or el2 is None:
        return
    tau = _tau(case)
    q = case.q
    with mpmath.workdps(60):
        for idx in np.ndindex(lse.shape):
            a, b = float(lse[idx]), float(lse2[idx])
            if not (math.isfinite(a) and math.isfinite(b)):
                if not same(np.float64(a), np.float64(b)):
                    _fail(impl, moved, f"lse at {idx}: {b!r}, unshifted {a!r}", True)
                continue
            qi = np.broadcast_to(q, (*lse.shape, width))[idx]
            c = mpmath.mpf(tau) * mpmath.fsum(
                mpmath.mpf(x) * mpmath.mpf(y) for x, y in zip(qi, u, strict=True)
            )
            got = abs(mpmath.mpf(b) - mpmath.mpf(a) - c)
            allow = (
                float(el1[idx]) + float(el2[idx]) + float(np.broadcast_to(delta, lse.shape)[idx])
            )
            if got > allow * _SO:
                _fail(
                    impl,
                    moved,
                    f"lse at {idx} moved by {float(mpmath.mpf(b) - a)!r}, expected tau q.u = "
                    f"{float(c)!r}: off by {float(got):.3g} > {allow:.3g}",
                    True,
                )


@tests_claims("value-affine-equivariance")
def check_value_affine(
    impl: AttentionImpl, case: AttentionCase, shift: Any = None, matrix: Any = None
) -> None:
    r"""Claim ``value-affine-equivariance``: :math:`V + \mathbf{1}c^\top \mapsto O +
    \mathbf{1}c^\top` and :math:`VW \mapsto OW`.

    The shift needs rows of weights summing to one: sinks and dropout are dropped, and
    rows that see nothing (output 0 either way) are skipped. Roundings:
    :math:`\mathrm{fl}(v + c)` moves each value by at most :math:`u|v'|`, so the exact
    output by :math:`u\sum_j p_{ij}|v'_{jk}|`; our :math:`\mathrm{fl}(\hat o + c)` adds
    :math:`u|\hat o + c|`. :math:`\mathrm{fl}(VW)` moves each value by
    :math:`\gamma_{E_v}(|V||W|)_{jl}`, the output by :math:`\gamma_{E_v} (\sum_j
    p_{ij}|v_j|)|W|`; our :math:`\mathrm{fl}(\hat O W)` adds :math:`\gamma_{E_v}|\hat O||W|`
    and the first output's error :math:`E|W|` (Higham 2002, eq. 3.5).
    """
    __tracebackhide__ = True
    case = _fit(impl, case, ("sinks", "dropout"))
    ev = case.v.shape[-1]
    c = np.array([0.5 + 2.0 * e for e in range(ev)]) if shift is None else np.asarray(shift, float)
    out, _ = _eval(impl, case)
    e1, _ = output_bound(impl, case)
    rows = _regular_rows(case, out)[..., None]
    with np.errstate(invalid="ignore"):  # hidden NaN/inf values stay what they are
        v2 = case.v + c
    moved = _with_values(case, v2)
    out2, _ = _eval(impl, moved)
    e2, _ = output_bound(impl, moved)
    w2, _ = _weighted_up(moved, np.abs(v2))
    with np.errstate(invalid="ignore", over="ignore"):
        want = out + c
        allowed = e1 + e2 + _SO * U * (w2 + np.abs(want))
    _compare(impl, moved, "output with V + 1 c^T vs O + 1 c^T", out2, want, allowed, rows)
    mat = (
        np.array([[(-1.0) ** (a + b) * (1 + a) / (1 + b) for b in range(2)] for a in range(ev)])
        if matrix is None
        else np.asarray(matrix, dtype=np.float64)
    )
    g = float(atol.gamma(ev))
    with np.errstate(invalid="ignore", over="ignore"):
        v3 = case.v @ mat
    mapped = _with_values(case, v3)
    out3, _ = _eval(impl, mapped)
    e3, _ = output_bound(impl, mapped)
    w1, _ = _weighted_up(case)
    with np.errstate(invalid="ignore", over="ignore"):
        want3 = out @ mat
        am = np.abs(mat)
        allowed3 = e3 + (np.broadcast_to(e1, out.shape) @ am) + _SO * g * ((w1 + np.abs(out)) @ am)
    _compare(impl, mapped, "output with V W vs O W", out3, want3, allowed3, rows)


@tests_claims("scale-zero-mean")
def check_scale_zero(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``scale-zero-mean``: with scale 0 the output is the mean of the visible
    values (0 for a row that sees nothing), and the lse is :math:`\log n`.

    Bias, ALiBi, sinks and dropout are dropped (they make the weights unequal). The mean
    is computed exactly (mpmath) and rounded; allowed: the output's bound plus half an ulp
    of the mean (:math:`u|\bar v|`), and for the lse its bound plus :math:`u \log n`.
    """
    __tracebackhide__ = True
    case = _fit(impl, case, ("alibi", "sinks", "dropout")).with_kwargs(scale=0.0, bias=None)
    out, lse = _eval(impl, case, lse=True)
    e, el = output_bound(impl, case, lse)
    seen = case_visibility(case)
    two_d = case.q.ndim == 2 and case.k.ndim == 2
    vv = case.v[None] if two_d else case.v
    sn = seen[None] if two_d else seen
    vv = np.repeat(vv, sn.shape[-3] // vv.shape[-3], axis=-3)
    vb = np.broadcast_to(vv, (*sn.shape[:-2], *vv.shape[-2:]))
    want = np.zeros((*sn.shape[:-1], vv.shape[-1]))
    n_vis = sn.sum(axis=-1)
    with mpmath.workdps(60):
        for idx in np.ndindex(sn.shape[:-1]):
            keys = np.flatnonzero(sn[idx])
            if keys.size == 0:
                continue
            block = vb[idx[:-1]][keys]
            for col in range(block.shape[-1]):
                vals = block[:, col]
                if not np.isfinite(vals).all():
                    want[(*idx, col)] = np.nan
                    continue
                want[(*idx, col)] = float(mpmath.fsum(mpmath.mpf(x) for x in vals) / keys.size)
    if two_d:
        want, n_vis = want[0], n_vis[0]
    rows = np.isfinite(want)
    _compare(impl, case, "output at scale 0 vs the mean", out, want, e + U * np.abs(want), rows)
    if lse is not None and el is not None:
        with np.errstate(divide="ignore"):  # log 0 = -inf for empty rows
            want_l = np.log(n_vis.astype(np.float64))
        _compare(
            impl, case, "lse at scale 0 vs log n", lse, want_l, el + U * np.abs(want_l), lse=True
        )


@tests_claims("scaling-variance")
def check_default_scale(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``scaling-variance`` (why the scale is :math:`1/\sqrt E`): leaving ``scale``
    out is ``scale=1/sqrt(E)``.

    An implementation may round :math:`1/\sqrt E` differently (``rsqrt``): a relative
    change of :math:`2u` in :math:`\tau` moves each logit by at most
    :math:`2u|\tau|\sum_e|q_e k_e|`, so the outputs may differ by the perturbation factor
    of that times :math:`\sum_j p_{ij}|v_{jk}|`, besides the two bounds.
    """
    __tracebackhide__ = True
    case = _fit(impl, case).with_kwargs(scale=None)
    explicit = case.with_kwargs(scale=1.0 / math.sqrt(case.q.shape[-1]))
    out, lse, e1, el1 = _evaluated(impl, case)
    out2, lse2, e2, el2 = _evaluated(impl, explicit)
    delta = 2 * U * _per_row_q_dot(case, case.k)
    w, _ = _weighted_up(case)
    allowed = e1 + e2 + atol.perturbation_factor(delta)[..., None] * w
    _compare(impl, explicit, "default scale vs scale=1/sqrt(E)", out, out2, allowed)
    if lse is not None and lse2 is not None and el1 is not None and el2 is not None:
        _compare(impl, explicit, "lse, default scale", lse, lse2, el1 + el2 + delta, lse=True)


def _square(case: AttentionCase) -> AttentionCase:
    """The case cut to L = S = min(L, S) (queries, keys, values and keyword arrays)."""
    n = min(case.n_queries, case.n_keys)
    kw = _rowwise(case, np.arange(n))
    kw = _colwise(kw, np.arange(n))
    kw.pop("align", None)
    return AttentionCase(case.q[..., :n, :], case.k[..., :n, :], case.v[..., :n, :], kw)


@tests_claims("causal-prefix")
def check_causal_prefix(impl: AttentionImpl, case: AttentionCase, t: int | None = None) -> None:
    r"""Claim ``causal-prefix``: under causal attention (:math:`L = S`) the first :math:`t`
    outputs are attention over the first :math:`t` queries, keys and values.

    The case is cut to :math:`L = S` and made causal; mask, bias, window and ALiBi keep
    their meaning on the prefix. Allowed: the sum of the two results' bounds.
    """
    __tracebackhide__ = True
    if "causal" not in impl.features:
        return
    case = _square(_fit(impl, case)).with_kwargs(causal=True)
    n = case.n_queries
    tt = max(n - 1, 0) if t is None else min(int(t), n)
    idx = np.arange(tt)
    kw = _colwise(_rowwise(case, idx), idx)
    prefix = AttentionCase(case.q[..., :tt, :], case.k[..., :tt, :], case.v[..., :tt, :], kw)
    out, lse, e1, el1 = _evaluated(impl, case)
    out2, lse2, e2, el2 = _evaluated(impl, prefix)
    e1p = np.broadcast_to(e1, out.shape)[..., :tt, :]
    _compare(
        impl, prefix, f"the first {tt} outputs vs the prefix", out2, out[..., :tt, :], e1p + e2
    )
    if lse is not None and lse2 is not None and el1 is not None and el2 is not None:
        _compare(impl, prefix, "prefix lse", lse2, lse[..., :tt], el1[..., :tt] + el2, lse=True)


@tests_claims("kv-cache-bottom-right")
def check_kv_cache(impl: AttentionImpl, case: AttentionCase, n_new: int | None = None) -> None:
    r"""Claim ``kv-cache-bottom-right``: the newest :math:`n` queries against all
    :math:`S` keys with the bottom-right alignment give the last :math:`n` rows of full
    causal attention (:math:`L = S`).

    Allowed: the sum of the two results' bounds.
    """
    __tracebackhide__ = True
    if "causal" not in impl.features:
        return
    case = _square(_fit(impl, case)).with_kwargs(causal=True)
    n = case.n_queries
    m = max(min(1, n), 0) if n_new is None else min(int(n_new), n)
    idx = np.arange(n - m, n)
    kw = _rowwise(case, idx)
    kw["align"] = "bottom_right"
    new = AttentionCase(case.q[..., n - m :, :], case.k, case.v, kw)
    out, lse, e1, el1 = _evaluated(impl, case)
    out2, lse2, e2, el2 = _evaluated(impl, new)
    e1p = np.broadcast_to(e1, out.shape)[..., n - m :, :]
    _compare(
        impl,
        new,
        f"the last {m} rows vs bottom-right decoding",
        out2,
        out[..., n - m :, :],
        e1p + e2,
    )
    if lse is not None and lse2 is not None and el1 is not None and el2 is not None:
        _compare(
            impl, new, "decoding lse", lse2, lse[..., n - m :], el1[..., n - m :] + el2, lse=True
        )


@tests_claims("alignments")
def check_alignments(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``alignments``: when :math:`L = S` the two alignments (and none) coincide.

    The case is cut to :math:`L = S` and made causal (if supported). Allowed: the sum of
    the two results' bounds (the same computation in the reference: bitwise there).
    """
    __tracebackhide__ = True
    case = _square(_fit(impl, case))
    if "causal" in impl.features:
        case = case.with_kwargs(causal=True)
    base = _evaluated(impl, case)
    for align in ("top_left", "bottom_right"):
        other = case.with_kwargs(align=align)
        _agree_evaluated(
            impl,
            other,
            f"align={align!r} vs no align (L = S)",
            f"lse, align={align!r}",
            _evaluated(impl, other),
            base,
        )


@tests_claims("hidden-key")
def check_hidden_key(impl: AttentionImpl, case: AttentionCase, key: int | None = None) -> None:
    r"""Claim ``hidden-key``: a key hidden by the mask, a key with bias :math:`-\infty` and
    a key removed give the same output and lse.

    Causal and window are folded into the mask first; ALiBi is dropped (removing a key
    moves the positions). Needs the mask feature. Allowed: the sum of the two bounds.
    """
    __tracebackhide__ = True
    if "mask" not in impl.features or case.n_keys == 0:
        return
    case = _materialise(_fit(impl, case, ("alibi",)))
    s = case.n_keys
    j = (s // 2) if key is None else int(key) % s
    shape = case.logits_shape
    mask = _full(case.kwargs.get("mask", True), shape).astype(bool)
    mask[..., j] = False
    by_mask = case.with_kwargs(mask=mask)
    bias = _full(case.kwargs.get("bias", 0.0), shape).astype(np.float64)
    bias[..., j] = -np.inf
    by_bias = case.with_kwargs(bias=bias)
    keep = np.delete(np.arange(s), j)
    kw = _colwise(case.kwargs, keep)
    removed = AttentionCase(
        case.q, np.take(case.k, keep, axis=-2), np.take(case.v, keep, axis=-2), kw
    )
    without = _evaluated(impl, removed)
    for name, other in (("mask False", by_mask), ("bias -inf", by_bias)):
        _agree_evaluated(
            impl,
            other,
            f"key {j} hidden by {name} vs removed",
            f"lse, key {j} {name} vs removed",
            _evaluated(impl, other),
            without,
        )


@tests_claims("gqa-repeat")
def check_gqa_repeat(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``gqa-repeat``: grouped-query attention equals attention with each kv head
    repeated :math:`G = H_q / H_{kv}` times (query head :math:`h` reads kv head
    :math:`\lfloor h/G \rfloor`). Allowed: the sum of the two bounds."""
    __tracebackhide__ = True
    case = _fit(impl, case)
    if case.q.ndim < 3 or case.k.ndim < 3 or case.q.shape[-3] == case.k.shape[-3]:
        return
    g = case.q.shape[-3] // case.k.shape[-3]
    rep = replace(case, k=np.repeat(case.k, g, axis=-3), v=np.repeat(case.v, g, axis=-3))
    _agree(impl, case, rep, "GQA vs kv heads repeated (h -> h // G)", "lse, GQA vs repeated")


@tests_claims("sink-rescales")
def check_sink_as_key(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``sink-rescales``: a sink :math:`\sigma_h` is one more key, seen by every
    query and always kept, with logit :math:`\sigma_h` and value 0.

    The extra key is :math:`k = 0` (logit :math:`\tau q \cdot 0 = 0`, also under a
    softcap) with a bias column :math:`\sigma_h`. Causal and window are folded into the
    mask; ALiBi is dropped (it would charge the extra key a distance). Needs sinks and
    mask. Allowed: the sum of the two bounds.
    """
    __tracebackhide__ = True
    if not {"sinks", "mask"} <= impl.features or case.kwargs.get("sinks") is None:
        return
    case = _materialise(_fit(impl, case, ("alibi",)))
    shape = case.logits_shape
    sig = np.broadcast_to(np.asarray(case.kwargs["sinks"], dtype=np.float64), shape[:-2])
    col = np.broadcast_to(sig[..., None, None], (*shape[:-1], 1))
    bias = np.concatenate([_full(case.kwargs.get("bias", 0.0), shape), col], axis=-1)
    ones = np.ones((*shape[:-1], 1), dtype=bool)
    kw = {key: val for key, val in case.kwargs.items() if key != "sinks"}
    kw["bias"] = bias
    kw["mask"] = np.concatenate(
        [_full(case.kwargs.get("mask", True), shape).astype(bool), ones], -1
    )
    if kw.get("dropout_mask") is not None:
        kw["dropout_mask"] = np.concatenate([_full(kw["dropout_mask"], shape), ones], -1)
    zero_k = np.zeros((*case.k.shape[:-2], 1, case.k.shape[-1]))
    zero_v = np.zeros((*case.v.shape[:-2], 1, case.v.shape[-1]))
    as_key = AttentionCase(
        case.q, np.concatenate([case.k, zero_k], -2), np.concatenate([case.v, zero_v], -2), kw
    )
    _agree(
        impl, case, as_key, "sink vs a key with logit sigma and value 0", "lse, sink vs extra key"
    )


@tests_claims("alibi-causal-row-constant")
def check_alibi_causal(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``alibi-causal-row-constant``: under causal visibility, ALiBi
    :math:`-m_h|i + o - j|` and a bias :math:`m_h j` give the same output; the lse differs
    by :math:`m_h(i + o)`.

    The case is made causal (ALiBi slopes 1/4 per head if it has none); sinks are dropped
    (a sink logit does not get the row constant). :math:`\mathrm{fl}(b + m_h j)` rounds by
    at most :math:`u(|m_h j| + |b + m_h j|)`, a logit perturbation :math:`\delta`. Allowed:
    the two bounds plus its effect (and :math:`\delta` for the lse, compared in mpmath).
    """
    __tracebackhide__ = True
    if not {"alibi", "causal", "mask"} <= impl.features:
        return
    case = _fit(impl, case, ("sinks",)).with_kwargs(causal=True)
    shape = case.logits_shape
    if case.kwargs.get("alibi_slopes") is None:
        case = case.with_kwargs(
            alibi_slopes=np.full(shape[:-2][-1:] if len(shape) > 2 else (), 0.25)
        )
    n_q, n_k = case.n_queries, case.n_keys
    if n_q != n_k and "align" not in case.kwargs:
        case = case.with_kwargs(align="bottom_right")
    align = case.kwargs.get("align")
    offset = 0 if (align is None or align == "top_left") else n_k - n_q
    m = np.broadcast_to(np.asarray(case.kwargs["alibi_slopes"], dtype=np.float64), shape[:-2])
    mj = m[..., None, None] * np.arange(n_k, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN/inf poison at hidden bias entries
        b0 = _full(case.kwargs.get("bias", 0.0), shape).astype(np.float64)
        bias = b0 + mj
        delta_e = U * (np.abs(mj) + np.abs(bias))
        seen = case_visibility(case)
        delta = _SO * np.max(np.where(seen, delta_e, 0.0), axis=-1, initial=0.0)
    linear = case.with_kwargs(alibi_slopes=None, bias=bias)
    out, lse, e1, el1 = _evaluated(impl, case)
    out2, lse2, e2, el2 = _evaluated(impl, linear)
    w, _ = _weighted_up(case)
    allowed = e1 + e2 + atol.perturbation_factor(delta)[..., None] * w
    _compare(impl, linear, "causal ALiBi vs bias m j", out2, out, allowed)
    if lse is None or lse2 is None or el1 is None or el2 is None:
        return
    rowc = m[..., None] * (np.arange(n_q) + offset).astype(np.float64)
    with mpmath.workdps(60):
        for idx in np.ndindex(lse.shape):
            a, b = float(lse[idx]), float(lse2[idx])
            if not (math.isfinite(a) and math.isfinite(b)):
                if not same(np.float64(a), np.float64(b)):
                    _fail(
                        impl, linear, f"lse at {idx}: {b!r} with bias m j, {a!r} with ALiBi", True
                    )
                continue
            c = mpmath.mpf(float(m[idx[:-1]])) * (idx[-1] + offset)
            got = abs(mpmath.mpf(b) - c - mpmath.mpf(a))
            allow = (float(el1[idx]) + float(el2[idx]) + float(delta[idx])) * _SO
            if got > allow:
                _fail(
                    impl,
                    linear,
                    f"lse at {idx}: {b!r} with bias m j, {a!r} with ALiBi; their difference "
                    f"should be m(i + o) = {float(c)!r}: off by {float(got):.3g} > {allow:.3g}",
                    True,
                )
    del rowc


@tests_claims("softcap-range")
def check_softcap_range(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``softcap-range``: softcapped logits lie in :math:`(-c, c)`.

    Seen through the outputs (bias, ALiBi, sinks and dropout dropped): the lse of a row
    with :math:`n` visible keys lies in :math:`[\log n - c, \log n + c]`, and any two of
    its weights (read with :math:`V = I`) have a ratio of at most :math:`e^{2c}`, however
    large the logits. Allowed: the bounds of the lse and of the weights.
    """
    __tracebackhide__ = True
    if "softcap" not in impl.features:
        return
    case = _fit(impl, case, ("alibi", "sinks", "dropout")).with_kwargs(bias=None)
    if case.kwargs.get("softcap") is None:
        case = case.with_kwargs(softcap=1.0)
    c = float(case.kwargs["softcap"])
    seen = case_visibility(case)
    n = seen.sum(axis=-1).astype(np.float64)
    _out, lse = _eval(impl, case, lse=True)
    if lse is not None:
        _, el = output_bound(impl, case, lse)
        assert el is not None
        with np.errstate(divide="ignore"):
            log_n = np.log(n)
        rows = n > 0
        slack = el + _SO * U * (np.abs(log_n) + c)
        # rows with n = 0 give -inf + inf here; they are masked out by `rows`
        with np.errstate(invalid="ignore"):
            over = rows & ((lse > log_n + c + slack) | (lse < log_n - c - slack) | np.isnan(lse))
        if over.any():
            at = np.unravel_index(int(np.argmax(over)), over.shape)
            _fail(
                impl,
                case,
                f"lse at {tuple(int(i) for i in at)} is {lse[at]!r}, outside [log n - c, log n + c]"
                f" = [{log_n[at] - c!r}, {log_n[at] + c!r}] (c = {c}, n = {int(n[at])})",
                True,
            )
    pcase = _with_values(case, _identity_values(case))
    p, _ = _eval(impl, pcase)
    e, _ = output_bound(impl, pcase)
    e = np.broadcast_to(e, p.shape)
    # math.exp is within 1 ulp and the product below rounds once: 4u covers both
    ratio = math.exp(2 * c) * (1 + 4 * U)
    with np.errstate(invalid="ignore"):
        top = np.max(np.where(seen, p - e, -np.inf), axis=-1, initial=-np.inf)
        low = np.min(np.where(seen, p + e, np.inf), axis=-1, initial=np.inf)
        bad = (n > 0) & (top > low * ratio)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), bad.shape)
        _fail(
            impl,
            pcase,
            f"row {tuple(int(i) for i in at)}: weights range from {low[at]!r} to {top[at]!r} "
            f"(within bounds), a ratio above e^(2c) = {math.exp(2 * c):.6g} (c = {c})",
        )


@tests_claims("dropout-expectation")
def check_dropout(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``dropout-expectation``, and the definition of dropout as an explicit keep-mask.

    1. An all-True keep-mask with ``dropout_p=0`` is no dropout (within the two bounds).
    2. The weights with a keep-mask :math:`\kappa` (read with :math:`V = I`) are the
       weights without it times :math:`\kappa_{ij}/(1 - p)`: allowed the bound of each,
       the second times :math:`1/(1 - p)`, and :math:`3u` of ours (``fl(1/(1-p))`` and two
       products).
    3. The expectation: averaging the output over every keep pattern of the keys (shared by
       the rows; :math:`S \le 4`), each with probability :math:`(1-p)^{kept}p^{dropped}`,
       gives the output without dropout (exact by linearity: each :math:`\kappa_{ij}` is
       Bernoulli(:math:`1-p`)); allowed the probability-weighted bounds.
    """
    __tracebackhide__ = True
    if "dropout" not in impl.features:
        return
    case = _fit(impl, case)
    shape = case.logits_shape
    plain = case.with_kwargs(dropout_mask=None, dropout_p=None)
    out0, _ = _eval(impl, plain)
    e0, _ = output_bound(impl, plain)
    keep_all = case.with_kwargs(dropout_mask=np.ones(shape, dtype=bool), dropout_p=0.0)
    out1, _ = _eval(impl, keep_all)
    e1, _ = output_bound(impl, keep_all)
    _compare(impl, keep_all, "all-True keep-mask, p = 0 vs no dropout", out1, out0, e0 + e1)
    p_drop = float(case.kwargs.get("dropout_p") or 0.5)
    kappa = case.kwargs.get("dropout_mask")
    if kappa is None:
        kappa = (np.arange(shape[-1]) % 2 == 0) | np.zeros(shape, dtype=bool)
    kappa = _full(kappa, shape).astype(bool)
    eye = _identity_values(case)
    pc = _with_values(plain, eye)
    pd = _with_values(case.with_kwargs(dropout_mask=kappa, dropout_p=p_drop), eye)
    w0, _ = _eval(impl, pc)
    wd, _ = _eval(impl, pd)
    ew0, _ = output_bound(impl, pc)
    ewd, _ = output_bound(impl, pd)
    scale = 1.0 / (1.0 - p_drop)
    with np.errstate(invalid="ignore"):
        want = w0 * kappa * scale
        allowed = ewd + ew0 * scale + _SO * 3 * U * np.abs(want)
    _compare(impl, pd, "weights with a keep-mask vs weights * keep / (1 - p)", wd, want, allowed)
    s = case.n_keys
    if s > 4 or s == 0:
        return
    mean = np.zeros(out0.shape)
    bound = np.zeros(out0.shape)
    for bits in range(2**s):
        pattern = np.array([(bits >> j) & 1 == 1 for j in range(s)])
        kept = int(pattern.sum())
        prob = (1 - p_drop) ** kept * p_drop ** (s - kept)
        one = case.with_kwargs(dropout_mask=_full(pattern, shape), dropout_p=p_drop)
        o, _ = _eval(impl, one)
        e, _ = output_bound(impl, one)
        with np.errstate(invalid="ignore"):
            mean = mean + prob * o
            # our own prob * o and the running sum: relative 2(S + 1)u, absolute 2 eta
            bound = bound + prob * (e + _SO * 2 * (s + 1) * U * np.abs(o)) + 2 * ETA
    rows = _regular_rows(plain, out0)[..., None]
    _compare(impl, case, "mean over keep patterns vs no dropout", mean, out0, bound + e0, rows)


@tests_claims("split-kv-merge")
def check_split_merge(impl: AttentionImpl, case: AttentionCase, split: Any = None) -> None:
    r"""Claim ``split-kv-merge``: attention over the keys :math:`A \cup B` is the merge
    :math:`e^{\ell_A - \ell} O_A + e^{\ell_B - \ell} O_B`, :math:`\ell =
    \operatorname{logaddexp}(\ell_A, \ell_B)`, of attention over :math:`A` and over
    :math:`B` (the blocks chosen by the mask). Needs mask and lse; sinks are dropped.

    The merge is evaluated in mpmath from the computed parts. With :math:`E_X` and
    :math:`E_{\ell_X}` the parts' bounds, :math:`\hat\ell` (a logaddexp, 1-Lipschitz in
    the max norm) is within :math:`m = \max(E_{\ell_A}, E_{\ell_B})` of :math:`\ell`, so
    each factor :math:`\hat w_X = e^{\hat\ell_X - \hat\ell}` is within a factor
    :math:`e^{\pm d_X}`, :math:`d_X = E_{\ell_X} + m`, of the exact one and
    :math:`|\hat w_X \hat O_X - w_X O_X| \le \hat w_X e^{d_X}((e^{d_X} - 1)|\hat O_X| +
    E_X)`. Allowed: that for both parts plus the bound of the whole.
    """
    __tracebackhide__ = True
    if not {"mask", "lse"} <= impl.features:
        return
    case = _fit(impl, case, ("sinks",))
    shape = case.logits_shape
    s = case.n_keys
    in_a = (np.arange(s) % 2 == 0) if split is None else np.asarray(split, dtype=bool)
    base = _full(case.kwargs.get("mask", True), shape).astype(bool)
    part_a = case.with_kwargs(mask=base & in_a)
    part_b = case.with_kwargs(mask=base & ~in_a)
    out, lse = _eval(impl, case, lse=True)
    oa, la = _eval(impl, part_a, lse=True)
    ob, lb = _eval(impl, part_b, lse=True)
    assert lse is not None and la is not None and lb is not None
    e, el = output_bound(impl, case, lse)
    ea, ela = output_bound(impl, part_a, la)
    eb, elb = output_bound(impl, part_b, lb)
    assert el is not None and ela is not None and elb is not None
    e, ea, eb = (np.broadcast_to(x, out.shape) for x in (e, ea, eb))
    with mpmath.workdps(40):
        for idx in np.ndindex(lse.shape):
            a_l, b_l = float(la[idx]), float(lb[idx])
            if not (
                np.isfinite(out[idx]).all()
                and np.isfinite(oa[idx]).all()
                and np.isfinite(ob[idx]).all()
            ):
                continue
            if a_l == -np.inf and b_l == -np.inf:
                continue
            if math.isnan(a_l) or math.isnan(b_l) or a_l == np.inf or b_l == np.inf:
                continue
            ml = max(float(ela[idx]), float(elb[idx]))
            lsum = mpmath.log(mpmath.exp(a_l) + mpmath.exp(b_l))
            # the lse of the whole is the logaddexp of the parts' (1-Lipschitz): within
            # its own bound plus m
            lgot = abs(mpmath.mpf(float(lse[idx])) - lsum)
            lallow = (float(el[idx]) + ml) * _SO
            if not lgot <= lallow:
                _fail(
                    impl,
                    case,
                    f"lse at {idx} is {float(lse[idx])!r}, logaddexp of the two key blocks' "
                    f"lse gives {float(lsum)!r}: off by {float(lgot):.3g} > {lallow:.3g}",
                    True,
                )
            parts = []
            for lx, ox, ex, elx in ((a_l, oa, ea, ela), (b_l, ob, eb, elb)):
                if lx == -np.inf:
                    continue
                wx = mpmath.exp(mpmath.mpf(lx) - lsum)
                d = float(elx[idx]) + ml
                parts.append((wx, ox[idx], ex[idx], d))
            for col in range(out.shape[-1]):
                merged = mpmath.fsum(wx * mpmath.mpf(float(ox[col])) for wx, ox, _, _ in parts)
                allow = float(e[idx][col])
                for wx, ox, ex, d in parts:
                    grow = math.expm1(d)
                    allow += float(wx) * math.exp(d) * (grow * abs(float(ox[col])) + float(ex[col]))
                got = abs(mpmath.mpf(float(out[idx][col])) - merged)
                if got > allow * _SO:
                    _fail(
                        impl,
                        case,
                        f"output at {(*idx, col)} is {float(out[idx][col])!r}, the merge of the "
                        f"two key blocks gives {float(merged)!r}: off by {float(got):.3g} > "
                        f"{allow * _SO:.3g}",
                        True,
                    )


@tests_claims("lse-is-softmax-lse")
def check_lse_bounds(impl: AttentionImpl, case: AttentionCase) -> None:
    r"""Claim ``lse-is-softmax-lse``: :math:`\ell_i` is the log-sum-exp of the visible
    logits (and the sink), so :math:`\max_j s_{ij} \le \ell_i \le \max_j s_{ij} + \log n_i`.

    The logits are computed here in float64 with the error bound :math:`\varepsilon_i` of
    :func:`~attnspec.spec.tolerances.attention.logit_data`; allowed: :math:`\varepsilon_i`,
    the lse's own bound and :math:`u` of the comparison. A row that sees nothing: exactly
    :math:`-\infty` (see :func:`check_empty_rows`).
    """
    __tracebackhide__ = True
    if "lse" not in impl.features:
        return
    case = _fit(impl, case)
    _, lse = _eval(impl, case, lse=True)
    assert lse is not None
    _, el = output_bound(impl, case, lse)
    assert el is not None
    data = atol.logit_data(case.q, case.k, **case.kwargs)
    two_d = case.q.ndim == 2 and case.k.ndim == 2
    top, eps, count = (x[0] if two_d else x for x in (data.top, data.eps, data.count))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_n = np.log(count)
        slack = eps + el + _SO * U * (np.abs(top) + log_n + 1)
        rows = (count > 0) & np.isfinite(top) & np.isfinite(slack)
        bad = rows & ~((top - slack <= lse) & (lse <= top + log_n + slack))
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), bad.shape)
        _fail(
            impl,
            case,
            f"lse at {tuple(int(i) for i in at)} is {lse[at]!r}, outside [max s, max s + log n]"
            f" = [{top[at]!r}, {top[at] + log_n[at]!r}] by more than {slack[at]:.3g}",
            True,
        )


def _poisoned(case: AttentionCase, value: float, through_bias: bool = True) -> AttentionCase:
    """``value`` at every position the definition hides: k and v of keys no query sees, q
    of rows that see nothing (without a sink), bias entries hidden by mask/causal/window.
    ``through_bias=False``: keys and rows hidden only by a bias of -inf are left alone."""
    seen = case_visibility(case if through_bias else case.with_kwargs(bias=None))
    q, k, v = case.q.copy(), case.k.copy(), case.v.copy()
    kw = dict(case.kwargs)
    if seen.size == 0:
        return case
    hidden_keys = ~seen.reshape(-1, seen.shape[-1]).any(axis=0)
    # q and k get NaN whatever ``value`` is: an infinite q or k makes infinite logits,
    # and inf + (-inf) with a -inf bias is an IEEE invalid operation
    k[..., hidden_keys, :] = np.nan if value != 0 else 0.0
    v[..., hidden_keys, :] = value
    if kw.get("sinks") is None:
        rows = seen.reshape(-1, seen.shape[-2], seen.shape[-1]).any(axis=(0, 2))
        q[..., ~rows, :] = np.nan if value != 0 else 0.0
    if kw.get("bias") is not None:
        b = np.array(kw["bias"], dtype=np.float64)
        hidden = ~case_visibility(case.with_kwargs(bias=None))
        lead = hidden.ndim - b.ndim
        red = np.all(hidden, axis=tuple(range(lead))) if lead else hidden
        axes = tuple(a for a in range(b.ndim) if b.shape[a] == 1 and red.shape[a] != 1)
        if axes:
            red = np.all(red, axis=axes, keepdims=True)
        b[np.broadcast_to(red, b.shape)] = value
        kw["bias"] = b
    return AttentionCase(q, k, v, kw)


@tests_claims("hidden-key")
def check_hidden_values(
    impl: AttentionImpl, case: AttentionCase, through_bias: bool = True
) -> None:
    r"""Definition, step 6: whatever sits at a hidden position never reaches the output.

    NaN, +inf and -inf put at every hidden position (:func:`_poisoned`: v of keys no query
    sees, bias entries hidden by mask, causal or window; NaN in k of those keys and in q of
    rows that see nothing)
    give **bitwise** the output and lse of 0 put there. Exact: a hidden key has weight
    exactly 0 and must be left out, not multiplied by 0 (``0 * NaN = NaN``).
    ``through_bias=False`` leaves out the keys and rows hidden only by a bias of
    :math:`-\infty` (where :math:`\mathrm{NaN} + (-\infty)` is NaN for an implementation
    that adds the bias before it decides visibility).
    """
    __tracebackhide__ = True
    case = _fit(impl, case)
    zero = _poisoned(case, 0.0, through_bias)
    out0, lse0 = _eval(impl, zero, lse=True)
    for value in (np.nan, np.inf, -np.inf):
        bad = _poisoned(case, float(value), through_bias)
        out, lse = _eval(impl, bad, lse=True)
        _compare(impl, bad, f"output with {value} at hidden positions vs 0 there", out, out0, 0.0)
        if lse is not None and lse0 is not None:
            _compare(impl, bad, f"lse with {value} at hidden positions", lse, lse0, 0.0, lse=True)


@tests_claims()
def check_agreement(impl: AttentionImpl, case: AttentionCase, dps: int = 50) -> None:
    r"""Every output and lse agrees with :func:`attnspec.exact.sdpa` (``dps`` digits)
    within the bound the implementation claims.

    "accurate": :math:`|\hat o_{ik} - o_{ik}| \le 4u \sum_j p_{ij}|v_{jk}| + f\max_j|v_{jk}|
    + \eta` with :math:`\sum_j p_{ij}|v_{jk}|` itself from the exact reference, and the lse
    within one ulp of the exact value (:func:`attnspec.spec.tolerances.softmax.ulp_of_exact`);
    "fast": the textbook bounds; a number: see the module docstring. Non-finite exact
    results (NaN rows, :math:`-\infty` lse of empty rows) must be matched exactly.
    """
    __tracebackhide__ = True
    from attnspec import exact
    from attnspec.spec.tolerances.softmax import ulp_of_exact

    case = _fit(impl, case)
    out, lse = _eval(impl, case, lse=True)
    mid: dict[str, Any] = {"dps": dps, "undecided": "midpoint"}  # its error: far below u
    y, y_lse = exact.sdpa(case.q, case.k, case.v, return_lse=True, **mid, **case.kwargs)
    with np.errstate(invalid="ignore"):
        absv = np.abs(case.v)
    if impl.accuracy == "fast":
        allowed, lse_allowed = output_bound(impl, case, lse)
    elif impl.accuracy == "accurate":
        w = exact.to_float64(exact.sdpa(case.q, case.k, absv, **mid, **case.kwargs))
        _, vmax = _weighted_up(case)
        # w is the exact sum rounded to nearest: within u of it; 2u rounds it up safely
        allowed = atol.accurate_sdpa_bound(w * (1 + 2 * U), vmax, impl.floor)
        lse_allowed = None
    else:
        allowed, lse_allowed = output_bound(impl, case, lse)
    allowed = np.broadcast_to(allowed, out.shape)
    worst: tuple[float, Any] = (0.0, None)
    with mpmath.workdps(max(dps, 40)):
        for idx in np.ndindex(out.shape):
            c, yv = float(out[idx]), y[idx]
            err = abs_error(c, yv)
            a = mpmath.mpf(float(allowed[idx])) if mpmath.isfinite(yv) else mpmath.mpf(0)
            if err > a:
                ratio = float(err / a) if a > 0 else math.inf
                if ratio >= worst[0]:
                    worst = (ratio, (idx, c, yv, a))
        if worst[1] is not None:
            idx, c, yv, a = worst[1]
            _fail(
                impl,
                case,
                f"output at {idx} is {c!r}, exact {mpmath.nstr(yv, 20)} ({dps} digits): "
                f"error {float(abs_error(c, yv)):.3g}, {worst[0]:.3g} times the "
                f"{impl.accuracy} bound {mpmath.nstr(a, 3)}",
            )
        if lse is None:
            return
        for idx in np.ndindex(lse.shape):
            c, yv = float(lse[idx]), y_lse[idx]
            err = abs_error(c, yv)
            if not mpmath.isfinite(yv):
                a = mpmath.mpf(0)
            elif impl.accuracy == "accurate":
                a = ulp_of_exact(yv)
            else:
                assert lse_allowed is not None
                a = mpmath.mpf(float(lse_allowed[idx]))
            if err > a:
                _fail(
                    impl,
                    case,
                    f"lse at {idx} is {c!r}, exact {mpmath.nstr(yv, 20)} ({dps} digits): error "
                    f"{float(err):.3g} > {impl.accuracy} bound {mpmath.nstr(a, 3)} "
                    f"({float(err / ulp_of_exact(yv)):.3g} ulp)",
                    True,
                )


#: name -> check; the attention battery's vocabulary
PROPERTIES: dict[str, Callable[..., None]] = {
    "weights_convex": check_weights_convex,
    "empty_rows": check_empty_rows,
    "query_permutation": check_query_permutation,
    "key_value_permutation": check_key_value_permutation,
    "key_shift": check_key_shift,
    "value_affine": check_value_affine,
    "scale_zero": check_scale_zero,
    "default_scale": check_default_scale,
    "causal_prefix": check_causal_prefix,
    "kv_cache": check_kv_cache,
    "alignments": check_alignments,
    "hidden_key": check_hidden_key,
    "gqa_repeat": check_gqa_repeat,
    "sink_as_key": check_sink_as_key,
    "alibi_causal": check_alibi_causal,
    "softcap_range": check_softcap_range,
    "dropout": check_dropout,
    "split_merge": check_split_merge,
    "lse_bounds": check_lse_bounds,
    "hidden_values": check_hidden_values,
    "agreement": check_agreement,
}


# ---------------------------------------------------------------------------------------
# The battery
# ---------------------------------------------------------------------------------------


def _attention_checks() -> list[Check]:
    def c(
        name: str,
        text: str,
        needs: tuple[str, ...] = (),
        n: int | None = 25,
        side: int = 4,
        width: int = 4,
    ) -> Check:
        def cases(impl: Any) -> st.SearchStrategy[Any]:
            return attention_cases(features=impl.features, max_side=side, max_width=width)

        return Check(name, text, PROPERTIES[name], cases, n, frozenset(needs))

    return [
        c("weights_convex", "rows of P sum to 1; outputs within the visible values' range"),
        c("empty_rows", "a row that sees nothing: output exactly 0, lse -inf (sigma with a sink)"),
        c("query_permutation", "permuting queries permutes outputs and lse"),
        c("key_value_permutation", "permuting keys and values together changes nothing"),
        c("key_shift", "K + 1 u^T: same output, lse + tau q.u (bound: the logit perturbation)"),
        c("value_affine", "V + 1 c^T -> O + 1 c^T and V W -> O W"),
        c("scale_zero", "scale 0: the mean of the visible values, lse log n"),
        c("default_scale", "no scale = scale 1/sqrt(E)"),
        c("causal_prefix", "causal: the first t outputs = attention over the first t", ("causal",)),
        c("kv_cache", "bottom-right decoding = the last rows of causal attention", ("causal",)),
        c("alignments", "top_left = bottom_right = no align when L = S"),
        c("hidden_key", "mask False = bias -inf = key removed", ("mask",)),
        c("gqa_repeat", "GQA = kv heads repeated (h -> h // G)", ("gqa",)),
        c("sink_as_key", "a sink = an extra key with logit sigma and value 0", ("sinks", "mask")),
        c("alibi_causal", "causal ALiBi = bias m j (lse - m(i + o))", ("alibi", "causal", "mask")),
        c(
            "softcap_range",
            "softcap: lse in [log n - c, log n + c], weight ratios <= e^2c",
            ("softcap",),
        ),
        c(
            "dropout",
            "keep-mask: all True & p = 0 is none; P kappa/(1-p); expectation",
            ("dropout",),
            n=15,
        ),
        c("split_merge", "attention over two key blocks merged by their lse", ("mask", "lse")),
        c("lse_bounds", "max s <= lse <= max s + log n", ("lse",)),
        c("hidden_values", "NaN/inf at hidden positions never reach the output (bitwise)"),
        c(
            "agreement",
            "within the claimed bound of attnspec.exact (certified): L, S <= 16, E <= 32",
            side=16,
            width=32,
        ),
    ]


#: the attention checks, in the order of the claims of spec/derivations/attention.py;
#: Hypothesis, at most 25 examples each (L, S <= 4): the whole battery must run in well
#: under 30 s per precision with the ci profile on 2 cores
BATTERY: list[Check] = _attention_checks()


def attnspec_implementation(precision: str = "accurate") -> AttentionImpl:
    """The reference at ``precision``: the name every topic's properties module gives it."""
    return attnspec_impl(precision)
