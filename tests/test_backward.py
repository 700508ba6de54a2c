"""The backward pass of the reference: its API, its special values, and its accuracy.

The accuracy tests compare each precision against attnspec.exact.sdpa_backward (Arb balls,
certified) within the bounds derived in attnspec.spec.tolerances.backward; the figures of
docs/backward.md (the worst error as a multiple of its bound) come from
``test_accuracy_within_the_derived_bounds``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np
import pytest

import attnspec
from attnspec import exact
from attnspec.spec.tolerances.backward import (
    accurate_backward_bound,
    family_bound,
    fast_backward_bound,
)

RNG_SEED = 20261201
BOUNDS = {"accurate": accurate_backward_bound, "fast": fast_backward_bound}


def _err(computed: Any, exact_values: Any) -> np.ndarray:
    """|computed - exact| entry by entry, in mpmath (the exact values are mpf)."""
    return np.vectorize(lambda c, y: float(abs(mpmath.mpf(float(c)) - y)), otypes=[float])(
        np.asarray(computed, dtype=np.float64), exact_values
    )


def _problem(rng: np.random.Generator, case: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A problem with features chosen by ``case`` (every combination over the cases)."""
    heads, groups = 2, 1 + case % 2
    n_q, n_k = int(rng.integers(1, 6)), int(rng.integers(1, 7))
    width, width_v = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    big = float(rng.choice([0.5, 3.0, 10.0]))
    q = rng.standard_normal((1, heads * groups, n_q, width)) * big
    k = rng.standard_normal((1, heads, n_k, width))
    v = rng.standard_normal((1, heads, n_k, width_v)) * 10.0 ** int(rng.integers(-3, 4))
    dout = rng.standard_normal((1, heads * groups, n_q, width_v))
    dlse = rng.standard_normal((1, heads * groups, n_q)) if case % 3 == 0 else None
    hq = heads * groups
    kw: dict[str, Any] = {}
    if case % 4 == 1:
        kw["bias"] = rng.standard_normal((1, hq, 1, n_k)) * 3
    if case % 4 == 3:
        kw["bias"] = rng.standard_normal((1, hq, n_q, n_k))
    if case % 5 == 2:
        kw["sinks"] = rng.standard_normal(hq)
    if case % 6 == 3:
        kw["softcap"] = 1.5
    if case % 7 == 4:
        kw["mask"] = rng.random((1, hq, n_q, n_k)) > 0.4
    if case % 8 == 5:
        kw.update(dropout_mask=rng.random((1, hq, n_q, n_k)) > 0.3, dropout_p=0.3)
    if case % 9 == 6:
        kw.update(causal=True, align="bottom_right", alibi_slopes=np.linspace(0.1, 1.0, hq))
    return (q, k, v, dout, dlse), kw


def test_accuracy_within_the_derived_bounds() -> None:
    """60 problems over every feature: each gradient of each precision within its bound
    of the certified exact gradient; the worst ratios are those of docs/backward.md
    (measured: accurate 0.43, fast 0.09 of the bound)."""
    rng = np.random.default_rng(RNG_SEED)
    worst = dict.fromkeys(BOUNDS, 0.0)
    for case in range(60):
        (q, k, v, dout, dlse), kw = _problem(rng, case)
        ref = exact.sdpa_backward(q, k, v, dout, dlse=dlse, undecided="midpoint", **kw)
        for precision, bound_of in BOUNDS.items():
            got = attnspec.sdpa_backward(q, k, v, dout, dlse=dlse, precision=precision, **kw)
            bounds = bound_of(q, k, v, dout, dlse, **kw)
            assert set(bounds) == {n for n in got._fields if getattr(got, n) is not None}
            for name, bound in bounds.items():
                err = _err(getattr(got, name), getattr(ref, name))
                assert bound.shape == err.shape
                assert np.all(err <= bound), (case, precision, name, err, bound)
                ratio = np.where(err > 0, err / np.where(bound > 0, bound, 1.0), 0.0)
                worst[precision] = max(worst[precision], float(ratio.max(initial=0.0)))
    # the bounds are not vacuous: the errors come within a factor 20 of them
    assert worst["accurate"] > 0.05 and worst["fast"] > 0.005, worst


