"""attnspec check on the peers, pinning what docs/conformance.md says of them: torch's CPU
backends (math with its autograd backward, flash, flex) and jax.nn.dot_product_attention,
each departure shown by its reproduction, each convention's rules shown to excuse exactly
that departure. The full default runs, with their times, are in docs/conformance.md
(``attnspec check torch``, ``attnspec check jax --dtype float32``)."""

from __future__ import annotations

import numpy as np
import pytest

from attnspec.spec import conformance as C
from attnspec.spec.strategies.attention import AttentionCase


def _torch(dtype: str = "float64") -> dict[str, C.Target]:
    return {t.name: t for t in C.load_target("torch", dtype=dtype)}


def test_torch_backends_and_features() -> None:
    targets = _torch()
    assert set(targets) == {"torch[math]", "torch[flash]", "torch[flex]"}
    assert "backward" in targets["torch[math]"].features
    assert "backward" not in targets["torch[flash]"].features  # no float-mask gradient kernel
    assert all({"mask", "causal", "gqa"} <= t.features for t in targets.values())


def test_torch_math_gradients_conform() -> None:
    math = _torch()["torch[math]"]
    rep = C.run(math, stages=("backward",), only=["gradients"])
    assert [v.verdict for v in rep.verdicts] == ["pass"], rep.text()
    assert rep.verdicts[0].examples == 4  # none, causal, mask and bias, none again


def test_torch_nan_behind_a_mask_leaks() -> None:
    """torch's documented departure (spec/conventions.py: hidden_nan 'K leaks, V leaks'):
    a NaN value no query may see reaches the output; --convention torch excuses it."""
    math = _torch()["torch[math]"]
    case = AttentionCase(
        q=np.array([[[[0.0]]]]),
        k=np.array([[[[0.0], [0.0]]]]),
        v=np.array([[[[np.nan], [0.0]]]]),
        kwargs={"scale": 1.0, "mask": np.array([[[[False, True]]]])},
    )
    with pytest.raises(AssertionError, match="nan"):
        C.reproduce_property(math, "agreement", case)
    rep = C.run(math, examples=3, stages=("properties",), only=["hidden_values"])
    assert [v.verdict for v in rep.verdicts] == ["fail"], rep.text()
    rep = C.run(math, stages=("properties",), only=["hidden_values"], convention="torch")
    assert [v.verdict for v in rep.verdicts] == ["not applicable"], rep.text()


def test_torch_cpu_flash_scale_zero_causal_is_nan() -> None:
    """torch 2.13's CPU flash backend returns NaN for causal attention with scale 0 (every
    row but the last); the math backend gives the mean of the visible values."""
    targets = _torch("float32")
    case = AttentionCase(
        q=np.zeros((1, 1, 2, 1)),
        k=np.zeros((1, 1, 2, 1)),
        v=np.zeros((1, 1, 2, 1)),
        kwargs={"causal": True, "align": "top_left"},
    )
    with pytest.raises(AssertionError, match="nan"):
        C.reproduce_property(targets["torch[flash]"], "scale_zero", case)
    C.reproduce_property(targets["torch[math]"], "scale_zero", case)


def test_jax_rows_that_see_no_key() -> None:
    """jax gives a row that sees no key the mean of V (its finite mask fill): a failure by
    the definition, conforming under --convention jax, where such rows are judged by
    jax's rule."""
    jax = C.load_target("jax", dtype="float32")[0]
    case = C.sized_case(3, 2, 8, seed=0, dtype="float32", features=["causal"], variant=1)
    case = case.with_kwargs(causal=True, align="bottom_right")  # query 0 sees no key
    with pytest.raises(AssertionError, match="output at"):
        C.judge(jax, case)
    res = C.judge(jax, case, convention="jax")
    assert res["worst"] <= 1 and res["not_judged"] > 0  # the fill's lse: not judged
