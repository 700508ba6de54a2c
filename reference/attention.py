r"""Scaled dot-product attention: logits -> visibility -> weights -> output (+ lse).

Shapes (the letters are used throughout attnspec):

====  ==============================================================
B...  leading batch dimensions (any number, broadcast between q, k, v)
Hq    query heads;  Hkv  key/value heads, ``Hq = G * Hkv``
L     queries;  S  keys and values
E     query/key width;  Ev  value width
====  ==============================================================

``q (..., Hq, L, E)``, ``k (..., Hkv, S, E)``, ``v (..., Hkv, S, Ev)``; query head
:math:`h` reads key/value head :math:`\lfloor h / G \rfloor`. The output is
``(..., Hq, L, Ev)``; with ``return_lse`` also ``lse (..., Hq, L)``. Three 2-D arrays
``(L, E), (S, E), (S, Ev)`` are read as one head and give ``(L, Ev)``.

For query :math:`i`, key :math:`j`, head :math:`h` and alignment offset :math:`o`
(see :mod:`attnspec.reference.visibility`):

1. :math:`s_{ij} = \tau\, q_i \cdot k_j`, with :math:`\tau` = ``scale``, default :math:`1/\sqrt{E}`;
2. softcap :math:`c`: :math:`s_{ij} \leftarrow c \tanh(s_{ij} / c)`;
3. :math:`s_{ij} \leftarrow s_{ij} + b_{ij} - m_h\, |i + o - j|` (``bias``, ALiBi ``alibi_slopes``);
4. key :math:`j` is visible to query :math:`i` by ``mask``, ``causal`` and ``window``; a
   logit of :math:`-\infty` hides a key too;
5. :math:`\ell_i = \log\bigl(\sum_{j\ \mathrm{visible}} e^{s_{ij}} + e^{\sigma_h}\bigr)`
   (the sink :math:`\sigma_h` is optional: a logit in the normaliser with no value);
6. :math:`p_{ij} = e^{s_{ij} - \ell_i}` for visible :math:`j`, exactly 0 otherwise;
7. dropout as an explicit keep-mask :math:`\kappa`:
   :math:`p_{ij} \leftarrow p_{ij}\, \kappa_{ij} / (1 - p_{\mathrm{drop}})`;
8. :math:`o_i = \sum_j p_{ij} v_j`.

A row with nothing visible and no sink gives :math:`o_i = 0` and :math:`\ell_i = -\infty`.
Whatever sits at a hidden position (NaN, inf) never reaches the output. The weights are
computed by :func:`attnspec.reference.softmax.normalise`, the same definition as
:func:`attnspec.softmax`, so the special-value rules (an included NaN makes the row NaN,
+inf logits share the weight equally) are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Arithmetic, get_arithmetic
from attnspec.reference.inputs import as_array, as_real_float64, check_size
from attnspec.reference.softmax import normalise
from attnspec.reference.visibility import (
    ALIGNMENTS,
    alignment_offset,
    check_window,
    relative_position,
    visible,
)

__all__ = [
    "Block",
    "Logits",
    "Prepared",
    "SdpaOptions",
    "dropped",
    "evaluate",
    "key_block",
    "logits",
    "prepare",
    "sdpa",
    "sdpa_defaults",
]

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]


@overload
def sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    scale: float | None = None,
    mask: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    align: str | None = None,
    softcap: float | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    sinks: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    return_lse: Literal[False] = False,
    precision: str = "accurate",
) -> F64: ...


@overload
def sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    scale: float | None = None,
    mask: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    align: str | None = None,
    softcap: float | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    sinks: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    return_lse: Literal[True],
    precision: str = "accurate",
) -> tuple[F64, F64]: ...


@overload
def sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    scale: float | None = None,
    mask: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    align: str | None = None,
    softcap: float | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    sinks: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    precision: str = "accurate",
) -> F64 | tuple[F64, F64]: ...


def sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    scale: float | None = None,
    mask: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    align: str | None = None,
    softcap: float | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    sinks: npt.ArrayLike | None = None,
    dropout_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    precision: str = "accurate",
) -> F64 | tuple[F64, F64]:
    r"""Scaled dot-product attention, as defined in :mod:`attnspec.reference.attention`.

    Parameters
    ----------
    q, k, v : array_like
        ``(..., Hq, L, E)``, ``(..., Hkv, S, E)``, ``(..., Hkv, S, Ev)``; real (float16,
        bfloat16, float32, float64 or integers); leading dimensions broadcast.
    scale : float, optional
        :math:`\tau`; default :math:`1/\sqrt{E}`.
    mask : array_like of bool, optional
        Broadcasts to ``(..., Hq, L, S)``; True = may attend.
    bias : array_like, optional
        Added to the logits; broadcasts to ``(..., Hq, L, S)``; -inf hides a key.
    causal : bool
        Key ``j`` visible to query ``i`` only when ``j <= i + o``.
    window : (left, right), optional
        Keys with ``i + o - left <= j <= i + o + right``; None for an unbounded side.
    align : {"top_left", "bottom_right"}, optional
        Required with ``causal``, ``window`` or ``alibi_slopes`` when ``L != S``.
    softcap : float, optional
        :math:`c > 0`: logits become :math:`c \tanh(s / c)` before bias and masking.
    alibi_slopes : array_like, optional
        One slope per query head, broadcasting to ``(..., Hq)``.
    sinks : array_like, optional
        One sink logit per query head, broadcasting to ``(..., Hq)``.
    dropout_mask : array_like of bool, optional
        Keep-mask, broadcasting to ``(..., Hq, L, S)``; required when ``dropout_p > 0``.
    dropout_p : float
        In ``[0, 1)``; kept weights are divided by ``1 - dropout_p``. The keep-mask is
        applied as given, also with ``dropout_p=0`` (factor 1): the weights of a row with
        dropped keys then sum to less than one, as with any ``dropout_p``.
    return_lse : bool
        Also return :math:`\ell`, shape ``(..., Hq, L)``.
    precision : {"accurate", "fast"}
        "accurate" (default): each output within :math:`4u \sum_j p_{ij} |v_{jk}|` of the
        exact value and lse within one ulp; "fast": plain float64.

    Returns
    -------
    out : ndarray of float64, ``(..., Hq, L, Ev)``
    lse : ndarray of float64, ``(..., Hq, L)`` (only with ``return_lse=True``)

    Raises
    ------
    TypeError
        An argument of the wrong type (bool or complex arrays, a masked array, an array as
        ``precision`` or ``align``); the message names it.
    ValueError
        Shapes that do not fit, values out of range, a job past the size limit
        (:data:`attnspec.reference.inputs.SIZE_LIMITS`), or, with
        ``precision="accurate"``, a visible logit beyond the float64 range although its
        inputs are finite (``"fast"`` returns the IEEE overflow, :mod:`attnspec.exact`
        the exact value). See docs/reliability.md.

    Examples
    --------
    >>> import numpy as np, attnspec
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[10.0], [20.0]])
    >>> attnspec.sdpa(q, k, v, scale=0.0)  # scale 0: the mean of the values
    array([[15.]])
    """
    options = SdpaOptions(
        scale=scale,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        align=align,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        return_lse=return_lse,
    )
    result: F64 | tuple[F64, F64] = evaluate(get_arithmetic(precision), q, k, v, options)
    return result


@dataclass(frozen=True)
class SdpaOptions:
    """The keyword arguments of :func:`sdpa` (but ``precision``), validated once.

    Every way of evaluating the definition takes one: :func:`sdpa`,
    :func:`attnspec.exact.sdpa`, the strategies' cases and the properties. The scalar
    options are checked (and normalised: ``scale`` and the others to float, ``window`` to
    a tuple) when it is made; the arrays are checked against the shapes of ``q``, ``k``
    and ``v`` by :func:`evaluate`, the only place that knows them.

    Examples
    --------
    >>> from attnspec.reference.attention import SdpaOptions
    >>> SdpaOptions(causal=True, window=[2, None]).window
    (2, None)
    >>> SdpaOptions.from_kwargs({"scale": 1}).replace(return_lse=True).as_kwargs()["scale"]
    1.0
    """

    scale: float | None = None
    mask: Any = None
    bias: Any = None
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    align: str | None = None
    softcap: float | None = None
    alibi_slopes: Any = None
    sinks: Any = None
    dropout_mask: Any = None
    dropout_p: float = 0.0
    return_lse: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if self.scale is not None:
            put("scale", _real_scalar(self.scale, "scale"))
        if not isinstance(self.causal, bool | np.bool_):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        put("window", check_window(self.window))
        if self.align is not None:
            if not isinstance(self.align, str):
                raise TypeError(
                    f"align must be one of {ALIGNMENTS!r} or None, got {type(self.align).__name__}"
                    f" {self.align!r}"
                )
            alignment_offset(1, 1, self.align, needed_by="align")  # validates the name
        if self.softcap is not None:
            put("softcap", _real_scalar(self.softcap, "softcap"))
            if self.softcap <= 0:
                raise ValueError(
                    f"softcap must be > 0 (the cap c in c*tanh(s/c)), got {self.softcap}"
                )
        put("dropout_p", _real_scalar(self.dropout_p, "dropout_p"))
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in [0, 1), got {self.dropout_p}")
        if self.dropout_p > 0 and self.dropout_mask is None:
            raise ValueError(
                f"dropout_p={self.dropout_p} needs an explicit dropout_mask (bool, "
                "True = keep): the reference draws no random numbers"
            )
        if not isinstance(self.return_lse, bool | np.bool_):
            raise TypeError(f"return_lse must be a bool, got {self.return_lse!r}")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> SdpaOptions:
        """The options named in ``kwargs``; a TypeError names any unknown keyword."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"sdpa() got unexpected keyword argument(s) {unknown}; "
                f"the options are {sorted(names)}"
            )
        return cls(**kwargs)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :func:`sdpa` (every field)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> SdpaOptions:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)


