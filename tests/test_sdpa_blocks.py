"""The speed paths of sdpa and the softmax family compute the same bits as the definition.

Each test compares two evaluations that perform the same float64 operations on the same
operands (so equality is bitwise, compared as int64 views, which also tells -0.0 from
+0.0), or, where BLAS is involved, the same BLAS calls on the same operand shapes:

* ``sdpa`` evaluates blocks of query rows into a preallocated output, with the kv heads
  repeated once for all blocks: a transcription of steps 1-8 in plain numpy, evaluated on
  the same row blocks, gives the same bits;
* ``DoubleDouble.mul`` by a power-of-two scalar (the scale 1/sqrt(E) for E = 4, 16, 64, ...)
  takes two plain products; the general TwoProduct path gives the same bits;
* ``softmax``'s row blocks are written into one output: the same bits as one block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import attnspec
import attnspec.reference.attention as attention
import attnspec.reference.doubledouble as doubledouble
from attnspec.reference.doubledouble import DD, DoubleDouble

RNG = np.random.default_rng(20261125)


def _same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.int64), b.view(np.int64)))


# --- sdpa in blocks of query rows ---------------------------------------------------


def _transcription(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, rows_per_block: int, tau: float
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-8 with nothing hidden, in plain float64 numpy, one block of rows at a time:
    the operations Fast performs, in its order (scale after the product; the max term
    set to 0 in a copy and the row summed; 1 + s' as the denominator; log1p(s') for the lse)."""
    outs, lses = [], []
    for start in range(0, q.shape[-2], rows_per_block):
        s = np.matmul(q[..., start : start + rows_per_block, :], np.swapaxes(k, -1, -2)) * tau
        top = np.argmax(s, axis=-1)[..., None]
        a = np.take_along_axis(s, top, axis=-1)
        e = np.exp(s - a)
        others = e.copy()
        np.put_along_axis(others, top, 0.0, axis=-1)
        rest = np.sum(others, axis=-1, keepdims=True)
        outs.append(np.matmul(e / (1.0 + rest), v))
        lses.append((a + np.log1p(rest))[..., 0])
    return np.concatenate(outs, axis=-2), np.concatenate(lses, axis=-1)


@pytest.mark.parametrize("rows_per_block", [1, 3, 8, 64])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_fast_sdpa_in_blocks_is_the_plain_transcription_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, rows_per_block: int, scale: float | None
) -> None:
    hq, n_q, n_k, e = 4, 19, 23, 16
    q = RNG.standard_normal((2, hq, n_q, e))
    k = RNG.standard_normal((2, hq, n_k, e))
    v = RNG.standard_normal((2, hq, n_k, 5))
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", rows_per_block * 2 * hq * n_k)
    out, lse = attnspec.sdpa(q, k, v, scale=scale, return_lse=True, precision="fast")
    tau = 1.0 / np.sqrt(e) if scale is None else scale
    ref_out, ref_lse = _transcription(q, k, v, rows_per_block, tau)
    assert _same_bits(out, ref_out) and _same_bits(lse, ref_lse)


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_grouped_query_heads_equal_explicitly_repeated_kv_heads(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    # G = 3 query heads per kv head; the repeat now happens once, before the row blocks.
    q = RNG.standard_normal((6, 13, 8))
    k = RNG.standard_normal((2, 11, 8))
    v = RNG.standard_normal((2, 11, 4))
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 4 * 6 * 11)  # 4 rows a block
    kw: dict[str, Any] = {
        "return_lse": True,
        "precision": precision,
        "causal": True,
        "align": "bottom_right",
    }
    out, lse = attnspec.sdpa(q, k, v, **kw)
    ref_out, ref_lse = attnspec.sdpa(q, np.repeat(k, 3, axis=0), np.repeat(v, 3, axis=0), **kw)
    assert _same_bits(out, ref_out) and _same_bits(lse, ref_lse)
    assert out.shape == (6, 13, 4) and lse.shape == (6, 13)


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_row_blocks_agree_with_one_block_on_masked_and_special_rows(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    # Rows with mask, bias and special values (an empty row, a NaN row): the blocks'
    # results land in the right rows, whatever the block size.
    q = RNG.standard_normal((2, 9, 4))
    k = RNG.standard_normal((2, 7, 4))
    v = RNG.standard_normal((2, 7, 3))
    mask = RNG.random((2, 9, 7)) < 0.7
    mask[:, 2] = False  # an empty row: output 0, lse -inf
    bias = RNG.standard_normal((9, 7))
    bias[5, 3] = np.nan  # NaN at a visible key of row 5: that row is NaN
    mask[:, 5, 3] = True
    kw: dict[str, Any] = {"mask": mask, "bias": bias, "return_lse": True, "precision": precision}
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 2 * 7)  # one row a block
    out, lse = attnspec.sdpa(q, k, v, **kw)
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1 << 20)  # all rows in one block
    ref_out, ref_lse = attnspec.sdpa(q, k, v, **kw)
    assert np.all(out[:, 2] == 0.0) and np.all(lse[:, 2] == -np.inf)
    assert np.all(np.isnan(out[:, 5])) and np.all(np.isnan(lse[:, 5]))
    rows = np.ones(9, dtype=bool)
    rows[[2, 5]] = False
    if precision == "accurate":
        # sdpa's claim (its docstring): each output within 4u sum_j p_ij |v_jk| <= 4u
        # max_j |v_jk| of the exact value and lse within 1 ulp, for either block size;
        # so the two differ by at most twice that.
        u = 2.0**-53
        vmax = np.max(np.abs(v), axis=-2)[:, None, :]
        assert np.all(np.abs(out[:, rows] - ref_out[:, rows]) <= 8 * u * vmax)
        assert np.all(np.abs(lse[:, rows] - ref_lse[:, rows]) <= 2 * np.spacing(ref_lse[:, rows]))
    else:
        # the fast path's rows: numpy's operations on the same rows, and per-row BLAS
        # products whose bits may depend on the block's shape; the row blocks' values
        # are pinned bit for bit by the transcription test above
        assert np.all(np.isfinite(out[:, rows])) and np.all(np.isfinite(lse[:, rows]))


