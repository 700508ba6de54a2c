"""precision="fast" walks blocks of keys once S exceeds one key block: with a small key block
forced (attnspec.reference.attention._KEY_BLOCK, monkeypatched), the key-blocked results
equal the one-block results within the derived bounds, and the special rows exactly.

Bounds: the key-blocked result is within attnspec.spec.tolerances.online.online_sdpa_bound
(block_keys = the key block) of the exact value, the one-block result within
attnspec.spec.tolerances.attention.textbook_sdpa_bound (and textbook_lse_bound); two
results are allowed the sum. Special rows (a NaN or +inf logit, a non-finite value that
carries weight, nothing visible, a logit that overflows) are evaluated over all the keys
again and must be bit for bit what one block gives. Where S fits one key block nothing
changes (tests/test_pinned.py and tests/test_sdpa_blocks.py pin those bits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnspec
import attnspec.reference.attention as attention
from attnspec.spec.properties._core import same
from attnspec.spec.strategies.attention import AttentionCase, attention_cases
from attnspec.spec.tolerances import online as otol
from attnspec.spec.tolerances.attention import textbook_lse_bound, textbook_sdpa_bound

RNG = np.random.default_rng(20261201)


@contextmanager
def key_block(size: int) -> Iterator[None]:
    """``attention._KEY_BLOCK`` set to ``size`` inside the block, restored after."""
    old = attention._KEY_BLOCK
    attention._KEY_BLOCK = size
    try:
        yield
    finally:
        attention._KEY_BLOCK = old


ONE_BLOCK = 1 << 40  # larger than any S: the one-block evaluation


def _both(case: AttentionCase, size: int) -> tuple[Any, Any, Any, Any]:
    kw = {**case.kwargs, "return_lse": True, "precision": "fast"}
    with key_block(ONE_BLOCK):
        one, one_lse = attnspec.sdpa(case.q, case.k, case.v, **kw)
    with key_block(size):
        blk, blk_lse = attnspec.sdpa(case.q, case.k, case.v, **kw)
    return one, one_lse, blk, blk_lse


def _special(out: Any, lse: Any) -> Any:
    """Rows whose one-block result is a special value: NaN or infinite output or lse, or
    the lse -inf of a row that sees nothing (the output's shape)."""
    with np.errstate(invalid="ignore"):
        rows = ~np.isfinite(lse) | ~np.isfinite(out).all(axis=-1)
    return np.broadcast_to(rows[..., None], out.shape)


def _check(case: AttentionCase, size: int) -> None:
    __tracebackhide__ = True
    one, one_lse, blk, blk_lse = _both(case, size)
    assert blk.shape == one.shape and blk_lse.shape == one_lse.shape
    special = _special(one, one_lse)
    exact = same(one, blk) | ~special
    assert exact.all(), f"special rows differ: {one[~exact]} vs {blk[~exact]} for {case!r}"
    assert (same(one_lse, blk_lse) | ~special[..., 0]).all(), f"special lse differ: {case!r}"
    _, textbook = textbook_sdpa_bound(case.q, case.k, case.v, **case.kwargs)
    _, online, online_lse = otol.online_sdpa_bound(
        case.q, case.k, case.v, block_keys=size, **case.kwargs
    )
    lse_one = np.broadcast_to(textbook_lse_bound(case.q, case.k, **case.kwargs), one_lse.shape)
    with np.errstate(invalid="ignore"):
        diff = np.where(special, 0.0, np.abs(one - blk))
        lse_diff = np.where(special[..., 0], 0.0, np.abs(one_lse - blk_lse))
    allowed = textbook + online
    bad = (diff > 0) & ~(diff <= allowed)  # a NaN bound (non-finite values) allows only 0
    assert not bad.any(), (
        f"outputs differ by {diff[bad].max():.3g} > allowed {allowed[bad].min():.3g} with key "
        f"blocks of {size}: {case!r}"
    )
    lse_allowed = lse_one + online_lse
    bad_l = (lse_diff > 0) & ~(lse_diff <= lse_allowed)
    assert not bad_l.any(), f"lse differ by {lse_diff[bad_l].max():.3g}: {case!r}"


@given(case=attention_cases(max_side=7, max_width=4), size=st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_key_blocked_results_equal_the_one_block_results_within_the_bounds(
    case: AttentionCase, size: int
) -> None:
    _check(case, size)


def _c(q: Any, k: Any, v: Any, **kw: Any) -> AttentionCase:
    return AttentionCase(
        np.asarray(q, dtype=np.float64),
        np.asarray(k, dtype=np.float64),
        np.asarray(v, dtype=np.float64),
        {key: (np.asarray(val) if isinstance(val, list) else val) for key, val in kw.items()},
    )


_Q = np.round(RNG.standard_normal((2, 3, 5, 4)), 3)
_K = np.round(RNG.standard_normal((2, 3, 9, 4)), 3)
_V = np.round(RNG.standard_normal((2, 3, 9, 3)), 3)
_V_BAD = _V.copy()
_V_BAD[..., 6, 1] = np.inf
_V_BAD[..., 7, 2] = np.nan
_BIAS_INF = np.zeros((5, 9))
_BIAS_INF[1, 7] = np.inf  # +inf in the last block, after finite logits
_BIAS_INF[2, [3, 8]] = np.inf  # two +inf logits in different blocks: weight 1/2 each
_BIAS_INF[3, :] = -np.inf  # a row that sees nothing
_BIAS_INF[4, 0] = np.nan  # a NaN logit in the first block

SPECIAL = {
    "+inf, NaN and -inf logits in different blocks": _c(_Q, _K, _V, bias=_BIAS_INF),
    "non-finite values that carry weight": _c(_Q, _K, _V_BAD),
    "non-finite values at hidden keys": _c(
        _Q, _K, _V_BAD, mask=np.array([True] * 6 + [False, False, True])
    ),
    "an infinite value at a key of weight e^-800": _c(
        np.zeros((1, 1)),
        np.zeros((5, 1)),
        [[1.0], [2.0], [3.0], [4.0], [np.inf]],
        bias=np.array([0.0, 0.0, 0.0, 0.0, -800.0]),
    ),
    "L > S bottom right: empty rows": _c(
        _Q, _K[..., :3, :], _V[..., :3, :], causal=True, align="bottom_right"
    ),
    "sinks, with rows that see only the sink": _c(
        _Q,
        _K,
        _V,
        sinks=np.array([0.5, -1.0, 2.0]),
        mask=np.array([[True] * 9, [False] * 9, [True] * 9, [False] * 9, [True] * 9]),
    ),
    "logits beyond float64 overflow (ieee)": _c(
        np.full((1, 2), 1e200), np.full((4, 2), 1e200), [[1.0], [2.0], [3.0], [4.0]], scale=1.0
    ),
    "causal window ALiBi dropout GQA": _c(
        _Q,
        _K[:, :1],
        _V[:, :1],
        causal=True,
        window=(3, None),
        align="bottom_right",
        alibi_slopes=np.array([0.5, 0.25, 0.0]),
        dropout_mask=RNG.random((5, 9)) > 0.3,
        dropout_p=0.25,
    ),
    "logits sharing an offset of 1e6": _c(
        np.concatenate([np.full((5, 1), 1e3), _Q[0, 0]], -1),
        np.concatenate([np.full((9, 1), 1e3), _K[0, 0]], -1),
        _V[0, 0],
        scale=1.0,
    ),
    "2-D, E != Ev, batch broadcast": _c(_Q[0, 0], _K[0, 0], _V[0, 0, :, :2]),
}


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_cases(name: str, size: int) -> None:
    _check(SPECIAL[name], size)


def test_special_rows_are_the_definitions_values() -> None:
    # expected values by construction: the rule of +inf logits (their values' mean), a
    # NaN row, an empty row (0 and -inf)
    q, k = np.zeros((3, 1)), np.zeros((4, 1))
    v = np.array([[1.0], [2.0], [3.0], [6.0]])
    bias = np.array(
        [[0.0, np.inf, 0.0, np.inf], [0.0, np.nan, 0.0, 0.0], [-np.inf] * 4], dtype=np.float64
    )
    with key_block(1):
        out, lse = attnspec.sdpa(q, k, v, bias=bias, return_lse=True, precision="fast")
    assert out[0].tolist() == [4.0] and lse[0] == np.inf  # (2 + 6) / 2
    assert np.isnan(out[1]).all() and np.isnan(lse[1])
    assert out[2].tolist() == [0.0] and lse[2] == -np.inf


def test_s_within_one_key_block_is_unchanged_bit_for_bit() -> None:
    case = SPECIAL["causal window ALiBi dropout GQA"]
    kw = {**case.kwargs, "return_lse": True, "precision": "fast"}
    with key_block(case.n_keys):
        a, a_lse = attnspec.sdpa(case.q, case.k, case.v, **kw)
    with key_block(ONE_BLOCK):
        b, b_lse = attnspec.sdpa(case.q, case.k, case.v, **kw)
    assert np.array_equal(a.view(np.int64), b.view(np.int64))
    assert np.array_equal(a_lse.view(np.int64), b_lse.view(np.int64))


def test_the_accurate_path_keeps_one_key_block() -> None:
    case = SPECIAL["logits sharing an offset of 1e6"]
    with key_block(1):
        a = attnspec.sdpa(case.q, case.k, case.v, precision="accurate", **case.kwargs)
    b = attnspec.sdpa(case.q, case.k, case.v, precision="accurate", **case.kwargs)
    assert np.array_equal(a.view(np.int64), b.view(np.int64))


def test_key_blocks_do_not_modify_the_inputs() -> None:
    case = SPECIAL["non-finite values that carry weight"]
    saved = [a.copy() for a in (case.q, case.k, case.v)]
    with key_block(2):
        attnspec.sdpa(case.q, case.k, case.v, precision="fast")
    for before, after in zip(saved, (case.q, case.k, case.v), strict=True):
        assert np.array_equal(before, after, equal_nan=True)


def test_the_key_block_size_is_the_one_measured() -> None:
    # the module constant the benchmark chose (benchmarks/attention_bench.py); a change
    # must come with new measurements
    assert attention._KEY_BLOCK == 8192 and attention._KEY_BLOCK_ELEMENTS == 1 << 20
