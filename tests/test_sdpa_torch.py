"""attnspec.sdpa against torch's float64 SDPA: a check of our reading of torch's conventions.

torch is not the oracle (attnspec.exact is); these tests check that where attnspec and
torch mean the same thing (torch's is_causal is top_left; causal_lower_right is
bottom_right; enable_gqa maps head h to kv head h // G; a bool mask is True = attend; a
float mask is added), they compute the same numbers within the sum of both error bounds:
attnspec's accurate bound and the textbook float64 bound of
``attnspec.spec.tolerances.attention.textbook_sdpa_bound`` for torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attnspec
from attnspec.spec.tolerances.attention import U as U64
from attnspec.spec.tolerances.attention import textbook_sdpa_bound

torch = pytest.importorskip("torch", reason="torch is an optional peer; CI installs torch==2.13.0")
F = torch.nn.functional
from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402

RNG = np.random.default_rng(20261125)


def _problem(b: int, hq: int, hkv: int, n_q: int, n_k: int, e: int, ev: int) -> tuple[Any, ...]:
    q = RNG.standard_normal((b, hq, n_q, e))
    k = RNG.standard_normal((b, hkv, n_k, e))
    v = RNG.standard_normal((b, hkv, n_k, ev))
    return q, k, v


def _torch(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> np.ndarray:
    out = F.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), **kw
    )
    return out.numpy()


def _assert_agree(
    ours: np.ndarray, theirs: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any
) -> None:
    __tracebackhide__ = True
    # |ours - torch| <= |ours - exact| + |torch - exact|
    #                <= 4u sum_j p|v| (attnspec's accurate bound) + textbook bound (torch).
    weights_abs_v, bound = textbook_sdpa_bound(q, k, v, **kw)
    allowed = bound + 4 * U64 * weights_abs_v
    excess = np.abs(ours - theirs) - allowed
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (
        f"attnspec and torch differ by {abs(ours - theirs)[worst]:.3e} at {worst}, more than the "
        f"derived bound {allowed[worst]:.3e}: attnspec {ours[worst]!r}, torch {theirs[worst]!r}"
    )


def test_plain_attention_matches_torch() -> None:
    q, k, v = _problem(2, 4, 4, 7, 7, 16, 8)
    _assert_agree(attnspec.sdpa(q, k, v), _torch(q, k, v), q, k, v)


def test_explicit_scale_matches_torch() -> None:
    q, k, v = _problem(1, 2, 2, 5, 9, 8, 3)
    _assert_agree(attnspec.sdpa(q, k, v, scale=0.3), _torch(q, k, v, scale=0.3), q, k, v, scale=0.3)


def test_torch_is_causal_is_top_left_when_queries_and_keys_differ() -> None:
    q, k, v = _problem(1, 2, 2, 4, 9, 8, 5)
    ours = attnspec.sdpa(q, k, v, causal=True, align="top_left")
    _assert_agree(ours, _torch(q, k, v, is_causal=True), q, k, v, causal=True, align="top_left")
    upper_left = _torch(q, k, v, attn_mask=causal_upper_left(4, 9))
    _assert_agree(ours, upper_left, q, k, v, causal=True, align="top_left")


def test_torch_causal_lower_right_is_bottom_right() -> None:
    q, k, v = _problem(1, 2, 2, 4, 9, 8, 5)
    ours = attnspec.sdpa(q, k, v, causal=True, align="bottom_right")
    theirs = _torch(q, k, v, attn_mask=causal_lower_right(4, 9))
    _assert_agree(ours, theirs, q, k, v, causal=True, align="bottom_right")


def test_alignments_differ_when_queries_and_keys_differ() -> None:
    # Not a tolerance check: the two conventions give different numbers (so the
    # tests above could fail if we had them the wrong way round).
    q, k, v = _problem(1, 1, 1, 3, 6, 4, 2)
    top = attnspec.sdpa(q, k, v, causal=True, align="top_left")
    bottom = attnspec.sdpa(q, k, v, causal=True, align="bottom_right")
    assert np.abs(top - bottom).max() > 1e-3


def test_gqa_matches_torch_enable_gqa() -> None:
    q, k, v = _problem(2, 6, 2, 5, 5, 8, 4)
    ours = attnspec.sdpa(q, k, v)
    _assert_agree(ours, _torch(q, k, v, enable_gqa=True), q, k, v)


def test_bool_mask_matches_torch() -> None:
    q, k, v = _problem(1, 2, 2, 6, 8, 8, 3)
    mask = RNG.random((6, 8)) < 0.6
    mask[:, 0] = True  # no fully masked rows here (torch 2.13 returns 0 for those, as we do)
    ours = attnspec.sdpa(q, k, v, mask=mask)
    _assert_agree(ours, _torch(q, k, v, attn_mask=torch.from_numpy(mask)), q, k, v, mask=mask)


def test_fully_masked_row_is_zero_in_both() -> None:
    q, k, v = _problem(1, 1, 1, 3, 4, 4, 2)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    ours = attnspec.sdpa(q, k, v, mask=mask)
    theirs = _torch(q, k, v, attn_mask=torch.from_numpy(mask))
    assert np.array_equal(ours[0, 0, 1], np.zeros(2))
    assert np.array_equal(theirs[0, 0, 1], np.zeros(2))


def test_float_mask_is_an_additive_bias() -> None:
    q, k, v = _problem(1, 2, 2, 5, 7, 8, 3)
    bias = RNG.standard_normal((5, 7))
    ours = attnspec.sdpa(q, k, v, bias=bias)
    _assert_agree(ours, _torch(q, k, v, attn_mask=torch.from_numpy(bias)), q, k, v, bias=bias)