def test_inputs_are_not_written_by_the_fast_path() -> None:
    q = RNG.standard_normal((2, 5, 4))
    k = RNG.standard_normal((2, 6, 4))
    v = RNG.standard_normal((2, 6, 3))
    saved = [a.copy() for a in (q, k, v)]
    attnspec.sdpa(
        q, k, v, precision="fast", softcap=2.0, alibi_slopes=[0.5, 0.25], align="top_left"
    )
    assert all(_same_bits(a, b) for a, b in zip((q, k, v), saved, strict=True))


# --- DoubleDouble.mul by a power of two ------------------------------------------------


def _general_mul(monkeypatch: pytest.MonkeyPatch, a: DD, b: DD) -> DD:
    with monkeypatch.context() as m:
        m.setattr(doubledouble, "_times_power_of_two", lambda a, b: None)
        return DoubleDouble().mul(a, b)


@pytest.mark.parametrize("tau", [0.125, 0.5, 4.0, -0.25, 2.0**-40])
def test_dd_mul_by_power_of_two_is_the_general_product_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, tau: float
) -> None:
    hi = RNG.standard_normal((16, 50)) * 10.0 ** RNG.integers(-250, 250, (16, 1))
    lo = hi * 2.0**-54 * RNG.standard_normal(hi.shape)
    lo[:, ::7] = 0.0
    lo[:, ::11] = -0.0
    b = DD(np.float64(tau), None)
    for a in (DD(hi, lo), DD(hi, None)):
        assert doubledouble._times_power_of_two(a, b) is not None  # the quick path applies
        got, ref = DoubleDouble().mul(a, b), _general_mul(monkeypatch, a, b)
        assert _same_bits(got.hi, ref.hi) and _same_bits(got.lo, ref.lo)


@pytest.mark.parametrize(
    ("entry", "tau"),
    [
        (0.0, 0.125),
        (1e-300, 0.125),
        (1e300, 0.125),
        (np.inf, 0.125),
        (np.nan, 0.125),
        (1.0, 0.3),
        (1.0, 2.0**100),
    ],
)
def test_dd_mul_outside_the_quick_path_takes_the_general_product(
    monkeypatch: pytest.MonkeyPatch, entry: float, tau: float
) -> None:
    hi = RNG.standard_normal((3, 4))
    hi[1, 2] = entry
    a, b = DD(hi, np.zeros_like(hi)), DD(np.float64(tau), None)
    assert doubledouble._times_power_of_two(a, b) is None
    got, ref = DoubleDouble().mul(a, b), _general_mul(monkeypatch, a, b)
    assert _same_bits(got.hi, ref.hi) and _same_bits(got.lo, ref.lo)


# --- softmax family: row blocks written into one output ---------------------------------


@pytest.mark.parametrize("kind", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_row_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    x = RNG.standard_normal((37, 29)) * 30.0
    x[4] = -np.inf  # an empty row inside a block
    where = RNG.random(x.shape) < 0.8
    f = getattr(attnspec, kind)
    monkeypatch.setattr(DoubleDouble, "chunk_elements", 3 * 29)  # blocks of 3 rows
    blocked = f(x, where=where)
    monkeypatch.setattr(DoubleDouble, "chunk_elements", 0)  # one block
    whole = f(x, where=where)
    assert _same_bits(blocked, whole)