def sdpa_defaults() -> dict[str, Any]:
    """The keyword arguments of :func:`sdpa` (but ``precision``) and their defaults."""
    return SdpaOptions().as_kwargs()


def _real_scalar(value: object, name: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:  # a Python int beyond the float64 range (10**400)
        raise ValueError(
            f"{name} must be finite, got an integer of {int(value).bit_length()} bits, "
            "beyond the float64 range"
        ) from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out!r}")
    return out


def _bool_array(value: object, name: str, shape: tuple[int, ...]) -> Bool:
    arr = as_array(value, name)
    if arr.dtype != np.bool_:
        meaning = "keep" if name == "dropout_mask" else "may attend"
        raise TypeError(
            f"{name} must be a bool array (True = {meaning}), got dtype {arr.dtype}"
            + ("; for an additive mask use bias=" if name == "mask" else "")
        )
    _check_broadcast(arr.shape, shape, name, "(..., Hq, L, S)")
    return arr


def _check_broadcast(
    got: tuple[int, ...], target: tuple[int, ...], name: str, letters: str
) -> None:
    try:
        out = np.broadcast_shapes(got, target)
    except ValueError:
        out = None
    if out != target:
        raise ValueError(f"{name} with shape {got} does not broadcast to {letters} = {target}")


def _per_head(value: object, name: str, batch: tuple[int, ...], hq: int) -> F64:
    arr = as_real_float64(value, name)
    _check_broadcast(arr.shape, (*batch, hq), name, "(..., Hq)")
    return arr


