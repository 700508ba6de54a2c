r"""Correct attention kernels, written the way kernel authors write them.

Each takes what a target of ``attnspec check`` takes: ``q (B, Hq, L, E)``, ``k (B, Hkv, S,
E)``, ``v (B, Hkv, S, E)`` and the keyword options of :func:`attnspec.sdpa` in their full
forms (``mask`` and ``bias`` of shape ``(B, Hq, L, S)``, ``alibi_slopes`` and ``sinks`` of
shape ``(Hq,)``), and computes, for query :math:`i`, key :math:`j`, head :math:`h`

.. math::

    z_{ij} = \mathrm{cap}(\tau\, q_i \cdot k_j) + b_{ij} - m_h |i + o - j|, \qquad
    \ell_i = \log\Bigl(\sum_{j\ \mathrm{visible}} e^{z_{ij}} + e^{\sigma_h}\Bigr), \qquad
    o_i = \sum_{j\ \mathrm{visible}} e^{z_{ij} - \ell_i} \frac{\kappa_{ij}}{1 - p} v_j,

with :math:`\mathrm{cap}(s) = c\tanh(s/c)` under ``softcap``, the offset :math:`o = S - L`
for ``align="bottom_right"`` and 0 otherwise, query head :math:`h` reading kv head
:math:`\lfloor h / G \rfloor`, a row with nothing visible giving :math:`o_i = 0`,
:math:`\ell_i = -\infty`, and whatever sits at a hidden position never reaching the
output. They are written from this text, independently of :mod:`attnspec.reference`
(no import from it).

Kernels (each declares ``attnspec_features`` and ``attnspec_dtype``):

* :func:`naive_float32`: numpy, every step in float32;
* :func:`naive_float16`: inputs cast to float16, each step computed in float32 and stored
  back in float16 (a mixed-precision kernel with float32 accumulation);
* :func:`online_float32`: blocked over keys in blocks of :data:`BLOCK` = 64 with the
  running maximum, sum and output of FlashAttention-2 (Dao 2023, Alg. 1: the division
  by the row sum last), in float32;
* :func:`loop_float64`: plain Python loops over float64 numbers (small sizes only: it
  is :math:`O(B H L S E)` Python operations);
* :func:`naive_float64` with :func:`naive_float64_backward`: numpy float64, the gradients
  by their closed forms (``attnspec_backward``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "ALL_FEATURES",
    "BLOCK",
    "KERNELS",
    "Gradients",
    "declare",
    "loop_float64",
    "naive_float16",
    "naive_float32",
    "naive_float64",
    "naive_float64_backward",
    "online_float32",
]

Arr = npt.NDArray[Any]
F = TypeVar("F", bound=Callable[..., Any])

#: every feature a target may declare (issue 10's list, in the vocabulary of
#: attnspec.spec.conformance.KERNEL_FEATURES, where "mask" covers bool masks and additive
#: biases both: there is no separate "bias")
ALL_FEATURES = frozenset(
    {"mask", "causal", "window", "gqa", "softcap", "alibi", "sinks", "dropout", "lse", "backward"}
)
#: the forward features every kernel here implements
FORWARD = ALL_FEATURES - {"backward"}
#: the key block of :func:`online_float32`
BLOCK = 64


def declare(
    features: frozenset[str], dtype: str, backward: Callable[..., Any] | None = None
) -> Callable[[F], F]:
    """Attach ``attnspec_features``, ``attnspec_dtype`` (and ``attnspec_backward``)."""
    unknown = features - ALL_FEATURES
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(ALL_FEATURES)}")

    def mark(fn: F) -> F:
        fn.attnspec_features = features  # type: ignore[attr-defined]
        fn.attnspec_dtype = dtype  # type: ignore[attr-defined]
        if backward is not None:
            fn.attnspec_backward = backward  # type: ignore[attr-defined]
        return fn

    return mark


# -- shared pieces (each kernel author writes these) -----------------------------------


def offset_of(n_q: int, n_k: int, align: str | None) -> int:
    """The alignment offset o: query i sits at key position i + o."""
    if align is None:
        if n_q != n_k:
            raise ValueError(f"align is needed when L={n_q} != S={n_k}")
        return 0
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"align must be 'top_left' or 'bottom_right', got {align!r}")
    return 0 if align == "top_left" else n_k - n_q


def needs_offset(opts: dict[str, Any]) -> bool:
    return (
        bool(opts.get("causal"))
        or opts.get("window") is not None
        or (opts.get("alibi_slopes") is not None)
    )


def rel_pos(n_q: int, n_k: int, o: int) -> npt.NDArray[np.int64]:
    """j - (i + o), shape (L, S)."""
    return np.arange(n_k)[None, :] - (np.arange(n_q)[:, None] + o)


def visibility(shape: tuple[int, ...], opts: dict[str, Any]) -> npt.NDArray[np.bool_]:
    """(B, Hq, L, S): True where key j is visible to query i (mask, a bias of -inf,
    causal, window)."""
    n_q, n_k = shape[-2], shape[-1]
    seen = np.ones(shape, dtype=bool)
    if opts.get("mask") is not None:
        seen = seen & np.broadcast_to(np.asarray(opts["mask"], dtype=bool), shape)
    if opts.get("bias") is not None:  # a bias of -inf hides its key, whatever q.k holds
        seen = seen & np.broadcast_to(np.asarray(opts["bias"], dtype=np.float64) != -np.inf, shape)
    if opts.get("causal") or opts.get("window") is not None:
        rel = rel_pos(n_q, n_k, offset_of(n_q, n_k, opts.get("align")))
        if opts.get("causal"):
            seen = seen & (rel <= 0)
        if opts.get("window") is not None:
            left, right = opts["window"]
            if left is not None:
                seen = seen & (rel >= -left)
            if right is not None:
                seen = seen & (rel <= right)
    return seen


def weighted_values(p: Arr, carry: npt.NDArray[np.bool_], v: Arr) -> Arr:
    """``p @ v`` where only keys with ``carry`` (visible and kept) contribute: a NaN or
    inf value at another key must not leak through 0 * NaN. Same dtype as ``p``."""
    finite = np.isfinite(v)
    if finite.all():
        return np.asarray(p @ v)
    out = np.asarray(p @ np.where(finite, v, 0).astype(v.dtype))
    w = carry.astype(np.float64)
    n_nan = w @ np.isnan(v)
    n_pos = w @ (v == np.inf)
    n_neg = w @ (v == -np.inf)
    patch = np.where(
        (n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), np.nan, np.where(n_pos > 0, np.inf, -np.inf)
    )
    touched = (n_nan > 0) | (n_pos > 0) | (n_neg > 0)
    return np.where(touched, patch, out).astype(p.dtype)


def _heads(k: Arr, v: Arr, hq: int) -> tuple[Arr, Arr]:
    """Each query head h reads kv head h // G."""
    g = hq // k.shape[-3]
    return np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3)


