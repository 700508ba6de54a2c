r"""The backward pass: closed-form gradients of softmax, log_softmax, logsumexp and sdpa.

Each gradient is written once against the arithmetic interface (:mod:`.arith`), like the
forward definitions, and evaluated in float64 (``precision="fast"``), in double-double
(``"accurate"``) or exactly (:mod:`attnspec.exact`). The closed forms are proved from the
forward definition by the derivations of ``spec/derivations/backward.py``.

Softmax family, for a slice :math:`x` with weights :math:`p = \operatorname{softmax}(x)`
and included entries :math:`V` (``where`` True and :math:`x_j > -\infty`):

.. math::

    J^\top g = p \odot (g - \langle p, g \rangle), \qquad
    J t = p \odot (t - \langle p, t \rangle), \qquad
    \nabla_{\log\mathrm{softmax}}^\top g = g - p \textstyle\sum_{j \in V} g_j, \qquad
    \nabla_{\mathrm{LSE}}^\top g = g\, p,

with :math:`J = \operatorname{diag}(p) - p p^\top` (symmetric, so the vjp and the jvp are
the same formula). Entries outside :math:`V` get exactly 0, whatever ``g`` holds there.

Attention, per head (the letters of :mod:`attnspec.reference.attention`): with
:math:`P` the weights before dropout, :math:`\kappa` the keep-mask,
:math:`r = 1/(1 - p_{\mathrm{drop}})`, :math:`\tilde P = P \odot \kappa\, r`,
:math:`O = \tilde P V`, and the upstream gradients :math:`dO` (and :math:`d\ell` of the
lse output, 0 when not given):

.. math::

    dV = \tilde P^\top dO, \quad
    dP = (dO\, V^\top) \odot \kappa\, r, \quad
    D_i = \textstyle\sum_e dO_{ie} O_{ie}, \quad
    dZ = P \odot (dP - D \mathbb{1}^\top + d\ell\, \mathbb{1}^\top),

:math:`dZ` the gradient of the final logits (so ``dbias`` is :math:`dZ` summed to the
bias's shape), :math:`d\sigma_h = \sum_i P_{i,\sigma} (d\ell_i - D_i)` for a sink,
:math:`dS = dZ \odot (1 - (t/c)^2)` through a softcap :math:`t = c \tanh(s/c)` (else
:math:`dS = dZ`), :math:`dQ = \tau\, dS\, K` and :math:`dK = \tau\, dS^\top Q`. The mask,
causal and window rules, ALiBi slopes, the keep-mask and ``dropout_p`` are constants.
GQA: the gradients of a key/value head are summed over its group; an input broadcast over
some axes gets its gradient summed over them.

Special values: a hidden position gets exactly 0 gradient, whatever it held; a row with
nothing visible (and no sink) gets zero gradients and contributes nothing. A gradient that
goes through a non-finite input at a position that carries weight (a NaN or infinite
value, key or query, or a NaN row of the forward) is NaN there.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Arithmetic, Move, get_arithmetic
from attnspec.reference.attention import (
    Prepared,
    SdpaOptions,
    _weighted_values,
    dropped,
    logits,
    prepare,
)
from attnspec.reference.inputs import as_real_float64, as_where, check_size, normalize_axes
from attnspec.reference.softmax import Rows, normalise

__all__ = [
    "SdpaGradients",
    "log_softmax_vjp",
    "logsumexp_vjp",
    "sdpa_backward",
    "sdpa_gradients",
    "softmax_jvp",
    "softmax_vjp",
]

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]


# --- the softmax family -------------------------------------------------------------------


def softmax_vjp(
    x: npt.ArrayLike,
    g: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    precision: str = "accurate",
) -> F64:
    r"""The vector-Jacobian product of :func:`attnspec.softmax`:
    :math:`J^\top g = p \odot (g - \langle p, g\rangle)` along ``axis``.

    ``g`` has the shape of ``x``; the other arguments are those of
    :func:`attnspec.softmax`. Excluded entries get exactly 0.

    Examples
    --------
    >>> import attnspec
    >>> attnspec.softmax_vjp([0.0, 0.0], [1.0, -1.0])
    array([ 0.5, -0.5])
    """
    return family_vjp("softmax", x, g, axis, where, False, get_arithmetic(precision))


def softmax_jvp(
    x: npt.ArrayLike,
    t: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    precision: str = "accurate",
) -> F64:
    r"""The Jacobian-vector product of :func:`attnspec.softmax`:
    :math:`J t = p \odot (t - \langle p, t\rangle)` (the Jacobian is symmetric, so this is
    :func:`softmax_vjp`'s formula), the directional derivative along ``t``.

    Examples
    --------
    >>> import attnspec
    >>> attnspec.softmax_jvp([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # a shift changes nothing
    array([0., 0., 0.])
    """
    return family_vjp("softmax", x, t, axis, where, False, get_arithmetic(precision), "t")


def log_softmax_vjp(
    x: npt.ArrayLike,
    g: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    precision: str = "accurate",
) -> F64:
    r"""The vector-Jacobian product of :func:`attnspec.log_softmax`:
    :math:`g - p \sum_{j \in V} g_j`; excluded entries get exactly 0.

    Examples
    --------
    >>> import attnspec
    >>> attnspec.log_softmax_vjp([0.0, 0.0], [1.0, 0.0])
    array([ 0.5, -0.5])
    """
    return family_vjp("log_softmax", x, g, axis, where, False, get_arithmetic(precision))


def logsumexp_vjp(
    x: npt.ArrayLike,
    g: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    keepdims: bool = False,
    precision: str = "accurate",
) -> F64:
    r"""The vector-Jacobian product of :func:`attnspec.logsumexp`: :math:`g\, p`.

    ``g`` has the shape of ``logsumexp(x, axis, keepdims=keepdims)``; the result the shape
    of ``x``. Excluded entries, and a slice with nothing included, get exactly 0.

    Examples
    --------
    >>> import attnspec
    >>> attnspec.logsumexp_vjp([0.0, 0.0], 2.0)
    array([1., 1.])
    """
    return family_vjp("logsumexp", x, g, axis, where, keepdims, get_arithmetic(precision))


def family_vjp(
    kind: str,
    x: object,
    g: object,
    axis: object,
    where: object,
    keepdims: object,
    arith: Arithmetic[Any],
    g_name: str = "g",
) -> Any:
    """The gradient of ``kind`` (softmax, log_softmax, logsumexp) in ``arith``: validate,
    bring the slices into rows, evaluate block by block, restore the shape of ``x``."""
    x64 = as_real_float64(x, "x")
    g64 = as_real_float64(g, g_name)
    check_size(x64.size, arith.name, "entries of x")
    axes = normalize_axes(axis, x64.ndim)
    w = None if where is None else as_where(where, x64.shape)
    if not isinstance(keepdims, bool | np.bool_):
        raise TypeError(f"keepdims must be a bool, got {keepdims!r}")
    layout = Rows(x64.shape, axes)
    if kind == "logsumexp":
        want = tuple(1 if a in axes else n for a, n in enumerate(x64.shape))
        if not keepdims:
            want = tuple(n for a, n in enumerate(x64.shape) if a not in axes)
        if g64.shape != want:
            raise ValueError(
                f"{g_name} must have the shape of logsumexp(x, axis={axis!r}, "
                f"keepdims={bool(keepdims)}) = {want}, got {g64.shape}"
            )
        rows_g = g64.reshape(layout.n_rows, 1)
    else:
        if g64.shape != x64.shape:
            raise ValueError(f"{g_name} must have the shape of x {x64.shape}, got {g64.shape}")
        rows_g = layout.rows(g64)
    rows_x = layout.rows(x64)
    rows_w = None if w is None else layout.rows(w)
    n_rows, n = rows_x.shape
    if n == 0 or n_rows == 0:
        return layout.full(arith.result(arith.lift(np.zeros((n_rows, n)))))
    block = n_rows if arith.chunk_elements <= 0 else max(1, arith.chunk_elements // n)
    out: Any = None
    for r in range(0, n_rows, block):
        part = _family_block(
            kind,
            rows_x[r : r + block],
            rows_g[r : r + block],
            None if rows_w is None else rows_w[r : r + block],
            arith,
        )
        if block >= n_rows:
            out = part
            break
        if out is None:
            out = np.empty((n_rows, n), dtype=part.dtype)
        out[r : r + block] = part
    return layout.full(out)


def _family_block(kind: str, x: F64, g: F64, where: Bool | None, arith: Arithmetic[Any]) -> Any:
    """One block of rows (R, n), n >= 1: the closed form of ``kind``'s gradient."""
    if where is not None:
        x = np.where(where, x, -np.inf)
    included = x > -np.inf  # NaN compares False: a NaN entry is included, and NaN
    included |= np.isnan(x)
    p = normalise(arith, arith.lift(x), x, ("softmax",))["softmax"]
    if kind == "logsumexp":
        out = arith.mul(arith.lift(g), p)  # g p, g one per row
    else:
        # g at excluded entries carries no weight: 0 there, whatever it held
        g_in = arith.lift(np.where(included, g, 0.0))
        ones = arith.lift(np.ones((x.shape[-1], 1)))
        if kind == "softmax":
            mean = arith.matmul(arith.mul(p, g_in), ones)  # <p, g>
            out = arith.mul(p, arith.sub(g_in, mean))
        else:  # log_softmax
            total = arith.matmul(g_in, ones)  # sum_{j in V} g_j
            out = arith.sub(g_in, arith.mul(p, total))
    zero = arith.lift(np.zeros((1, 1)))
    return arith.result(arith.select(included, out, zero))


# --- attention ----------------------------------------------------------------------------


class SdpaGradients(NamedTuple):
    """The gradients of :func:`attnspec.sdpa`: each the shape of its input (``dbias`` and
    ``dsinks`` None where the forward had no ``bias`` or ``sinks``)."""

    dq: Any
    dk: Any
    dv: Any
    dbias: Any = None
    dsinks: Any = None


def sdpa_backward(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    dlse: npt.ArrayLike | None = None,
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
    precision: str = "accurate",
) -> SdpaGradients:
    r"""The gradients of :func:`attnspec.sdpa` with respect to ``q``, ``k``, ``v`` (and
    ``bias`` and ``sinks`` where given), for the upstream gradient ``dout`` of the output
    and, optionally, ``dlse`` of the lse output.

    Parameters
    ----------
    q, k, v : array_like
        As for :func:`attnspec.sdpa`.
    dout : array_like
        The gradient of the output: the output's shape ``(..., Hq, L, Ev)`` (``(L, Ev)``
        for 2-D inputs).
    dlse : array_like, optional
        The gradient of the lse output, shape ``(..., Hq, L)``; None: 0.
    scale, mask, bias, causal, window, align, softcap, alibi_slopes, sinks, dropout_mask, dropout_p
        As for :func:`attnspec.sdpa` (``return_lse`` is not taken: ``dlse`` says whether
        the lse was used).
    precision : {"accurate", "fast"}
        "accurate" (default): double-double throughout, every gradient within the bound of
        :func:`attnspec.spec.tolerances.backward.accurate_backward_bound`; "fast": plain
        float64 (:func:`~attnspec.spec.tolerances.backward.fast_backward_bound`).

    Returns
    -------
    SdpaGradients
        ``(dq, dk, dv, dbias, dsinks)``, float64 arrays of the shapes of their inputs (the
        kv heads' gradients summed over each group of query heads, broadcast inputs summed
        over their broadcast axes); ``dbias`` and ``dsinks`` None without ``bias`` and
        ``sinks``.

    Examples
    --------
    >>> import numpy as np, attnspec
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[10.0], [20.0]])
    >>> g = attnspec.sdpa_backward(q, k, v, np.ones((1, 1)), scale=0.0)
    >>> g.dv  # scale 0: each value has weight 1/2
    array([[0.5],
           [0.5]])
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
    )
    return sdpa_gradients(get_arithmetic(precision), q, k, v, dout, dlse, options)


def sdpa_gradients(
    arith: Arithmetic[Any],
    q: object,
    k: object,
    v: object,
    dout: object,
    dlse: object,
    options: SdpaOptions,
) -> SdpaGradients:
    """The closed forms in ``arith`` (the results as the arithmetic's results), block by
    block of query rows as the forward evaluates them."""
    if options.return_lse:
        raise TypeError("sdpa_backward takes no return_lse: pass dlse= for the lse's gradient")
    prep = prepare(arith, q, k, v, options)
    batch, hq, n_q, n_k = prep.batch, prep.hq, prep.n_q, prep.n_k
    width, width_v = prep.q.shape[-1], prep.v.shape[-1]
    out_shape = (*batch, hq, n_q, width_v)
    d_out = _upstream(dout, "dout", out_shape, prep.two_d, "the output's shape")
    d_lse = (
        None
        if dlse is None
        else _upstream(dlse, "dlse", out_shape[:-1], prep.two_d, "the lse's shape")
    )
    if prep.two_d:
        d_out = d_out[None]
        d_lse = None if d_lse is None else d_lse[None]

    # the shapes each gradient is summed to (the inputs' own, 2-D ones with their head axis)
    q_shape = as_real_float64(q, "q").shape
    k_shape = as_real_float64(k, "k").shape
    v_shape = as_real_float64(v, "v").shape
    if prep.two_d:
        q_shape, k_shape, v_shape = (1, *q_shape), (1, *k_shape), (1, *v_shape)
    logits_shape = prep.logits_shape
    bias_shape = None if prep.bias is None else prep.bias.shape
    bias_rows = bias_shape is not None and len(bias_shape) >= 2 and bias_shape[-2] == n_q > 1
    sinks_shape = None if prep.sinks is None else prep.sinks.shape

    dq: Any = None
    dbias: Any = None
    dk_sum: Any = None
    dv_sum: Any = None
    dbias_sum: Any = None
    dsinks_sum: Any = None
    starts = prep.row_starts() if n_q > 0 else range(0)
    for start in starts:
        stop = min(n_q, start + prep.rows_per_block)
        part = _block_gradients(arith, prep, start, stop, d_out, d_lse)
        rows = stop - start
        dq_part = _summed(arith, part.dq, (*batch, hq, rows, width), (*q_shape[:-2], rows, width))
        dq_part = arith.result(dq_part)
        dq = _into_rows(dq, dq_part, start, n_q, q_shape)
        dk_sum = part.dk if dk_sum is None else arith.add(dk_sum, part.dk)
        dv_sum = part.dv if dv_sum is None else arith.add(dv_sum, part.dv)
        if part.dbias is not None:
            assert bias_shape is not None
            if bias_rows:
                piece = arith.result(
                    _summed(
                        arith,
                        part.dbias,
                        (*logits_shape[:-2], rows, n_k),
                        (*bias_shape[:-2], rows, n_k),
                    )
                )
                dbias = _into_rows(dbias, piece, start, n_q, bias_shape)
            else:
                piece = _summed(arith, part.dbias, (*logits_shape[:-2], rows, n_k), bias_shape)
                dbias_sum = piece if dbias_sum is None else arith.add(dbias_sum, piece)
        if part.dsinks is not None:
            assert sinks_shape is not None
            per_row = arith.rearrange(part.dsinks, lambda a: a[..., 0])  # (..., Hq, rows)
            piece = _summed(arith, per_row, (*batch, hq, rows), (*sinks_shape, 1))
            piece = arith.rearrange(piece, lambda a: a.reshape(sinks_shape))
            dsinks_sum = piece if dsinks_sum is None else arith.add(dsinks_sum, piece)

    hkv = prep.hkv
    full_k = (*batch, hq, n_k, width)
    full_v = (*batch, hq, n_k, width_v)
    if dk_sum is None:  # no query rows: every gradient is 0
        zeros = arith.lift(np.zeros(()))
        dk_sum = arith.rearrange(zeros, lambda a: np.broadcast_to(a, full_k))
        dv_sum = arith.rearrange(zeros, lambda a: np.broadcast_to(a, full_v))
        dq = arith.result(arith.rearrange(zeros, lambda a: np.broadcast_to(a, q_shape).copy()))
        if bias_shape is not None:
            dbias_sum = arith.rearrange(zeros, lambda a: np.broadcast_to(a, bias_shape).copy())
        if sinks_shape is not None:
            dsinks_sum = arith.rearrange(zeros, lambda a: np.broadcast_to(a, sinks_shape).copy())
    dk = arith.result(_kv_heads(arith, dk_sum, full_k, hkv, k_shape))
    dv = arith.result(_kv_heads(arith, dv_sum, full_v, hkv, v_shape))
    if dbias_sum is not None:
        dbias = arith.result(dbias_sum)
    dsinks = None if dsinks_sum is None else arith.result(dsinks_sum)
    if prep.two_d:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return SdpaGradients(dq, dk, dv, dbias, dsinks)


def _upstream(value: object, name: str, shape: tuple[int, ...], two_d: bool, what: str) -> F64:
    """An upstream gradient, float64, checked to have exactly ``shape`` (2-D inputs: the
    shape without the head axis)."""
    arr = as_real_float64(value, name)
    want = shape[1:] if two_d else shape
    if arr.shape != want:
        raise ValueError(f"{name} must have {what} {want}, got shape {arr.shape}")
    return arr


class _Part(NamedTuple):
    """The gradients of one block of query rows, as numbers of the arithmetic, in the
    full shapes of the logits (before any sum to the inputs' shapes)."""

    dq: Any  # (..., Hq, rows, E)
    dk: Any  # (..., Hq, S, E), this block's rows' share
    dv: Any  # (..., Hq, S, Ev)
    dbias: Any  # (..., Hq, rows, S) or None
    dsinks: Any  # (..., Hq, rows, 1) or None


def _block_gradients(
    arith: Arithmetic[Any],
    prep: Prepared,
    start: int,
    stop: int,
    d_out: F64,
    d_lse: F64 | None,
) -> _Part:
    """The closed forms for query rows ``start:stop`` (module docstring)."""
    blk = prep.block(start, stop)
    q = prep.q[..., start:stop, :]
    n_k = prep.n_k
    sink = prep.sinks is not None
    lg = logits(arith, q, prep.k, prep.v, blk)
    p = normalise(arith, lg.s, lg.approx, ("softmax",))["softmax"]  # (..., rows, S [+1])
    pd = dropped(arith, p, lg.keep, blk.dropout_p)
    o = _weighted_values(arith, pd, lg.approx, lg.keep, lg.v, blk.finite_values)
    g_out = d_out[..., start:stop, :]
    do = arith.lift(g_out)

    # dP~ = dO V^T (sink column: value 0), then through dropout: dP = dP~ kappa r
    dpd = _product(arith, do, g_out != 0, np.swapaxes(lg.v, -1, -2))
    dp = _rescaled(arith, dpd, lg.keep, blk.dropout_p)
    # D_i = sum_e dO_ie O_ie, from the output the forward gives
    big_d = arith.matmul(arith.mul(do, o), arith.lift(np.ones((g_out.shape[-1], 1))))
    shifted = arith.sub(dp, big_d)
    if d_lse is not None:
        shifted = arith.add(shifted, arith.lift(np.asarray(d_lse[..., start:stop, None])))
    dz = arith.mul(p, shifted)  # dZ = P (dP - D + dlse)
    seen = lg.seen
    zero = arith.lift(np.zeros((1, 1)))
    if seen is not None:
        dz = arith.select(seen, dz, zero)  # hidden: exactly 0, whatever dP holds
    keys = slice(0, n_k)
    dz_keys = arith.rearrange(dz, lambda a: a[..., keys]) if sink else dz
    dsinks = arith.rearrange(dz, lambda a: a[..., n_k:]) if sink else None
    dbias = dz_keys if prep.bias is not None else None

    ds = dz_keys
    if lg.capped is not None:  # dS = dZ (1 - (t/c)^2), t = c tanh(s/c)
        cap = arith.lift(np.asarray(blk.softcap, dtype=np.float64))
        t = arith.rearrange(lg.capped, lambda a: a[..., keys]) if sink else lg.capped
        r = arith.div(t, cap)
        ds = arith.mul(ds, arith.sub(arith.lift(np.ones(())), arith.mul(r, r)))
        seen_keys = None if seen is None else seen[..., :n_k]
        if seen_keys is not None:
            ds = arith.select(seen_keys, ds, zero)
    tau = arith.lift(np.asarray(blk.tau, dtype=np.float64))
    nonzero = arith.approx(ds) != 0
    dq = arith.mul(_product(arith, ds, nonzero, prep.k), tau)  # dQ = tau dS K
    ds_t = arith.rearrange(ds, lambda a: np.swapaxes(a, -1, -2))
    dk = arith.mul(_product(arith, ds_t, np.swapaxes(nonzero, -1, -2), q), tau)  # tau dS^T Q
    pd_keys = arith.rearrange(pd, lambda a: np.swapaxes(a[..., keys], -1, -2))
    carried = np.swapaxes(arith.approx(pd)[..., keys] != 0, -1, -2)
    dv = _product(arith, pd_keys, carried, g_out)  # dV = P~^T dO
    return _Part(dq, dk, dv, dbias, dsinks)


def _rescaled(arith: Arithmetic[Any], x: Any, keep: Bool | None, dropout_p: float) -> Any:
    r""":math:`x\, \kappa / (1 - p_{\mathrm{drop}})` as a product with the reciprocal
    :math:`r = 1/(1 - p_{\mathrm{drop}})` (the same number in exact arithmetic): ``x`` here
    is :math:`dO\, V^\top`, which may be near the float64 range, where a double-double
    quotient loses its low part and a product does not (DoubleDouble.mul scales huge
    operands)."""
    if keep is None:
        return x
    one = arith.lift(np.ones(()))
    r = arith.div(one, arith.sub(one, arith.lift(np.asarray(dropout_p, dtype=np.float64))))
    return arith.mul(arith.mul(x, arith.lift(keep.astype(np.float64))), r)


def _product(arith: Arithmetic[Any], a: Any, nonzero: Bool, b: F64) -> Any:
    r""":math:`\sum_j a_{ij} b_{jk}` over the last two axes, where a term with
    :math:`a_{ij} = 0` (``nonzero`` False) is 0 even if :math:`b_{jk}` is not finite (a
    hidden key's NaN never reaches a gradient); a term with a non-finite
    :math:`b_{jk}` and :math:`a_{ij} \ne 0` makes the entry NaN."""
    finite = np.isfinite(b)
    if finite.all():
        return arith.matmul(a, arith.lift(b))
    out = arith.matmul(a, arith.lift(np.where(finite, b, 0.0)))
    touched = np.matmul(nonzero.astype(np.float64), (~finite).astype(np.float64)) > 0
    return arith.select(touched, arith.lift(np.full((1, 1), np.nan)), out)


def _summed(arith: Arithmetic[Any], x: Any, full: tuple[int, ...], target: tuple[int, ...]) -> Any:
    """``x`` (numbers of shape ``full``, or broadcasting to it) summed over the axes along
    which ``target`` broadcasts to ``full``: the gradient of an input of shape ``target``
    that was broadcast. A few terms are added one by one; more by a product with ones."""
    lead = len(full) - len(target)
    axes = list(range(lead)) + [
        lead + i for i, n in enumerate(target) if n == 1 and full[lead + i] != 1
    ]
    if not axes:
        return arith.rearrange(x, lambda a: np.broadcast_to(a, full).reshape(target))
    kept = [a for a in range(len(full)) if a not in axes]
    n = math.prod(full[a] for a in axes)
    kept_shape = tuple(full[a] for a in kept)

    def moved(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        a = np.broadcast_to(a, full)
        return np.transpose(a, kept + axes).reshape((*kept_shape, n))

    flat = arith.rearrange(x, moved)
    if n == 0:

        def zeros(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return np.broadcast_to(a, kept_shape)

        total = arith.rearrange(arith.lift(np.zeros(())), zeros)
    elif n <= 8:
        total = arith.rearrange(flat, lambda a: a[..., 0])
        for i in range(1, n):
            total = arith.add(total, arith.rearrange(flat, _entry(i)))
    else:
        row = arith.rearrange(flat, lambda a: a[..., None, :])
        total = arith.rearrange(
            arith.matmul(row, arith.lift(np.ones((n, 1)))), lambda a: a[..., 0, 0]
        )
    return arith.rearrange(total, lambda a: np.broadcast_to(a, kept_shape).reshape(target))


def _entry(i: int) -> Move:
    """The layout change that takes entry ``i`` of the last axis."""

    def take(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return a[..., i]

    return take


def _kv_heads(
    arith: Arithmetic[Any], x: Any, full: tuple[int, ...], hkv: int, target: tuple[int, ...]
) -> Any:
    """A gradient over the repeated heads ``(..., Hq, S, W)`` summed over each group of
    ``G = Hq / Hkv`` query heads, then to the input's shape ``target``."""
    hq = full[-3]
    groups = hq // hkv
    if groups > 1:
        grouped = (*full[:-3], hkv, groups, *full[-2:])
        x = arith.rearrange(x, lambda a: np.broadcast_to(a, full).reshape(grouped))
        x = _summed(arith, x, grouped, (*full[:-3], hkv, 1, *full[-2:]))
        full = (*full[:-3], hkv, *full[-2:])
        x = arith.rearrange(x, lambda a: a.reshape(full))
    return _summed(arith, x, full, target)


def _into_rows(out: Any, part: Any, start: int, n_q: int, shape: tuple[int, ...]) -> Any:
    """Write the block's rows ``part`` (results) into ``out`` (allocated at the first
    block, in ``shape``, with its dtype); the one block itself when it holds every row."""
    part = np.asarray(part)
    if start == 0 and part.shape[-2] == n_q:
        return part
    if out is None:
        out = np.empty(shape, dtype=part.dtype)
    out[..., start : start + part.shape[-2], :] = part
    return out
