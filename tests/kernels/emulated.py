"""Low-precision kernels with a backward, from attnspec's own emulation.

:func:`attnspec.reference.emulate.emulated_sdpa` and
:func:`~attnspec.reference.emulate.emulated_sdpa_backward` evaluate the definition as a
naive kernel in a low precision does: every step rounded to the dtype, products
accumulated in float32. They are the kernels the derived bounds of
:mod:`attnspec.spec.tolerances.precision` were written for, so they are not independent
of attnspec (the kernels of :mod:`tests.kernels.correct` are); they are here because
they are correct low-precision kernels *with gradients*, which the false-alarm figures
of ``attnspec check`` need (the backward stage in float32 and bfloat16).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from attnspec.reference.emulate import emulated_sdpa, emulated_sdpa_backward

from .correct import ALL_FEATURES, FORWARD

__all__ = ["KERNELS", "emulated_bfloat16", "emulated_float32"]


def _kernel(dtype: str, store: Any) -> Any:
    def back(q: Any, k: Any, v: Any, dout: Any, *, dlse: Any = None, **opts: Any) -> Any:
        return emulated_sdpa_backward(q, k, v, dout, dlse=dlse, dtype=dtype, **opts)

    def fn(q: Any, k: Any, v: Any, *, return_lse: bool = False, **opts: Any) -> Any:
        res = emulated_sdpa(q, k, v, dtype=dtype, return_lse=return_lse, **opts)
        if return_lse:
            out, lse = res
            return out.astype(store), lse.astype(np.float32)
        return res.astype(store)

    fn.__name__ = fn.__qualname__ = f"emulated_{dtype}"
    fn.__doc__ = f"attnspec's emulation of a naive {dtype} kernel, with its backward."
    fn.attnspec_features = FORWARD | {"backward"}  # type: ignore[attr-defined]
    fn.attnspec_dtype = dtype  # type: ignore[attr-defined]
    fn.attnspec_backward = back  # type: ignore[attr-defined]
    assert fn.attnspec_features == ALL_FEATURES  # type: ignore[attr-defined]
    return fn


emulated_float32 = _kernel("float32", np.float32)
emulated_bfloat16 = _kernel("bfloat16", ml_dtypes.bfloat16)

#: the kernels by name
KERNELS: dict[str, Any] = {
    "emulated_float32": emulated_float32,
    "emulated_bfloat16": emulated_bfloat16,
}
