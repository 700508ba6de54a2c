r"""Single-bug attention kernels: each a copy of a kernel of :mod:`.correct` with one bug.

The bugs are the kinds in shared/notes/kernel-tests.md ("Bugs that a conformance oracle
must catch", real reports): the scale, the softmax axis, the max-shift, causal diagonals
and alignments, masks, NaN leaks, empty rows, the GQA mapping, windows, softcap order,
ALiBi, sinks, dropout rescaling, the lse's base and scale, low-precision accumulation,
split-KV merges, tile boundaries and gradients with a missing term.

Each kernel declares the features and dtype of the kernel it was copied from (so a
harness tests it on everything the correct kernel takes) and carries
``attnspec_witness``: a function that returns the smallest valid input on which it is
wrong, a :class:`Witness`, as its docstring states. :data:`BUGS` lists them by name.

The copies are written once as cores with a ``bug`` switch (:func:`_naive`,
:func:`_online`, :func:`_backward`): with ``bug=None`` each is the correct kernel of
:mod:`.correct` (tests/test_conformance_power.py checks that too), and each kernel below
turns on exactly one switch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .correct import (
    ALL_FEATURES,
    BLOCK,
    FORWARD,
    Gradients,
    _heads,
    _sum_groups,
    naive_float64,
    offset_of,
    rel_pos,
    visibility,
    weighted_values,
)

__all__ = ["BUGS", "Witness", "witness"]

Arr = npt.NDArray[Any]


@dataclass(frozen=True)
class Witness:
    """An input: q, k, v (4-D), the options in full form, and for a gradient bug the
    upstream gradient ``dout`` (and ``dlse``)."""

    q: Arr
    k: Arr
    v: Arr
    opts: dict[str, Any] = field(default_factory=dict)
    dout: Arr | None = None
    dlse: Arr | None = None


def witness(
    n_q: int,
    n_k: int,
    width: int,
    *,
    hq: int = 1,
    hkv: int = 1,
    seed: int = 0,
    q: Any = None,
    k: Any = None,
    v: Any = None,
    grad: bool = False,
    **opts: Any,
) -> Witness:
    """A witness of shape (1, hq, n_q, width) etc.: given values (reshaped) or standard
    normal ones from ``seed``, rounded to float16 (every kernel's dtype holds them);
    ``mask``, ``bias``, ``dropout_mask`` broadcast to (1, hq, n_q, n_k), ``sinks`` and
    ``alibi_slopes`` to (hq,)."""
    rng = np.random.default_rng(seed)

    def arr(x: Any, shape: tuple[int, ...]) -> Arr:
        if x is None:
            a = rng.standard_normal(shape)
        else:
            a = np.asarray(x, dtype=np.float64)
            a = a.reshape(shape) if a.size == math.prod(shape) else np.broadcast_to(a, shape)
        return np.asarray(a.astype(np.float16), dtype=np.float64)

    qq = arr(q, (1, hq, n_q, width))
    kk = arr(k, (1, hkv, n_k, width))
    vv = arr(v, (1, hkv, n_k, width))
    full = (1, hq, n_q, n_k)
    for name in ("mask", "dropout_mask"):
        if opts.get(name) is not None:
            opts[name] = np.broadcast_to(np.asarray(opts[name], dtype=bool), full).copy()
    if opts.get("bias") is not None:
        opts["bias"] = np.broadcast_to(np.asarray(opts["bias"], dtype=np.float64), full).copy()
    for name in ("sinks", "alibi_slopes"):
        if opts.get(name) is not None:
            opts[name] = np.broadcast_to(np.asarray(opts[name], dtype=np.float64), (hq,)).copy()
    dout = None
    if grad:
        dout = np.asarray(rng.standard_normal((1, hq, n_q, width)).astype(np.float16), np.float64)
    return Witness(qq, kk, vv, opts, dout)


# -- the cores: copies of the correct kernels with a bug switch ---------------------------


def _naive(
    q: Any, k: Any, v: Any, bug: str | None, store: Any, opts: dict[str, Any], return_lse: bool
) -> Any:
    """:func:`.correct._naive` with ``bug`` switched on."""
    work = np.float64 if store == np.float64 else np.float32

    def st(x: Any) -> Arr:
        return np.asarray(np.asarray(x, dtype=work).astype(store), dtype=work)

    q_, k_, v_ = st(q), st(k), st(v)
    hq, n_q, width = q_.shape[-3:]
    n_k = k_.shape[-2]
    if bug == "gqa_modulo":  # query head h reads kv head h % Hkv
        heads = np.arange(hq) % k_.shape[-3]
        k_, v_ = k_[..., heads, :, :], v_[..., heads, :, :]
    else:
        k_, v_ = _heads(k_, v_, hq)
    scale = opts.get("scale")
    tau_v = 1 / math.sqrt(width) if scale is None else scale
    if bug == "scale_one_over_e":
        tau_v = 1 / width if scale is None else scale
    if bug == "scale_missing":
        tau_v = 1.0
    tau = st(tau_v)
    shape = (*q_.shape[:-1], n_k)
    vis_opts = dict(opts)
    if bug == "causal_alignment_swapped" and opts.get("align") is not None:
        vis_opts["align"] = "top_left" if opts["align"] == "bottom_right" else "bottom_right"
    if bug == "inverted_mask" and opts.get("mask") is not None:
        vis_opts["mask"] = ~np.asarray(opts["mask"], dtype=bool)
    with np.errstate(all="ignore"):
        raw = st(q_ @ np.swapaxes(k_, -1, -2))
        s = st(raw * tau)
        softcap = opts.get("softcap")
        if softcap is not None and bug not in ("softcap_dropped", "softcap_after_bias"):
            c = st(softcap)
            s = st(c * st(np.tanh(st(s / c))))
        if opts.get("bias") is not None:
            s = st(s + st(np.broadcast_to(opts["bias"], shape)))
        if softcap is not None and bug == "softcap_after_bias":
            c = st(softcap)
            s = st(c * st(np.tanh(st(s / c))))
        if opts.get("alibi_slopes") is not None:
            o = offset_of(n_q, n_k, opts.get("align"))
            if bug == "alibi_offset":
                o = 0
            dist = st(np.abs(rel_pos(n_q, n_k, o)))
            slopes = st(opts["alibi_slopes"])[:, None, None]
            s = st(s + st(slopes * dist)) if bug == "alibi_sign" else st(s - st(slopes * dist))
        seen = visibility(shape, vis_opts) & (s != -np.inf)
        if bug == "causal_diagonal_off_by_one" and opts.get("causal"):
            rel = rel_pos(n_q, n_k, offset_of(n_q, n_k, opts.get("align")))
            seen = seen | (rel == 1)
            if opts.get("mask") is not None:
                seen = seen & np.asarray(opts["mask"], dtype=bool)
        if bug == "window_off_by_one" and opts.get("window") is not None:
            left = opts["window"][0]
            if left is not None:
                rel = rel_pos(n_q, n_k, offset_of(n_q, n_k, opts.get("align")))
                others = visibility(shape, {**opts, "window": (None, opts["window"][1])})
                seen = seen | (others & (rel == -left - 1))
        fill = np.finfo(work).min if bug == "empty_row_mean" else -np.inf
        s = np.where(seen, s, fill) if bug != "mask_after_softmax" else s
        if bug == "nan_logit_hidden":
            s = np.where(np.isnan(s), -np.inf, s)
        sinks = opts.get("sinks")
        if sinks is not None:
            sig = np.broadcast_to(st(sinks)[:, None, None], (*shape[:-1], 1))
            s = np.concatenate([s, sig], axis=-1)
            if bug == "sink_counted_twice":
                s = np.concatenate([s, sig], axis=-1)
        if bug in ("no_max_shift_float16", "no_max_shift_float32"):
            m = np.zeros((*s.shape[:-1], 1), dtype=work)
        else:
            m = s.max(axis=-1, keepdims=True)
            if bug != "empty_row_nan":
                m = np.where(m == -np.inf, work(0), m)
        if bug == "empty_row_nan":
            e = st(np.exp(st(s - m)))
        else:
            e = np.where(s == -np.inf, work(0), st(np.exp(st(s - m))))
        if bug == "accumulate_float16":  # the row sum in float16, key after key
            total = np.zeros((*e.shape[:-1], 1), dtype=np.float16)
            for j in range(e.shape[-1]):
                total = (total + e[..., j : j + 1].astype(np.float16)).astype(np.float16)
            total = total.astype(work)
        else:
            total = e.sum(axis=-1, keepdims=True, dtype=work)
        if bug == "softmax_over_queries":
            e_keys = e[..., :n_k]
            col = e_keys.sum(axis=-2, keepdims=True, dtype=work)
            p = np.where(col > 0, st(e_keys / col), work(0))
        elif bug == "empty_row_nan":
            p = st(e / total)[..., :n_k]
        else:
            p = np.where(total == 0, work(0), st(e / total))[..., :n_k]
        p_sink = np.where(total == 0, work(0), e / total)[..., n_k : n_k + 1]
        lse = np.where(total == 0, -np.inf, m + np.log(total))[..., 0].astype(work)
        if bug == "empty_row_nan":
            lse = (m + np.log(total))[..., 0].astype(work)
        if bug == "lse_base2":
            lse = np.multiply(lse, math.log2(math.e), dtype=work)
        if bug == "lse_unscaled":  # the running maximum kept in units of q.k
            lse = np.where(total == 0, -np.inf, m / tau + np.log(total))[..., 0].astype(work)
        if bug == "mask_after_softmax":
            p = np.where(seen, p, work(0))
        carry = seen
        if opts.get("dropout_mask") is not None:
            keep = np.broadcast_to(np.asarray(opts["dropout_mask"], dtype=bool), shape)
            keep_p = 1 - float(opts.get("dropout_p", 0.0))
            factor = {"dropout_not_rescaled": 1.0, "dropout_rescaled_twice": keep_p**-2}.get(
                bug or "", 1 / keep_p
            )
            p = st(st(p * keep) * st(factor))
            carry = seen & keep
        if bug == "nan_leak_hidden_values":
            out = p @ v_
        elif bug == "accumulate_float16":  # P V in float16, key after key
            acc = np.zeros((*p.shape[:-1], v_.shape[-1]), dtype=np.float16)
            p16, v16 = p.astype(np.float16), v_.astype(np.float16)
            for j in range(n_k):
                acc = (acc + p16[..., j : j + 1] * v16[..., None, j, :]).astype(np.float16)
            out = acc.astype(work)
        else:
            out = weighted_values(p, carry, v_)
        if bug == "sink_added_to_output" and sinks is not None:
            out = out + p_sink
        out = st(out).astype(store)
    return (out, lse) if return_lse else out


def _online(q: Any, k: Any, v: Any, bug: str | None, opts: dict[str, Any], return_lse: bool) -> Any:
    """:func:`.correct.online_float32` with ``bug`` switched on."""
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
    if bug == "running_max_from_zero":
        m = np.zeros_like(m)
    total = np.zeros_like(m)
    acc = np.zeros((*q_.shape[:-1], v_.shape[-1]), dtype=f32)
    first = [True]

    def step(s: Arr, vb: Arr, carry: npt.NDArray[np.bool_], kb: Arr | None) -> None:
        nonlocal m, total, acc
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        if bug == "running_max_not_updated" and not first[0]:
            m_new = np.where(m == -np.inf, m_new, m)  # kept from the first block
        first[0] = False
        safe = np.where(m_new == -np.inf, f32(0), m_new)
        alpha = np.exp(m - safe)
        p = np.where(s == -np.inf, f32(0), np.exp(s - safe))
        total = total * alpha + p.sum(axis=-1, keepdims=True, dtype=f32)
        if kb is not None:
            p = p * kb * r_drop
            carry = carry & kb
        scaled = acc if bug == "running_output_not_rescaled" else acc * alpha
        acc = scaled + weighted_values(p.astype(f32), carry, vb)
        m = m_new

    starts = list(range(0, n_k, BLOCK))
    if bug == "last_partial_tile_dropped" and len(starts) > 1 and n_k % BLOCK:
        starts = starts[:-1]
    with np.errstate(all="ignore"):
        for start in starts:
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


def _split_average(q: Any, k: Any, v: Any, opts: dict[str, Any], return_lse: bool) -> Any:
    """Split-KV (FlashDecoding): the keys in two halves, each half's output by the
    correct float32 kernel, and the partial outputs merged by their plain mean instead
    of weighting them by :math:`e^{\\ell_a - \\ell}` (the lse merge is right)."""
    n_k = np.shape(k)[-2]
    if n_k < 2:
        return _naive(q, k, v, None, np.float32, opts, return_lse)
    half = (n_k + 1) // 2
    parts = []
    for sl in (slice(0, half), slice(half, n_k)):
        sub = dict(opts)
        for name in ("mask", "bias", "dropout_mask"):
            if sub.get(name) is not None:
                sub[name] = np.asarray(sub[name])[..., sl]
        # the alignment offset of the whole problem: key positions keep their index
        parts.append((sl, sub))
    outs, lses = [], []
    for sl, sub in parts:
        o, lse = _split_part(q, k, v, sl, sub)
        outs.append(o)
        lses.append(lse)
    with np.errstate(all="ignore"):
        lse = np.logaddexp(lses[0], lses[1]).astype(np.float32)
        both = np.isfinite(lses[0]) & np.isfinite(lses[1])
        mean = (outs[0] + outs[1]) / 2
        single = np.where(np.isfinite(lses[0])[..., None], outs[0], outs[1])
        out = np.where(both[..., None], mean, single).astype(np.float32)
    return (out, lse) if return_lse else out


def _split_part(q: Any, k: Any, v: Any, sl: slice, sub: dict[str, Any]) -> tuple[Arr, Arr]:
    """One split: the correct kernel on keys ``sl``, with causal, window and ALiBi
    positions of the whole key axis (through a mask and a bias); sinks only in the first
    split."""
    q_ = np.asarray(q)
    n_q, n_k = q_.shape[-2], np.shape(k)[-2]
    shape = (*q_.shape[:-1], n_k)
    full = dict(sub)
    needs = full.get("causal") or full.get("window") is not None
    if needs:
        pos = visibility(shape, {**full, "mask": None})[..., sl]
        full["mask"] = pos if full.get("mask") is None else (np.asarray(full["mask"]) & pos)
        full.pop("causal", None)
        full.pop("window", None)
    if full.get("alibi_slopes") is not None:
        o = offset_of(n_q, n_k, full.get("align"))
        slopes = np.asarray(full.pop("alibi_slopes"), dtype=np.float64)[:, None, None]
        term = -slopes * np.abs(rel_pos(n_q, n_k, o))[..., sl]
        b = full.get("bias")
        full["bias"] = term if b is None else np.asarray(b) + term
    full.pop("align", None)
    if sl.start:
        full.pop("sinks", None)
    out, lse = _naive(
        q, np.asarray(k)[..., sl, :], np.asarray(v)[..., sl, :], None, np.float32, full, True
    )
    return np.asarray(out, dtype=np.float32), np.asarray(lse, dtype=np.float32)


def _backward(
    q: Any, k: Any, v: Any, dout: Any, bug: str | None, dlse: Any, opts: dict[str, Any]
) -> Gradients:
    """:func:`.correct.naive_float64_backward` with ``bug`` switched on."""
    f64 = np.float64
    q_, k_, v_ = (np.asarray(x, dtype=f64) for x in (q, k, v))
    do = np.asarray(dout, dtype=f64)
    hq, n_q, width = q_.shape[-3:]
    hkv, n_k = k_.shape[-3], k_.shape[-2]
    kr, vr = _heads(k_, v_, hq)
    scale = opts.get("scale")
    tau = 1 / math.sqrt(width) if scale is None else float(scale)
    shape = (*q_.shape[:-1], n_k)

    def fin(x: Arr) -> Arr:
        return np.where(np.isfinite(x), x, 0.0)

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
        if bug == "bwd_dv_not_transposed":
            dv = _sum_groups(pd @ do, hkv)
        else:
            dv = _sum_groups(np.swapaxes(pd, -1, -2) @ do, hkv)
        dp = np.where(carry, do @ np.swapaxes(fin(vr), -1, -2), 0.0) * kappa * r
        big_d = np.sum(do * fin(out), axis=-1, keepdims=True)
        if bug == "bwd_ds_without_d":
            big_d = np.zeros_like(big_d)
        g_lse = 0.0 if dlse is None else np.asarray(dlse, dtype=f64)[..., None]
        dz = np.where(seen, p * (dp - big_d + g_lse), 0.0)
        dsinks = None
        if opts.get("sinks") is not None:
            dsinks = np.sum(-pall[..., n_k:] * (big_d - g_lse), axis=(0, 2, 3))
        ds = dz
        if t is not None and bug != "bwd_softcap_factor_missing":
            ds = dz * (1 - (t / float(opts["softcap"])) ** 2)
        ds = np.where(seen, ds, 0.0)
        dq = tau * (ds @ fin(kr))
        tau_k = 1.0 if bug == "bwd_dk_without_tau" else tau
        dk = _sum_groups(tau_k * (np.swapaxes(ds, -1, -2) @ fin(q_)), hkv)
        dbias = None if opts.get("bias") is None else dz
    return Gradients(dq, dk, dv, dbias, dsinks)


# -- the buggy kernels ------------------------------------------------------------------

#: name -> kernel
BUGS: dict[str, Any] = {}


def _register(
    core: str,
    make_witness: Callable[[], Witness],
    dtype: str = "float32",
    features: frozenset[str] = FORWARD,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn a stub (its name is the bug, its docstring the description) into a kernel
    that runs ``core`` ("naive", "online", "split", "backward") with that bug."""
    store = {"float32": np.float32, "float16": np.float16, "float64": np.float64}[dtype]

    def make(stub: Callable[..., Any]) -> Callable[..., Any]:
        bug = stub.__name__

        def kernel(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
            if core == "naive":
                return _naive(q, k, v, bug, store, opts, return_lse)
            if core == "online":
                return _online(q, k, v, bug, opts, return_lse)
            if core == "split":
                return _split_average(q, k, v, opts, return_lse)
            return naive_float64(q, k, v, return_lse=return_lse, **opts)

        functools.update_wrapper(kernel, stub)
        kernel.attnspec_features = features  # type: ignore[attr-defined]
        kernel.attnspec_dtype = dtype  # type: ignore[attr-defined]
        kernel.attnspec_witness = make_witness  # type: ignore[attr-defined]
        if core == "backward":

            def backward(
                q: Any, k: Any, v: Any, dout: Any, *, dlse: Any = None, **opts: Any
            ) -> Gradients:
                return _backward(q, k, v, dout, bug, dlse, opts)

            backward.__name__ = backward.__qualname__ = f"{bug}_backward"
            kernel.attnspec_backward = backward  # type: ignore[attr-defined]
        BUGS[bug] = kernel
        return kernel

    return make


W = witness


@_register("naive", lambda: W(1, 2, 2))
def scale_one_over_e() -> None:
    """Scale :math:`1/E` instead of :math:`1/\\sqrt{E}` (the muP-style scale used where the
    standard one was meant). Smallest input: L=1, S=2, E=2 with distinct logits."""


@_register("naive", lambda: W(1, 2, 2))
def scale_missing() -> None:
    """No scale: the logits are :math:`q \\cdot k` (metal-flash-attention#8 applies the
    scale late; here it is forgotten). Smallest input: L=1, S=2, E=2."""


@_register("naive", lambda: W(2, 1, 1))
def softmax_over_queries() -> None:
    """The softmax normalises over the query axis instead of the keys. Smallest input:
    L=2, S=1, E=1 (every weight should be 1)."""


@_register("naive", lambda: W(1, 1, 1, q=4.0, k=4.0), dtype="float16")
def no_max_shift_float16() -> None:
    """No max-shift: :math:`e^{s}` is taken unshifted and overflows float16 at
    :math:`s > 11.09` (pytorch#121558, metal-flash-attention#8: large logits in half
    precision). Smallest input: L=S=E=1, q=k=4 (s = 16: inf/inf = NaN)."""


@_register("naive", lambda: W(1, 1, 1, q=10.0, k=10.0))
def no_max_shift_float32() -> None:
    """No max-shift in float32: overflows at :math:`s > 88.7`. Smallest input: L=S=E=1,
    q=k=10 (s = 100)."""


@_register("naive", lambda: W(2, 2, 1, causal=True))
def causal_diagonal_off_by_one() -> None:
    """Causal sees one key too many (:math:`j \\le i + o + 1`), the kind of off-by-one of
    NVIDIA/cutlass#2336. Smallest input: L=S=2, causal (query 0 sees key 1)."""


@_register("naive", lambda: W(1, 2, 1, causal=True, align="bottom_right"))
def causal_alignment_swapped() -> None:
    """Causal alignment swapped: top-left where bottom-right is asked and the reverse
    (flash-attention#517, #1778; mlx PR #2967). Smallest input: L=1, S=2, causal,
    bottom_right (the one query should see both keys)."""


@_register("naive", lambda: W(1, 2, 1, mask=[True, False]))
def inverted_mask() -> None:
    """The boolean mask read as True = hidden (the additive-mask habit). Smallest input:
    L=1, S=2, mask [True, False]."""


@_register("naive", lambda: W(1, 2, 1, v=[1.0, np.nan], mask=[True, False]))
def nan_leak_hidden_values() -> None:
    """``P @ V`` over every key: a NaN value at a hidden key leaks through 0 * NaN (the
    NaN-poisoned padding of xformers' and cuDNN's tests). Smallest input: L=1, S=2,
    mask [True, False], v = [1, NaN]."""


@_register("naive", lambda: W(1, 1, 1, mask=[[False]]))
def empty_row_nan() -> None:
    """A row with nothing visible gives NaN (exp(-inf - -inf)); the definition gives 0
    and lse -inf (pytorch#103963, #103749, #109517; mlx PR #2608). Smallest input:
    L=S=E=1, mask [[False]]."""


@_register("naive", lambda: W(1, 2, 1, v=[1.0, 3.0], mask=[[False, False]]))
def empty_row_mean() -> None:
    """Hidden logits filled with the dtype's lowest finite value instead of -inf: a row
    with nothing visible gets uniform weights, the mean of V (torch's masked_fill with
    finfo.min). Smallest input: L=1, S=2, mask all False, v = [1, 3] (2, not 0)."""


@_register("naive", lambda: W(1, 2, 1, q=1.0, k=[np.nan, 0.0], v=[1.0, 3.0]))
def nan_logit_hidden() -> None:
    """A NaN logit taken for a hidden one (an fmax-style row maximum, weights built where
    ``s > -inf``): a NaN in a visible key or query disappears instead of reaching the
    output, and the divergence that produced it goes unseen. Smallest input: L=1, S=2,
    E=1, k = [NaN, 0] (NaN, not 3)."""


@_register("naive", lambda: W(1, 1, 1, hq=4, hkv=2, v=[1.0, 2.0]))
def gqa_modulo() -> None:
    """GQA: query head h reads kv head h % Hkv instead of h // G (HipKittens PR #22:
    right only by coincidence). Smallest input: Hq=4, Hkv=2, L=S=E=1 (head 1 reads kv
    head 1, not 0)."""


@_register("naive", lambda: W(2, 2, 1, window=(0, 0)))
def window_off_by_one() -> None:
    """Sliding window one key too wide on the left: (W, 0) attends to W + 2 keys
    (huggingface/transformers#39408, Megatron-Bridge PR #2656). Smallest input: L=S=2,
    window (0, 0) (query 1 sees key 0)."""


@_register("naive", lambda: W(1, 2, 1, q=1.0, k=[0.0, 0.0], bias=[0.0, 2.0], softcap=1.0))
def softcap_after_bias() -> None:
    """Softcap applied after the bias instead of before (flash-attention PR #1025: the
    order against masking and bias). Smallest input: L=1, S=2, softcap 1, bias [0, 2]."""


@_register("naive", lambda: W(1, 2, 1, q=2.0, k=[0.0, 2.0], softcap=1.0))
def softcap_dropped() -> None:
    """Softcap silently ignored (vllm-metal#665, sgl-kernel-xpu PR #491). Smallest input:
    L=1, S=2, softcap 1, logits 0 and 4."""


@_register("naive", lambda: W(1, 2, 1, alibi_slopes=[1.0], align="top_left"))
def alibi_sign() -> None:
    """ALiBi added with the wrong sign (:math:`+m|i + o - j|`). Smallest input: L=1,
    S=2, one slope 1."""


@_register("naive", lambda: W(1, 2, 1, alibi_slopes=[1.0], align="bottom_right"))
def alibi_offset() -> None:
    """ALiBi distances :math:`|i - j|` without the alignment offset. Smallest input:
    L=1, S=2, bottom_right (distances [1, 0], not [0, 1])."""


@_register("naive", lambda: W(1, 1, 1, sinks=[0.0]))
def sink_counted_twice() -> None:
    """The sink's :math:`e^{\\sigma}` counted twice in the normaliser (a sink added per
    split and again at the merge). Smallest input: L=S=E=1, sinks [0]."""


@_register("naive", lambda: W(1, 1, 1, sinks=[0.0]))
def sink_added_to_output() -> None:
    """The sink treated as a key with value 1: its weight added to every output.
    Smallest input: L=S=E=1, sinks [0] (weight 1/2)."""


@_register("naive", lambda: W(1, 1, 1, dropout_p=0.5, dropout_mask=[[True]]))
def dropout_not_rescaled() -> None:
    """Dropout without the :math:`1/(1-p)` rescaling. Smallest input: L=S=E=1,
    dropout_p 0.5, the one key kept."""


@_register("naive", lambda: W(1, 1, 1, dropout_p=0.5, dropout_mask=[[True]]))
def dropout_rescaled_twice() -> None:
    """Dropout rescaled twice (:math:`1/(1-p)^2`). Smallest input: L=S=E=1,
    dropout_p 0.5, the one key kept."""


@_register("naive", lambda: W(1, 1, 1, q=1.0, k=1.0))
def lse_base2() -> None:
    """The lse in base 2 (FlashInfer's convention, FlashAttention's exp2 trick left in).
    Smallest input: L=S=E=1, q=k=1 (lse 1, not 1.4427)."""


@_register("naive", lambda: W(1, 1, 4, q=1.0, k=1.0))
def lse_unscaled() -> None:
    """The lse from a running maximum kept in units of :math:`q \\cdot k`, the scale
    left out of it (:math:`m/\\tau + \\log l`; vllm flash-attention PR #87 returns a
    wrong lse). Smallest input: L=S=1, E=4, q=k=1 (lse 4, not 2)."""


def _many_keys() -> Witness:
    return W(1, 48, 1, q=0.0, k=0.0, v=1.85)


@_register("naive", _many_keys, dtype="float16")
def accumulate_float16() -> None:
    """Row sum and ``P V`` accumulated in float16 key after key (a half-precision
    accumulator where float32 is claimed): each addition rounds to float16. Smallest
    witness found (S in 32..96 by 16, constant values in [0.5, 2]): L=1, S=48, E=1, all
    logits 0, every value 1.85 (the 48 roundings of the running ``P V`` near 1.85, of
    spacing 2**-10, add up to 2.6 times the bound; at S=32 1.3 times)."""


@_register("split", lambda: W(1, 2, 1, q=1.0, k=[0.0, 2.0], v=[0.0, 1.0]))
def split_kv_average() -> None:
    """Split-KV merge that averages the partial outputs instead of weighting them by
    their lse (vllm flash-attention PR #87, FlagGems#5235: merges that get the lse
    wrong). Smallest input: L=1, S=2 (two splits of one key) with distinct logits."""


def _tile_case(last: float) -> Witness:
    """L=1, S=65, E=1: logits 0 in the first tile with values 1, ``last`` at key 64
    with value 0."""
    k = np.zeros(BLOCK + 1)
    k[-1] = last
    v = np.ones(BLOCK + 1)
    v[-1] = 0.0
    return W(1, BLOCK + 1, 1, q=1.0, k=k, v=v)


@_register("online", lambda: _tile_case(1.0))
def last_partial_tile_dropped() -> None:
    """The last partial tile of keys is skipped when S % 64 != 0 (flash-attention
    test_flash_attn_bwd_overflow: keys past the last full tile mishandled). Smallest
    input: L=1, S=65, E=1."""


@_register("online", lambda: _tile_case(100.0))
def running_max_not_updated() -> None:
    """The running maximum kept from the first tile: a later tile's logits are
    exponentiated against a stale maximum and overflow float32 when they exceed it by
    88.7. Smallest input: L=1, S=65, E=1, logits 0 in the first tile and 100 at key 64."""


@_register("online", lambda: W(1, 1, 1, q=-16.0, k=8.0))
def running_max_from_zero() -> None:
    """The running maximum starts at 0 instead of -inf: a row whose logits are all below
    -103 gets weights exp(s - 0) that underflow float32 to 0, and 0/0. Smallest input:
    L=S=E=1, q=-16, k=8 (logit -128: output NaN, not v)."""


@_register("online", lambda: _tile_case(3.0))
def running_output_not_rescaled() -> None:
    """The running output not multiplied by :math:`e^{m_{old} - m_{new}}` when the
    maximum grows at a tile boundary (the row sum is). Smallest input: L=1, S=65, E=1,
    a larger logit in the second tile."""


@_register("naive", lambda: W(1, 2, 1, mask=[True, False]))
def mask_after_softmax() -> None:
    """The mask applied to the weights after a softmax over every key: the weights are
    not renormalised. Smallest input: L=1, S=2, mask [True, False]."""


@_register("backward", lambda: W(1, 2, 1, grad=True), dtype="float64", features=ALL_FEATURES)
def bwd_ds_without_d() -> None:
    """Gradients: :math:`dZ = P\\,dP` without :math:`-D` (the term :math:`D_i =
    \\mathrm{rowsum}(dO \\odot O)` forgotten; TransformerEngine#3216, flash-attention#2896
    give wrong dQ with the forward right). Smallest input: L=1, S=2, E=1."""


@_register("backward", lambda: W(1, 2, 4, grad=True), dtype="float64", features=ALL_FEATURES)
def bwd_dk_without_tau() -> None:
    """Gradients: :math:`dK = dS^\\top Q` without the scale :math:`\\tau`. Smallest
    input: L=1, S=2, E=4 (tau 1/2; with S=1 every dS is 0)."""


@_register("backward", lambda: W(2, 2, 1, grad=True), dtype="float64", features=ALL_FEATURES)
def bwd_dv_not_transposed() -> None:
    """Gradients: :math:`dV = \\tilde P\\,dO` instead of :math:`\\tilde P^\\top dO` (it
    raises when L != S). Smallest input: L=S=2, E=1."""


@_register(
    "backward",
    lambda: W(1, 2, 1, q=2.0, k=[1.0, -1.0], softcap=1.0, grad=True),
    dtype="float64",
    features=ALL_FEATURES,
)
def bwd_softcap_factor_missing() -> None:
    """Gradients: the softcap's factor :math:`1 - (t/c)^2` left out of :math:`dS`.
    Smallest input: L=1, S=2, E=1, softcap 1."""