def evaluate(arith: Arithmetic[Any], q: object, k: object, v: object, options: SdpaOptions) -> Any:
    """The definition in ``arith`` on ``q``, ``k``, ``v`` with validated ``options``:
    ``out`` or ``(out, lse)`` as the arithmetic's results."""
    prep = prepare(arith, q, k, v, options)
    if arith.name == "fast" and prep.n_k > _KEY_BLOCK and prep.n_q > 0:
        # plain float64 walks blocks of keys too, so that its workspace does not grow
        # with S: the blocks' (o, lse) are merged (attnspec.reference.online)
        out, lse = _key_blocks(arith, prep)
    else:
        out, lse = _row_blocks(arith, prep)
    if lse.shape != out.shape[:-1]:
        # v has batch dimensions that q and k lack: the lse (of q and k alone) is the same
        # along them, and has the documented shape (..., Hq, L) of the output's rows
        lse = np.array(np.broadcast_to(lse, out.shape[:-1]))
    if prep.two_d:
        out, lse = out[0], lse[0]
    return (out, lse) if options.return_lse else out


def _row_blocks(arith: Arithmetic[Any], prep: Prepared) -> tuple[Any, Any]:
    """The definition on blocks of query rows, each over all the keys."""
    # Each query row is independent: evaluate blocks of rows so that the (L, S) logits
    # and the arithmetic's temporaries stay within a bounded workspace; each block's
    # results are written into the output (allocated with the first block's dtype).
    n_q = prep.n_q
    starts = prep.row_starts()
    out: Any = None
    lse: Any = None
    for start in starts:
        stop = min(n_q, start + prep.rows_per_block)
        block = prep.block(start, stop)
        o_block, lse_block = _forward(arith, prep.q[..., start:stop, :], prep.k, prep.v, block)
        if len(starts) == 1:
            out, lse = o_block, lse_block
            break
        if out is None:
            out = np.empty((*o_block.shape[:-2], n_q, o_block.shape[-1]), dtype=o_block.dtype)
            lse = np.empty((*lse_block.shape[:-1], n_q), dtype=lse_block.dtype)
        out[..., start:stop, :] = o_block
        lse[..., start:stop] = lse_block
    return out, lse


#: keys per block of precision="fast" once S is larger (S <= _KEY_BLOCK: one block of
#: keys, bit for bit what it was); each block of keys is taken with
#: _KEY_BLOCK_ELEMENTS // (heads * _KEY_BLOCK) query rows. Measured on the 2-core dev
#: machine (min of 2 rounds, (B, H, L, S, E) = (1, 1, 16384, 16384, 64)): one block of
#: keys (64 rows) 3.05 s; blocks of 2048 keys x 512 rows 3.03 s, 4096 x 256 2.76 s,
#: 4096 x 128 2.80 s, 4096 x 512 4.38 s, 8192 x 128 2.44 s, 8192 x 256 3.39 s; at
#: (1, 1, 65536, 65536, 64) (one round, a loaded machine) 8192 x 128 86 s, 4096 x 256
#: 99 s, 16384 x 64 236 s, 8192 x 64 491 s. At S = 4096 blocks of keys were slower
#: (1.1x to 1.35x of one block): S <= 8192 keeps one block.
_KEY_BLOCK = 8192
_KEY_BLOCK_ELEMENTS = 1 << 20


