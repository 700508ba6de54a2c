"""The textbook bounds (attnspec.spec.tolerances.attention) on every broadcast form sdpa takes.

Regression tests for issue 7 (the fuzzer): ``textbook_sdpa_bound`` and ``logit_data``
raised on valid forms where a mask or sinks had batch dimensions (or leading 1s) that q
and k lack, which sdpa takes when v has them ("all the input arrays must have same number
of dimensions" from the sink column, "input operand has more dimensions than allowed by
the axis remapping", "operands could not be broadcast together"). The neighbouring forms
are held here too: v alone with more batch dimensions, 0-d sinks, sinks (Hq,) and
(..., Hq), mask and bias (..., Hq, L, S) with 1s anywhere, three 2-D arrays (one head).

Each test computes the bound on a broadcast form and on the same case written out in
full shapes (q, k, v and every option ``np.broadcast_to`` the batch of the output): the
values the function gives for the full form are the expected ones, bit for bit, and
``weighted`` and ``bound`` have the output's shape.
"""

from __future__ import annotations

from typing import Any

import mpmath
import numpy as np
import pytest

import attnspec
from attnspec.spec.properties._core import abs_error
from attnspec.spec.tolerances import attention as atol

_SEED = 20261207


def _normal(*shape: int) -> Any:
    """Values rounded to 3 decimals, the same for a shape whatever tests run."""
    return np.round(np.random.default_rng([_SEED, *shape]).standard_normal(shape), 3)


def _bools(*shape: int) -> Any:
    """A mask with about 7 in 10 True, the same for a shape whatever tests run."""
    return np.random.default_rng([_SEED, 1, *shape]).random(shape) < 0.7


