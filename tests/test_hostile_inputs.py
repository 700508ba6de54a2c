"""Regression tests for the defects hostile testing found (issue 7), each named after what
it guards. Expected values say where they come from."""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import pytest

import attnspec
from attnspec.reference import inputs


def test_a_huge_python_int_as_a_scalar_option_is_a_value_error_naming_it() -> None:
    q = k = v = np.ones((2, 2))
    for name in ("scale", "softcap", "dropout_p"):
        with pytest.raises(ValueError, match=f"{name} must be finite, got an integer of 1329 bits"):
            attnspec.sdpa(q, k, v, **{name: 10**400})


@pytest.mark.parametrize("precision", ["accurate", "fast"])
def test_lse_has_the_shape_of_the_output_rows_when_v_has_more_batch_dimensions(
    precision: str,
) -> None:
    q, k = np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 2))
    v = np.arange(24.0).reshape(4, 1, 3, 2)
    out, lse = attnspec.sdpa(q, k, v, return_lse=True, precision=precision)
    assert out.shape == (4, 1, 2, 2) and lse.shape == (4, 1, 2)
    # logits all 0: lse = log 3 in every row (mpmath: 1.0986122886681098)
    np.testing.assert_array_equal(lse, np.full((4, 1, 2), math.log(3.0)))
    _, ex_lse = attnspec.exact.sdpa(q, k, v, return_lse=True)
    assert ex_lse.shape == (4, 1, 2)


@pytest.mark.parametrize("name", ["x", "where"])
def test_a_ragged_list_names_the_argument(name: str) -> None:
    ragged = [[1.0, 2.0], [3.0]]
    args = (
        {"x": ragged} if name == "x" else {"x": np.zeros((2, 2)), "where": [[True], [True, False]]}
    )
    with pytest.raises(ValueError, match=f"{name} must be a rectangular array"):
        attnspec.softmax(**args)


@pytest.mark.parametrize("name", ["q", "k", "v", "mask", "bias", "dropout_mask"])
def test_a_ragged_list_in_sdpa_names_the_argument(name: str) -> None:
    kw = {"q": np.ones((2, 2)), "k": np.ones((2, 2)), "v": np.ones((2, 2))}
    ragged = [[1.0, 2.0], [3.0]] if name in ("q", "k", "v", "bias") else [[True, True], [True]]
    kw[name] = ragged
    if name == "dropout_mask":
        kw["dropout_p"] = 0.5
    with pytest.raises(ValueError, match=f"{name} must be a rectangular array"):
        attnspec.sdpa(**kw)


def test_an_array_as_precision_or_align_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="precision must be one of"):
        attnspec.softmax([1.0, 2.0], precision=np.array(["fast"]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="align must be one of"):
        attnspec.sdpa(
            np.ones((2, 2)),
            np.ones((2, 2)),
            np.ones((2, 2)),
            causal=True,
            align=np.array("top_left"),
        )


@pytest.mark.parametrize("slope", [np.inf, -np.inf, np.nan])
def test_non_finite_alibi_slopes_are_refused(slope: float) -> None:
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        attnspec.sdpa(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), alibi_slopes=[slope])


def test_masked_arrays_are_refused_rather_than_losing_their_mask() -> None:
    masked = np.ma.masked_array([1.0, 2.0], mask=[True, False])
    with pytest.raises(TypeError, match="x is a numpy masked array"):
        attnspec.softmax(masked)
    with pytest.raises(TypeError, match="mask is a numpy masked array"):
        attnspec.sdpa(
            np.ones((2, 2)),
            np.ones((2, 2)),
            np.ones((2, 2)),
            mask=np.ma.masked_array(np.ones((2, 2), dtype=bool)),
        )


def test_a_keep_mask_with_dropout_p_zero_is_applied_with_factor_one() -> None:
    # Defined (docstring of attnspec.sdpa): the mask is applied as given, factor 1/(1-0).
    # Logits all 0, two keys, key 1 dropped: p = (1/2, 0), out = 1/2 * v_0 = 5.
    keep = np.array([[True, False]])
    out = attnspec.sdpa(
        np.zeros((1, 1)),
        np.zeros((2, 1)),
        np.array([[10.0], [20.0]]),
        dropout_mask=keep,
        dropout_p=0.0,
    )
    assert out.tolist() == [[5.0]]


