r"""torch.autograd and jax.vjp of float64 SDPA against attnspec.exact.sdpa_backward.

The peers are not the oracle (attnspec.exact is, certified): these tests check that where
attnspec and a peer mean the same thing, the peer's float64 gradients lie within
:func:`attnspec.spec.tolerances.backward.fast_backward_bound` of the exact gradients, the
bound of any textbook float64 evaluation of the closed forms (torch's CPU flash kernel
and autograd of a materialised softmax both are: D from the output, or from the weights;
S <= 16 keeps any blocked kernel to one key block, whose rounding is the textbook one).

torch's conventions: ``attn_mask`` bool (True = attend) or float (added: a bias, whose
gradient is dbias summed to its shape); ``is_causal`` is top-left; ``scale``;
``enable_gqa`` maps head h to kv head h // G. jax's: layout (B, L, H, E); ``bias``,
``mask``, ``is_causal`` (top-left), ``scale``, GQA by head count.

jax computes the softmax of ``jax.nn.dot_product_attention`` in float32 whatever the
input dtype (its source: "Softmax and it is always carried out in fp32"); its float64
gradients are off by about 1e-8, a departure shown by a test of its own. They are held to
:data:`U32_FACTOR` times the fast bound: that bound is first order in the unit roundoff
(:math:`\gamma_n \approx nu`, the weights' :math:`\rho \propto u`), so with every
rounding at most :math:`u_{32} = 2^{-24} = 2^{29} u_{64}` the same derivation gives
:math:`2^{29}` times it, while no float32 weight is subnormal (logit ranges below 87,
checked) and :math:`\rho \ll 10^{-2}` (``SECOND_ORDER``).

Fully masked rows are a departure shown in tests of their own that assert what each peer
does there.
"""

from __future__ import annotations

from typing import Any

import mpmath
import numpy as np
import pytest

from attnspec import exact
from attnspec.spec.properties._core import abs_error
from attnspec.spec.tolerances.attention import textbook_sdpa_bound
from attnspec.spec.tolerances.backward import fast_backward_bound

RNG = np.random.default_rng(20261127)
#: u32 / u64: the fast bound at float32's unit roundoff (module docstring)
U32_FACTOR = 2.0**29


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip(
        "torch", reason="torch is an optional peer; CI installs torch==2.13.0"
    )


@pytest.fixture(scope="module")
def jax() -> Any:
    jax = pytest.importorskip("jax", reason="jax is an optional peer; CI installs it")
    jax.config.update("jax_enable_x64", True)  # float64 arrays (the comparison's premise)
    return jax


def _problem(b: int, hq: int, hkv: int, n_q: int, n_k: int, e: int, ev: int) -> tuple[Any, ...]:
    q = RNG.standard_normal((b, hq, n_q, e))
    k = RNG.standard_normal((b, hkv, n_k, e))
    v = RNG.standard_normal((b, hkv, n_k, ev))
    dout = RNG.standard_normal((b, hq, n_q, ev))
    return q, k, v, dout


def _assert_within_fast_bound(
    peer: str,
    got: dict[str, np.ndarray],
    q: Any,
    k: Any,
    v: Any,
    dout: Any,
    factor: float = 1.0,
    **kw: Any,
) -> None:
    """Each gradient of ``got`` within ``factor`` times fast_backward_bound of
    attnspec.exact's (50 digits): entries pass at once when |got - fl(exact)| + half an
    ulp of fl(exact) is within the bound, the rest are compared with the exact value."""
    __tracebackhide__ = True
    want = exact.sdpa_backward(q, k, v, dout, undecided="midpoint", **kw)
    with np.errstate(invalid="ignore", over="ignore"):
        bounds = {n: factor * b for n, b in fast_backward_bound(q, k, v, dout, **kw).items()}
    for name, c in got.items():
        y = np.asarray(getattr(want, name), dtype=object)
        y64 = np.asarray(exact.to_float64(y), dtype=np.float64)
        bound = np.broadcast_to(bounds[name], c.shape)
        assert c.shape == y64.shape, f"{peer} {name} has shape {c.shape}, expected {y64.shape}"
        quick = np.abs(c - y64) + np.spacing(np.abs(y64)) / 2 <= bound
        for idx in np.argwhere(~quick):
            at = tuple(int(i) for i in idx)
            err = abs_error(float(c[at]), y[at])
            assert err <= mpmath.mpf(float(bound[at])), (
                f"{peer} {name} at {at} is {float(c[at])!r}, attnspec.exact "
                f"{mpmath.nstr(y[at], 17)}: error {float(err):.3g} > fast_backward_bound "
                f"{float(bound[at]):.3g} ({kw})"
            )


# ---------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------