def _full_form(q: Any, k: Any, v: Any, kw: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The case written out: q, k, v with the whole batch, options of the full shapes
    (..., Hq, L, S) and (..., Hq); three 2-D arrays become one head, (1, L, E)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim == 2 and k.ndim == 2 and v.ndim == 2:
        q, k, v = q[None], k[None], v[None]
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    hq, n_q, n_k = q.shape[-3], q.shape[-2], k.shape[-2]
    full = dict(kw)
    for name in ("mask", "bias", "dropout_mask"):
        if kw.get(name) is not None:
            full[name] = np.broadcast_to(kw[name], (*batch, hq, n_q, n_k)).copy()
    for name in ("sinks", "alibi_slopes"):
        if kw.get(name) is not None:
            full[name] = np.broadcast_to(kw[name], (*batch, hq)).copy()
    return (
        np.broadcast_to(q, (*batch, *q.shape[-3:])).copy(),
        np.broadcast_to(k, (*batch, *k.shape[-3:])).copy(),
        np.broadcast_to(v, (*batch, *v.shape[-3:])).copy(),
        full,
    )


def _same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def assert_bound_as_full_form(q: Any, k: Any, v: Any, **kw: Any) -> tuple[Any, Any]:
    """The bounds on the case equal those on its full form, bit for bit, and have the
    output's shape (the lse bound: broadcast to the lse's shape)."""
    out, lse = attnspec.sdpa(q, k, v, precision="fast", return_lse=True, **kw)
    weighted, bound = atol.textbook_sdpa_bound(q, k, v, **kw)
    assert weighted.shape == out.shape
    assert bound.shape == out.shape
    lse_b = atol.textbook_lse_bound(q, k, **kw)
    two_d = np.ndim(q) == 2 and np.ndim(k) == 2 and np.ndim(v) == 2
    fq, fk, fv, fkw = _full_form(q, k, v, kw)
    f_weighted, f_bound = atol.textbook_sdpa_bound(fq, fk, fv, **fkw)
    f_lse_b = atol.textbook_lse_bound(fq, fk, **fkw)
    if two_d:
        f_weighted, f_bound, f_lse_b = f_weighted[0], f_bound[0], f_lse_b[0]
    assert _same_bits(weighted, f_weighted)
    assert _same_bits(bound, f_bound)
    assert _same_bits(np.broadcast_to(lse_b, lse.shape), f_lse_b)
    return out, bound


# --- v with batch dimensions that q and k lack -------------------------------------------


def test_v_with_more_batch_dims_than_q_and_k() -> None:
    q, k, v = _normal(1, 1, 2, 2), _normal(1, 1, 3, 2), _normal(4, 1, 3, 2)
    out, bound = assert_bound_as_full_form(q, k, v)
    assert out.shape == bound.shape == (4, 1, 2, 2)


def test_v_with_leading_batch_dims_q_and_k_have_not() -> None:
    q, k, v = _normal(2, 3, 2), _normal(1, 2, 2), _normal(3, 2, 1, 2, 2)
    out, bound = assert_bound_as_full_form(q, k, v, causal=True, align="bottom_right")
    assert out.shape == bound.shape == (3, 2, 2, 3, 2)


def test_grouped_heads_with_v_batch() -> None:
    q, k, v = _normal(4, 2, 3), _normal(2, 3, 3), _normal(2, 1, 2, 3, 1)
    assert_bound_as_full_form(q, k, v, mask=_bools(2, 3))


# --- a mask, bias or slopes with the batch only v has ------------------------------------


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
def test_mask_with_the_batch_only_v_has(with_sinks: bool) -> None:
    q, k, v = _normal(1, 2, 3), _normal(1, 3, 3), _normal(3, 1, 3, 2)
    mask = _bools(3, 1, 2, 3)
    kw: dict[str, Any] = {"mask": mask}
    if with_sinks:
        kw["sinks"] = np.float64(0.25)
    assert_bound_as_full_form(q, k, v, **kw)


def test_mask_with_leading_ones_only_v_has() -> None:
    q, k, v = _normal(2, 2, 2), _normal(1, 3, 2), _normal(1, 1, 3, 2)
    assert_bound_as_full_form(q, k, v, mask=np.ones((1, 1, 2, 3), dtype=bool), sinks=[0.5, -1.0])


def test_bias_with_the_batch_only_v_has() -> None:
    q, k, v = _normal(2, 2, 2), _normal(2, 3, 2), _normal(2, 2, 3, 1)
    bias = _normal(2, 1, 1, 3)
    bias[1, 0, 0, 2] = -np.inf
    assert_bound_as_full_form(q, k, v, bias=bias, sinks=np.zeros(2))


def test_alibi_slopes_with_the_batch_only_v_has() -> None:
    q, k, v = _normal(2, 3, 2), _normal(1, 3, 2), _normal(2, 1, 3, 2)
    slopes = np.array([[0.5, 0.25], [1.0, 0.125]])
    assert_bound_as_full_form(q, k, v, alibi_slopes=slopes, causal=True)


# --- sinks: 0-d, (Hq,), (..., Hq) --------------------------------------------------------


@pytest.mark.parametrize(
    "sinks",
    [0.5, np.float64(-1.5), np.array(2.0), np.array([0.5])],
    ids=["float", "np_float64", "0d_array", "1_for_every_head"],
)
def test_sinks_one_for_every_head(sinks: Any) -> None:
    q, k, v = _normal(2, 2, 2, 2), _normal(2, 1, 3, 2), _normal(2, 1, 3, 2)
    assert_bound_as_full_form(q, k, v, sinks=sinks)


def test_0d_sinks_with_v_batch() -> None:
    q, k, v = _normal(1, 1, 2, 2), _normal(1, 1, 3, 2), _normal(4, 1, 3, 2)
    _, bound = assert_bound_as_full_form(q, k, v, sinks=np.float64(0.0))
    assert bound.shape == (4, 1, 2, 2)


def test_sinks_per_head_shape_hq() -> None:
    q, k, v = _normal(3, 2, 2, 2), _normal(1, 1, 3, 2), _normal(1, 3, 2)
    assert_bound_as_full_form(q, k, v, sinks=np.array([0.5, -0.5]))


def test_batched_sinks() -> None:
    q, k, v = _normal(3, 2, 2, 2), _normal(3, 1, 3, 2), _normal(1, 3, 2)
    assert_bound_as_full_form(q, k, v, sinks=_normal(3, 2))
    assert_bound_as_full_form(q, k, v, sinks=_normal(3, 1))


def test_batched_sinks_with_the_batch_only_v_has() -> None:
    q, k, v = _normal(1, 2, 2), _normal(1, 3, 2), _normal(4, 1, 3, 2)
    assert_bound_as_full_form(q, k, v, sinks=_normal(4, 1))
    assert_bound_as_full_form(q, k, v, sinks=np.array([[0.5]]))


# --- (..., Hq, L, S) options with 1s anywhere --------------------------------------------


@pytest.mark.parametrize(
    "mask_shape", [(3,), (2, 1), (1, 1, 3), (2, 1, 1, 1), (1, 2, 2, 3)], ids=str
)
@pytest.mark.parametrize("bias_shape", [None, (1, 3), (2, 1, 1), (1, 2, 1, 3)], ids=str)
def test_mask_and_bias_with_ones_anywhere(
    mask_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None
) -> None:
    q, k, v = _normal(1, 2, 2, 2), _normal(2, 1, 3, 2), _normal(1, 1, 3, 2)
    kw: dict[str, Any] = {"mask": _bools(*mask_shape), "sinks": _normal(2)}
    if bias_shape is not None:
        kw["bias"] = _normal(*bias_shape)
    assert_bound_as_full_form(q, k, v, **kw)


# --- three 2-D arrays: one head ----------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"mask": np.array([[True, False, True], [False, False, False]])},
        {"sinks": 0.75},
        {"sinks": np.array([0.75]), "mask": np.array([True, False, True])},
        {"bias": np.array([0.5, -np.inf, 0.0]), "causal": True, "align": "bottom_right"},
        {
            "bias": np.zeros((1, 2, 3)),
            "sinks": np.array(-0.5),
            "alibi_slopes": 0.5,
            "align": "top_left",
        },
    ],
    ids=["plain", "mask", "0d_sinks", "sinks_1_mask_s", "bias_causal", "bias_1ls_slopes"],
)
def test_one_head_2d_forms(kw: dict[str, Any]) -> None:
    q, k, v = _normal(2, 2), _normal(3, 2), _normal(3, 2)
    out, bound = assert_bound_as_full_form(q, k, v, **kw)
    assert out.shape == bound.shape == (2, 2)


