"""The public contract of attnspec.sdpa: shapes, errors, special values, no side effects.

Expected values here are exact by construction (stated at each test): a mean of small
integers, a single visible key, an empty row.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import attnspec

PRECISIONS = ["accurate", "fast"]
RNG = np.random.default_rng(7)


def _qkv(
    b: int = 2, hq: int = 4, hkv: int = 2, n_q: int = 3, n_k: int = 5, e: int = 4, ev: int = 3
):
    return (
        RNG.standard_normal((b, hq, n_q, e)),
        RNG.standard_normal((b, hkv, n_k, e)),
        RNG.standard_normal((b, hkv, n_k, ev)),
    )


# --- shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_output_shape_is_batch_hq_l_ev_and_lse_batch_hq_l(precision: str) -> None:
    q, k, v = _qkv()
    out, lse = attnspec.sdpa(q, k, v, return_lse=True, precision=precision)
    assert out.shape == (2, 4, 3, 3) and out.dtype == np.float64
    assert lse.shape == (2, 4, 3) and lse.dtype == np.float64


def test_two_dimensional_inputs_are_one_head() -> None:
    q, k, v = _qkv(b=1, hq=1, hkv=1)
    out3 = attnspec.sdpa(q[0], k[0], v[0])
    out2 = attnspec.sdpa(q[0, 0], k[0, 0], v[0, 0])
    assert out2.shape == (3, 3)
    assert np.array_equal(out2, out3[0])


def test_leading_dimensions_broadcast() -> None:
    q = RNG.standard_normal((3, 1, 2, 2, 4))
    k = RNG.standard_normal((1, 5, 2, 6, 4))
    v = RNG.standard_normal((5, 2, 6, 2))
    out = attnspec.sdpa(q, k, v, precision="fast")
    assert out.shape == (3, 5, 2, 2, 2)
    # each broadcast entry equals the unbroadcast computation, bit for bit
    one = attnspec.sdpa(q[2, 0], k[0, 4], v[4], precision="fast")
    assert np.array_equal(out[2, 4], one)


# --- exact values by construction ------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_scale_zero_gives_the_mean_of_the_values(precision: str) -> None:
    q, k, _ = _qkv(1, 1, 1, 2, 4)
    v = np.array([[[[1.0], [2.0], [3.0], [6.0]]]])  # mean 3, exact in binary
    out = attnspec.sdpa(q, k, v, scale=0.0, precision=precision)
    assert np.array_equal(out, np.full((1, 1, 2, 1), 3.0))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_single_visible_key_returns_its_value(precision: str) -> None:
    q, k, v = _qkv(1, 1, 1, 3, 3)
    out = attnspec.sdpa(q, k, v, causal=True, precision=precision)
    # query 0 sees only key 0 under causal masking: weight exactly 1
    assert np.array_equal(out[0, 0, 0], v[0, 0, 0])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_row_with_nothing_visible_gives_zero_and_lse_minus_inf(precision: str) -> None:
    q, k, v = _qkv(1, 1, 1, 3, 4)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    out, lse = attnspec.sdpa(q, k, v, mask=mask, return_lse=True, precision=precision)
    assert np.array_equal(out[0, 0, 1], np.zeros(3))
    assert lse[0, 0, 1] == -np.inf
    assert np.all(np.isfinite(out[0, 0, [0, 2]]))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_values_at_hidden_keys_never_reach_the_output(precision: str, poison: float) -> None:
    q, k, v = _qkv(1, 2, 2, 4, 4)
    clean = attnspec.sdpa(q, k, v, causal=True, precision=precision)
    v2, k2 = v.copy(), k.copy()
    v2[..., 3, :] = poison  # key 3 is visible only to query 3 under causal masking
    k2[..., 3, :] = poison
    dirty = attnspec.sdpa(q, k2, v2, causal=True, precision=precision)
    assert np.array_equal(dirty[..., :3, :], clean[..., :3, :])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_bias_of_minus_inf_hides_a_key_like_the_mask(precision: str) -> None:
    q, k, v = _qkv(1, 1, 1, 3, 5)
    mask = np.array([True, False, True, True, False])
    bias = np.where(mask, 0.0, -np.inf)
    by_mask = attnspec.sdpa(q, k, v, mask=mask, precision=precision)
    by_bias = attnspec.sdpa(q, k, v, bias=bias, precision=precision)
    removed = attnspec.sdpa(q, k[..., mask, :], v[..., mask, :], precision=precision)
    assert np.array_equal(by_mask, by_bias)
    assert np.array_equal(by_mask, removed)


# --- errors --------------------------------------------------------------------------


def _raises(exc: type[Exception], pattern: str, *args: Any, **kw: Any) -> None:
    __tracebackhide__ = True
    with pytest.raises(exc, match=pattern):
        attnspec.sdpa(*args, **kw)


def test_causal_with_unequal_lengths_and_no_align_names_both_alignments() -> None:
    q, k, v = _qkv(1, 1, 1, 3, 5)
    with pytest.raises(ValueError) as info:
        attnspec.sdpa(q, k, v, causal=True)
    message = str(info.value)
    assert "top_left" in message and "bottom_right" in message and "L=3" in message


@pytest.mark.parametrize("feature", [{"window": (1, 0)}, {"alibi_slopes": np.ones(1)}])
def test_window_and_alibi_with_unequal_lengths_need_align(feature: dict[str, Any]) -> None:
    q, k, v = _qkv(1, 1, 1, 3, 5)
    _raises(ValueError, "align", q, k, v, **feature)


def test_equal_lengths_need_no_align_and_both_alignments_agree() -> None:
    q, k, v = _qkv(1, 1, 1, 4, 4)
    plain = attnspec.sdpa(q, k, v, causal=True)
    assert np.array_equal(plain, attnspec.sdpa(q, k, v, causal=True, align="top_left"))
    assert np.array_equal(plain, attnspec.sdpa(q, k, v, causal=True, align="bottom_right"))


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        (((1, 2, 3, 4), (1, 2, 5, 3), (1, 2, 5, 2)), r"last dimension E"),
        (((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 6, 2)), r"v must have shape"),
        (((1, 3, 3, 4), (1, 2, 5, 4), (1, 2, 5, 2)), r"Hq=3 .* multiple .* Hkv=2"),
        (((2, 2, 3, 4), (3, 2, 5, 4), (3, 2, 5, 2)), r"batch\) dimensions .* do not broadcast"),
        (((3, 4), (5, 4), (1, 5, 2)), r"at least 3 dimensions"),
    ],
    ids=["E-mismatch", "S-mismatch", "heads-not-multiple", "batch", "ndim"],
)
def test_shapes_that_do_not_fit_are_refused_with_both_shapes(
    shapes: tuple[tuple[int, ...], ...], pattern: str
) -> None:
    q, k, v = (np.zeros(s) for s in shapes)
    _raises(ValueError, pattern, q, k, v)


def test_mask_that_does_not_broadcast_names_the_shapes() -> None:
    q, k, v = _qkv(1, 2, 2, 3, 5)
    with pytest.raises(ValueError, match=re.escape("mask with shape (3, 4)")) as info:
        attnspec.sdpa(q, k, v, mask=np.ones((3, 4), dtype=bool))
    assert "(1, 2, 3, 5)" in str(info.value)


def test_bias_that_does_not_broadcast_names_the_shapes() -> None:
    q, k, v = _qkv(1, 2, 2, 3, 5)
    _raises(ValueError, re.escape("bias with shape (2, 5)"), q, k, v, bias=np.zeros((2, 5)))


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        ({"dropout_p": 1.0, "dropout_mask": np.ones((3, 5), bool)}, ValueError, r"\[0, 1\)"),
        ({"dropout_p": -0.1, "dropout_mask": np.ones((3, 5), bool)}, ValueError, r"\[0, 1\)"),
        ({"dropout_p": 0.5}, ValueError, "explicit dropout_mask"),
        ({"window": (-1, 2)}, ValueError, "left side must be >= 0"),
        ({"window": (1,)}, ValueError, "pair"),
        ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
        ({"softcap": -1.0}, ValueError, "softcap must be > 0"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": True}, TypeError, "scale must be a real number"),
        ({"align": "top"}, ValueError, "align must be one of"),
        ({"mask": np.ones((3, 5))}, TypeError, "mask must be a bool array"),
        ({"dropout_mask": np.ones((3, 5))}, TypeError, "dropout_mask must be a bool array"),
        ({"alibi_slopes": np.ones(3)}, ValueError, re.escape("alibi_slopes with shape (3,)")),
        ({"sinks": np.ones((2, 2))}, ValueError, re.escape("sinks with shape (2, 2)")),
        ({"precision": "exact"}, ValueError, "precision must be one of"),
        ({"causal": 1}, TypeError, "causal must be a bool"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(
    kw: dict[str, Any], exc: type[Exception], pattern: str
) -> None:
    q, k, v = _qkv(1, 2, 2, 3, 5)
    _raises(exc, pattern, q, k, v, **kw)


@pytest.mark.parametrize("bad", [np.ones((1, 1, 3, 4), dtype=bool), np.ones((1, 1, 3, 4)) * 1j])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_bool_and_complex_inputs_are_a_type_error(bad: np.ndarray, which: str) -> None:
    args = dict(zip("qkv", _qkv(1, 1, 1, 3, 3, 4, 4), strict=True))
    args[which] = bad
    with pytest.raises(TypeError, match=f"^{which} "):
        attnspec.sdpa(args["q"], args["k"], args["v"])


def test_inputs_are_never_modified() -> None:
    q, k, v = _qkv(1, 2, 2, 3, 5)
    v[..., 4, 0] = np.nan
    mask = np.ones((3, 5), dtype=bool)
    mask[:, 4] = False
    bias = RNG.standard_normal((3, 5))
    keep = RNG.random((3, 5)) < 0.7
    args = [q, k, v, mask, bias, keep]
    before = [a.copy() for a in args]
    for precision in PRECISIONS:
        attnspec.sdpa(
            q, k, v, mask=mask, bias=bias, dropout_mask=keep, dropout_p=0.25, precision=precision
        )
    for a, b in zip(args, before, strict=True):
        assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int32", "bfloat16"])
def test_low_precision_and_integer_inputs_are_read_exactly(dtype: str) -> None:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    q, k, v = (np.round(a * 4) for a in _qkv(1, 1, 1, 3, 4))  # small integers: exact in every dtype
    dt = np.dtype(dtype)
    low = attnspec.sdpa(q.astype(dt), k.astype(dt), v.astype(dt))
    assert low.dtype == np.float64
    assert np.array_equal(low, attnspec.sdpa(q, k, v))


def test_accurate_lse_that_cancels_to_near_zero_is_within_one_ulp() -> None:
    # Issue 7, item 1: the two logits -5 and log1p(-e^-5) (a float64 rounding of it) have
    # lse log(e^-5 + e^{log1p(-e^-5)}) = 4.121221970914226952e-19 (mpmath at 50 digits).
    # Before the arithmetic's lse went back to the row, sdpa gave 4.1204065654482746e-19.
    import math

    b = np.array([-5.0, math.log1p(-math.exp(-5.0))])
    _, lse = attnspec.sdpa(
        np.zeros((1, 1)), np.zeros((2, 1)), np.ones((2, 1)), bias=b, return_lse=True
    )
    assert float(lse[0]) == 4.121221970914227e-19
