r"""PyTorch's ``scaled_dot_product_attention`` (each backend) and FlexAttention as targets.

Features declared: ``mask`` (a bool mask and a bias: torch takes one ``attn_mask``, so a
mask with a bias is sent as the float mask ``bias`` where visible, :math:`-\infty` where
hidden, torch's own conversion of a bool mask), ``causal`` (``is_causal=True`` when the
alignment is top-left or L = S, torch's convention; bottom-right as the explicit mask
``causal_lower_right`` stands for), ``gqa`` (``enable_gqa=True``). No lse, window, softcap,
ALiBi, sinks or keep-mask dropout: SDPA has none of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnspec.spec.conformance import Target

__all__ = ["BACKENDS", "torch_targets"]

#: backend name -> torch.nn.attention.SDPBackend member
BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _tdtype(torch: Any, dtype: str) -> Any:
    return getattr(torch, dtype)


def _to_torch(torch: Any, a: Any, device: str) -> Any:
    arr = np.asarray(a)
    if arr.dtype == bool:
        return torch.from_numpy(arr.copy()).to(device)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)


def _from_torch(torch: Any, t: Any, dtype: str) -> Any:
    t = t.detach().cpu()
    if dtype == "bfloat16":
        import ml_dtypes

        if t.dtype != torch.bfloat16:
            return t.numpy()  # a wrong dtype: reported by the harness
        return t.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _attn_mask(kw: dict[str, Any], L: int, S: int, dtype: str) -> tuple[Any, bool]:
    """(attn_mask as numpy or None, is_causal) for torch's conventions."""
    mask, bias = kw.get("mask"), kw.get("bias")
    causal = bool(kw.get("causal"))
    align = kw.get("align")
    explicit_causal = causal and L != S and align == "bottom_right"
    if not explicit_causal and causal and (mask is not None or bias is not None):
        explicit_causal = True
    vis = None
    if mask is not None:
        vis = np.asarray(mask, dtype=bool)
    if explicit_causal:
        off = (S - L) if align == "bottom_right" else 0
        tri = np.arange(S)[None, :] <= np.arange(L)[:, None] + off
        vis = tri if vis is None else (vis & tri)
    if bias is None:
        return vis, (causal and not explicit_causal)
    b = np.asarray(bias)
    if vis is not None:
        b = np.where(vis, b, -np.inf).astype(b.dtype)
    return b, False


def _sdpa_fn(backend: str, dtype: str, device: str) -> Any:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, BACKENDS[backend])

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        L, S = q.shape[-2], k.shape[-2]
        m, is_causal = _attn_mask(kw, L, S, dtype)
        tq, tk, tv = (_to_torch(torch, x, device) for x in (q, k, v))
        tm = None if m is None else _to_torch(torch, m, device)
        if tm is not None and tm.dtype != torch.bool:
            tm = tm.to(tq.dtype)
        gqa = tq.shape[-3] != tk.shape[-3]
        with sdpa_kernel([member]):
            out = F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=tm, is_causal=is_causal, scale=kw.get("scale"), enable_gqa=gqa
            )
        return _from_torch(torch, out, dtype)

    return fn