def _sum_groups(x: Arr, hkv: int) -> Arr:
    """(B, Hq, ...) -> (B, Hkv, ...): the sum over each group of G query heads."""
    b, hq = x.shape[0], x.shape[1]
    return np.asarray(x.reshape(b, hkv, hq // hkv, *x.shape[2:]).sum(axis=2))


# -- numpy kernels -----------------------------------------------------------------------


def _naive(q: Any, k: Any, v: Any, store: Any, opts: dict[str, Any], return_lse: bool) -> Any:
    """The materialised kernel: every value stored in ``store`` (a numpy dtype), every
    operation computed in float32 (float64 when ``store`` is float64)."""
    work = np.float64 if store == np.float64 else np.float32

    def st(x: Any) -> Arr:
        return np.asarray(np.asarray(x, dtype=work).astype(store), dtype=work)

    q_, k_, v_ = st(q), st(k), st(v)
    hq, n_q, width = q_.shape[-3:]
    n_k = k_.shape[-2]
    k_, v_ = _heads(k_, v_, hq)
    scale = opts.get("scale")
    tau = st(1 / math.sqrt(width) if scale is None else scale)
    shape = (*q_.shape[:-1], n_k)
    with np.errstate(all="ignore"):
        s = st(st(q_ @ np.swapaxes(k_, -1, -2)) * tau)
        if opts.get("softcap") is not None:
            c = st(opts["softcap"])
            s = st(c * st(np.tanh(st(s / c))))
        if opts.get("bias") is not None:
            s = st(s + st(np.broadcast_to(opts["bias"], shape)))
        if opts.get("alibi_slopes") is not None:
            o = offset_of(n_q, n_k, opts.get("align"))
            dist = st(np.abs(rel_pos(n_q, n_k, o)))
            slopes = st(opts["alibi_slopes"])[:, None, None]
            s = st(s - st(slopes * dist))
        seen = visibility(shape, opts) & (s != -np.inf)
        s = np.where(seen, s, -np.inf)
        if opts.get("sinks") is not None:
            sig = np.broadcast_to(st(opts["sinks"])[:, None, None], (*shape[:-1], 1))
            s = np.concatenate([s, sig], axis=-1)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(m == -np.inf, work(0), m)
        e = np.where(s == -np.inf, work(0), st(np.exp(st(s - m))))
        total = e.sum(axis=-1, keepdims=True, dtype=work)
        p = np.where(total == 0, work(0), st(e / total))[..., :n_k]
        lse = np.where(total == 0, -np.inf, m + np.log(total))[..., 0].astype(work)
        carry = seen
        if opts.get("dropout_mask") is not None:
            keep = np.broadcast_to(np.asarray(opts["dropout_mask"], dtype=bool), shape)
            p = st(st(p * keep) * st(1 / (1 - float(opts.get("dropout_p", 0.0)))))
            carry = seen & keep
        out = st(weighted_values(p, carry, v_)).astype(store)
    return (out, lse) if return_lse else out


@declare(FORWARD, "float32")
def naive_float32(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
    """Attention in numpy float32: logits, max-shifted softmax, weights and ``P V``."""
    return _naive(q, k, v, np.float32, opts, return_lse)


@declare(FORWARD, "float16")
def naive_float16(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
    """Attention in float16 storage: inputs cast to float16, each operation in float32
    and stored back in float16; the dot products, the row sums and ``P V`` accumulate
    in float32. The lse is float32."""
    return _naive(q, k, v, np.float16, opts, return_lse)


@declare(FORWARD, "float32")
def online_float32(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
    r"""FlashAttention-2's recurrence in float32 over blocks of :data:`BLOCK` keys: for
    each block, :math:`m' = \max(m, \max_j s_j)`, :math:`\ell \leftarrow \ell e^{m - m'} +
    \sum_j e^{s_j - m'}`, :math:`O \leftarrow O e^{m - m'} + e^{s - m'} V`; the output is
    :math:`O / \ell` at the end, the lse :math:`m + \log\ell`; the sink is a last block
    of one key with value 0."""
    f32 = np.float32
    q_, k_, v_ = (np.asarray(x, dtype=f32) for x in (q, k, v))
    hq, n_q, width = q_.shape[-3:]
    n_k = k_.shape[-2]
    k_, v_ = _heads(k_, v_, hq)
    scale = opts.get("scale")
    tau = f32(1 / math.sqrt(width) if scale is None else scale)
    shape = (*q_.shape[:-1], n_k)
    seen_all = visibility(shape, opts)
    bias = None if opts.get("bias") is None else np.broadcast_to(opts["bias"], shape).astype(f32)
    keep = None
    if opts.get("dropout_mask") is not None:
        keep = np.broadcast_to(np.asarray(opts["dropout_mask"], dtype=bool), shape)
    r_drop = f32(1 / (1 - float(opts.get("dropout_p", 0.0))))
    dist = None
    if opts.get("alibi_slopes") is not None:
        o = offset_of(n_q, n_k, opts.get("align"))
        dist = np.abs(rel_pos(n_q, n_k, o)).astype(f32)
        slopes = np.asarray(opts["alibi_slopes"], dtype=f32)[:, None, None]
    m = np.full((*q_.shape[:-1], 1), -np.inf, dtype=f32)
    total = np.zeros_like(m)
    acc = np.zeros((*q_.shape[:-1], v_.shape[-1]), dtype=f32)

    def step(s: Arr, vb: Arr, carry: npt.NDArray[np.bool_], kb: Arr | None) -> None:
        nonlocal m, total, acc
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        safe = np.where(m_new == -np.inf, f32(0), m_new)
        alpha = np.exp(m - safe)  # 0 while nothing was seen
        p = np.where(s == -np.inf, f32(0), np.exp(s - safe))
        total = total * alpha + p.sum(axis=-1, keepdims=True, dtype=f32)
        if kb is not None:
            p = p * kb * r_drop
            carry = carry & kb
        acc = acc * alpha + weighted_values(p.astype(f32), carry, vb)
        m = m_new

    with np.errstate(all="ignore"):
        for start in range(0, n_k, BLOCK):
            stop = min(n_k, start + BLOCK)
            s = (q_ @ np.swapaxes(k_[..., start:stop, :], -1, -2)) * tau
            if opts.get("softcap") is not None:
                c = f32(opts["softcap"])
                s = c * np.tanh(s / c)
            if bias is not None:
                s = s + bias[..., start:stop]
            if dist is not None:
                s = s - slopes * dist[:, start:stop]
            seen = seen_all[..., start:stop] & (s != -np.inf)
            s = np.where(seen, s, -np.inf).astype(f32)
            step(s, v_[..., start:stop, :], seen, None if keep is None else keep[..., start:stop])
        if opts.get("sinks") is not None:
            sig = np.broadcast_to(np.asarray(opts["sinks"], dtype=f32)[:, None, None], m.shape)
            zero = np.zeros((*v_.shape[:-2], 1, v_.shape[-1]), dtype=f32)
            step(sig.astype(f32), zero, np.ones(m.shape, dtype=bool), None)
        out = np.where(total == 0, f32(0), acc / total).astype(f32)
        lse = np.where(total == 0, -np.inf, m + np.log(total))[..., 0].astype(f32)
    return (out, lse) if return_lse else out


@declare(FORWARD, "float64")
def loop_float64(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
    """Attention in plain Python: loops over batch, head, query and key, float64 numbers
    (Python floats), hidden keys skipped. :math:`O(BHLSE)` Python operations: small
    sizes only."""
    q_ = np.asarray(q, dtype=np.float64)
    k_ = np.asarray(k, dtype=np.float64)
    v_ = np.asarray(v, dtype=np.float64)
    n_b, hq, n_q, width = q_.shape
    hkv, n_k, width_v = k_.shape[1], k_.shape[2], v_.shape[3]
    group = hq // hkv
    scale = opts.get("scale")
    tau = 1 / math.sqrt(width) if scale is None else float(scale)
    shape = (n_b, hq, n_q, n_k)
    seen = visibility(shape, opts).tolist()
    bias = None if opts.get("bias") is None else np.broadcast_to(opts["bias"], shape).tolist()
    keep = None
    if opts.get("dropout_mask") is not None:
        keep = np.broadcast_to(np.asarray(opts["dropout_mask"], dtype=bool), shape).tolist()
    r_drop = 1 / (1 - float(opts.get("dropout_p", 0.0)))
    softcap = None if opts.get("softcap") is None else float(opts["softcap"])
    slopes = None if opts.get("alibi_slopes") is None else np.asarray(opts["alibi_slopes"]).tolist()
    sinks = None if opts.get("sinks") is None else np.asarray(opts["sinks"]).tolist()
    o = offset_of(n_q, n_k, opts.get("align")) if needs_offset(opts) else 0
    ql, kl, vl = q_.tolist(), k_.tolist(), v_.tolist()
    out = [[[[0.0] * width_v for _ in range(n_q)] for _ in range(hq)] for _ in range(n_b)]
    lse = [[[-math.inf] * n_q for _ in range(hq)] for _ in range(n_b)]
    for b in range(n_b):
        for h in range(hq):
            kv = h // group
            for i in range(n_q):
                logit: dict[int, float] = {}
                for j in range(n_k):
                    if not seen[b][h][i][j]:
                        continue
                    s = tau * sum(a * c for a, c in zip(ql[b][h][i], kl[b][kv][j], strict=True))
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if bias is not None:
                        s += bias[b][h][i][j]
                    if slopes is not None:
                        s -= slopes[h] * abs(i + o - j)
                    if s != -math.inf:
                        logit[j] = s
                terms = list(logit.values())
                if sinks is not None:
                    terms.append(sinks[h])
                if not terms:
                    continue
                top = max(terms)
                total = 0.0
                for t in terms:
                    total += math.exp(t - top)
                lse[b][h][i] = top + math.log(total)
                row = out[b][h][i]
                for j, s in logit.items():
                    w = math.exp(s - top) / total
                    if keep is not None:
                        if not keep[b][h][i][j]:
                            continue
                        w *= r_drop
                    for e in range(width_v):
                        row[e] += w * vl[b][kv][j][e]
    out_a, lse_a = np.array(out, dtype=np.float64), np.array(lse, dtype=np.float64)
    return (out_a, lse_a) if return_lse else out_a


# -- float64 with a backward -----------------------------------------------------------


class Gradients(NamedTuple):
    """(dq, dk, dv, dbias, dsinks), as :func:`attnspec.sdpa_backward` returns them."""

    dq: Arr
    dk: Arr
    dv: Arr
    dbias: Arr | None = None
    dsinks: Arr | None = None


def _nonfinite_to_zero(x: Arr) -> Arr:
    return np.where(np.isfinite(x), x, 0.0)


def naive_float64_backward(
    q: Any, k: Any, v: Any, dout: Any, *, dlse: Any = None, **opts: Any
) -> Gradients:
    r"""The gradients of attention by their closed forms, in numpy float64 (per head;
    :math:`P` the weights before dropout, :math:`\tilde P = P \kappa r` after it, :math:`O
    = \tilde P V`): :math:`dV = \tilde P^\top dO`; :math:`dP = (dO V^\top) \kappa r`;
    :math:`D_i = \sum_e dO_{ie} O_{ie}`; :math:`dZ = P (dP - D + d\ell)` (= dbias);
    :math:`d\sigma_h = -\sum_i P_{i,\mathrm{sink}}(D_i - d\ell_i)`; :math:`dS = dZ (1 -
    (t/c)^2)` with the softcap, else :math:`dZ`; :math:`dQ = \tau\, dS K`, :math:`dK =
    \tau\, dS^\top Q`; kv gradients summed over each group of query heads."""
    f64 = np.float64
    q_, k_, v_ = (np.asarray(x, dtype=f64) for x in (q, k, v))
    do = np.asarray(dout, dtype=f64)
    hq, n_q, width = q_.shape[-3:]
    hkv, n_k = k_.shape[-3], k_.shape[-2]
    kr, vr = _heads(k_, v_, hq)
    scale = opts.get("scale")
    tau = 1 / math.sqrt(width) if scale is None else float(scale)
    shape = (*q_.shape[:-1], n_k)
    with np.errstate(all="ignore"):
        s = q_ @ np.swapaxes(kr, -1, -2) * tau
        t = None
        if opts.get("softcap") is not None:
            c = float(opts["softcap"])
            s = t = c * np.tanh(s / c)
        if opts.get("bias") is not None:
            s = s + np.broadcast_to(np.asarray(opts["bias"], dtype=f64), shape)
        if opts.get("alibi_slopes") is not None:
            o = offset_of(n_q, n_k, opts.get("align"))
            slopes = np.asarray(opts["alibi_slopes"], dtype=f64)[:, None, None]
            s = s - slopes * np.abs(rel_pos(n_q, n_k, o))
        seen = visibility(shape, opts) & (s != -np.inf)
        s = np.where(seen, s, -np.inf)
        cols = s
        if opts.get("sinks") is not None:
            sig = np.broadcast_to(
                np.asarray(opts["sinks"], dtype=f64)[:, None, None], (*shape[:-1], 1)
            )
            cols = np.concatenate([s, sig], axis=-1)
        m = cols.max(axis=-1, keepdims=True)
        m = np.where(m == -np.inf, 0.0, m)
        e = np.where(cols == -np.inf, 0.0, np.exp(cols - m))
        total = e.sum(axis=-1, keepdims=True)
        pall = np.where(total == 0, 0.0, e / total)
        p = pall[..., :n_k]
        kappa = np.ones(shape)
        if opts.get("dropout_mask") is not None:
            kappa = np.broadcast_to(np.asarray(opts["dropout_mask"], dtype=f64), shape)
        r = 1 / (1 - float(opts.get("dropout_p", 0.0)))
        pd = p * kappa * r
        carry = seen & (kappa > 0)
        out = weighted_values(pd, carry, vr)
        dv = _sum_groups(np.swapaxes(pd, -1, -2) @ do, hkv)
        dp = np.where(carry, do @ np.swapaxes(_nonfinite_to_zero(vr), -1, -2), 0.0) * kappa * r
        big_d = np.sum(do * np.where(np.isfinite(out), out, 0.0), axis=-1, keepdims=True)
        g_lse = 0.0 if dlse is None else np.asarray(dlse, dtype=f64)[..., None]
        dz = np.where(seen, p * (dp - big_d + g_lse), 0.0)
        dsinks = None
        if opts.get("sinks") is not None:
            p_sink = pall[..., n_k:]
            dsinks = np.sum(-p_sink * (big_d - g_lse), axis=(0, 2, 3))
        ds = dz if t is None else dz * (1 - (t / float(opts["softcap"])) ** 2)
        ds = np.where(seen, ds, 0.0)
        dq = tau * (ds @ _nonfinite_to_zero(kr))
        dk = _sum_groups(tau * (np.swapaxes(ds, -1, -2) @ _nonfinite_to_zero(q_)), hkv)
        dbias = None if opts.get("bias") is None else dz
    return Gradients(dq, dk, dv, dbias, dsinks)


@declare(ALL_FEATURES, "float64", backward=naive_float64_backward)
def naive_float64(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
    """Attention in numpy float64 (the materialised kernel); its gradients are
    :func:`naive_float64_backward` (``attnspec_backward``)."""
    return _naive(q, k, v, np.float64, opts, return_lse)


#: the correct kernels by name
KERNELS: dict[str, Any] = {
    "naive_float32": naive_float32,
    "naive_float16": naive_float16,
    "online_float32": online_float32,
    "loop_float64": loop_float64,
    "naive_float64": naive_float64,
}