def test_work_past_the_size_limit_is_refused_at_once_with_what_to_do() -> None:
    huge = np.broadcast_to(np.zeros(1), (10**6, 10**6))  # 1e12 entries: about 17 h accurate
    with pytest.raises(ValueError, match=r"exceed the size limit.*set_size_limit"):
        attnspec.logsumexp(huge)
    old = inputs.set_size_limit("fast", 10)
    try:
        with pytest.raises(ValueError, match="logits"):
            attnspec.sdpa(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 2)), precision="fast")
        attnspec.sdpa(np.ones((2, 2)), np.ones((1, 2)), np.ones((1, 2)), precision="fast")
    finally:
        inputs.set_size_limit("fast", old)
    with pytest.raises(ValueError, match="positive int or None"):
        inputs.set_size_limit("fast", 0)


def test_exact_sdpa_keeps_its_digits_when_logit_terms_cancel() -> None:
    # q.k = 1e300 + 1 and 1e300 exactly, bias -1e300: the logits are 1 and 0, the weights
    # e/(1+e) and 1/(1+e), so out = e/(1+e) = 0.7310585786300049 (math.exp, correctly
    # rounded here). At a fixed 50 digits the logit 1e300 + 1 rounded to 1e300 (out 0.5).
    q = np.array([[1.0, 1.0]])
    k = np.array([[1e300, 1.0], [1e300, 0.0]])
    v = np.array([[1.0], [0.0]])
    bias = np.array([[-1e300, -1e300]])
    got = attnspec.exact.to_float64(attnspec.exact.sdpa(q, k, v, scale=1.0, bias=bias))
    assert abs(float(got[0, 0]) - 1 / (1 + math.exp(-1.0))) <= 2**-52


# Logits beyond the float64 range from finite inputs (issue 7, item 7). The answers are
# exact: three equal logits (-2e308 each) weigh 1/3 each, so out = mean(1, 2, 3) = 2; the
# logits 2e308 and 4e308 differ by 2e308, so the second weighs 1 - e^-2e308 = 1: out = 2.
OVERFLOWING = {
    "equal logits -2e308": (
        (np.ones((1, 2)), np.ones((3, 2)), np.array([[1.0], [2.0], [3.0]])),
        {"scale": -1e308},
        2.0,
    ),
    "logits 2e308 and 4e308": (
        (
            np.array([[1e154, 1e154]]),
            np.array([[1e154, 1e154], [2e154, 2e154]]),
            np.array([[1.0], [2.0]]),
        ),
        {"scale": 1.0},
        2.0,
    ),
}


@pytest.mark.parametrize("name", sorted(OVERFLOWING))
def test_exact_sdpa_orders_logits_beyond_the_float64_range(name: str) -> None:
    args, kw, want = OVERFLOWING[name]
    assert attnspec.exact.to_float64(attnspec.exact.sdpa(*args, **kw)).tolist() == [[want]]


@pytest.mark.parametrize("name", sorted(OVERFLOWING))
def test_accurate_sdpa_refuses_logits_it_cannot_order(name: str) -> None:
    args, kw, _ = OVERFLOWING[name]
    with pytest.raises(ValueError, match="beyond the float64 range"):
        attnspec.sdpa(*args, **kw)
    # a softcap brings such logits back in range (c tanh(+-inf) = +-c, the limit)
    q, k, v = args
    assert np.isfinite(attnspec.sdpa(q, k, v, softcap=5.0, **kw)).all()


