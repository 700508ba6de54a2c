r"""The online softmax: partial states over sets of keys, their merge, blocked attention.

Softmax and attention over the keys :math:`\mathcal{K}` of a row can be computed a block
of keys at a time, carrying a small **state** from block to block (Milakov & Gimelshein
2018; Rabe & Staats 2021; FlashAttention-2, Dao 2023). For the visible keys
:math:`\mathcal{V}` folded so far, with logits :math:`s_j`, values :math:`v_j` and keep
bits :math:`\kappa_j` (dropout; 1 without), the state is

.. math::

    m = \max_{j \in \mathcal{V}} s_j, \qquad
    l = \sum_{j \in \mathcal{V}} e^{s_j - m}, \qquad
    \mathit{acc} = \sum_{j \in \mathcal{V}} e^{s_j - m}\, \kappa_j v_j ,

so that it stands for the sums :math:`Z = l\, e^{m}` and :math:`N = \mathit{acc}\, e^{m}`
of the definition without holding them (they overflow). The **empty state**
:math:`(m, l, \mathit{acc}) = (-\infty, 0, 0)` stands for :math:`Z = N = 0`. Two states
of disjoint key sets merge into the state of their union:

.. math::

    m = \max(m_A, m_B), \qquad
    l = e^{m_A - m} l_A + e^{m_B - m} l_B, \qquad
    \mathit{acc} = e^{m_A - m} \mathit{acc}_A + e^{m_B - m} \mathit{acc}_B ;

the merge is associative and commutative with the empty state as its identity, and
:func:`update` is the merge with the state of one block. :func:`finalize` gives the
output and lse of the definition (:mod:`attnspec.reference.attention`, steps 5-8):
:math:`o = \mathit{acc} / (l\,(1 - p_{\mathrm{drop}}))`, :math:`\ell = m + \log l`. The
claims are proved in ``spec/derivations/online.py``.

Normalised partial results :math:`(o_X, \ell_X)` (split-KV decoding, ring attention)
merge by :func:`merge_partials`: :math:`\ell = \operatorname{logaddexp}(\ell_A, \ell_B)`,
:math:`o = e^{\ell_A - \ell} o_A + e^{\ell_B - \ell} o_B`: the attention of one query over
two keys with logits :math:`\ell_A, \ell_B` and values :math:`o_A, o_B`.

Special values follow the definition (:mod:`attnspec.reference.softmax`) exactly:

* :math:`-\infty - (-\infty)` never occurs: a factor :math:`e^{x - m}` is 0 where
  :math:`x = -\infty` (an empty state, a hidden key) and 1 where :math:`x = m` (so a fully
  hidden first block gives no NaN);
* a NaN logit at a visible key (or a NaN sink) makes :math:`m` NaN, and the row NaN;
* :math:`+\infty` logits: the limit rule, weight :math:`1/|I|` on the infinite entries
  :math:`I`; the state holds :math:`m = +\infty`, :math:`l = |I|` and the sum of their
  values, and a later :math:`+\infty` takes over from finite logits (factor 0).
  :func:`merge_partials` refuses two partials that both have :math:`\ell = +\infty`:
  their counts :math:`|I_A|, |I_B|` are not in :math:`(o, \ell)`;
* a value :math:`\pm\infty` or NaN at a key that carries weight makes that output entry
  :math:`\pm\infty` or NaN (both signs: NaN), whatever other keys hold; the state carries
  flags for them, since :math:`0 \cdot \infty` would otherwise turn a tiny weight into
  NaN;
* a sink :math:`\sigma` enters once, as a key with logit :math:`\sigma` and value 0
  (:func:`with_sink`).

Arrays: the rows of a state have any shape ``R``; ``m`` and ``l`` have shape ``R``,
``acc`` ``(*R, Ev)`` (``Ev = 0``: softmax only). Everything is vectorised numpy in
float64; no input is modified.

References
----------
M. Milakov, N. Gimelshein, Online normalizer calculation for softmax, 2018,
arXiv:1805.02867. M. N. Rabe, C. Staats, Self-attention does not need O(n^2) memory, 2021,
arXiv:2112.05682. T. Dao, FlashAttention-2: faster attention with better parallelism and
work partitioning, ICLR 2024, arXiv:2307.08691.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from attnspec.reference.inputs import as_array, as_real_float64

__all__ = [
    "State",
    "blocked_sdpa",
    "empty_state",
    "finalize",
    "merge",
    "merge_partials",
    "split_sdpa",
    "update",
    "with_sink",
]

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class State:
    r"""The partial softmax (and attention) of rows over a set of keys.

    Attributes
    ----------
    m : ndarray, shape ``R``
        :math:`\max_j s_j` over the visible keys folded so far; :math:`-\infty` for none,
        NaN once a visible NaN logit is folded, :math:`+\infty` once a :math:`+\infty` one is.
    l : ndarray, shape ``R``
        :math:`\sum_j e^{s_j - m}` (in :math:`[1, n]` once a key is folded); with
        :math:`m = +\infty` the number of :math:`+\infty` logits.
    acc : ndarray, shape ``(*R, Ev)``
        :math:`\sum_j e^{s_j - m} \kappa_j v_j` over the keys whose values are finite.
    nan_values, pos_inf_values, neg_inf_values : ndarray of bool, shape ``(*R, Ev)``
        Whether a key that carries weight holds NaN, :math:`+\infty`, :math:`-\infty` in
        that column of its value.
    """

    m: F64
    l: F64  # noqa: E741 - the name of the papers
    acc: F64
    nan_values: Bool
    pos_inf_values: Bool
    neg_inf_values: Bool

    def __post_init__(self) -> None:
        rows = np.shape(self.m)
        if np.shape(self.l) != rows:
            raise ValueError(f"State: l has shape {np.shape(self.l)}, m has shape {rows}")
        for name in ("acc", "nan_values", "pos_inf_values", "neg_inf_values"):
            shape = np.shape(getattr(self, name))
            if shape[:-1] != rows or len(shape) != len(rows) + 1:
                raise ValueError(
                    f"State: {name} must have shape (*R, Ev) with R = {rows} the shape of m, "
                    f"got {shape}"
                )
        if len({np.shape(getattr(self, n))[-1] for n in ("acc", "nan_values")}) != 1:
            raise ValueError("State: acc and the value flags must share their width Ev")

    @property
    def rows(self) -> tuple[int, ...]:
        """``R``, the shape of the rows."""
        return tuple(np.shape(self.m))

    @property
    def width(self) -> int:
        """``Ev``, the width of the values (0: softmax only)."""
        return int(np.shape(self.acc)[-1])


def empty_state(rows: tuple[int, ...] | int, width: int = 0) -> State:
    r"""The empty state :math:`(-\infty, 0, 0)` of rows of shape ``rows``, with values of
    width ``width`` (0: softmax only): the identity of :func:`merge`."""
    shape = (rows,) if isinstance(rows, int | np.integer) else tuple(rows)
    if any(isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0 for n in shape):
        raise ValueError(f"rows must be a shape (ints >= 0), got {rows!r}")
    if isinstance(width, bool) or not isinstance(width, int | np.integer) or width < 0:
        raise ValueError(f"width must be an int >= 0 (Ev), got {width!r}")
    full = (*shape, int(width))
    no = np.zeros(full, dtype=bool)
    return State(np.full(shape, -np.inf), np.zeros(shape), np.zeros(full), no, no, no)


def _factor(x: F64, m: F64) -> F64:
    r""":math:`e^{x - m}` for :math:`x \le m`, guarded: 0 where :math:`x = -\infty` (a hidden
    key, an empty state; also when :math:`m = -\infty`, where :math:`x - m` is NaN), 1 where
    :math:`x = m` (also :math:`+\infty = +\infty`: the infinite entries share one finite
    part), NaN where either is NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.subtract(x, m)
        d = np.where(x == m, 0.0, d)
        return np.where(x == -np.inf, 0.0, np.exp(d))


