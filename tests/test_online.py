"""The online topic: the reference's semantics, every property on attnspec's online kernels,
and each property's power to fail on deliberately broken online kernels.

Expected values are exact by construction (stated at each test): means of small binary
fractions, equal logits, a single visible key, the empty sums. The accuracy of one merge
is compared with mpmath at 50 digits within the bound derived in
spec/tolerances/online.py (claim online-merge-rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import attnspec
from attnspec.reference import online as O
from attnspec.spec.battery import run_battery
from attnspec.spec.properties import online as OP
from attnspec.spec.properties._core import PropertyViolation, claims_of, same
from attnspec.spec.strategies.attention import AttentionCase
from attnspec.spec.strategies.online import (
    OnlineCase,
    block_sizes,
    hide_first_block,
    merge_trees,
    online_cases,
    partitions,
    tree_leaves,
)
from attnspec.spec.tolerances import online as otol

RNG = np.random.default_rng(20261201)
U = 2.0**-53


def _same_bits(a: Any, b: Any) -> bool:
    return bool(np.all(same(np.asarray(a), np.asarray(b))))


# ---------------------------------------------------------------------------------------
# The state: update, merge, finalize
# ---------------------------------------------------------------------------------------


def _state(logits: Any, values: Any, **kw: Any) -> O.State:
    s = np.asarray(logits, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return O.update(O.empty_state(s.shape[:-1], v.shape[-1]), s, v, **kw)


def test_empty_state_is_minus_inf_zero_zero_and_finalizes_to_zero_and_minus_inf() -> None:
    e = O.empty_state((2, 3), 4)
    assert e.rows == (2, 3) and e.width == 4
    assert np.all(e.m == -np.inf) and np.all(e.l == 0) and np.all(e.acc == 0)
    o, lse = O.finalize(e)
    assert o.shape == (2, 3, 4) and np.all(o == 0.0) and np.all(lse == -np.inf)


def test_empty_state_is_the_identity_of_merge_bit_for_bit() -> None:
    a = _state(RNG.standard_normal((3, 5)), RNG.standard_normal((5, 2)))
    e = O.empty_state(3, 2)
    for merged in (O.merge(a, e), O.merge(e, a)):
        for name in ("m", "l", "acc"):
            assert _same_bits(getattr(merged, name), getattr(a, name)), name


def test_merge_is_commutative_bit_for_bit() -> None:
    a = _state(RNG.standard_normal((4, 3)) * 30, RNG.standard_normal((3, 2)))
    b = _state(RNG.standard_normal((4, 6)) * 30, RNG.standard_normal((6, 2)))
    ab, ba = O.merge(a, b), O.merge(b, a)
    assert all(_same_bits(getattr(ab, n), getattr(ba, n)) for n in ("m", "l", "acc"))


def test_equal_logits_in_blocks_give_the_mean_exactly() -> None:
    # four keys with logit 0: weights 1/4 each; values 1, 2, 3, 6 (mean 3, exact)
    v = np.array([[1.0], [2.0], [3.0], [6.0]])
    st_ = O.empty_state(1, 1)
    for j in range(4):
        st_ = O.update(st_, np.zeros((1, 1)), v[j : j + 1])
    o, lse = O.finalize(st_)
    assert o.tolist() == [[3.0]] and lse[0] == math.log(4.0)


def test_a_fully_hidden_first_block_gives_no_nan_whatever_it_holds() -> None:
    # first block: NaN logits and values, all hidden; second block: one key, value 5
    st_ = O.empty_state(1, 1)
    st_ = O.update(st_, [[np.nan, np.inf]], [[np.nan], [np.inf]], visible=[[False, False]])
    assert st_.m[0] == -np.inf and st_.l[0] == 0 and not np.isnan(st_.acc).any()
    st_ = O.update(st_, [[0.25]], [[5.0]])
    o, lse = O.finalize(st_)
    assert o.tolist() == [[5.0]] and lse.tolist() == [0.25]  # a single visible key


def test_a_nan_logit_at_a_visible_key_makes_the_row_nan() -> None:
    st_ = _state([[0.0, np.nan], [0.0, 1.0]], [[1.0], [2.0]])
    st_ = O.update(st_, [[3.0], [3.0]], [[1.0]])
    o, lse = O.finalize(st_)
    assert np.isnan(o[0]).all() and np.isnan(lse[0])
    assert np.isfinite(o[1]).all() and np.isfinite(lse[1])


def test_plus_inf_logits_share_the_weight_and_take_over_from_earlier_blocks() -> None:
    # block 1: finite logits with an infinite value (outweighed later: weight 0)
    st_ = _state([[5.0, 1.0]], [[np.inf], [7.0]])
    st_ = O.update(st_, [[np.inf, 0.0, np.inf]], [[1.0], [100.0], [2.0]])
    o, lse = O.finalize(st_)
    # the limit rule: weight 1/2 on each +inf logit: (1 + 2) / 2 = 1.5 exactly
    assert o.tolist() == [[1.5]] and lse.tolist() == [np.inf]
    # matches the definition
    ref, ref_lse = attnspec.sdpa(
        np.zeros((1, 1)),
        np.zeros((5, 1)),
        np.array([[np.inf], [7.0], [1.0], [100.0], [2.0]]),
        bias=np.array([[5.0, 1.0, np.inf, 0.0, np.inf]]),
        return_lse=True,
    )
    assert _same_bits(o, ref) and _same_bits(lse, ref_lse)


def test_an_infinite_value_at_a_key_with_a_tiny_weight_gives_infinity() -> None:
    # logits 0 and -800: the second weight e^-800 underflows to 0 in float64 but is
    # positive, so its +inf value makes the output +inf (the definition's rule)
    st_ = _state([[0.0]], [[1.0]])
    st_ = O.update(st_, [[-800.0]], [[np.inf]])
    o, _ = O.finalize(st_)
    assert o.tolist() == [[np.inf]]
    both = O.update(st_, [[0.0]], [[-np.inf]])
    assert np.isnan(O.finalize(both)[0]).all()  # +inf and -inf at weighted keys: NaN


def test_a_dropped_key_counts_in_the_normaliser_but_not_in_the_output() -> None:
    # two keys with logit 0, the second dropped (p = 0.5): o = 1/2 * 4 / (1 - 0.5) = 4
    st_ = _state([[0.0, 0.0]], [[4.0], [np.nan]], keep=[[True, False]])
    o, lse = O.finalize(st_, dropout_p=0.5)
    assert o.tolist() == [[4.0]] and lse[0] == math.log(2.0)


def test_a_sink_enters_once_and_a_sink_only_row_gives_zero_and_sigma() -> None:
    st_ = _state([[0.0]], [[3.0]])
    o, lse = O.finalize(O.with_sink(st_, [0.0]))
    # key logit 0 and sink 0: the key's weight is 1/2: o = 3/2, lse = log 2
    assert o.tolist() == [[1.5]] and lse[0] == math.log(2.0)
    o, lse = O.finalize(O.with_sink(O.empty_state(1, 1), [0.75]))
    assert o.tolist() == [[0.0]] and lse.tolist() == [0.75]


def test_blocked_sdpa_with_one_key_per_block_matches_the_definition() -> None:
    q, k, v = (
        RNG.standard_normal((2, 3, 4)),
        RNG.standard_normal((1, 6, 4)),
        RNG.standard_normal((1, 6, 2)),
    )
    kw: dict[str, Any] = {"causal": True, "align": "bottom_right", "sinks": np.array([0.5, -1.0])}
    out, lse = O.blocked_sdpa(q, k, v, block_keys=1, return_lse=True, **kw)
    w_up, bound, lse_b = otol.online_sdpa_bound(q, k, v, block_keys=1, **kw)
    ref, ref_lse = attnspec.sdpa(q, k, v, return_lse=True, **kw)
    # the blocked result's bound plus the direct (accurate) result's: 4u W + eta, 1 ulp
    assert np.all(np.abs(out - ref) <= bound + 4 * U * w_up + 2.0**-1074)
    assert np.all(np.abs(lse - ref_lse) <= lse_b + 2 * U * np.abs(ref_lse))


@pytest.mark.parametrize("order", [None, [2, 0, 1], [1, 2, 0]])
def test_blocked_sdpa_in_any_order_of_the_key_blocks_gives_the_same_special_rows(
    order: Any,
) -> None:
    q = np.zeros((3, 2))
    k = np.zeros((5, 2))
    v = np.array([[1.0], [2.0], [3.0], [4.0], [np.nan]])
    mask = np.array([[False] * 5, [True, True, True, True, False], [True] * 5])
    out, lse = O.blocked_sdpa(q, k, v, block_keys=2, order=order, mask=mask, return_lse=True)
    assert out[0].tolist() == [0.0] and lse[0] == -np.inf  # nothing visible
    assert out[1].tolist() == [2.5] and lse[1] == math.log(4.0)  # the mean, exact
    assert np.isnan(out[2]).all() and lse[2] == math.log(5.0)  # a NaN value carries weight


# ---------------------------------------------------------------------------------------
# merge_partials
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_merging_with_the_empty_partial_is_the_identity(precision: str) -> None:
    o = RNG.standard_normal((3, 2))
    lse = RNG.standard_normal(3) * 100
    empty_o, empty_l = np.full((3, 2), np.nan), np.full(3, -np.inf)
    for got in (
        O.merge_partials(o, lse, empty_o, empty_l, precision=precision),
        O.merge_partials(empty_o, empty_l, o, lse, precision=precision),
    ):
        assert _same_bits(got[0], o) and _same_bits(got[1], lse)
    go, gl = O.merge_partials(empty_o, empty_l, empty_o, empty_l, precision=precision)
    assert np.all(go == 0.0) and np.all(gl == -np.inf)


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_merge_partials_special_rows(precision: str) -> None:
    o_a = np.array([[1.0], [1.0], [np.inf], [2.0]])
    l_a = np.array([np.nan, np.inf, -800.0, 0.0])
    o_b = np.array([[3.0], [5.0], [1.0], [np.inf]])
    l_b = np.array([0.0, 1.0, 0.0, np.inf])
    o, lse = O.merge_partials(o_a, l_a, o_b, l_b, precision=precision)
    assert np.isnan(o[0]).all() and np.isnan(lse[0])  # NaN lse: NaN row
    assert o[1].tolist() == [1.0] and lse[1] == np.inf  # +inf side takes all the weight
    assert o[2].tolist() == [np.inf]  # weight e^-800 > 0 times +inf
    assert o[3].tolist() == [np.inf] and lse[3] == np.inf


def test_merge_partials_refuses_two_plus_inf_partials_naming_the_row() -> None:
    with pytest.raises(ValueError, match=r"both partials have lse \+inf in row \(1,\)"):
        O.merge_partials(np.ones((2, 1)), [0.0, np.inf], np.ones((2, 1)), [0.0, np.inf])


def _mp_merge(oa: float, la: float, ob: float, lb: float) -> tuple[Any, Any]:
    """The exact merge of float64 partials, in mpmath (50 digits)."""
    terms = [(mpmath.mpf(la), mpmath.mpf(oa)), (mpmath.mpf(lb), mpmath.mpf(ob))]
    terms = [(x, y) for x, y in terms if x != mpmath.ninf]
    if not terms:
        return mpmath.mpf(0), mpmath.ninf
    top = max(x for x, _ in terms)
    z = mpmath.fsum(mpmath.exp(x - top) for x, _ in terms)
    ell = top + mpmath.log(z)
    return mpmath.fsum(mpmath.exp(x - ell) * y for x, y in terms), ell


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_one_merge_is_within_its_derived_bound_of_the_exact_merge(precision: str) -> None:
    # lse from -1e6 to 1e6 (|l| u is the dominant term there), outputs of both signs
    n = 400
    la = RNG.standard_normal(n) * np.array([1.0, 30.0, 1e3, 1e6])[np.arange(n) % 4]
    lb = la + RNG.standard_normal(n) * np.array([0.1, 3.0, 30.0, 800.0])[np.arange(n) % 4]
    oa, ob = RNG.standard_normal((n, 2)), RNG.standard_normal((n, 2)) * 1e3
    o, lse = O.merge_partials(oa, la, ob, lb, precision=precision)
    bound_fn = otol.merge_bound if precision == "fast" else otol.accurate_merge_bound
    bound, lse_bound = bound_fn(oa, la, ob, lb)
    worst = 0.0
    with mpmath.workdps(50):
        for i in range(n):
            for c in range(2):
                y, ell = _mp_merge(oa[i, c], la[i], ob[i, c], lb[i])
                err = abs(mpmath.mpf(o[i, c]) - y)
                assert err <= bound[i, c], (i, c, float(err), bound[i, c])
                worst = max(worst, float(err / bound[i, c]))
            assert abs(mpmath.mpf(lse[i]) - ell) <= lse_bound[i], i
    assert worst > 1e-3  # the bound is not vacuous: some errors come within 1000x of it


def test_fast_merge_does_not_meet_the_accurate_merge_bound() -> None:
    # at lse near 1e6 the fast merge's weights carry errors ~1e6 u: far beyond 4u
    la = np.full(64, 1e6) + RNG.standard_normal(64)
    lb = la + RNG.standard_normal(64)
    oa, ob = np.ones((64, 1)), -np.ones((64, 1)) * 0.5
    o, _ = O.merge_partials(oa, la, ob, lb)
    bound, _ = otol.accurate_merge_bound(oa, la, ob, lb)
    errors = []
    with mpmath.workdps(50):
        for i in range(64):
            y, _ = _mp_merge(oa[i, 0], la[i], ob[i, 0], lb[i])
            errors.append(float(abs(mpmath.mpf(o[i, 0]) - y) / bound[i, 0]))
    assert max(errors) > 1.0


# ---------------------------------------------------------------------------------------
# Validation: clear errors naming the argument; inputs never modified
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: O.update(O.empty_state(2, 1), np.zeros((3, 1)), np.zeros((1, 1))),
            ValueError,
            r"logits_block must have shape \(\*R, n\) with R = \(2,\)",
        ),
        (
            lambda: O.update(O.empty_state(2, 1), np.zeros((2, 3)), np.zeros((2, 1))),
            ValueError,
            r"values_block must have shape \(\.\.\., n, Ev\) = \(\.\.\., 3, 1\)",
        ),
        (
            lambda: O.update(O.empty_state(2, 1), np.zeros((2, 1))),
            ValueError,
            r"values_block is required",
        ),
        (
            lambda: O.update(O.empty_state(2, 0), np.zeros((2, 1)), visible=[[1], [0]]),
            TypeError,
            r"visible must be a bool array",
        ),
        (
            lambda: O.update(O.empty_state(2, 0), np.zeros((2, 1)), keep=np.ones((3, 1), bool)),
            ValueError,
            r"keep with shape \(3, 1\) does not broadcast",
        ),
        (
            lambda: O.update(O.empty_state(2, 0), np.zeros((2, 1), bool)),
            TypeError,
            r"logits_block must hold real numbers",
        ),
        (lambda: O.update("state", np.zeros((2, 1))), TypeError, r"state must be a State"),
        (
            lambda: O.merge(O.empty_state(2, 1), O.empty_state(2, 2)),
            ValueError,
            r"same value width Ev, got 1 and 2",
        ),
        (
            lambda: O.merge(O.empty_state(2, 1), O.empty_state(3, 1)),
            ValueError,
            r"rows of a \(2,\) and b \(3,\) do not broadcast",
        ),
        (lambda: O.empty_state((2, -1)), ValueError, r"rows must be a shape"),
        (lambda: O.empty_state(2, width=-1), ValueError, r"width must be an int >= 0"),
        (
            lambda: O.finalize(O.empty_state(1), dropout_p=1.0),
            ValueError,
            r"dropout_p must lie in \[0, 1\)",
        ),
        (
            lambda: O.with_sink(O.empty_state(2), np.zeros(3)),
            ValueError,
            r"sink with shape \(3,\) does not broadcast to the rows R = \(2,\)",
        ),
        (
            lambda: O.merge_partials(np.zeros((2, 1)), np.zeros(2), np.zeros((2, 3)), np.zeros(2)),
            ValueError,
            r"o_a and o_b must share Ev",
        ),
        (
            lambda: O.merge_partials(np.zeros(2), np.zeros(2), np.zeros((2, 1)), np.zeros(2)),
            ValueError,
            r"o_a must have shape \(\*R, Ev\)",
        ),
        (
            lambda: O.merge_partials(
                np.zeros((2, 1)), np.zeros(2), np.zeros((2, 1)), np.zeros(2), precision="exact"
            ),
            ValueError,
            r"precision must be 'fast'",
        ),
        (
            lambda: O.blocked_sdpa(np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), block_keys=0),
            ValueError,
            r"block_keys must be >= 1",
        ),
        (
            lambda: O.blocked_sdpa(
                np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), block_keys=True
            ),
            TypeError,
            r"block_keys must be an int",
        ),
        (
            lambda: O.blocked_sdpa(
                np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), block_keys=2, order=[0, 0]
            ),
            ValueError,
            r"order must be a permutation of the 2",
        ),
        (
            lambda: O.blocked_sdpa(
                np.ones((2, 2)),
                np.ones((3, 2)),
                np.ones((3, 1)),
                block_keys=2,
                mask=np.ones((2, 3)),
            ),
            TypeError,
            r"mask must be a bool array",
        ),
        (
            lambda: O.blocked_sdpa(
                np.ones((2, 2)),
                np.ones((3, 2)),
                np.ones((3, 1)),
                block_keys=2,
                bias=np.ones((4, 3)),
            ),
            ValueError,
            r"bias with shape \(4, 3\) does not broadcast to \(\.\.\., Hq, L, S\)",
        ),
        (
            lambda: O.blocked_sdpa(np.ones((2, 2)), np.ones((3, 3)), np.ones((3, 1)), block_keys=2),
            ValueError,
            r"q and k must share their last dimension E",
        ),
        (
            lambda: O.blocked_sdpa(
                np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), block_keys=2, causal=True
            ),
            ValueError,
            r"needs an explicit align=",
        ),
        (
            lambda: O.blocked_sdpa(
                np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), block_keys=2, precision="fast"
            ),
            TypeError,
            r"unexpected keyword argument",
        ),
        (
            lambda: O.split_sdpa(np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1))),
            ValueError,
            r"exactly one of block_keys= and parts=",
        ),
        (
            lambda: O.split_sdpa(
                np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), parts=[[0, 1], [1, 2]]
            ),
            ValueError,
            r"parts must hold each key 0..2 exactly once",
        ),
        (
            lambda: O.split_sdpa(
                np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 1)), parts=[[0], [1, 2]], tree=(0, 0)
            ),
            ValueError,
            r"tree \(0, 0\) must have each part 0..1",
        ),
        (
            lambda: O.split_sdpa(
                np.ones((2, 2)),
                np.ones((3, 2)),
                np.ones((3, 1)),
                block_keys=1,
                mask=np.ones((2, 3)),
            ),
            TypeError,
            r"mask must be a bool array",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_argument(
    call: Callable[[], Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_inputs_are_never_modified() -> None:
    q, k, v = (
        RNG.standard_normal((2, 3, 2)),
        RNG.standard_normal((2, 5, 2)),
        RNG.standard_normal((2, 5, 3)),
    )
    v[0, 1, 0] = np.nan
    mask = RNG.random((3, 5)) > 0.3
    bias = RNG.standard_normal((3, 5))
    bias[0, 0] = -np.inf
    keep = RNG.random((2, 3, 5)) > 0.2
    args = {
        "mask": mask,
        "bias": bias,
        "dropout_mask": keep,
        "dropout_p": 0.25,
        "sinks": np.array([0.1, 0.2]),
    }
    saved = [a.copy() for a in (q, k, v, mask, bias, keep)]
    O.blocked_sdpa(q, k, v, block_keys=2, **args)
    O.split_sdpa(q, k, v, block_keys=2, precision="accurate", **args)
    o, lse = attnspec.sdpa(q, k, v, return_lse=True, **args)
    o0, l0 = o.copy(), lse.copy()
    O.merge_partials(o, lse, o, lse)
    O.merge_partials(o, lse, o, lse, precision="accurate")
    state = O.empty_state((2, 3), 3)
    s = RNG.standard_normal((2, 3, 5))
    s0 = s.copy()
    O.finalize(O.update(state, s, v, visible=mask, keep=keep))
    for before, after in zip(saved, (q, k, v, mask, bias, keep), strict=True):
        assert _same_bits(before, after)
    assert _same_bits(o, o0) and _same_bits(lse, l0) and _same_bits(s, s0)
    assert np.all(state.m == -np.inf)  # the state is not written either


# ---------------------------------------------------------------------------------------
# The strategies reach what their docstring promises; bad arguments are refused
# ---------------------------------------------------------------------------------------

SEARCH = settings(
    max_examples=2000,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def _hidden_first_block(oc: OnlineCase) -> bool:
    mask = oc.case.kwargs.get("mask")
    if mask is None or oc.case.n_keys == 0:
        return False
    first = np.arange(oc.case.n_keys) < oc.block_keys
    return bool(not np.asarray(mask, dtype=bool)[..., first].any())


REACHES: dict[str, Callable[[OnlineCase], bool]] = {
    "a fully hidden first block": _hidden_first_block,
    "a hidden first block holding NaN": lambda oc: (
        _hidden_first_block(oc) and bool(np.isnan(oc.case.v).any())
    ),
    "several blocks with a short last one": lambda oc: (
        oc.block_keys < oc.case.n_keys and oc.case.n_keys % oc.block_keys != 0
    ),
    "one block (b >= S)": lambda oc: oc.block_keys >= oc.case.n_keys > 0,
    "a non-contiguous part": lambda oc: any(
        p and list(p) != list(range(p[0], p[0] + len(p))) for p in oc.parts
    ),
    "an empty part": lambda oc: len(oc.parts) > 1 and any(not p for p in oc.parts),
    "four parts": lambda oc: len(oc.parts) == 4,
    "a tree that is not a left fold in order": lambda oc: (
        (not isinstance(oc.tree, int) and not isinstance(oc.tree[1], int))
        or tree_leaves(oc.tree) != sorted(tree_leaves(oc.tree))
    ),
    "sinks": lambda oc: oc.case.kwargs.get("sinks") is not None,
    "dropout": lambda oc: oc.case.kwargs.get("dropout_mask") is not None,
}


@pytest.mark.parametrize("what", list(REACHES))
def test_online_cases_reach(what: str) -> None:
    found = find(online_cases(), REACHES[what], settings=SEARCH)
    assert REACHES[what](found)


@given(oc=online_cases())
@settings(max_examples=30, deadline=None)
def test_online_cases_are_valid(oc: OnlineCase) -> None:
    keys = sorted(j for p in oc.parts for j in p)
    assert keys == list(range(oc.case.n_keys))
    assert sorted(tree_leaves(oc.tree)) == list(range(len(oc.parts)))
    attnspec.sdpa(oc.case.q, oc.case.k, oc.case.v, **oc.case.kwargs)  # a valid problem


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: online_cases(max_parts=0), r"max_parts >= 1"),
        (lambda: online_cases(max_side=0), r"max_side >= 1"),
        (lambda: online_cases(features="mask"), r"Expected a set or tuple"),
        (lambda: online_cases(hidden_block=True, features=("lse",)), r"without 'mask'"),
        (lambda: online_cases(hidden_block=1), r"a bool or None"),
        (lambda: block_sizes(-1), r"n_keys >= 0"),
        (lambda: partitions(3, max_parts=0), r"max_parts >= 1"),
        (lambda: merge_trees(0), r"n_leaves >= 1"),
    ],
)
def test_strategy_arguments_are_checked_when_built(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        build()


def test_online_case_validates_its_parts_and_tree() -> None:
    case = AttentionCase(np.zeros((1, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"must hold each key 0..1 once"):
        OnlineCase(case, 1, ((0,),), 0)
    with pytest.raises(ValueError, match=r"each part 0..1 once as a leaf"):
        OnlineCase(case, 1, ((0,), (1,)), (0, 0))
    with pytest.raises(ValueError, match=r"block_keys must be >= 1"):
        OnlineCase(case, 0, ((0, 1),), 0)


# ---------------------------------------------------------------------------------------
# Every property on attnspec's online kernels
# ---------------------------------------------------------------------------------------

IMPLS = {p: OP.attnspec_implementation(p) for p in ("fast", "accurate")}
FEW = settings(max_examples=min(settings().max_examples, 20), deadline=None)

_Q = np.round(RNG.standard_normal((1, 2, 3, 2)), 3)
_K = np.round(RNG.standard_normal((1, 2, 5, 2)), 3)
_V = np.round(RNG.standard_normal((1, 2, 5, 3)), 3)


def _oc(case: AttentionCase, b: int, parts: Any = None, tree: Any = 0) -> OnlineCase:
    p = (tuple(range(case.n_keys)),) if parts is None else parts
    return OnlineCase(case, b, p, tree)


_BASE = AttentionCase(_Q, _K, _V)
SPECIAL = {
    "one key per block": _oc(_BASE, 1, ((0, 1), (2,), (3, 4)), ((2, 0), 1)),
    "short last block": _oc(_BASE, 2, ((4, 0), (1, 2, 3)), (1, 0)),
    "one block": _oc(_BASE, 9),
    "hidden first block with NaN": _oc(hide_first_block(_BASE, 2, poison=True), 2),
    "every key hidden": _oc(AttentionCase(_Q, _K, _V, {"mask": np.zeros(5, dtype=bool)}), 2),
    "sinks": _oc(AttentionCase(_Q, _K, _V, {"sinks": np.array([0.5, -1.0])}), 2),
    "L > S bottom right": _oc(
        AttentionCase(
            _K[..., :4, :],
            _Q[..., :2, :],
            _V[..., :2, :],
            {"causal": True, "align": "bottom_right"},
        ),
        1,
    ),
    "logits offset 1e6": _oc(
        AttentionCase(
            np.concatenate([np.full((3, 1), 1e3), _Q[0, 0]], -1),
            np.concatenate([np.full((5, 1), 1e3), _K[0, 0]], -1),
            _V[0, 0],
            {"scale": 1.0},
        ),
        2,
        ((0, 2, 4), (1, 3)),
        (1, 0),
    ),
    "GQA and dropout": _oc(
        AttentionCase(
            np.concatenate([_Q, -_Q], axis=-3),
            _K,
            _V,
            {"dropout_mask": np.array([True, False, True, True, True]), "dropout_p": 0.5},
        ),
        3,
    ),
}


def _property_test(name: str) -> Callable[..., None]:
    check = OP.PROPERTIES[name]

    @pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
    @FEW
    @given(ocase=online_cases(max_side=4, max_width=3))
    def test(impl: OP.OnlineImpl, ocase: OnlineCase) -> None:
        check(impl, ocase)

    for case in SPECIAL.values():
        test = example(ocase=case)(test)
    test.__name__ = f"test_{name}"
    test.__doc__ = check.__doc__
    return test


test_block_sizes = _property_test("block_sizes")
test_split_merge_order = _property_test("split_merge_order")
test_hidden_block = _property_test("hidden_block")
test_sink_once = _property_test("sink_once")


def test_every_property_has_a_test_and_names_its_claims() -> None:
    from attnspec.spec.derivations import online as derivations

    names = {c.name for c in derivations.CLAIMS}
    tested: set[str] = set()
    for name, check in OP.PROPERTIES.items():
        assert f"test_{name}" in globals()
        assert set(claims_of(check)) <= names
        tested |= set(claims_of(check))
    assert names == tested  # the rounding bound: by the merge-tree property (its tolerance)


@pytest.mark.parametrize("precision", ["fast", "accurate"])
def test_attnspec_implementation_claims_its_precision(precision: str) -> None:
    impl = OP.attnspec_implementation(precision)
    assert impl.topic == "online" and impl.accuracy == precision
    assert {"blocked", "merge", "mask", "sinks", "lse"} <= impl.features


# ---------------------------------------------------------------------------------------
# Each property can fail: deliberately broken online kernels
# ---------------------------------------------------------------------------------------


def _toy_blocked(
    *,
    rescale: bool = True,
    guard: bool = True,
    sink_every_block: bool = False,
    overlap: int = 0,
) -> Callable[..., Any]:
    """A small FlashAttention-2 loop (mask, bias, scale, sinks and lse only) with one
    defect switched on: no rescaling by e^{m_old - m_new}; no guard (-inf - -inf in a fully
    hidden block, 0 * NaN at hidden values); the sink added in every block; blocks that
    overlap by ``overlap`` keys (an off-by-one boundary)."""

    def fn(q: Any, k: Any, v: Any, *, block_keys: int, **kw: Any) -> Any:
        q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
        tau = kw.get("scale")
        tau = 1.0 / math.sqrt(q.shape[-1]) if tau is None else tau
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            s_all = tau * (q @ np.swapaxes(k, -1, -2))
            seen = np.ones(s_all.shape, dtype=bool)
            if kw.get("mask") is not None:
                seen = seen & np.asarray(kw["mask"], dtype=bool)
            if kw.get("bias") is not None:
                b = np.asarray(kw["bias"], dtype=np.float64)
                s_all = s_all + b
                seen = seen & (b != -np.inf)
            sig = kw.get("sinks")
            n_k = k.shape[-2]
            m = np.full(s_all.shape[:-1], -np.inf)
            l_ = np.zeros(m.shape)
            acc = np.zeros((*m.shape, v.shape[-1]))
            for c0 in range(0, n_k, block_keys):
                c1 = min(n_k, c0 + block_keys + overlap)
                s = np.where(seen[..., c0:c1], s_all[..., c0:c1], -np.inf)
                m_new = np.maximum(m, s.max(axis=-1))
                if sink_every_block and sig is not None:
                    m_new = np.maximum(m_new, np.asarray(sig)[..., None])
                if guard:
                    alpha = np.where(m == -np.inf, 0.0, np.exp(m - m_new))
                    p = np.where(s == -np.inf, 0.0, np.exp(s - m_new[..., None]))
                    vals = np.where(np.isfinite(v[..., c0:c1, :]), v[..., c0:c1, :], 0.0)
                else:
                    alpha = np.exp(m - m_new)
                    p = np.exp(s - m_new[..., None])
                    vals = v[..., c0:c1, :]
                if not rescale:
                    alpha = np.ones(alpha.shape)
                l_ = alpha * l_ + p.sum(axis=-1)
                acc = alpha[..., None] * acc + p @ vals
                if sink_every_block and sig is not None:
                    l_ = l_ + np.exp(np.asarray(sig)[..., None] - m_new)
                m = m_new
            if sig is not None and not sink_every_block:
                m_new = np.maximum(m, np.asarray(sig)[..., None])
                alpha = np.where(m == -np.inf, 0.0, np.exp(m - m_new))
                l_ = alpha * l_ + np.exp(np.asarray(sig)[..., None] - m_new)
                acc = alpha[..., None] * acc
                m = m_new
            o = (
                np.where(l_[..., None] > 0, acc / l_[..., None], 0.0)
                if guard
                else acc / l_[..., None]
            )
            lse = m + np.log(l_)
        return (o, lse) if kw.get("return_lse") else o

    return fn


def _averaging_merge(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """The outputs averaged, the lse ignored."""
    return (np.asarray(o_a) + np.asarray(o_b)) / 2, np.logaddexp(lse_a, lse_b)


def _unguarded_merge(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """e^{l_A - l} o_A + e^{l_B - l} o_B as written: 0 * NaN for an empty side, and
    e^{-inf - (-inf)} for two empty sides."""
    with np.errstate(invalid="ignore"):
        ell = np.logaddexp(lse_a, lse_b)
        o = np.exp(lse_a - ell)[..., None] * o_a + np.exp(lse_b - ell)[..., None] * o_b
    return o, ell


_TOY_OPTIONS = frozenset({"mask", "sinks", "lse"})


def _broken_blocked(fn: Callable[..., Any]) -> OP.OnlineImpl:
    return OP.OnlineImpl("broken", blocked=fn, accuracy="fast", options=_TOY_OPTIONS)


def _broken_merge(fn: Callable[..., Any]) -> OP.OnlineImpl:
    return OP.OnlineImpl("broken", merge=fn, accuracy="fast")


_WIDE = AttentionCase(_Q * 20, _K * 20, _V, {"scale": 1.0})
_PLAIN = AttentionCase(_Q, _K, _V)

BROKEN = [
    (
        "no rescaling by e^(m_old - m_new)",
        _broken_blocked(_toy_blocked(rescale=False)),
        OP.check_block_sizes,
        _oc(_WIDE, 2),
    ),
    (
        "off-by-one block boundary",
        _broken_blocked(_toy_blocked(overlap=1)),
        OP.check_block_sizes,
        _oc(_PLAIN, 2),
    ),
    (
        "NaN from -inf - -inf in a hidden first block",
        _broken_blocked(_toy_blocked(guard=False)),
        OP.check_hidden_block,
        _oc(_PLAIN, 2),
    ),
    (
        "a sink added in every block",
        _broken_blocked(_toy_blocked(sink_every_block=True)),
        OP.check_sink_once,
        _oc(_PLAIN, 2),
    ),
    (
        "a merge that averages",
        _broken_merge(_averaging_merge),
        OP.check_split_merge_order,
        _oc(_WIDE, 2, ((0, 1), (2, 3, 4)), (0, 1)),
    ),
    (
        "a merge without the guard for empty partials",
        _broken_merge(_unguarded_merge),
        OP.check_hidden_block,
        _oc(_PLAIN, 2),
    ),
]


@pytest.mark.parametrize(
    ("impl", "check", "ocase"),
    [pytest.param(impl, check, oc, id=name) for name, impl, check, oc in BROKEN],
)
def test_property_catches_a_broken_online_kernel(
    impl: OP.OnlineImpl, check: Callable[..., None], ocase: OnlineCase
) -> None:
    with pytest.raises(PropertyViolation) as info:
        check(impl, ocase)
    assert "reproduce: " in str(info.value) and info.value.implementation == "broken"


def test_every_property_is_shown_able_to_fail() -> None:
    assert set(OP.PROPERTIES.values()) <= {check for _, _, check, _ in BROKEN}


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_broken_cases_pass_on_the_reference(impl: OP.OnlineImpl) -> None:
    for _, _, check, ocase in BROKEN:
        check(impl, ocase)


def test_the_toy_kernel_without_defects_passes_every_property() -> None:
    good_blocked = _broken_blocked(_toy_blocked())
    good_merge = _broken_merge(lambda *a: O.merge_partials(*a))
    for _, _, check, ocase in BROKEN:
        check(good_blocked, ocase)
        check(good_merge, ocase)


# ---------------------------------------------------------------------------------------
# The battery
# ---------------------------------------------------------------------------------------


def test_online_battery_runs_and_reports_a_failure() -> None:
    few = settings(max_examples=5, derandomize=True, database=None, deadline=None)
    results = run_battery(IMPLS["fast"], few, OP.BATTERY)
    assert [r.name for r in results] == [c.name for c in OP.BATTERY]
    assert all(r.passed and r.examples == 5 for r in results), [r.message for r in results]
    broken = OP.OnlineImpl("broken", merge=_averaging_merge, accuracy="fast")
    # the battery's own number of examples; no shrinking (only the verdict is asserted)
    more = settings(few, max_examples=25, phases=[Phase.explicit, Phase.generate])
    by_name = {r.name: r for r in run_battery(broken, more, OP.BATTERY)}
    assert not by_name["split_merge_order"].passed
    assert "reproduce: broken.merge along tree" in by_name["split_merge_order"].message
    assert not by_name["block_sizes"].applicable  # no blocked attention to check


def test_online_impl_needs_a_kernel_and_known_options() -> None:
    with pytest.raises(ValueError, match=r"needs blocked= or merge="):
        OP.OnlineImpl("nothing")
    with pytest.raises(ValueError, match=r"unknown options \['flash'\]"):
        OP.OnlineImpl("x", merge=_averaging_merge, options=frozenset({"flash"}))


@given(st.integers(1, 5), st.integers(0, 7))
@settings(max_examples=20, deadline=None)
def test_n_blocks_covers_the_keys(b: int, n: int) -> None:
    blocks = otol.n_blocks(n, b)
    assert (blocks - 1) * b < max(n, 1) <= blocks * b