def _key_cols(a: npt.NDArray[Any] | None, c0: int, c1: int) -> npt.NDArray[Any] | None:
    """Keys c0:c1 of the key axis (-1) of a (..., L, S) array, if it has one."""
    if a is None or a.ndim < 1 or a.shape[-1] == 1:
        return a
    return a[..., c0:c1]


def key_block(prep: Prepared, start: int, stop: int, c0: int, c1: int) -> Block:
    """What the definition needs for query rows ``start:stop`` and keys ``c0:c1``, without
    the sink (a blocked evaluation adds it once): the mask, bias, keep-mask, causal and
    window visibility and ALiBi distances of those keys."""
    opt = prep.options
    n = c1 - c0
    # keys c0:c1 are keys 0:n of a problem whose alignment offset is offset - c0:
    # j - (i + o) = (j - c0) - (i + o - c0)
    offset = prep.offset - c0
    seen = visible(
        prep.n_q, n, causal=bool(opt.causal), window=opt.window, offset=offset, rows=(start, stop)
    )
    block_mask = _key_cols(_query_rows(prep.mask, start, stop), c0, c1)
    if block_mask is not None:
        seen = block_mask if seen is None else (block_mask & seen)
    block_bias = _key_cols(_query_rows(prep.bias, start, stop), c0, c1)
    if block_bias is not None and np.any(block_bias == -np.inf):
        shown = block_bias != -np.inf  # a bias of -inf hides its key, like the mask
        seen = shown if seen is None else (seen & shown)
    distance = None
    if prep.slopes is not None:
        distance = np.abs(relative_position(prep.n_q, n, offset, (start, stop))).astype(np.float64)
    return Block(
        tau=prep.tau,
        softcap=opt.softcap,
        bias=block_bias,
        slopes=prep.slopes,
        distance=distance,
        seen=seen,
        sinks=None,
        keep=_key_cols(_query_rows(prep.keep, start, stop), c0, c1),
        dropout_p=opt.dropout_p,
        finite_values=prep.finite_values,
        first_row=start,
    )