def _sdpa_backward_fn(backend: str, dtype: str, device: str) -> Any:
    """The gradients of the backend's forward by torch.autograd: ``(dq, dk, dv, dbias,
    None)``, dbias the gradient of the additive mask where the case has a bias."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, BACKENDS[backend])

    def back(q: Any, k: Any, v: Any, dout: Any, **kw: Any) -> Any:
        L, S = q.shape[-2], k.shape[-2]
        m, is_causal = _attn_mask(kw, L, S, dtype)
        tq, tk, tv = (_to_torch(torch, x, device).requires_grad_() for x in (q, k, v))
        tm = None if m is None else _to_torch(torch, m, device)
        if tm is not None and tm.dtype != torch.bool:
            tm = tm.to(tq.dtype).requires_grad_(kw.get("bias") is not None)
        gqa = tq.shape[-3] != tk.shape[-3]
        with sdpa_kernel([member]):
            out = F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=tm, is_causal=is_causal, scale=kw.get("scale"), enable_gqa=gqa
            )
        out.backward(_to_torch(torch, dout, device))
        grads = [_from_torch(torch, t.grad, dtype) for t in (tq, tk, tv)]
        dbias = None
        if kw.get("bias") is not None and tm is not None and tm.grad is not None:
            dbias = _from_torch(torch, tm.grad, dtype)
        return (*grads, dbias, None)

    return back


def _flex_fn(dtype: str, device: str) -> Any:
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        L, S = q.shape[-2], k.shape[-2]
        m, is_causal = _attn_mask({**kw, "causal": kw.get("causal")}, L, S, dtype)
        if is_causal:
            m = np.arange(S)[None, :] <= np.arange(L)[:, None]
        tq, tk, tv = (_to_torch(torch, x, device) for x in (q, k, v))
        score_mod = None
        if m is not None:
            mm = np.asarray(m)
            add = np.where(mm, 0.0, -np.inf) if mm.dtype == bool else mm.astype(np.float64)
            tb = torch.from_numpy(np.broadcast_to(add, (*q.shape[:-2], L, S)).copy()).to(tq.dtype)

            def score_mod(score: Any, b: Any, h: Any, i: Any, j: Any) -> Any:
                return score + tb[b, h, i, j]

        gqa = tq.shape[-3] != tk.shape[-3]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_attention(
                tq, tk, tv, score_mod=score_mod, scale=kw.get("scale"), enable_gqa=gqa
            )
        return _from_torch(torch, out, dtype)

    return fn


def _runs(fn: Any, dtype: str) -> str | None:
    """None if ``fn`` runs on a small problem; else why not."""
    from attnspec.spec.conformance import _np_dtype

    x = np.ones((1, 1, 2, 8)).astype(_np_dtype(dtype))
    try:
        fn(x, x, x)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def _runs_backward(back: Any, dtype: str) -> str | None:
    """None if the backward runs on a small problem; else why not."""
    from attnspec.spec.conformance import _np_dtype

    x = np.ones((1, 1, 2, 8)).astype(_np_dtype(dtype))
    try:
        back(x, x, x, x)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def torch_targets(
    *,
    dtype: str = "float64",
    accumulate: str | None = None,
    device: str = "cpu",
    backend: str | None = None,
) -> list[Target]:
    """One target per SDPA backend that runs on ``device`` in ``dtype`` (``backend``: that
    one only), and FlexAttention (eager) on the CPU. ValueError where none runs, or the
    device is not there (``--device cuda`` without a GPU)."""
    import torch

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"torch has no {dtype} attention; --dtype one of {_TORCH_DTYPES}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)"
        )
    names = [backend] if backend else [*BACKENDS, "flex"]
    targets, why = [], {}
    feats = frozenset({"mask", "causal", "gqa"})
    for name in names:
        back = None
        if name == "flex":
            if device != "cpu":
                why[name] = "FlexAttention is run eagerly on the CPU only here"
                continue
            fn = _flex_fn(dtype, device)
        else:
            fn = _sdpa_fn(name, dtype, device)
            # the math backend's gradients by autograd; the CPU flash backend has no kernel
            # for the gradient of a float attn_mask (the bias's), so it declares none
            if name == "math":
                back = _sdpa_backward_fn(name, dtype, device)
                if _runs_backward(back, dtype) is not None:
                    back = None
        reason = _runs(fn, dtype)
        if reason is not None:
            why[name] = reason
            continue
        targets.append(
            Target(
                name=f"torch[{name}]",
                fn=fn,
                features=feats | ({"backward"} if back is not None else set()),
                backward=back,
                dtype=dtype,
                accumulate=accumulate,
                spec="torch",
                note=f"torch {torch.__version__} {device}, backend {name}",
            )
        )
    if not targets:
        raise ValueError(f"no torch backend runs on {device} in {dtype}: {why}")
    for t in targets:
        object.__setattr__(
            t,
            "note",
            t.note
            + ("; not run: " + "; ".join(f"{k} ({v})" for k, v in why.items()) if why else ""),
        )
    return targets