def _kept(side_m: F64, m: F64) -> Bool:
    """Whether the keys of a side still carry weight after the maximum became ``m``: not
    when ``m`` is +inf and the side's maximum is not (the limit gives them weight 0)."""
    return np.asarray(~((m == np.inf) & (side_m != np.inf)))


def merge(a: State, b: State) -> State:
    r"""The state of the union of the disjoint key sets of ``a`` and ``b``.

    :math:`m = \max(m_A, m_B)`, :math:`l = e^{m_A - m} l_A + e^{m_B - m} l_B`, and ``acc``
    likewise; the value flags of a side stay where its keys still carry weight. The rows
    of ``a`` and ``b`` broadcast. Commutative bit for bit (each step is symmetric in
    ``a`` and ``b``); associative in real arithmetic (``spec/derivations/online.py``).

    Examples
    --------
    >>> import numpy as np
    >>> from attnspec.reference.online import empty_state, finalize, merge, update
    >>> a = update(empty_state(1, 1), np.array([[0.0]]), np.array([[2.0]]))
    >>> b = update(empty_state(1, 1), np.array([[0.0]]), np.array([[4.0]]))
    >>> o, lse = finalize(merge(a, b))  # two keys with equal logits: the mean
    >>> float(o[0, 0]), bool(lse[0] == np.log(2.0))
    (3.0, True)
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, State):
            raise TypeError(f"{name} must be a State, got {type(s).__name__}")
    if a.width != b.width:
        raise ValueError(f"a and b must have the same value width Ev, got {a.width} and {b.width}")
    try:
        rows = np.broadcast_shapes(a.rows, b.rows)
    except ValueError:
        raise ValueError(f"the rows of a {a.rows} and b {b.rows} do not broadcast") from None
    m = np.broadcast_to(np.maximum(a.m, b.m), rows)  # NaN propagates: a NaN row stays NaN
    fa, fb = _factor(a.m, m), _factor(b.m, m)
    l_new = fa * a.l + fb * b.l
    acc = fa[..., None] * a.acc + fb[..., None] * b.acc
    ka, kb = _kept(a.m, m)[..., None], _kept(b.m, m)[..., None]
    return State(
        np.array(m),
        np.broadcast_to(l_new, rows).copy(),
        np.broadcast_to(acc, (*rows, a.width)).copy(),
        *(
            np.broadcast_to((flag_a & ka) | (flag_b & kb), (*rows, a.width)).copy()
            for flag_a, flag_b in (
                (a.nan_values, b.nan_values),
                (a.pos_inf_values, b.pos_inf_values),
                (a.neg_inf_values, b.neg_inf_values),
            )
        ),
    )


def _bool_like(value: object, name: str, shape: tuple[int, ...], meaning: str) -> Bool:
    arr = as_array(value, name)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array (True = {meaning}), got dtype {arr.dtype}")
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(
            f"{name} with shape {arr.shape} does not broadcast to the logits' shape {shape}"
        ) from None


def update(
    state: State,
    logits_block: npt.ArrayLike,
    values_block: npt.ArrayLike | None = None,
    visible: npt.ArrayLike | None = None,
    keep: npt.ArrayLike | None = None,
) -> State:
    r"""Fold one block of keys into ``state``: the merge with the block's own state.

    Parameters
    ----------
    state : State
        The state of the keys folded so far (rows ``R``, width ``Ev``).
    logits_block : array_like, shape ``(*R, n)``
        The logits :math:`s_j` of the block's ``n`` keys for each row.
    values_block : array_like, shape ``(..., n, Ev)``, optional
        The block's values, multiplied as ``p @ values_block`` (numpy's matmul
        broadcasting: for attention rows ``(..., L)`` the values ``(..., n, Ev)`` are shared
        by the ``L`` queries). Required when ``Ev > 0``.
    visible : array_like of bool, optional
        Broadcasts to ``(*R, n)``; False hides the key: weight exactly 0, whatever its
        logit or value holds. A logit of :math:`-\infty` hides its key too.
    keep : array_like of bool, optional
        The dropout keep-mask of the block (broadcasts to ``(*R, n)``): a dropped key counts
        in :math:`l` but not in ``acc``.

    Returns
    -------
    State
        :math:`m' = \max(m, \max_j s_j)`, :math:`l' = e^{m - m'} l + \sum_j e^{s_j - m'}`,
        :math:`\mathit{acc}' = e^{m - m'} \mathit{acc} + \sum_j e^{s_j - m'} \kappa_j v_j`.
    """
    if not isinstance(state, State):
        raise TypeError(f"state must be a State, got {type(state).__name__}")
    s = as_real_float64(logits_block, "logits_block")
    if s.ndim != len(state.rows) + 1 or s.shape[:-1] != state.rows:
        raise ValueError(
            f"logits_block must have shape (*R, n) with R = {state.rows} the rows of the "
            f"state, got {s.shape}"
        )
    n = s.shape[-1]
    if visible is not None:
        s = np.where(_bool_like(visible, "visible", s.shape, "visible"), s, -np.inf)
    kappa = None if keep is None else _bool_like(keep, "keep", s.shape, "keep")
    width = state.width
    v: F64 | None = None
    if values_block is not None:
        v = as_real_float64(values_block, "values_block")
        if v.ndim < 2 or v.shape[-2:] != (n, width):
            raise ValueError(
                f"values_block must have shape (..., n, Ev) = (..., {n}, {width}) (n keys of "
                f"logits_block {s.shape}, Ev of the state), got {v.shape}"
            )
    elif width:
        raise ValueError(f"values_block is required: the state has values of width Ev={width}")

    with np.errstate(invalid="ignore"):  # NaN rows compare False: they are NaN anyway
        top = np.max(s, axis=-1, initial=-np.inf) if n else np.full(state.rows, -np.inf)
        m = np.maximum(state.m, top)  # NaN propagates
    alpha = _factor(state.m, m)
    p = _factor(s, m[..., None])  # e^{s_j - m'}: 0 at hidden keys, 1 at the maximum
    l_new = alpha * state.l + np.sum(p, axis=-1)
    kept = _kept(state.m, m)[..., None]
    flags = [f & kept for f in (state.nan_values, state.pos_inf_values, state.neg_inf_values)]
    acc = alpha[..., None] * state.acc
    if v is not None and width:
        pk = p if kappa is None else np.where(kappa, p, 0.0)
        finite = np.isfinite(v)
        all_finite = bool(finite.all())
        with np.errstate(invalid="ignore", over="ignore"):
            part = pk @ (v if all_finite else np.where(finite, v, 0.0))
        acc = acc + part
        if not all_finite:
            # keys that carry weight: visible, logit > -inf and, once m' = +inf, only the
            # +inf ones; dropped keys carry none (their value never reaches the output)
            with np.errstate(invalid="ignore"):
                carry = (s > -np.inf) & np.where(m[..., None] == np.inf, s == np.inf, True)
            if kappa is not None:
                carry = carry & kappa
            w = carry.astype(np.float64)
            for i, hit in enumerate((np.isnan(v), v == np.inf, v == -np.inf)):
                flags[i] = flags[i] | ((w @ hit.astype(np.float64)) > 0)
    rows = state.rows
    return State(
        m,
        l_new,
        np.broadcast_to(acc, (*rows, width)).copy(),
        *(np.broadcast_to(f, (*rows, width)).copy() for f in flags),
    )


def with_sink(state: State, sink: npt.ArrayLike) -> State:
    r"""``state`` with the sink :math:`\sigma` folded in once: a key with logit
    :math:`\sigma` and value 0 (``sink`` broadcasts to the rows ``R``; -inf: no sink)."""
    if not isinstance(state, State):
        raise TypeError(f"state must be a State, got {type(state).__name__}")
    sig = as_real_float64(sink, "sink")
    try:
        sig = np.broadcast_to(sig, state.rows)
    except ValueError:
        raise ValueError(
            f"sink with shape {sig.shape} does not broadcast to the rows R = {state.rows}"
        ) from None
    zeros = np.zeros((1, state.width))
    return update(state, sig[..., None], zeros if state.width else None)


def finalize(state: State, *, dropout_p: float = 0.0) -> tuple[F64, F64]:
    r"""The output and lse of the keys folded into ``state``.

    :math:`o = \mathit{acc} / (l\,(1 - p_{\mathrm{drop}}))` and :math:`\ell = m + \log l`,
    with the definition's special rows: nothing visible (:math:`m = -\infty`): output 0,
    lse :math:`-\infty`; a NaN logit: NaN throughout; :math:`+\infty` logits: the mean of
    their values and lse :math:`+\infty`; a non-finite value at a key that carries weight:
    :math:`\pm\infty` or NaN in its column. Returns ``(o, lse)`` of shapes ``(*R, Ev)`` and
    ``R``.
    """
    if not isinstance(state, State):
        raise TypeError(f"state must be a State, got {type(state).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p!r}")
    m, l_ = state.m, state.l
    empty = m == -np.inf
    nan_rows = np.isnan(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = l_ if p == 0.0 else l_ * (1.0 - p)
        o = state.acc / denominator[..., None]
        lse = np.where(m == np.inf, np.inf, m + np.log(l_))
    o = np.where(empty[..., None], 0.0, o)
    lse = np.where(empty, -np.inf, lse)
    nan_col = state.nan_values | (state.pos_inf_values & state.neg_inf_values)
    patch = np.where(nan_col, np.nan, np.where(state.pos_inf_values, np.inf, -np.inf))
    touched = state.nan_values | state.pos_inf_values | state.neg_inf_values
    o = np.where(touched, patch, o)
    o = np.where(nan_rows[..., None], np.nan, o)
    return o, np.where(nan_rows, np.nan, lse)


def merge_partials(
    o_a: npt.ArrayLike,
    lse_a: npt.ArrayLike,
    o_b: npt.ArrayLike,
    lse_b: npt.ArrayLike,
    *,
    precision: str = "fast",
) -> tuple[F64, F64]:
    r"""Merge two normalised partial results over disjoint key sets (split-KV, ring attention).

    .. math::

        \ell = \operatorname{logaddexp}(\ell_A, \ell_B)
             = \max + \operatorname{log1p}(e^{\min - \max}), \qquad
        o = e^{\ell_A - \ell} o_A + e^{\ell_B - \ell} o_B .

    Parameters
    ----------
    o_a, o_b : array_like, shape ``(*R, Ev)``
        The partial outputs (each row's attention over its own keys).
    lse_a, lse_b : array_like, shape ``R``
        Their lse; :math:`-\infty` for a part with nothing visible (its output is ignored:
        weight exactly 0), NaN for a NaN row (the merged row is NaN).
    precision : {"fast", "accurate"}
        "fast": the formula above in float64 (error bound:
        :func:`attnspec.spec.tolerances.online.merge_bound`); "accurate": the weights
        :math:`e^{\ell_X - \ell}` and :math:`\ell` as the softmax and log-sum-exp of the two
        logits :math:`\ell_A, \ell_B` by the definition at ``precision="accurate"`` (each
        within one ulp), the weighted sum from exact products and sums rounded once
        (TwoProduct, TwoSum): within :math:`3u \sum_X w_X |o_X| + 2\eta` of the exact merge
        of the given partials (:math:`4u` where a product exceeds :math:`2^{996}`), lse
        within one ulp (:func:`attnspec.spec.tolerances.online.accurate_merge_bound`).

    Returns
    -------
    (o, lse) : shapes ``(*R, Ev)`` and ``R`` (``R`` the broadcast of the inputs' rows).

    Raises
    ------
    ValueError
        Shapes that do not fit, or a row where both lse are :math:`+\infty` (the numbers of
        infinite logits on each side, which the limit rule weighs by, are not in
        :math:`(o, \ell)`: merge the states instead, :func:`merge`).

    Examples
    --------
    >>> import numpy as np
    >>> from attnspec.reference.online import merge_partials
    >>> o, lse = merge_partials([[1.0]], [0.0], [[3.0]], [0.0])
    >>> o.tolist(), bool(lse[0] == np.log(2.0))
    ([[2.0]], True)
    >>> merge_partials([[1.0]], [0.5], [[np.nan]], [-np.inf])[0].tolist()  # an empty part
    [[1.0]]
    """
    oa, ob = as_real_float64(o_a, "o_a"), as_real_float64(o_b, "o_b")
    la, lb = as_real_float64(lse_a, "lse_a"), as_real_float64(lse_b, "lse_b")
    for name, o, lse in (("o_a", oa, la), ("o_b", ob, lb)):
        if o.ndim != lse.ndim + 1:
            raise ValueError(
                f"{name} must have shape (*R, Ev) with R the shape of its lse {lse.shape}, "
                f"got {o.shape}"
            )
    try:
        rows = np.broadcast_shapes(la.shape, lb.shape, oa.shape[:-1], ob.shape[:-1])
    except ValueError:
        raise ValueError(
            f"the partials do not broadcast: o_a {oa.shape}, lse_a {la.shape}, o_b {ob.shape}, "
            f"lse_b {lb.shape}"
        ) from None
    if oa.shape[-1] != ob.shape[-1]:
        raise ValueError(f"o_a and o_b must share Ev: got {oa.shape} and {ob.shape}")
    both_inf = (la == np.inf) & (lb == np.inf)
    if np.any(both_inf):
        at = tuple(int(i) for i in np.argwhere(np.broadcast_to(both_inf, rows))[0])
        raise ValueError(
            f"both partials have lse +inf in row {at}: the limit rule weighs their +inf "
            "logits by how many each side has, which (o, lse) does not hold; merge the "
            "states (attnspec.reference.online.merge) instead"
        )
    if not isinstance(precision, str) or precision not in ("fast", "accurate"):
        raise ValueError(f"precision must be 'fast' or 'accurate', got {precision!r}")
    width = oa.shape[-1]
    oa, ob = np.broadcast_to(oa, (*rows, width)), np.broadcast_to(ob, (*rows, width))
    la, lb = np.broadcast_to(la, rows), np.broadcast_to(lb, rows)
    if precision == "accurate":
        return _merge_accurate(oa, la, ob, lb)
    return _merge_fast(oa, la, ob, lb)


def _merge_fast(oa: F64, la: F64, ob: F64, lb: F64) -> tuple[F64, F64]:
    """:func:`merge_partials` in float64, on broadcast operands (no +inf on both sides)."""
    with np.errstate(invalid="ignore", over="ignore"):
        hi = np.maximum(la, lb)  # NaN propagates
        lo = np.minimum(la, lb)
        # logaddexp = hi + log1p(e^{lo - hi}); e^{lo - hi} is the guarded factor (0 for
        # lo = -inf, so hi + 0 = hi exactly; +inf with a finite lo: 0)
        lse = hi + np.log1p(_factor(lo, hi))
        lse = np.where(hi == np.inf, np.inf, lse)
        wa, wb = _factor(la, lse)[..., None], _factor(lb, lse)[..., None]
        ca, cb = wa * oa, wb * ob
    return _combine(oa, la, ob, lb, lse, ca, cb, None)


def _merge_accurate(oa: F64, la: F64, ob: F64, lb: F64) -> tuple[F64, F64]:
    r""":func:`merge_partials` accurately: the weights and the lse of the two logits
    :math:`\ell_A, \ell_B` by the definition's softmax at precision="accurate" (each within
    one ulp), the weighted sum from exact products and one exact sum, rounded once
    (TwoProduct, TwoSum): within :math:`3u \sum_X w_X |o_X|` and a few :math:`\eta` (where
    a product is beyond :math:`2^{996}`, Dekker's split overflows: the rounded products and
    their rounded sum, :math:`4u`)."""
    from attnspec.reference.eft import two_prod, two_sum
    from attnspec.reference.softmax import logsumexp, softmax

    x = np.stack([la, lb], axis=-1)
    w = softmax(x, precision="accurate")
    lse = logsumexp(x, precision="accurate")
    with np.errstate(invalid="ignore", over="ignore"):
        pa, ea = two_prod(np.broadcast_to(w[..., :1], oa.shape), oa)
        pb, eb = two_prod(np.broadcast_to(w[..., 1:], ob.shape), ob)
        total, err = two_sum(pa, pb)
        both = total + (err + (ea + eb))
    return _combine(oa, la, ob, lb, lse, pa, pb, both)


def _combine(
    oa: F64, la: F64, ob: F64, lb: F64, lse: F64, ca: F64, cb: F64, both: F64 | None
) -> tuple[F64, F64]:
    """The merged output from the weighted parts ``ca = w_a o_a``, ``cb = w_b o_b`` (and
    their sum ``both`` where it is computed otherwise than ``ca + cb``), with the special
    rules: a part with nothing visible (lse -inf) or outweighed by +inf logits adds
    nothing, whatever its output holds; a non-finite output of a part that carries weight
    passes as it is (its weight is positive, however small: w * inf would be NaN where w
    underflows to 0); a NaN lse makes the row NaN."""
    carry_a = ((la > -np.inf) & _kept(la, lse))[..., None]
    carry_b = ((lb > -np.inf) & _kept(lb, lse))[..., None]
    ca = np.where(np.isfinite(oa), ca, oa)
    cb = np.where(np.isfinite(ob), cb, ob)
    with np.errstate(invalid="ignore", over="ignore"):
        sum_ab = ca + cb
        if both is not None:
            # the exact products' sum where it is finite (Dekker's split overflows beyond
            # 2**996: there the rounded products' sum, within 2u more)
            sum_ab = np.where(np.isfinite(both), both, sum_ab)
    o = np.where(carry_b, np.where(carry_a, sum_ab, cb), np.where(carry_a, ca, 0.0))
    return np.where(np.isnan(lse)[..., None], np.nan, o), lse


def _check_parts(parts: object, n_keys: int) -> tuple[tuple[int, ...], ...]:
    """``parts`` as a tuple of tuples of key indices that hold each key once."""
    if isinstance(parts, str | bytes) or not isinstance(parts, tuple | list) or not parts:
        raise ValueError(f"parts must be a non-empty sequence of sequences of keys, got {parts!r}")
    out = []
    for part in parts:
        if isinstance(part, str | bytes) or not isinstance(part, tuple | list | range):
            raise ValueError(f"each part must be a sequence of key indices, got {part!r}")
        if any(isinstance(j, bool) or not isinstance(j, int | np.integer) for j in part):
            raise ValueError(f"key indices must be ints, got the part {part!r}")
        out.append(tuple(int(j) for j in part))
    keys = sorted(j for part in out for j in part)
    if keys != list(range(n_keys)):
        raise ValueError(
            f"parts must hold each key 0..{n_keys - 1} exactly once (S={n_keys}), got {parts!r}"
        )
    return tuple(out)


def _check_tree(tree: object, n_leaves: int) -> object:
    """``tree`` (an int or a pair of trees) with each leaf ``0 .. n_leaves - 1`` once."""

    def leaves(t: object) -> list[int]:
        if isinstance(t, int | np.integer) and not isinstance(t, bool):
            return [int(t)]
        if isinstance(t, tuple | list) and len(t) == 2:
            return leaves(t[0]) + leaves(t[1])
        raise ValueError(f"tree must be an int (a part) or a pair of trees, got {t!r}")

    if sorted(leaves(tree)) != list(range(n_leaves)):
        raise ValueError(
            f"tree {tree!r} must have each part 0..{n_leaves - 1} as a leaf exactly once"
        )
    return tree


def _block_parts(n_keys: int, block_keys: object) -> tuple[tuple[int, ...], ...]:
    if isinstance(block_keys, bool) or not isinstance(block_keys, int | np.integer):
        raise TypeError(f"block_keys must be an int >= 1, got {block_keys!r}")
    if block_keys < 1:
        raise ValueError(f"block_keys must be >= 1 (keys per block), got {block_keys}")
    b = int(block_keys)
    starts = range(0, max(n_keys, 1), b)
    return tuple(tuple(range(s, min(n_keys, s + b))) for s in starts)


def split_sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    block_keys: int | None = None,
    parts: Any = None,
    tree: Any = None,
    precision: str = "fast",
    **options: Any,
) -> Any:
    r"""Attention over the keys cut into parts, each evaluated alone, merged by their lse.

    The reference of split-KV decoding and ring attention: each part :math:`X` of the keys
    gives a partial :math:`(o_X, \ell_X)`, attention over the keys of :math:`X` alone (the
    definition, :func:`attnspec.sdpa` at ``precision``, with the mask restricted to
    :math:`X`: positions, causal, window and ALiBi stay those of the whole problem); the
    partials are merged by :func:`merge_partials` at ``precision`` along ``tree``, and the
    sink (if any) is merged once at the end as the partial :math:`(0, \sigma_h)`.

    Parameters
    ----------
    q, k, v, **options
        As for :func:`attnspec.sdpa` (``return_lse`` included).
    block_keys : int, optional
        Contiguous parts of ``block_keys`` keys (the last one may be shorter).
    parts : sequence of sequences of ints, optional
        Any partition of the keys ``0 .. S - 1`` (contiguous or not; parts may be empty).
        One of ``block_keys`` and ``parts`` is required.
    tree : int or nested pairs, optional
        The merge tree over the parts (leaves ``0 .. len(parts) - 1``, each once);
        default: the balanced tree ``((0, 1), (2, 3)), ...`` (the merges of each level in
        one call).
    precision : {"fast", "accurate"}
        Of the partials and of the merges.

    Returns
    -------
    What :func:`attnspec.sdpa` returns. In real arithmetic the same values, for every
    partition and tree (``spec/derivations/online.py``, claim ``online-any-partition``).
    """
    from attnspec.reference.attention import SdpaOptions

    opts = SdpaOptions.from_kwargs(options)
    k64 = as_real_float64(k, "k")
    if k64.ndim < 2:
        raise ValueError(f"k must have shape (..., Hkv, S, E) or (S, E), got shape {k64.shape}")
    n_k = int(k64.shape[-2])
    user_mask = None if opts.mask is None else as_array(opts.mask, "mask")
    if user_mask is not None and user_mask.dtype != np.bool_:
        raise TypeError(
            f"mask must be a bool array (True = may attend), got dtype {user_mask.dtype}"
        )
    if (block_keys is None) == (parts is None):
        raise ValueError("give exactly one of block_keys= and parts=")
    cut = _block_parts(n_k, block_keys) if parts is None else _check_parts(parts, n_k)
    if tree is not None:
        _check_tree(tree, len(cut))
    sinks = opts.sinks
    base = opts.replace(sinks=None, return_lse=True)

    leaves = _partials(q, k, v, cut, base, user_mask, precision)

    def fold(t: Any) -> tuple[F64, F64]:
        if isinstance(t, int | np.integer):
            return leaves[int(t)]
        (oa, la), (ob, lb) = fold(t[0]), fold(t[1])
        return merge_partials(oa, la, ob, lb, precision=precision)

    if tree is not None:
        out, lse = fold(tree)
    else:
        # the balanced tree ((0, 1), (2, 3)), ...: the pairs of each level in one call
        level = leaves
        while len(level) > 1:
            pairs = len(level) // 2
            a = [level[2 * i] for i in range(pairs)]
            b = [level[2 * i + 1] for i in range(pairs)]
            o_m, l_m = merge_partials(
                np.stack([x[0] for x in a]),
                np.stack([x[1] for x in a]),
                np.stack([x[0] for x in b]),
                np.stack([x[1] for x in b]),
                precision=precision,
            )
            merged = [(o_m[i], l_m[i]) for i in range(pairs)]
            level = merged + ([level[-1]] if len(level) % 2 else [])
        out, lse = level[0]
    if sinks is not None:
        sig = np.broadcast_to(as_real_float64(sinks, "sinks")[..., None], lse.shape)
        out, lse = merge_partials(out, lse, np.zeros_like(out), sig, precision=precision)
    return (out, lse) if opts.return_lse else out


#: logits (..., L, S) of the partials evaluated in one call of the definition
_PARTIAL_ELEMENTS = 1 << 22


def _partials(
    q: Any,
    k: Any,
    v: Any,
    cut: tuple[tuple[int, ...], ...],
    base: Any,
    user_mask: Bool | None,
    precision: str,
) -> list[tuple[F64, F64]]:
    """The partial (o_X, lse_X) of each part: the definition with the mask restricted to
    the part. The parts are stacked on a new leading batch axis and evaluated a chunk of
    parts per call (q, k, v broadcast along it, no copy)."""
    from attnspec.reference.attention import sdpa

    arrays = [as_real_float64(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))]
    two_d = all(a.ndim == 2 for a in arrays)
    if not two_d and min(a.ndim for a in arrays) < 3:
        sdpa(q, k, v, **base.as_kwargs())  # the definition refuses the shapes, naming them
    if two_d:
        arrays = [a[None] for a in arrays]
    rank = max(a.ndim for a in arrays)
    arrays = [a.reshape((1,) * (rank - a.ndim) + a.shape) for a in arrays]
    n_k = arrays[1].shape[-2]
    inside = np.zeros((len(cut), n_k), dtype=bool)
    for i, part in enumerate(cut):
        inside[i, list(part)] = True
    size = np.prod(np.broadcast_shapes(*(a.shape[:-3] for a in arrays)), dtype=np.float64)
    size *= arrays[0].shape[-3] * arrays[0].shape[-2] * max(n_k, 1)
    chunk = max(1, int(_PARTIAL_ELEMENTS // max(size, 1.0)))
    out: list[tuple[F64, F64]] = []
    for start in range(0, len(cut), chunk):
        rows = inside[start : start + chunk]
        p = rows.shape[0]
        mask = rows.reshape((p,) + (1,) * (rank - 1) + (n_k,))
        if user_mask is not None:
            mask = mask & user_mask
        qq, kk, vv = (np.broadcast_to(a[None], (p, *a.shape)) for a in arrays)
        o, lse = sdpa(qq, kk, vv, precision=precision, **base.replace(mask=mask).as_kwargs())
        for i in range(p):
            out.append((o[i, 0], lse[i, 0]) if two_d else (o[i], lse[i]))
    return out


def blocked_sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    block_keys: int,
    block_queries: int | None = None,
    order: Any = None,
    **options: Any,
) -> Any:
    r"""Scaled dot-product attention walking blocks of keys: FlashAttention-2 in float64.

    For each block of query rows, the state (:class:`State`) starts empty and every block
    of ``block_keys`` keys is folded in with :func:`update`: its logits (steps 1-4 of the
    definition in plain float64, :func:`attnspec.reference.attention.logits` on
    :func:`~attnspec.reference.attention.key_block`: :math:`\tau\, q \cdot k`, softcap,
    bias and ALiBi, visibility from mask, causal, window and a bias of :math:`-\infty`),
    its values and its keep-mask; the sink is folded in once (:func:`with_sink`) and
    :func:`finalize` gives the output and lse. The logits of a block are never more than
    ``block_queries x block_keys`` per head.

    Parameters
    ----------
    q, k, v, **options
        As for :func:`attnspec.sdpa` (but ``precision``; ``return_lse`` included).
    block_keys : int
        Keys per block (>= 1); the last block may be shorter.
    block_queries : int, optional
        Query rows per block (default: about :math:`2^{20}` logits per block).
    order : sequence of ints, optional
        The order in which the key blocks are folded (a permutation of
        ``0 .. ceil(S / block_keys) - 1``); default ascending.

    Returns
    -------
    What :func:`attnspec.sdpa` returns; within
    :func:`attnspec.spec.tolerances.online.online_sdpa_bound` of the exact values.

    Examples
    --------
    >>> import numpy as np
    >>> from attnspec.reference.online import blocked_sdpa
    >>> q, k = np.ones((2, 2)), np.ones((4, 2))
    >>> v = np.array([[1.0], [2.0], [3.0], [6.0]])
    >>> blocked_sdpa(q, k, v, block_keys=3, scale=0.0)  # scale 0: the mean, 3 (exact)
    array([[3.],
           [3.]])
    >>> blocked_sdpa(q, k, v, block_keys=1, causal=True, align="top_left")[:, 0].tolist()
    [1.0, 1.5]
    """
    from attnspec.reference.arith import Fast
    from attnspec.reference.attention import SdpaOptions, key_block, logits, prepare

    opts = SdpaOptions.from_kwargs(options)
    arith = Fast()
    prep = prepare(arith, q, k, v, opts)  # the definition's checks, naming each argument
    if isinstance(block_keys, bool) or not isinstance(block_keys, int | np.integer):
        raise TypeError(f"block_keys must be an int >= 1, got {block_keys!r}")
    if block_keys < 1:
        raise ValueError(f"block_keys must be >= 1 (keys per block), got {block_keys}")
    b = int(block_keys)
    n_q, n_k = prep.n_q, prep.n_k
    n_blocks = max(1, -(-n_k // b))
    walk = list(range(n_blocks)) if order is None else [int(i) for i in order]
    if sorted(walk) != list(range(n_blocks)):
        raise ValueError(
            f"order must be a permutation of the {n_blocks} key blocks 0..{n_blocks - 1}, "
            f"got {order!r}"
        )
    heads = (*prep.batch, prep.hq)
    if block_queries is None:
        per_row = max(1, int(np.prod(heads, dtype=np.int64)) * min(b, max(n_k, 1)))
        rows_per_block = max(1, (1 << 20) // per_row)
    elif isinstance(block_queries, bool) or not isinstance(block_queries, int | np.integer):
        raise TypeError(f"block_queries must be an int >= 1, got {block_queries!r}")
    elif block_queries < 1:
        raise ValueError(f"block_queries must be >= 1, got {block_queries}")
    else:
        rows_per_block = int(block_queries)
    width_v = prep.v.shape[-1]
    outs, lses = [], []
    for r0 in range(0, max(n_q, 1), rows_per_block):
        r1 = min(n_q, r0 + rows_per_block)
        state = empty_state((*heads, r1 - r0), width_v)
        q_rows = prep.q[..., r0:r1, :]
        for blk in walk:
            c0, c1 = blk * b, min(n_k, (blk + 1) * b)
            if c1 <= c0:
                continue
            # steps 1-4 of the definition for these rows and keys: the logits, -inf at
            # the hidden keys (whatever they held), and the keep-mask
            lg = logits(
                arith,
                q_rows,
                prep.k[..., c0:c1, :],
                prep.v[..., c0:c1, :],
                key_block(prep, r0, r1, c0, c1),
            )
            s = np.broadcast_to(lg.approx, (*heads, r1 - r0, c1 - c0))
            state = update(state, s, lg.v, keep=lg.keep)
        if prep.sinks is not None:
            state = with_sink(state, np.broadcast_to(prep.sinks[..., None], state.rows))
        o_blk, l_blk = finalize(state, dropout_p=opts.dropout_p)
        outs.append(o_blk)
        lses.append(l_blk)
    out = np.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    lse = np.concatenate(lses, axis=-1) if len(lses) > 1 else lses[0]
    if prep.two_d:
        out, lse = out[0], lse[0]
    return (out, lse) if opts.return_lse else out
