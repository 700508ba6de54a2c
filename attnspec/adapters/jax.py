r"""``jax.nn.dot_product_attention`` (XLA on the CPU) as a target.

Layout: jax takes ``(B, T, N, H)``; the adapter transposes the kernel form ``(B, H, L, E)``.
Features declared: ``mask`` (bool ``mask`` and additive ``bias``), ``causal``
(``is_causal``: top-left, jax's convention; bottom-right and causal with a mask as an
explicit mask), ``window`` (``local_window_size=(left, right)``, top-left aligned), ``gqa``,
``lse`` (``return_residual=True``: the natural-log lse of the scaled logits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnspec.spec.conformance import Target

__all__ = ["jax_target"]


def jax_target(*, dtype: str = "float32", accumulate: str | None = None) -> Target:
    """The target; ValueError for a dtype jax has no attention in."""
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if dtype not in ("float64", "float32", "float16", "bfloat16"):
        raise ValueError(
            f"jax has no {dtype} attention here; --dtype float32, float16, bfloat16 or float64"
        )
    import jax.numpy as jnp

    # compiled once per shape and options: half the time of eager dispatch, op by op, on
    # the many shapes a check sends
    dpa: Any = jax.jit(
        jax.nn.dot_product_attention,
        static_argnames=("scale", "is_causal", "local_window_size", "return_residual"),
    )

    def fn(q: Any, k: Any, v: Any, return_lse: bool = False, **kw: Any) -> Any:
        L, S = q.shape[-2], k.shape[-2]
        causal = bool(kw.get("causal"))
        align = kw.get("align")
        window = kw.get("window")
        mask = None if kw.get("mask") is None else np.asarray(kw["mask"], dtype=bool)
        explicit = (causal or window is not None) and L != S and align == "bottom_right"
        if causal and (mask is not None or explicit):
            off = (S - L) if align == "bottom_right" else 0
            tri = np.arange(S)[None, :] <= np.arange(L)[:, None] + off
            mask = tri if mask is None else mask & tri
            causal = False
        lws = None
        if window is not None:
            left, right = window
            if explicit or mask is not None:
                off = (S - L) if align == "bottom_right" else 0
                d = np.arange(S)[None, :] - (np.arange(L)[:, None] + off)
                w = np.ones((L, S), dtype=bool)
                if left is not None:
                    w &= d >= -left
                if right is not None:
                    w &= d <= right
                mask = w if mask is None else mask & w
            else:
                lws = (10**9 if left is None else int(left), 10**9 if right is None else int(right))
        t = lambda a: jnp.asarray(np.swapaxes(np.asarray(a), -2, -3))  # noqa: E731
        bias = None if kw.get("bias") is None else jnp.asarray(np.asarray(kw["bias"]))
        jm = (
            None
            if mask is None
            else jnp.asarray(np.broadcast_to(mask, (q.shape[0], q.shape[1], L, S)))
        )
        res = dpa(
            t(q),
            t(k),
            t(v),
            bias=bias,
            mask=jm,
            scale=None if kw.get("scale") is None else float(kw["scale"]),
            is_causal=causal,
            local_window_size=lws,
            return_residual=return_lse,
        )
        out, lse = res if return_lse else (res, None)
        o = np.swapaxes(np.asarray(out), -2, -3)
        if not return_lse:
            return o
        return o, np.swapaxes(np.asarray(lse), -1, -2)

    return Target(
        name="jax.nn.dot_product_attention",
        fn=fn,
        features=frozenset({"mask", "causal", "window", "gqa", "lse"}),
        dtype=dtype,
        accumulate=accumulate,
        spec="jax",
        note=f"jax {jax.__version__} {jax.default_backend()}",
    )
