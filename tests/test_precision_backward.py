"""The low-precision backward: the emulation and the derived bounds on the gradients.

(a) No false alarm: correct backward kernels in float32, float16 and bfloat16 stay within
:func:`attnspec.spec.tolerances.precision.backward_bound` on the input families of
tests/test_precision_bounds.py at 20 seeds: the emulation
(:func:`attnspec.reference.emulate.emulated_sdpa_backward`), a naive numpy backward
written here, and torch's CPU autograd of SDPA in float32 and bfloat16.

(b) Power: kernels with one bug each exceed the bound: dS without the :math:`-D` term,
dK without the scale, dV accumulated in float16 over many queries where float32 is
claimed, and D from an output stored in bfloat16 in a float32 kernel (where D matters:
rows where dP and D nearly cancel).

The reference is :func:`attnspec.sdpa_backward` with ``precision="fast"`` (float64); its
own error is bounded by :func:`attnspec.spec.tolerances.backward.fast_backward_bound`,
added to the bound (``backward_bound`` is against the exact gradients). The naive kernel
rounds with numpy and ml_dtypes casts, not with the emulation's ``round_to``.

``python tests/test_precision_backward.py`` prints the table of docs/tolerances.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from test_precision_bounds import FAMILIES, NP_TYPES, SEEDS, _hidden, ratio, rounded

import attnspec
from attnspec.reference.emulate import emulated_sdpa_backward, round_to
from attnspec.spec.tolerances.backward import fast_backward_bound
from attnspec.spec.tolerances.precision import (
    FLASH_BACKWARD_FACTOR,
    backward_bound,
    empirical_backward_bound,
)

F64 = npt.NDArray[np.float64]
NAMES = ("dq", "dk", "dv", "dbias", "dsinks")


def naive_backward(
    q: F64,
    k: F64,
    v: F64,
    dout: F64,
    *,
    dtype: str,
    subtract_d: bool = True,
    scale_dk: bool = True,
    d_from: str = "own",
    **opts: Any,
) -> dict[str, F64]:
    """The backward as one writes it in numpy: arrays stored in ``dtype``, each operation
    in float32 and stored back, products and sums in float32. The forward is recomputed
    (max-shifted, the weights stored before PV); then dV = P^T dO, dP = dO V^T,
    D = rowsum(dO * O), dS = P (dP - D) (through the softcap's 1 - (t/c)^2),
    dQ = tau dS K, dK = tau dS^T Q. Bugs: ``subtract_d=False`` (dS = P dP),
    ``scale_dk=False`` (dK = dS^T Q); ``d_from="bfloat16"``: D from the output stored in
    bfloat16; ``d_from="reference"``: D from the float64 reference output rounded to
    ``dtype`` (a correct variant: the output the forward stored)."""
    dt, f32 = NP_TYPES[dtype], np.float32

    def st(x: Any) -> Any:
        return np.asarray(x, dtype=f32).astype(dt).astype(f32)

    q32, k32, v32, do32 = st(q), st(k), st(v), st(dout)
    hq, hkv = q32.shape[-3], k32.shape[-3]
    group = hq // hkv
    k32, v32 = np.repeat(k32, group, axis=-3), np.repeat(v32, group, axis=-3)
    scale = opts.get("scale")
    tau = f32(1 / math.sqrt(q32.shape[-1]) if scale is None else scale)
    n_k = k32.shape[-2]
    with np.errstate(over="ignore", invalid="ignore"):
        s = st(st(q32 @ np.swapaxes(k32, -1, -2)) * tau)
        t = s
        if opts.get("softcap") is not None:
            c = f32(opts["softcap"])
            t = st(c * st(np.tanh(st(s / c))))
        z = t if opts.get("bias") is None else st(t + st(opts["bias"]))
        hidden = _hidden(z.shape[-2], n_k, opts)
        z = np.where(hidden, -np.inf, z)
        if opts.get("sinks") is not None:
            sig = np.broadcast_to(st(opts["sinks"])[..., None, None], (*z.shape[:-1], 1))
            z = np.concatenate([z, sig], axis=-1)
        e = st(np.exp(st(z - z.max(axis=-1, keepdims=True))))
        p = st(e / e.sum(axis=-1, keepdims=True, dtype=f32))
        pk = p[..., :n_k]
        out = st(pk @ v32)
        if d_from == "bfloat16":
            out = np.asarray(out, dtype=f32).astype(NP_TYPES["bfloat16"]).astype(f32)
        elif d_from == "reference":
            ref = attnspec.sdpa(q, k, v, precision="fast", **opts)
            out = st(ref)
        dv = st(np.swapaxes(pk, -1, -2) @ do32)
        dp = st(do32 @ np.swapaxes(v32, -1, -2))
        big_d = st(st(do32 * out).sum(axis=-1, keepdims=True, dtype=f32))
        dz = st(pk * st(dp - big_d)) if subtract_d else st(pk * dp)
        dz = np.where(hidden, f32(0), dz)
        ds = dz
        if opts.get("softcap") is not None:
            r = st(t / c)
            ds = st(dz * st(1 - st(r * r)))
        dq = st(st(ds @ k32) * tau)
        dk = st(np.swapaxes(ds, -1, -2) @ q32)
        if scale_dk:
            dk = st(dk * tau)
    grads = {"dq": dq, "dk": dk, "dv": dv}
    for name in ("dk", "dv"):  # GQA: each kv head's gradient summed over its group
        g = grads[name]
        grads[name] = st(g.reshape(*g.shape[:-3], hkv, group, *g.shape[-2:]).sum(-3, dtype=f32))
    if opts.get("bias") is not None:
        grads["dbias"] = st(dz.sum(axis=tuple(range(dz.ndim - 2)), dtype=f32))
    if opts.get("sinks") is not None:
        dsink = st(-p[..., n_k] * big_d[..., 0])
        grads["dsinks"] = st(dsink.sum(axis=(0, -1), dtype=f32))
    return {name: np.asarray(g, dtype=np.float64) for name, g in grads.items()}


def torch_backward(q: F64, k: F64, v: F64, dout: F64, *, dtype: str, **opts: Any) -> dict[str, F64]:
    """torch.autograd of torch.nn.functional.scaled_dot_product_attention on the CPU in
    ``dtype`` (its default backend), masks and causal as a boolean attn_mask, GQA with
    enable_gqa (the bias family is left out: a float attn_mask's gradient is not asked)."""
    torch = pytest.importorskip("torch")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t = [torch.from_numpy(np.ascontiguousarray(x)).to(tdt).requires_grad_(True) for x in (q, k, v)]
    hidden = _hidden(q.shape[-2], k.shape[-2], opts)
    kwargs: dict[str, Any] = {"scale": opts.get("scale")}
    if hidden.any():
        kwargs["attn_mask"] = torch.from_numpy(~hidden)
    if q.shape[-3] != k.shape[-3]:
        kwargs["enable_gqa"] = True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems (restored)
    try:
        out = torch.nn.functional.scaled_dot_product_attention(*t, **kwargs)
        out.backward(torch.from_numpy(np.ascontiguousarray(dout)).to(tdt))
    finally:
        torch.set_num_threads(threads)
    return {
        name: np.asarray(x.grad.to(torch.float64).numpy(), dtype=np.float64)
        for name, x in zip(("dq", "dk", "dv"), t, strict=True)
    }


def emulation(q: F64, k: F64, v: F64, dout: F64, *, dtype: str, **opts: Any) -> dict[str, F64]:
    g = emulated_sdpa_backward(q, k, v, dout, dtype=dtype, **opts)
    return {name: x for name, x in zip(NAMES, g, strict=True) if x is not None}


#: name: (kernel, the features it has, dtypes, the forward's claim: rescalings=)
KERNELS: dict[str, tuple[Any, frozenset[str], tuple[str, ...], int | None]] = {
    "emulation": (
        emulation,
        frozenset({"bias", "mask", "causal", "softcap", "sinks", "window", "alibi", "dropout"}),
        ("float32", "float16", "bfloat16"),
        0,
    ),
    "naive numpy": (
        naive_backward,
        frozenset({"bias", "mask", "causal", "softcap", "sinks"}),
        ("float32", "float16", "bfloat16"),
        0,
    ),
    # torch's CPU backward: blocks of keys with rescalings, so the default claim
    "torch": (torch_backward, frozenset({"mask", "causal"}), ("float32", "bfloat16"), None),
}


@functools.cache
def reference(family: str, seed: int, dtype: str) -> tuple[Any, ...]:
    """Rounded inputs and upstream gradient, the reference gradients and their bound."""
    q, k, v, opts = rounded(family, seed, dtype)
    rng = np.random.default_rng([seed, 7, len(family)])
    dout = round_to(rng.standard_normal((*q.shape[:-1], v.shape[-1])), dtype)
    ref = attnspec.sdpa_backward(q, k, v, dout, precision="fast", **opts)
    own = fast_backward_bound(q, k, v, dout, **opts)
    return q, k, v, dout, opts, ref, own


@functools.cache
def judged(family: str, seed: int, dtype: str, rescalings: int | None) -> tuple[Any, ...]:
    """:func:`reference` with the bound of the claim ``rescalings`` added."""
    q, k, v, dout, opts, ref, own = reference(family, seed, dtype)
    bound = backward_bound(q, k, v, dout, dtype=dtype, rescalings=rescalings, **opts)
    total = {name: bound[name] + own[name] for name in bound}
    return q, k, v, dout, opts, ref, total


def worst(name: str, dtype: str) -> dict[str, float]:
    """Per family, the worst error / bound over the seeds and the gradients."""
    kernel, features, _, claim = KERNELS[name]
    found: dict[str, float] = {}
    for family, needs in FAMILIES.items():
        if not needs <= features:
            continue
        w = 0.0
        for seed in SEEDS:
            q, k, v, dout, opts, ref, bound = judged(family, seed, dtype, claim)
            assert all(np.isfinite(b).all() for b in bound.values()), (family, seed)
            got = kernel(q, k, v, dout, dtype=dtype, **opts)
            for g, x in got.items():
                w = max(w, ratio(np.abs(x - getattr(ref, g)), bound[g]))
        found[family] = w
    return found


@pytest.mark.parametrize(
    ("name", "dtype"), [(n, d) for n, (_, _, dts, _) in KERNELS.items() for d in dts]
)
def test_correct_backward_kernels_stay_within_the_bound(name: str, dtype: str) -> None:
    found = worst(name, dtype)
    print(name, dtype, {f: round(r, 3) for f, r in found.items()})
    assert max(found.values()) <= 1.0, found


def _bug_ratio(dtype: str, **bug: Any) -> float:
    w = 0.0
    for seed in range(5):
        q, k, v, dout, _opts, ref, bound = judged("gaussian", seed, dtype, 0)
        got = naive_backward(q, k, v, dout, dtype=dtype, **bug)
        for g, x in got.items():
            w = max(w, ratio(np.abs(x - getattr(ref, g)), bound[g]))
    return w


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bug", ["subtract_d", "scale_dk"])
def test_buggy_backward_kernels_are_flagged(bug: str, dtype: str) -> None:
    r = _bug_ratio(dtype, **{bug: False})
    print(bug, dtype, round(r, 1))
    assert r > 1.0


def many_queries_case() -> tuple[F64, ...]:
    """L = 4096 queries, S = 4 keys, q = 0 and dO = 1: every weight is 1/4 exactly and
    dV_je = sum_i P_ij dO_ie = 1024 (exact). In float16 (11 bits) a running sum of
    quarters stops at 512, where the spacing is 1/2 and 512 + 1/4 is a tie that rounds to
    even (IEEE 754 round to nearest even): an error of 512; float32 sums them exactly."""
    rng = np.random.default_rng(11)
    q = np.zeros((1, 1, 4096, 8))
    k = round_to(rng.standard_normal((1, 1, 4, 8)) * 0.3, "float16")
    v = round_to(rng.standard_normal((1, 1, 4, 8)), "float16")
    dout = np.ones((1, 1, 4096, 8))
    return q, k, v, dout


def test_float16_accumulation_of_dv_is_flagged_where_float32_is_claimed() -> None:
    q, k, v, dout = many_queries_case()
    ref = attnspec.sdpa_backward(q, k, v, dout, precision="fast")
    own = fast_backward_bound(q, k, v, dout)
    got = emulated_sdpa_backward(q, k, v, dout, dtype="float16", accumulate="float16")
    assert np.all(got.dv == 512.0) and np.all(ref.dv == 1024.0)  # the stalled sums
    claimed = backward_bound(q, k, v, dout, dtype="float16", rescalings=0)
    flagged = ratio(np.abs(got.dv - ref.dv), claimed["dv"] + own["dv"])
    print("float16 accumulation of dV:", round(flagged, 1))
    assert flagged > 1.0
    # with the accumulation it does, gamma_4096 in float16 (4096 u >= 1) says nothing
    honest = backward_bound(q, k, v, dout, dtype="float16", accumulate="float16", rescalings=0)
    assert np.all(honest["dv"] == np.inf)


def cancelling_case() -> tuple[F64, ...]:
    """Values all near 1 (v = 1 + small): dP_ij = dO_i . v_j is nearly D_i, so dZ =
    P (dP - D) is small against P |D| and an error in D shows in dQ and dK."""
    rng = np.random.default_rng(5)
    q = round_to(rng.standard_normal((1, 2, 8, 16)), "float32")
    k = round_to(rng.standard_normal((1, 2, 33, 16)), "float32")
    v = round_to(1 + 1e-2 * rng.standard_normal((1, 2, 33, 16)), "float32")
    dout = round_to(rng.standard_normal((1, 2, 8, 16)), "float32")
    return q, k, v, dout


def test_d_from_an_output_stored_in_bfloat16_is_flagged() -> None:
    q, k, v, dout = cancelling_case()
    ref = attnspec.sdpa_backward(q, k, v, dout, precision="fast")
    own = fast_backward_bound(q, k, v, dout)
    bound = backward_bound(q, k, v, dout, dtype="float32", rescalings=0)
    good = naive_backward(q, k, v, dout, dtype="float32")
    bad = naive_backward(q, k, v, dout, dtype="float32", d_from="bfloat16")
    r_good = max(ratio(np.abs(good[g] - getattr(ref, g)), bound[g] + own[g]) for g in good)
    r_bad = max(ratio(np.abs(bad[g] - getattr(ref, g)), bound[g] + own[g]) for g in bad)
    print("D from a bfloat16 output:", round(r_bad, 1), "own output:", round(r_good, 3))
    assert r_good <= 1.0 < r_bad


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_d_from_the_rounded_reference_output_is_no_false_alarm(dtype: str) -> None:
    # the output a forward stored in dtype, from another kernel: within delta O as well
    w = 0.0
    for seed in SEEDS:
        q, k, v, dout, _opts, ref, bound = judged("gaussian", seed, dtype, 0)
        got = naive_backward(q, k, v, dout, dtype=dtype, d_from="reference")
        for g, x in got.items():
            w = max(w, ratio(np.abs(x - getattr(ref, g)), bound[g]))
    print("D from the rounded reference output", dtype, round(w, 3))
    assert w <= 1.0


def test_the_empirical_criterion() -> None:
    # FlashAttention's 3x rule: it holds the emulation it is made of (factor 3 >= 1) and
    # flags dS without -D in float32; it is one number per gradient, not componentwise
    q, k, v, dout, opts, ref, _ = reference("gaussian", 0, "float32")
    tol = empirical_backward_bound(q, k, v, dout, dtype="float32", **opts)
    assert set(tol) == {"dq", "dk", "dv"}
    assert all(np.unique(t).size == 1 for t in tol.values())
    good = emulation(q, k, v, dout, dtype="float32", **opts)
    assert all(np.all(np.abs(good[g] - getattr(ref, g)) <= tol[g]) for g in tol)
    bad = naive_backward(q, k, v, dout, dtype="float32", subtract_d=False, **opts)
    assert any(np.any(np.abs(bad[g] - getattr(ref, g)) > tol[g]) for g in tol)
    assert FLASH_BACKWARD_FACTOR == 3.0
    with pytest.raises(ValueError, match="factor must be a number"):
        empirical_backward_bound(q, k, v, dout, dtype="float32", factor=-1.0, **opts)


def test_backward_bound_errors() -> None:
    q = np.zeros((2, 4))
    with pytest.raises(ValueError, match=r"dout holds values that bfloat16 cannot represent"):
        backward_bound(q, q, q, np.full((2, 4), 0.1), dtype="bfloat16")
    with pytest.raises(ValueError, match="logits must be one of"):
        backward_bound(q, q, q, q, dtype="float16", logits="float16")
    with pytest.raises(ValueError, match="rescalings must be None or an int"):
        backward_bound(q, q, q, q, dtype="float16", rescalings=-1)
    with pytest.raises(TypeError, match="takes no return_lse"):
        emulated_sdpa_backward(q, q, q, q, dtype="float16", return_lse=True)
    # 2-D inputs: the bounds have the inputs' shapes
    b = backward_bound(q, q, q, q, dtype="float16", bias=np.zeros((2, 2)))
    assert {n: x.shape for n, x in b.items()} == {
        "dq": (2, 4),
        "dk": (2, 4),
        "dv": (2, 4),
        "dbias": (2, 2),
    }


if __name__ == "__main__":  # pragma: no cover - the table of docs/tolerances.md
    print("| kernel | dtype | worst error / bound (family) |")
    print("|---|---|---|")
    for kname, (_, _, dts, _) in KERNELS.items():
        for dt in dts:
            found = worst(kname, dt)
            fam = max(found, key=lambda f: found[f])
            print(f"| {kname} | {dt} | {found[fam]:.3f} ({fam}) |")
    for bug in ("subtract_d", "scale_dk"):
        for dt in ("float32", "float16", "bfloat16"):
            print(f"| bug {bug} | {dt} | {_bug_ratio(dt, **{bug: False}):.1f} |")