@pytest.mark.parametrize("precision", ["accurate", "fast"])
def test_an_excluded_entry_of_a_nan_slice_weighs_zero(precision: str) -> None:
    # Found by the thorough profile: excluded (and -inf) entries carry no weight in any
    # slice, a NaN slice too (as a hidden key in attention): softmax 0, log_softmax -inf.
    x, where = np.array([np.nan, 0.0, -np.inf]), np.array([True, False, True])
    p = attnspec.softmax(x, where=where, precision=precision)
    assert np.isnan(p[0]) and p[1:].tolist() == [0.0, 0.0]
    lp = attnspec.log_softmax(x, where=where, precision=precision)
    assert np.isnan(lp[0]) and lp[1:].tolist() == [-np.inf, -np.inf]
    assert np.isnan(attnspec.logsumexp(x, where=where, precision=precision))
    exact = attnspec.exact.to_float64(attnspec.exact.softmax(x, where=where))
    assert np.isnan(exact[0]) and exact[1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("precision", ["accurate", "exact"])
def test_logit_terms_that_cancel_keep_the_weights_exact(precision: str) -> None:
    # Found while fixing exact's digits: q.k = 1e300 + 1 and 1e300 exactly, plus a bias
    # -1e300, leaves the logits 1 and 0 as double-doubles (hi 0, lo 1) whose exponential
    # was reduced from hi alone. The accurate claim 4u sum_j p_j |v_j| is 4u e/(1+e) here.
    q, k = np.array([[1.0, 1.0]]), np.array([[1e300, 1.0], [1e300, 0.0]])
    v, bias = np.array([[1.0], [0.0]]), np.array([[-1e300, -1e300]])
    if precision == "exact":
        out = attnspec.exact.to_float64(attnspec.exact.sdpa(q, k, v, scale=1.0, bias=bias))
    else:
        out = attnspec.sdpa(q, k, v, scale=1.0, bias=bias)
    with mpmath.workdps(40):  # e / (1 + e) at 40 digits
        want = mpmath.e / (1 + mpmath.e)
        assert abs(mpmath.mpf(float(out[0, 0])) - want) <= 4 * mpmath.mpf(2) ** -53 * want


def test_python_ints_beyond_int64_are_real_numbers() -> None:
    # Found by the fuzzer: [2**70, 1] made a numpy object array, refused as dtype object.
    # 2**70 is exactly a float64; softmax [1, e^(1 - 2**70)] = [1, 0] exactly.
    assert attnspec.softmax([2**70, 1]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="x holds an integer beyond the float64 range"):
        attnspec.softmax([10**400, 1])


def test_logits_that_round_alike_in_the_wrong_order_do_not_overflow() -> None:
    # found by the fuzzer's author (issue 7): logits 1e19 and 1e19 + 1000 (exact products
    # of the inputs) round to the same float64, so the maximum chosen from the roundings
    # may be the smaller one, and e**(+1000) overflowed to inf: NaN. The exact output is
    # the value of the larger logit's key, 1 (the other weight is e**-1000 / (1 + e**-1000),
    # times the value 0); the lse is 1e19 + 1000 + log1p(e**-1000), which rounds to 1e19
    # (the ulp of 1e19 is 2048)
    q = [[1.0, 1.0]]
    k = [[1e19, 0.0], [1e19, 1000.0]]
    v = [[0.0], [1.0]]
    out, lse = attnspec.sdpa(q, k, v, scale=1.0, return_lse=True)
    assert out.tolist() == [[1.0]]
    assert lse.tolist() == [1e19]
    ex_out, ex_lse = attnspec.exact.sdpa(q, k, v, scale=1.0, return_lse=True)
    assert attnspec.exact.to_float64(ex_out).tolist() == [[1.0]]
    assert attnspec.exact.to_float64(ex_lse).tolist() == [1e19]


def test_overflow_refusal_names_the_row_of_the_whole_query_axis(monkeypatch: Any) -> None:
    # the definition evaluates blocks of query rows; the refusal of a logit beyond the
    # float64 range must name its row in the call's query axis, not in its block
    from attnspec.reference import attention

    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 2)  # one query row per block
    q = np.array([[[1.0], [1.0], [1e300]]])  # one head, three queries
    k = np.array([[[1e10], [1.0]]])
    with pytest.raises(ValueError, match=r"the logit at \(0, 2, 0\)"):
        attnspec.sdpa(q, k, np.ones((1, 2, 1)), scale=1.0)