def _torch_grads(
    torch: Any, q: Any, k: Any, v: Any, dout: Any, bias: Any = None, **kw: Any
) -> dict[str, np.ndarray]:
    """torch.autograd of scaled_dot_product_attention in float64 (``bias``: a float
    attn_mask whose gradient is taken too)."""
    t = {
        n: torch.tensor(a, dtype=torch.float64, requires_grad=True)
        for n, a in (("q", q), ("k", k), ("v", v))
    }
    if bias is not None:
        kw["attn_mask"] = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"], **kw)
    out.backward(torch.tensor(dout, dtype=torch.float64))
    grads = {f"d{n}": t[n].grad.numpy() for n in ("q", "k", "v")}
    if bias is not None:
        grads["dbias"] = kw["attn_mask"].grad.numpy()
    return grads


#: (name, shapes (B, Hq, Hkv, L, S, E, Ev), torch keywords, attnspec keywords); masks and
#: biases are built per problem by _torch_extras
TORCH_PROBLEMS: list[tuple[str, tuple[int, ...], dict[str, Any], dict[str, Any]]] = [
    ("plain", (2, 3, 3, 5, 7, 4, 3), {}, {}),
    ("scale", (1, 2, 2, 4, 6, 8, 5), {"scale": 0.3}, {"scale": 0.3}),
    (
        "is_causal top-left, L < S",
        (1, 2, 2, 4, 9, 4, 4),
        {"is_causal": True},
        {"causal": True, "align": "top_left"},
    ),
    (
        "is_causal top-left, L > S",
        (1, 2, 2, 6, 3, 4, 2),
        {"is_causal": True},
        {"causal": True, "align": "top_left"},
    ),
    ("is_causal, L = S", (2, 2, 2, 5, 5, 3, 3), {"is_causal": True}, {"causal": True}),
    ("enable_gqa", (2, 6, 2, 4, 5, 4, 4), {"enable_gqa": True}, {}),
    (
        "enable_gqa, causal",
        (1, 4, 1, 5, 5, 2, 3),
        {"enable_gqa": True, "is_causal": True},
        {"causal": True},
    ),
    ("bool mask (L, S)", (2, 2, 2, 4, 6, 4, 4), {"mask": "LS"}, {}),
    ("bool mask (B, 1, L, S)", (2, 3, 3, 4, 5, 4, 2), {"mask": "B1LS"}, {}),
    ("float mask (B, H, L, S): a bias", (2, 2, 2, 3, 5, 4, 4), {"bias": "BHLS"}, {}),
    ("float mask (L, S), broadcast", (2, 2, 2, 4, 4, 2, 3), {"bias": "LS"}, {}),
    (
        "float mask with -inf and GQA",
        (1, 4, 2, 4, 6, 4, 4),
        {"bias": "inf", "enable_gqa": True},
        {},
    ),
]


def _visible_mask(shape: tuple[int, ...]) -> np.ndarray:
    """A bool mask with about a quarter hidden, every row seeing at least one key."""
    m = RNG.random(shape) > 0.25
    m[..., 0] = True
    return m


@pytest.mark.parametrize(
    ("shapes", "tkw", "akw"),
    [pytest.param(s, t, a, id=n) for n, s, t, a in TORCH_PROBLEMS],
)
def test_torch_autograd_within_the_fast_bound_of_exact(
    torch: Any, shapes: tuple[int, ...], tkw: dict[str, Any], akw: dict[str, Any]
) -> None:
    b, hq, hkv, n_q, n_k, e, ev = shapes
    q, k, v, dout = _problem(b, hq, hkv, n_q, n_k, e, ev)
    tkw, akw = dict(tkw), dict(akw)
    bias = None
    kind = tkw.pop("mask", None)
    if kind is not None:
        m = _visible_mask((n_q, n_k) if kind == "LS" else (b, 1, n_q, n_k))
        tkw["attn_mask"], akw["mask"] = torch.tensor(m), m
    kind = tkw.pop("bias", None)
    if kind is not None:
        bias = RNG.standard_normal((n_q, n_k) if kind == "LS" else (b, hq, n_q, n_k))
        if kind == "inf":
            bias = np.where(_visible_mask(bias.shape), bias, -np.inf)
        akw["bias"] = bias
    got = _torch_grads(torch, q, k, v, dout, bias, **tkw)
    _assert_within_fast_bound("torch", got, q, k, v, dout, **akw)


def test_torch_autograd_on_many_random_problems(torch: Any) -> None:
    """Twelve more problems, GQA, causal and masks mixed by seed."""
    for i in range(12):
        hkv = 1 + i % 2
        hq = hkv * (1 + i % 3)
        n_q, n_k = 1 + i % 5, 2 + (3 * i) % 7
        q, k, v, dout = _problem(1 + i % 2, hq, hkv, n_q, n_k, 2 + i % 3, 1 + i % 4)
        tkw: dict[str, Any] = {"enable_gqa": hq != hkv}
        akw: dict[str, Any] = {}
        if i % 3 == 0:
            tkw["is_causal"], akw["causal"], akw["align"] = True, True, "top_left"
        elif i % 3 == 1:
            m = _visible_mask((n_q, n_k))
            tkw["attn_mask"], akw["mask"] = torch.tensor(m), m
        got = _torch_grads(torch, q, k, v, dout, **tkw)
        _assert_within_fast_bound("torch", got, q, k, v, dout, **akw)