@pytest.mark.parametrize("precision", ["accurate", "fast"])
def test_hidden_positions_get_zero_gradient_whatever_they_held(precision: str) -> None:
    """NaN keys, infinite values at masked keys and a NaN query in a fully masked row:
    their gradients are exactly 0 and every other gradient is bit for bit the one of the
    same problem with finite numbers there."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    v, dout = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 3, 3))
    mask = np.ones((2, 3, 5), dtype=bool)
    mask[:, :, 4] = False
    mask[1, 2, :] = False  # a row with nothing visible
    poisoned_q, poisoned_k, poisoned_v = q.copy(), k.copy(), v.copy()
    poisoned_k[:, 4] = np.nan
    poisoned_v[:, 4] = np.inf
    poisoned_q[1, 2] = np.nan
    clean = attnspec.sdpa_backward(q, k, v, dout, mask=mask, precision=precision)
    dirty = attnspec.sdpa_backward(
        poisoned_q, poisoned_k, poisoned_v, dout, mask=mask, precision=precision
    )
    for a, b in zip(clean[:3], dirty[:3], strict=True):
        assert np.array_equal(a.view(np.int64), b.view(np.int64))
    assert np.all(dirty.dk[:, 4] == 0) and np.all(dirty.dv[:, 4] == 0)
    assert np.all(dirty.dq[1, 2] == 0)
    ref = exact.sdpa_backward(poisoned_q, poisoned_k, poisoned_v, dout, mask=mask)
    assert np.all(exact.to_float64(ref.dk)[:, 4] == 0)


def test_a_bias_of_minus_inf_hides_and_gets_zero_gradient() -> None:
    q, k, v = np.ones((2, 2)), np.eye(2), np.array([[1.0], [2.0]])
    bias = np.array([[0.0, -np.inf], [0.0, 0.0]])
    g = attnspec.sdpa_backward(q, k, v, np.ones((2, 1)), bias=bias)
    assert g.dbias[0, 1] == 0.0 and g.dv[1, 0] == 0.5  # only row 1 sees key 1, weight 1/2


def test_empty_sizes_give_zero_gradients_of_the_inputs_shapes() -> None:
    rng = np.random.default_rng(2)
    shapes = [
        ((0, 4), (5, 4), (5, 3), (0, 3)),  # no queries
        ((3, 4), (0, 4), (0, 3), (3, 3)),  # no keys
        ((3, 0), (5, 0), (5, 3), (3, 3)),  # E = 0: the logits are all 0
    ]
    for q_shape, k_shape, v_shape, d_shape in shapes:
        q, k, v, dout = (rng.standard_normal(s) for s in (q_shape, k_shape, v_shape, d_shape))
        for precision in ("accurate", "fast"):
            g = attnspec.sdpa_backward(q, k, v, dout, scale=1.0, precision=precision)
            assert (g.dq.shape, g.dk.shape, g.dv.shape) == (q_shape, k_shape, v_shape)
            assert not g.dq.any() and not g.dk.any()
        # E = 0: uniform weights 1/5, so dv_j = sum_i dout_i / 5 (exact rational)
        if q_shape == (3, 0):
            ref = exact.sdpa_backward(q, k, v, dout, scale=1.0)
            # the exact rational, correctly rounded by Python (Fraction -> float)
            column = [float(sum(map(Fraction, dout[:, c])) / 5) for c in range(3)]
            assert np.array_equal(exact.to_float64(ref.dv), np.broadcast_to(column, (5, 3)))


def _same_sums(small: Any, full: Any, axes: tuple[int, ...]) -> None:
    """``small`` equals ``full`` summed over ``axes`` (and reshaped), both exact gradients:
    each mpf is within 10**-50 of its exact value, relative, or 2**-1074 absolute (the
    guarantee of attnspec.exact at dps=50), so the two sides differ by at most
    10**-50 (|small| + sum |full|) + (n + 1) 2**-1074, n the number of terms; summed in
    mpmath at 80 digits, which adds nothing of that size."""
    with mpmath.workdps(80):
        total = np.asarray(np.sum(full, axis=axes), dtype=object).reshape(np.shape(small))
        size = np.asarray(
            np.sum(np.vectorize(abs, otypes=[object])(full), axis=axes), dtype=object
        ).reshape(np.shape(small))
        n = math.prod(np.shape(full)[a] for a in axes)
        for a, b, m in zip(np.ravel(small), np.ravel(total), np.ravel(size), strict=True):
            allowed = mpmath.mpf(10) ** -50 * (abs(a) + m) + (n + 1) * mpmath.mpf(2) ** -1074
            assert abs(a - b) <= allowed, (a, b)


def test_two_d_and_broadcast_forms_are_the_written_out_sums() -> None:
    """2-D inputs are one head; q broadcast over a batch gets the sum of the batch's
    gradients; a bias broadcast over rows and heads gets the sum over them; a 0-d sink
    the sum over every head and row: each against the written-out full form, exactly."""
    rng = np.random.default_rng(3)
    q, k, v = (
        rng.standard_normal((1, 2, 3, 4)),
        rng.standard_normal((3, 2, 5, 4)),
        rng.standard_normal((3, 2, 5, 2)),
    )
    dout = rng.standard_normal((3, 2, 3, 2))
    bias = rng.standard_normal((1, 1, 1, 5))
    small = exact.sdpa_backward(q, k, v, dout, bias=bias, sinks=np.float64(0.5))
    full = exact.sdpa_backward(
        np.broadcast_to(q, (3, 2, 3, 4)),
        k,
        v,
        dout,
        bias=np.broadcast_to(bias, (3, 2, 3, 5)).copy(),
        sinks=np.full((3, 2), 0.5),
    )
    _same_sums(small.dq, full.dq, (0,))
    _same_sums(small.dbias, full.dbias, (0, 1, 2))
    _same_sums(small.dsinks, full.dsinks, (0, 1))
    assert (
        small.dq.shape == q.shape and small.dbias.shape == bias.shape and small.dsinks.shape == ()
    )
    one = attnspec.sdpa_backward(q[0, 0], k[0, 0], v[0, 0], dout[0, 0])
    heads = attnspec.sdpa_backward(q[0, :1], k[0, :1], v[0, :1], dout[0, :1])
    for a, b in zip(one[:3], heads[:3], strict=True):
        assert np.array_equal(a, b[0])


def test_gqa_gradients_are_the_repeated_heads_summed_over_each_group() -> None:
    rng = np.random.default_rng(4)
    q, k, v = (
        rng.standard_normal((4, 3, 2)),
        rng.standard_normal((2, 5, 2)),
        rng.standard_normal((2, 5, 3)),
    )
    dout = rng.standard_normal((4, 3, 3))
    grouped = exact.sdpa_backward(q, k, v, dout)
    repeated = exact.sdpa_backward(q, np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0), dout)
    for name in ("dk", "dv"):
        parts = getattr(repeated, name)
        _same_sums(getattr(grouped, name), parts.reshape(2, 2, 5, parts.shape[-1]), (1,))


def test_the_gradient_of_the_lse_output_is_the_weights() -> None:
    """dout = 0, dlse = 1: dbias (the gradient of the final logits) is the weights."""
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    bias = np.zeros((3, 6))
    g = attnspec.sdpa_backward(q, k, v, np.zeros((3, 2)), dlse=np.ones(3), bias=bias)
    p = attnspec.softmax(q @ k.T / 2.0)
    assert np.all(np.abs(g.dbias - p) <= 4 * 2.0**-53 * p)


def test_central_differences_of_the_exact_forward_agree() -> None:
    """The central difference D(h) = (f(x + h) - f(x - h)) / 2h of the exact forward (40
    digits) is f'(x) + c h**2 + O(h**4) (claim central-difference-error of
    spec/derivations/backward.py): at h = 2**-16 and h/2 its error falls by 4 (within 1%),
    and Richardson's (4 D(h/2) - D(h)) / 3, whose error is O(h**4) ~ 1e-19 here (the fifth
    derivatives here are of order 1), agrees with the gradient to 1e-17
    where D(h) alone is off by about 1e-12 (measured: 8e-13, Richardson 8e-23)."""
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((2, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    dout, dlse = rng.standard_normal((2, 2)), rng.standard_normal(2)
    grads = exact.sdpa_backward(q, k, v, dout, dlse=dlse, softcap=3.0)

    def f(qq: Any, kk: Any, vv: Any) -> Any:
        out, lse = exact.sdpa(qq, kk, vv, return_lse=True, softcap=3.0, dps=40)
        with mpmath.workdps(40):  # mpf arithmetic rounds to the context's precision
            return mpmath.fsum(out.ravel() * dout.ravel()) + mpmath.fsum(lse * dlse)

    def difference(which: int, at: tuple[int, int], h: float) -> Any:
        args = [q.copy(), k.copy(), v.copy()]
        args[which][at] += h
        up = f(*args)
        args[which][at] -= 2 * h
        with mpmath.workdps(40):
            return (up - f(*args)) / (2 * h)

    for which, name, at in ((0, "dq", (1, 2)), (1, "dk", (3, 0)), (2, "dv", (2, 1))):
        h = 2.0**-16
        coarse, fine = difference(which, at, h), difference(which, at, h / 2)
        exact_g = getattr(grads, name)[at]
        with mpmath.workdps(40):
            if name != "dv":  # the output is linear in v: both differences are exact there
                assert 3.96 < abs(coarse - exact_g) / abs(fine - exact_g) < 4.04
            assert abs((4 * fine - coarse) / 3 - exact_g) < 1e-17


def test_errors_name_the_argument() -> None:
    q, k, v = np.ones((2, 3)), np.ones((4, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 2\)"):
        attnspec.sdpa_backward(q, k, v, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dlse must have the lse's shape \(2,\)"):
        attnspec.sdpa_backward(q, k, v, np.ones((2, 2)), dlse=np.ones(3))
    with pytest.raises(TypeError, match="dout"):
        attnspec.sdpa_backward(q, k, v, np.ones((2, 2), dtype=bool))
    with pytest.raises(TypeError, match="return_lse"):
        exact.sdpa_backward(q, k, v, np.ones((2, 2)), return_lse=True)
    with pytest.raises(ValueError, match="precision"):
        attnspec.sdpa_backward(q, k, v, np.ones((2, 2)), precision="double")
    with pytest.raises(ValueError, match=r"g must have the shape of x \(3,\)"):
        attnspec.softmax_vjp([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="logsumexp"):
        attnspec.logsumexp_vjp(np.ones((2, 3)), np.ones(3))


def test_inputs_are_never_modified() -> None:
    rng = np.random.default_rng(7)
    arrays = [
        rng.standard_normal(s) for s in ((1, 2, 3, 4), (1, 1, 5, 4), (1, 1, 5, 2), (1, 2, 3, 2))
    ]
    extra = {"bias": rng.standard_normal((1, 2, 3, 5)), "sinks": rng.standard_normal(2)}
    saved = [a.copy() for a in arrays] + [a.copy() for a in extra.values()]
    for precision in ("accurate", "fast"):
        attnspec.sdpa_backward(*arrays, dlse=np.ones((1, 2, 3)), precision=precision, **extra)
    for a, b in zip([*arrays, *extra.values()], saved, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["softmax", "log_softmax", "logsumexp"])
def test_family_gradients_within_their_bounds(kind: str) -> None:
    rng = np.random.default_rng(8)
    fns = {
        "softmax": (attnspec.softmax_vjp, exact.softmax_vjp),
        "log_softmax": (attnspec.log_softmax_vjp, exact.log_softmax_vjp),
        "logsumexp": (attnspec.logsumexp_vjp, exact.logsumexp_vjp),
    }
    fast_fn, exact_fn = fns[kind]
    for trial in range(12):
        x = rng.standard_normal((3, 6)) * float(rng.choice([1.0, 10.0, 100.0]))
        g = rng.standard_normal((3, 6)) * 10.0 ** int(rng.integers(-2, 3))
        where = rng.random((3, 6)) > 0.2 if trial % 2 else None
        gg = g[:, 0] if kind == "logsumexp" else g
        ref = exact_fn(x, gg, where=where, undecided="midpoint")
        for precision in ("accurate", "fast"):
            err = _err(fast_fn(x, gg, where=where, precision=precision), ref)
            assert np.all(err <= family_bound(kind, x, gg, precision, where=where))


def test_family_special_slices() -> None:
    """Excluded entries get 0 whatever g holds there; an empty slice gives 0; the
    softmax jvp along a shift is 0 (J 1 = 0)."""
    out = attnspec.softmax_vjp([1.0, np.nan, 2.0], [1.0, np.nan, -1.0], where=[True, False, True])
    assert out[1] == 0.0 and np.isfinite(out).all()
    assert attnspec.log_softmax_vjp([1.0, -np.inf], [1.0, np.nan])[1] == 0.0
    assert attnspec.logsumexp_vjp(np.zeros((2, 0)), np.ones(2)).shape == (2, 0)
    assert np.all(np.abs(attnspec.softmax_jvp([0.5, -3.0, 2.0], [1.0, 1.0, 1.0])) <= 2**-52)