def _key_blocks(arith: Arithmetic[Any], prep: Prepared) -> tuple[F64, F64]:
    r"""The definition on blocks of query rows and blocks of keys, merged by their lse.

    Each (rows, keys) block is the definition over those keys alone (:func:`_forward`:
    its own max-shifted softmax); the partials of a row are merged in key order by
    :func:`attnspec.reference.online.merge_partials` (claim ``online-partials-merge``),
    and the sink, if any, once at the end as the partial :math:`(0, \sigma_h)`. A block
    in which no row sees a key (causal, window, mask) is skipped: its partial
    :math:`(0, -\infty)` is the merge's identity (claim ``online-hidden-block``). The
    error against the exact value is bounded by
    :func:`attnspec.spec.tolerances.online.online_sdpa_bound` with ``block_keys`` =
    ``_KEY_BLOCK``.

    The rows whose result is a special value in any block or at the end (a NaN or
    :math:`+\infty` logit, a non-finite output: non-finite values, an overflow; nothing
    visible) are evaluated again over all the keys, on the row blocks of
    :func:`_row_blocks`: they give exactly what one block of keys gives.
    """
    from attnspec.reference.online import merge_partials

    n_q, n_k, kb = prep.n_q, prep.n_k, _KEY_BLOCK
    heads = max(1, int(np.prod(prep.logits_shape[:-2])))
    rows = max(1, _KEY_BLOCK_ELEMENTS // (heads * kb))
    out = np.empty((*prep.batch, prep.hq, n_q, prep.v.shape[-1]))
    lse = np.empty((*prep.batch, prep.hq, n_q))
    redo = np.zeros(n_q, dtype=bool)
    for start in range(0, n_q, rows):
        stop = min(n_q, start + rows)
        q_rows = prep.q[..., start:stop, :]
        o_acc: Any = None
        l_acc: Any = None
        special: Any = None
        for c0 in range(0, n_k, kb):
            c1 = min(n_k, c0 + kb)
            blk = key_block(prep, start, stop, c0, c1)
            if blk.seen is not None and not blk.seen.any():
                continue  # nothing visible (causal, window, mask): the merge's identity
            o_b, l_b = _forward(arith, q_rows, prep.k[..., c0:c1, :], prep.v[..., c0:c1, :], blk)
            l_b = np.broadcast_to(l_b, o_b.shape[:-1])  # v may have batch dims q, k lack
            with np.errstate(invalid="ignore"):
                bad = np.isnan(l_b) | (l_b == np.inf) | ~np.isfinite(o_b).all(axis=-1)
            special = bad if special is None else (special | bad)
            if bad.any():  # redone below: keep them out of the merge (+inf twice refuses)
                l_b = np.where(bad, -np.inf, l_b)
                o_b = np.where(bad[..., None], 0.0, o_b)
            if o_acc is None:
                o_acc, l_acc = o_b, l_b
            else:
                o_acc, l_acc = merge_partials(o_acc, l_acc, o_b, l_b)
        if o_acc is None:  # no key block with a visible key: every row is empty
            redo[start:stop] = True
            continue
        special = special | (l_acc == -np.inf)  # nothing visible: the empty-row rule
        if prep.sinks is not None:
            sig = np.broadcast_to(prep.sinks[..., None], np.shape(l_acc))
            o_acc, l_acc = merge_partials(o_acc, l_acc, np.zeros(np.shape(o_acc)), sig)
        with np.errstate(invalid="ignore"):
            special = special | np.isnan(l_acc) | ~np.isfinite(o_acc).all(axis=-1)
        out[..., start:stop, :] = o_acc
        lse[..., start:stop] = l_acc
        special = np.broadcast_to(special, l_acc.shape)
        redo[start:stop] = special.reshape(-1, stop - start).any(axis=0)
    if redo.any():
        for start in prep.row_starts():
            stop = min(n_q, start + prep.rows_per_block)
            which = redo[start:stop]
            if not which.any():
                continue
            o_t, l_t = _forward(
                arith, prep.q[..., start:stop, :], prep.k, prep.v, prep.block(start, stop)
            )
            idx = np.arange(start, stop)[which]
            out[..., idx, :] = np.broadcast_to(o_t, (*out.shape[:-2], stop - start, out.shape[-1]))[
                ..., which, :
            ]
            lse[..., idx] = np.broadcast_to(l_t, (*lse.shape[:-1], stop - start))[..., which]
    return out, lse


@dataclass(frozen=True)
class Prepared:
    """The validated inputs of one call: what every block of the definition reads.

    ``q``, ``k``, ``v`` are float64 with at least three dimensions (2-D inputs gain a head
    axis, ``two_d`` says so), ``k`` and ``v`` with their kv heads repeated to one per query
    head; the optional arrays are validated against the shapes (None where not given).
    """

    q: F64
    k: F64
    v: F64
    two_d: bool
    batch: tuple[int, ...]
    hq: int
    hkv: int
    n_q: int
    n_k: int
    logits_shape: tuple[int, ...]
    tau: float
    options: SdpaOptions
    mask: Bool | None
    keep: Bool | None
    bias: F64 | None
    slopes: F64 | None
    sinks: F64 | None
    offset: int
    finite_values: bool
    rows_per_block: int

    def row_starts(self) -> range:
        """The first query row of each block of rows (one block for L = 0)."""
        return range(0, max(self.n_q, 1), self.rows_per_block)

    def block(self, start: int, stop: int) -> Block:
        """What the definition needs for query rows ``start:stop``."""
        opt = self.options
        seen = visible(
            self.n_q,
            self.n_k,
            causal=bool(opt.causal),
            window=opt.window,
            offset=self.offset,
            rows=(start, stop),
        )
        block_mask = _query_rows(self.mask, start, stop)
        if block_mask is not None:
            seen = block_mask if seen is None else (block_mask & seen)
        block_bias = _query_rows(self.bias, start, stop)
        if block_bias is not None and np.any(block_bias == -np.inf):
            # A bias of -inf hides its key, like the mask: whatever the logit holds
            # (NaN + -inf would be NaN) never reaches the row.
            shown = block_bias != -np.inf
            seen = shown if seen is None else (seen & shown)
        return Block(
            tau=self.tau,
            softcap=opt.softcap,
            bias=block_bias,
            slopes=self.slopes,
            distance=None
            if self.slopes is None
            else np.abs(relative_position(self.n_q, self.n_k, self.offset, (start, stop))).astype(
                np.float64
            ),
            seen=seen,
            sinks=self.sinks,
            keep=_query_rows(self.keep, start, stop),
            dropout_p=opt.dropout_p,
            finite_values=self.finite_values,
            first_row=start,
        )


def prepare(
    arith: Arithmetic[Any], q: object, k: object, v: object, options: SdpaOptions
) -> Prepared:
    """Validate ``q``, ``k``, ``v`` and the arrays of ``options`` against each other (the
    errors name the argument, its shape and the shape expected) for an evaluation in
    ``arith`` (whose size limit applies)."""
    q64 = as_real_float64(q, "q")
    k64 = as_real_float64(k, "k")
    v64 = as_real_float64(v, "v")
    two_d = q64.ndim == 2 and k64.ndim == 2 and v64.ndim == 2
    if two_d:
        q64, k64, v64 = q64[None], k64[None], v64[None]
    for name, arr, letters in (
        ("q", q64, "(..., Hq, L, E)"),
        ("k", k64, "(..., Hkv, S, E)"),
        ("v", v64, "(..., Hkv, S, Ev)"),
    ):
        if arr.ndim < 3:
            raise ValueError(
                f"{name} must have shape {letters} (at least 3 dimensions, or q, k, v all "
                f"2-D for one head), got shape {arr.shape}"
            )
    hq, n_q, width = q64.shape[-3:]
    hkv, n_k, width_k = k64.shape[-3:]
    if width_k != width:
        raise ValueError(
            f"q and k must share their last dimension E: q has shape {q64.shape} (E={width}), "
            f"k has shape {k64.shape} (E={width_k})"
        )
    if v64.shape[-3:-1] != (hkv, n_k):
        raise ValueError(
            f"v must have shape (..., Hkv, S, Ev) with Hkv={hkv} and S={n_k} as in k "
            f"{k64.shape}, got {v64.shape}"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads Hq={hq} (q {q64.shape}) must be a multiple of the "
            f"number of key/value heads Hkv={hkv} (k {k64.shape})"
        )
    try:
        batch = np.broadcast_shapes(q64.shape[:-3], k64.shape[:-3], v64.shape[:-3])
    except ValueError:
        raise ValueError(
            f"the leading (batch) dimensions of q {q64.shape}, k {k64.shape} and v "
            f"{v64.shape} do not broadcast"
        ) from None
    logits_shape = (*batch, hq, n_q, n_k)

    opt = options
    if opt.scale is None and width == 0:
        raise ValueError("scale=None needs E > 0 (the default is 1/sqrt(E)); pass scale=")
    tau = 1.0 / math.sqrt(width) if opt.scale is None else opt.scale
    causal, win, align = opt.causal, opt.window, opt.align
    mask = None if opt.mask is None else _bool_array(opt.mask, "mask", logits_shape)
    keep = (
        None
        if opt.dropout_mask is None
        else _bool_array(opt.dropout_mask, "dropout_mask", logits_shape)
    )
    bias = None if opt.bias is None else as_real_float64(opt.bias, "bias")
    if bias is not None:
        _check_broadcast(bias.shape, logits_shape, "bias", "(..., Hq, L, S)")
    slopes = (
        None if opt.alibi_slopes is None else _per_head(opt.alibi_slopes, "alibi_slopes", batch, hq)
    )
    if slopes is not None and not np.isfinite(slopes).all():
        raise ValueError(
            f"alibi_slopes must be finite, got {slopes[~np.isfinite(slopes)].ravel()[:4]} among "
            f"them: an infinite slope makes every distance infinite (and distance 0 NaN)"
        )
    check_size(int(np.prod(logits_shape, dtype=np.float64)), arith.name, "logits (..., Hq, L, S)")
    sinks = None if opt.sinks is None else _per_head(opt.sinks, "sinks", batch, hq)

    needs = [
        name
        for name, on in (
            ("causal", causal),
            ("window", win is not None),
            ("alibi_slopes", slopes is not None),
        )
        if on
    ]
    offset = alignment_offset(n_q, n_k, align, needed_by=" and ".join(needs)) if needs else 0

    # Query head h reads key/value head h // G (G = Hq / Hkv): repeat each kv head G
    # times, once for all blocks. K and V are small next to the (L, S) logits.
    if hq != hkv:
        k64 = np.repeat(k64, hq // hkv, axis=-3)
        v64 = np.repeat(v64, hq // hkv, axis=-3)

    return Prepared(
        q=q64,
        k=k64,
        v=v64,
        two_d=two_d,
        batch=batch,
        hq=hq,
        hkv=hkv,
        n_q=n_q,
        n_k=n_k,
        logits_shape=logits_shape,
        tau=tau,
        options=opt,
        mask=mask,
        keep=keep,
        bias=bias,
        slopes=slopes,
        sinks=sinks,
        offset=offset,
        finite_values=bool(np.isfinite(v64).all()),  # decided once for all blocks
        rows_per_block=max(1, _BLOCK_ELEMENTS // max(1, int(np.prod(logits_shape[:-2])) * n_k)),
    )


#: elements of the (..., L, S) logits evaluated at once (8 MiB of float64). Measured on
#: the 2-core dev machine at (B, H, L, S, E) = (1, 8, 1024, 1024, 64): 2**20 was the
#: fastest of 2**17 ... 2**22 for both arithmetics (fast 0.10 s against 0.12 s at 2**22;
#: accurate 1.6-1.9 s against 3.6 s): larger blocks fall out of the caches (the
#: accurate exponential's table lookups most of all), smaller ones pay the per-block
#: work (visibility, the Ozaki products' slicing) more often.
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Block:
    """What the definition needs for one block of query rows (all validated)."""

    tau: float
    softcap: float | None
    bias: F64 | None
    slopes: F64 | None
    distance: F64 | None  # |i + o - j| for the block's queries, with ALiBi
    seen: Bool | None  # visibility (mask, causal, window); None: all visible
    sinks: F64 | None
    keep: Bool | None
    dropout_p: float
    finite_values: bool  # v holds no inf or NaN
    first_row: int = 0  # the query row the block starts at (for messages)


def _query_rows(a: npt.NDArray[Any] | None, start: int, stop: int) -> npt.NDArray[Any] | None:
    """Rows start:stop of the query axis (-2) of a (..., L, S) array, if it has one."""
    if a is None or a.ndim < 2 or a.shape[-2] == 1:
        return a
    return a[..., start:stop, :]


def _forward(arith: Arithmetic[Any], q: F64, k: F64, v: F64, blk: Block) -> tuple[Any, Any]:
    """Steps 1-8 of the definition, for one block of queries."""
    lg = logits(arith, q, k, v, blk)
    # 5-6. lse and weights: the softmax definition (attnspec.reference.softmax).
    weights = normalise(arith, lg.s, lg.approx, ("softmax", "lse"))
    # 7. dropout: p <- p * keep / (1 - p_drop)
    p = dropped(arith, weights["softmax"], lg.keep, blk.dropout_p)
    # 8. o_i = sum_j p_ij v_j over the keys that carry weight.
    out = _weighted_values(arith, p, lg.approx, lg.keep, lg.v, blk.finite_values)
    return arith.result(out), arith.result(weights["lse"])[..., 0]


@dataclass(frozen=True)
class Logits:
    """Steps 1-4 for one block of queries: the logits and what comes with them.

    With sinks, the keys gain a last column: key number S, with logit sigma_h and value 0
    (``k``, ``v``, ``seen`` and ``keep`` include it)."""

    #: the final logits (numbers of the arithmetic), -inf at hidden keys
    s: Any
    #: ``s`` rounded to float64
    approx: F64
    #: the softcapped logits c tanh(s/c) before bias and ALiBi (None without softcap)
    capped: Any
    #: visibility, sink column included (None: all visible)
    seen: Bool | None
    #: the keep-mask, sink column included (None: no dropout mask)
    keep: Bool | None
    #: the keys and values, the sink's zero row included
    k: F64
    v: F64


def logits(arith: Arithmetic[Any], q: F64, k: F64, v: F64, blk: Block) -> Logits:
    """Steps 1-4 of the definition, for one block of queries."""
    tau, softcap, bias, slopes = blk.tau, blk.softcap, blk.bias, blk.slopes
    seen, sinks, keep = blk.seen, blk.sinks, blk.keep
    n_q, n_k = q.shape[-2], k.shape[-2]
    # k and v have one head per query head here (the kv heads were repeated by prepare).
    if sinks is not None:
        # A sink is a key with logit sigma_h and value 0: key number S.
        k = np.concatenate([k, np.zeros((*k.shape[:-2], 1, k.shape[-1]))], axis=-2)
        v = np.concatenate([v, np.zeros((*v.shape[:-2], 1, v.shape[-1]))], axis=-2)
        seen = _with_sink_column(seen, n_q, n_k)
        keep = _with_sink_column(keep, n_q, n_k)

    # 1. s_ij = tau * q_i . k_j
    s = arith.mul(
        arith.matmul(arith.lift(q), arith.lift(np.swapaxes(k, -1, -2))),
        arith.lift(np.asarray(tau, dtype=np.float64)),
    )
    # 2. softcap: s <- c tanh(s / c)
    capped = None
    if softcap is not None:
        s = capped = arith.softcap(s, softcap)
    # 3. bias and ALiBi: s <- s + b - m_h |i + o - j|
    if bias is not None:
        s = arith.add(s, arith.lift(_pad_keys(bias, n_k, sinks is not None)))
    if slopes is not None:
        assert blk.distance is not None
        distance = _pad_keys(blk.distance, n_k, sinks is not None)
        s = arith.sub(s, arith.mul(arith.lift(slopes[..., None, None]), arith.lift(distance)))
    if sinks is not None:
        is_sink = np.arange(n_k + 1) == n_k
        s = arith.select(is_sink, arith.lift(sinks[..., None, None]), s)
    # 4. hidden keys get logit -inf: weight exactly 0, whatever they held.
    approx = arith.approx(s)
    if arith.overflow == "refuse":
        _refuse_overflowed_logits(approx, q, k, bias, seen, sinks is not None, blk.first_row)
    if seen is not None:
        s = arith.select(seen, s, arith.lift(np.full((1, 1), -np.inf)))
        approx = np.where(seen, approx, -np.inf)
    return Logits(s=s, approx=approx, capped=capped, seen=seen, keep=keep, k=k, v=v)


def dropped(arith: Arithmetic[Any], p: Any, keep: Bool | None, dropout_p: float) -> Any:
    r"""Step 7, dropout: :math:`p \leftarrow p\, \kappa / (1 - p_{\mathrm{drop}})` (``p``
    itself without a keep-mask)."""
    if keep is None:
        return p
    return arith.div(
        arith.mul(p, arith.lift(keep.astype(np.float64))),
        arith.sub(arith.lift(np.ones(())), arith.lift(np.asarray(dropout_p, dtype=np.float64))),
    )


def _refuse_overflowed_logits(
    approx: F64,
    q: F64,
    k: F64,
    bias: F64 | None,
    seen: Bool | None,
    sink: bool,
    first_row: int = 0,
) -> None:
    """ValueError where a visible logit is not finite although every term it is made of
    is: the exact logit lies beyond the float64 range, and an arithmetic bounded like
    float64 would order such logits by their roundings (inf = inf), which is wrong."""
    rows_q = np.asarray(np.isfinite(q).all(axis=-1))
    rows_k = np.asarray(np.isfinite(k).all(axis=-1))
    finite = rows_q[..., :, None] & rows_k[..., None, :]
    if sink:
        finite = finite[..., :-1]  # the sink column is an input of its own
        approx = approx[..., :-1]
        seen = None if seen is None else seen[..., :-1]
    if bias is not None:
        finite = finite & np.isfinite(bias)
    bad = finite & ~np.isfinite(approx)
    if seen is not None:
        bad = bad & seen
    if bad.any():
        at_block = [int(i) for i in np.argwhere(bad)[0]]
        at_block[-2] += first_row  # the block's row, as a row of the whole query axis
        at = tuple(at_block)
        raise ValueError(
            f"the logit at {at} (..., Hq, L, S) is beyond the float64 range (|scale * q.k + "
            "bias| > 1.8e308) although q, k and bias are finite there: precision='accurate' "
            "cannot order logits beyond float64; scale q, k or scale down (softmax is "
            "shift-invariant, not scale-invariant: the weights change), or use attnspec.exact"
        )


def _pad_keys(a: npt.NDArray[Any], n_k: int, sink: bool) -> npt.NDArray[Any]:
    """Give a (..., L, S) array a zero column for the sink key, when there is one."""
    if not sink:
        return a
    a = np.broadcast_to(a, (*a.shape[:-1], n_k))
    return np.concatenate([a, np.zeros((*a.shape[:-1], 1), dtype=a.dtype)], axis=-1)


def _with_sink_column(pattern: Bool | None, n_q: int, n_k: int) -> Bool | None:
    """Visibility or keep pattern with the sink key (always visible, always kept)."""
    if pattern is None:
        return None
    full = np.broadcast_to(pattern, (*pattern.shape[:-2], n_q, n_k))
    return np.concatenate([full, np.ones((*full.shape[:-1], 1), dtype=bool)], axis=-1)


def _weighted_values(
    arith: Arithmetic[Any], p: Any, approx: F64, keep: Bool | None, v: F64, finite_values: bool
) -> Any:
    """``P V`` summed over the keys with positive weight, in the extended reals.

    A product P V in BLAS would let a NaN or inf at a hidden key leak through
    0 * NaN = NaN. So non-finite values are taken out of the product and their
    effect is added back only where a key with positive weight holds them: a NaN, or
    both +inf and -inf, give NaN; +inf alone +inf; -inf alone -inf.
    """
    if finite_values:
        return arith.matmul(p, arith.lift(v))
    finite = np.isfinite(v)
    out = arith.matmul(p, arith.lift(np.where(finite, v, 0.0)))
    # Keys that carry weight: not hidden (logit > -inf) and, in a row with +inf
    # logits, only the +inf keys; dropped keys carry none.
    row_has_inf = np.any(approx == np.inf, axis=-1, keepdims=True)
    weighted = np.where(row_has_inf, approx == np.inf, approx > -np.inf)
    if keep is not None:
        weighted = weighted & keep
    w = weighted.astype(np.float64)
    n_nan = w @ np.isnan(v)
    n_pos = w @ (v == np.inf)
    n_neg = w @ (v == -np.inf)
    patch = np.where(
        (n_nan > 0) | ((n_pos > 0) & (n_neg > 0)),
        np.nan,
        np.where(n_pos > 0, np.inf, -np.inf),
    )
    # A row with an included NaN logit is NaN throughout already (the softmax rule).
    nan_row = np.any(np.isnan(approx), axis=-1, keepdims=True)
    touched = ((n_nan > 0) | (n_pos > 0) | (n_neg > 0)) & ~nan_row
    return arith.select(touched, arith.lift(patch), out)