def test_torch_fully_masked_row_departure(torch: Any) -> None:
    """torch 2.13 (math and CPU flash backends alike): a row hidden by a bool mask (or a
    -inf float mask) gets output 0 and zero gradients, as attnspec defines it; a row hidden
    by a finite fill (finfo.min, the old idiom) attends to every key alike instead: its
    output is the mean of the values and its dq is not 0 (the departure)."""
    q, k, v, dout = _problem(1, 2, 2, 3, 4, 4, 3)
    m = np.ones((3, 4), dtype=bool)
    m[1] = False
    got = _torch_grads(torch, q, k, v, dout, attn_mask=torch.tensor(m))
    assert (got["dq"][..., 1, :] == 0).all()
    _assert_within_fast_bound("torch", got, q, k, v, dout, mask=m)
    fill = np.where(m, 0.0, np.finfo(np.float64).min)
    t = {n: torch.tensor(a, requires_grad=True) for n, a in (("q", q), ("k", k), ("v", v))}
    out = torch.nn.functional.scaled_dot_product_attention(
        t["q"], t["k"], t["v"], attn_mask=torch.tensor(fill)
    )
    out.backward(torch.tensor(dout))
    row = out.detach().numpy()[..., 1, :]
    mean = np.mean(v, axis=-2)
    # the mean of V within the textbook bound of uniform weights (scale 0: equal logits)
    _, bound = textbook_sdpa_bound(q, k, v, scale=0.0)
    assert (np.abs(row - mean) <= bound[..., 1, :]).all(), (row, mean)
    assert (t["q"].grad.numpy()[..., 1, :] != 0).any()


# ---------------------------------------------------------------------------------------
# jax
# ---------------------------------------------------------------------------------------


def _bthd(a: Any) -> Any:
    """(B, H, L, E) <-> jax's (B, L, H, E)."""
    return np.swapaxes(np.asarray(a), 1, 2)


def _jax_grads(
    jax: Any, q: Any, k: Any, v: Any, dout: Any, bias: Any = None, **kw: Any
) -> dict[str, np.ndarray]:
    """jax.vjp of jax.nn.dot_product_attention in float64, in attnspec's layout."""
    args = [_bthd(q), _bthd(k), _bthd(v)]
    if bias is not None:

        def f(q_: Any, k_: Any, v_: Any, b_: Any) -> Any:
            return jax.nn.dot_product_attention(q_, k_, v_, bias=b_, **kw)

        args.append(np.asarray(bias))
    else:

        def f(q_: Any, k_: Any, v_: Any) -> Any:  # type: ignore[misc]
            return jax.nn.dot_product_attention(q_, k_, v_, **kw)

    out, vjp = jax.vjp(f, *args)
    assert out.dtype == np.float64
    grads = vjp(jax.numpy.asarray(_bthd(dout)))
    result = {f"d{n}": _bthd(g) for n, g in zip("qkv", grads[:3], strict=True)}
    if bias is not None:
        result["dbias"] = np.asarray(grads[3])
    return result


#: few shapes: jax compiles every operation once per shape (seconds each on 2 cores)
JAX_PROBLEMS: list[tuple[str, tuple[int, ...], dict[str, Any], dict[str, Any]]] = [
    ("plain", (1, 2, 2, 4, 6, 4, 4), {}, {}),
    ("scale", (1, 2, 2, 4, 6, 4, 4), {"scale": 0.3}, {"scale": 0.3}),
    (
        "GQA, is_causal top-left",
        (1, 4, 2, 3, 4, 2, 2),
        {"is_causal": True},
        {"causal": True, "align": "top_left"},
    ),
    ("GQA, bool mask", (1, 4, 2, 3, 4, 2, 2), {"mask": True}, {}),
    ("GQA, bias (B, H, L, S) and mask", (1, 4, 2, 3, 4, 2, 2), {"bias": True, "mask": True}, {}),
]