# --- what the bound is for, and the forms it refuses -------------------------------------


def test_fast_sdpa_within_the_bound_on_a_broadcast_form() -> None:
    """sdpa(precision="fast") against attnspec.exact on v with a batch q and k lack, a
    mask with that batch and 0-d sinks: within the textbook bound."""
    q, k, v = _normal(1, 2, 3, 2), _normal(1, 1, 4, 2), _normal(3, 1, 1, 4, 2)
    kw: dict[str, Any] = {
        "mask": _bools(3, 1, 1, 3, 4),
        "sinks": np.float64(0.5),
        "bias": _normal(2, 1, 4),
        "softcap": 5.0,
    }
    _, bound = assert_bound_as_full_form(q, k, v, **kw)
    out = attnspec.sdpa(q, k, v, precision="fast", **kw)
    y = attnspec.exact.sdpa(q, k, v, **kw)
    y64 = attnspec.exact.to_float64(y)
    assert y64.shape == out.shape == bound.shape == (3, 1, 2, 3, 2)
    # the bound is on |fast - exact|; the exact value rounded to float64 moves by u|y|
    assert np.all(np.abs(out - y64) <= bound + atol.U * np.abs(y64))
    errors = np.vectorize(abs_error, otypes=[object])(out, y)
    assert all(
        e <= mpmath.mpf(float(b)) for e, b in zip(errors.ravel(), bound.ravel(), strict=True)
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sinks", np.zeros(3)),  # Hq = 2
        ("alibi_slopes", np.zeros(3)),  # Hq = 2
        ("mask", np.ones((3, 2, 3), dtype=bool)),  # Hq = 2
        ("mask", np.ones((4, 3), dtype=bool)),  # L = 2
        ("bias", np.zeros(4)),  # S = 3
    ],
    ids=["sinks_3_heads", "alibi_3_heads", "mask_3_heads", "mask_4_queries", "bias_4_keys"],
)
def test_logit_data_refuses_an_option_that_changes_hq_l_or_s(name: str, value: Any) -> None:
    """What sdpa refuses whatever v's batch, logit_data refuses too, naming the option."""
    q, k = _normal(1, 2, 2, 2), _normal(1, 1, 3, 2)
    with pytest.raises(ValueError, match=name):
        attnspec.sdpa(q, k, _normal(3, 1, 1, 3, 1), align="top_left", **{name: value})
    with pytest.raises(ValueError, match=name):
        atol.logit_data(q, k, **{name: value})


def test_logit_data_refuses_a_batch_for_2d_inputs() -> None:
    q, k, v = _normal(2, 2), _normal(3, 2), _normal(3, 1)
    for name, value in (("sinks", np.zeros((1, 1))), ("mask", np.ones((1, 1, 2, 3), bool))):
        with pytest.raises(ValueError, match=name):
            attnspec.sdpa(q, k, v, **{name: value})
        with pytest.raises(ValueError, match=name):
            atol.logit_data(q, k, **{name: value})


def test_logit_data_takes_options_with_the_batch_only_v_has() -> None:
    """Without v, an option's extra batch dimensions are v's (sdpa takes them when v has
    them): the logit data has that batch."""
    q, k = _normal(1, 2, 2, 2), _normal(1, 1, 3, 2)
    data = atol.logit_data(q, k, mask=np.ones((3, 1, 1, 1, 3), bool), sinks=np.zeros((1, 2)))
    assert data.seen.shape == data.logits.shape == (3, 1, 2, 2, 4)
    assert data.eps.shape == data.top.shape == data.count.shape == (3, 1, 2, 2)