@pytest.mark.parametrize(
    ("shapes", "jkw", "akw"),
    [pytest.param(s, j, a, id=n) for n, s, j, a in JAX_PROBLEMS],
)
def test_jax_vjp_within_the_fast_bound_of_exact(
    jax: Any, shapes: tuple[int, ...], jkw: dict[str, Any], akw: dict[str, Any]
) -> None:
    b, hq, hkv, n_q, n_k, e, ev = shapes
    q, k, v, dout = _problem(b, hq, hkv, n_q, n_k, e, ev)
    jkw, akw = dict(jkw), dict(akw)
    bias = None
    if jkw.pop("mask", False):
        m = _visible_mask((b, hq, n_q, n_k))
        jkw["mask"], akw["mask"] = m, m
    if jkw.pop("bias", False):
        bias = RNG.standard_normal((b, hq, n_q, n_k))
        akw["bias"] = bias
    got = _jax_grads(jax, q, k, v, dout, bias, **jkw)
    _assert_no_float32_subnormal_weights(q, k, **akw)
    _assert_within_fast_bound("jax", got, q, k, v, dout, U32_FACTOR, **akw)


def _assert_no_float32_subnormal_weights(q: Any, k: Any, **kw: Any) -> None:
    """The premise of U32_FACTOR: every visible logit within 87 of its row's maximum, so
    that e^(s - max) >= 2^-126 is a normal float32."""
    from attnspec.spec.tolerances.attention import logit_data

    spread = logit_data(q, k, **kw).spread
    assert float(np.max(np.where(np.isfinite(spread), spread, 0.0), initial=0.0)) < 87.0


def test_jax_float32_softmax_departure(jax: Any) -> None:
    """jax's float64 gradients miss the float64 fast bound (its softmax is float32) by
    orders of magnitude, and meet the float32 one."""
    q, k, v, dout = _problem(1, 2, 2, 4, 6, 4, 4)
    got = _jax_grads(jax, q, k, v, dout)
    with pytest.raises(AssertionError, match="fast_backward_bound"):
        _assert_within_fast_bound("jax", got, q, k, v, dout)
    _assert_within_fast_bound("jax", got, q, k, v, dout, U32_FACTOR)


def test_jax_fully_masked_row_departure(jax: Any) -> None:
    """jax.nn.dot_product_attention (xla) fills hidden logits with a large finite negative:
    a fully masked row weighs every key alike, so its output is the mean of its kv head's
    values (attnspec: 0) and each key's dv gets dO_i / S from it; its dq and dbias are 0
    (the fill cuts the gradient), so dq and dk agree with attnspec's definition."""
    q, k, v, dout = _problem(1, 4, 2, 3, 4, 2, 2)
    m = np.ones((1, 4, 3, 4), dtype=bool)
    m[..., 1, :] = False
    bias = RNG.standard_normal((1, 4, 3, 4))
    out = np.asarray(jax.nn.dot_product_attention(_bthd(q), _bthd(k), _bthd(v), bias=bias, mask=m))
    mean = np.repeat(np.mean(v, axis=-2), 2, axis=-2)  # (B, Hq, Ev): kv head h // 2
    _, bound = textbook_sdpa_bound(q, np.repeat(k, 2, axis=-3), np.repeat(v, 2, axis=-3), scale=0.0)
    assert (np.abs(_bthd(out)[..., 1, :] - mean) <= bound[..., 1, :]).all()
    got = _jax_grads(jax, q, k, v, dout, bias, mask=m)
    assert (got["dq"][..., 1, :] == 0).all() and (got["dbias"][..., 1, :] == 0).all()
    # dv minus what the masked row adds (dO_i / S for each key, summed over the group) is
    # attnspec's dv, within jax's (float32-softmax) bound; the two roundings here add
    # u (|dv| + |extra|)
    extra = dout[..., 1, :].reshape(1, 2, 2, -1).sum(axis=-2)[..., None, :] / 4
    with_row = got["dv"] - extra
    want = exact.sdpa_backward(q, k, v, dout, bias=bias, mask=m, undecided="midpoint")
    y = np.asarray(exact.to_float64(want.dv), dtype=np.float64)
    bound_dv = fast_backward_bound(q, k, v, dout, bias=bias, mask=m)["dv"]
    allowed = (
        U32_FACTOR * bound_dv
        + 2 * 2.0**-53 * (np.abs(got["dv"]) + np.abs(extra))
        + np.spacing(np.abs(y))
    )
    assert (np.abs(with_row - y) <= allowed).all()
    grads = {"dq": got["dq"], "dk": got["dk"]}
    _assert_within_fast_bound("jax", grads, q, k, v, dout, U32_FACTOR, bias=bias, mask=m)


def test_the_peer_comparisons_can_fail(torch: Any) -> None:
    """The comparison is not vacuous: torch's gradients of a problem with the scale 0.3
    fail against attnspec.exact at the default scale."""
    q, k, v, dout = _problem(1, 2, 2, 3, 4, 4, 3)
    got = _torch_grads(torch, q, k, v, dout, scale=0.3)
    with pytest.raises(AssertionError, match="fast_backward_bound"):
        _assert_within_fast_bound("torch", got, q, k, v, dout)
