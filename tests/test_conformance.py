"""attnspec check: exit codes, a correct kernel conforms, broken kernels are caught with a
reproduction that reproduces, the JSON, forms never sent undeclared, the pytest plugin.

Small --examples and one stage at a time keep the file well under a minute.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from attnspec.cli import main
from attnspec.spec import conformance as C

ME = __name__
pytest_plugins = ["pytester"]


def kernel(
    q: Any,
    k: Any,
    v: Any,
    scale: Any = None,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    align: Any = None,
    return_lse: bool = False,
    **kw: Any,
) -> Any:
    """A float64 kernel as kernel authors write one: 4-D, full-shape masks, asserted."""
    assert q.ndim == 4 and k.ndim == 4 and v.ndim == 4, "only 4-D inputs"
    assert q.dtype == np.float64 and q.shape[-2] >= 1 and k.shape[-2] >= 1
    assert v.shape[-1] == q.shape[-1], "Ev = E only"
    assert not kw, f"undeclared features {sorted(kw)}"
    L, S = q.shape[-2], k.shape[-2]
    s = (1 / np.sqrt(q.shape[-1]) if scale is None else scale) * (q @ np.swapaxes(k, -1, -2))
    vis = np.ones(s.shape, dtype=bool)
    if mask is not None:
        assert mask.shape == s.shape, "full-shape masks only"
        vis &= mask
    if bias is not None:
        assert bias.shape == s.shape
        s = s + np.where(vis, bias, 0.0)
    if causal:
        off = S - L if align == "bottom_right" else 0
        vis &= np.arange(S)[None, :] <= np.arange(L)[:, None] + off
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)  # a NaN logit stays NaN: it must reach the row
    e = np.where(vis, np.exp(s - m), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.where(den == 0, 0.0, e / np.where(den == 0, 1.0, den))
    out = np.einsum("bhls,bhse->bhle", p, np.where(np.asarray(vis.any(-2))[..., None], v, 0.0))
    if return_lse:
        return out, np.where(
            den[..., 0] == 0,
            -np.inf,
            m[..., 0] + np.log(np.where(den[..., 0] == 0, 1, den[..., 0])),
        )
    return out


kernel.attnspec_features = ("mask", "causal", "lse")  # type: ignore[attr-defined]


def _broken(name: str, **changes: Any) -> Any:
    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        if name == "scale":
            kw["scale"] = 1.0 / q.shape[-1]
        if name == "causal_off_by_one" and kw.get("causal"):
            kw = {**kw, "causal": False}
            L, S = q.shape[-2], k.shape[-2]
            tri = np.arange(S)[None, :] <= np.arange(L)[:, None] + 1
            kw["mask"] = tri if kw.get("mask") is None else kw["mask"] & tri
            kw["mask"] = np.broadcast_to(kw["mask"], (*q.shape[:-1], S)).copy()
        if name == "crash" and q.shape[-2] > 1:
            raise RuntimeError("boom")
        res = kernel(q, k, v, **kw)
        if name == "nan_leak" and kw.get("mask") is not None:
            out = res[0] if isinstance(res, tuple) else res
            bad = ~kw["mask"].all(-2)  # a key no query sees: its NaN value leaks
            leak = np.einsum(
                "bhls,bhse->bhle", np.ones(kw["mask"].shape), np.where(bad[..., None], v, 0.0)
            )
            out = out + 0.0 * leak
            return (out, res[1]) if isinstance(res, tuple) else out
        if name == "inplace":  # right results, but the caller's q is overwritten
            q[...] = 0
        if name == "shape":
            out = res[0] if isinstance(res, tuple) else res
            out = out[..., :-1, :]
            return (out, res[1]) if isinstance(res, tuple) else out
        return res

    fn.attnspec_features = kernel.attnspec_features  # type: ignore[attr-defined]
    return fn


wrong_scale = _broken("scale")
nan_leak = _broken("nan_leak")
causal_off_by_one = _broken("causal_off_by_one")
crashes = _broken("crash")
wrong_shape = _broken("shape")
writes_its_input = _broken("inplace")


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "nonsense"]) == 2
    assert "TARGET must be" in capsys.readouterr().err
    assert main(["check", "no_such_module_xyz:f"]) == 2
    assert main(["check", f"{ME}:missing"]) == 2
    assert main(["check", "attnspec", "--dtype", "bfloat16"]) == 2
    assert main(["check", f"{ME}:kernel", "--features", "warp"]) == 2
    assert main(["check", f"{ME}:kernel", "--examples", "0"]) == 2
    assert main(["check", f"{ME}:kernel", "--stages", "families", "--only", "no_such_check"]) == 2
    assert "names no check" in capsys.readouterr().err
    assert main(["check", "torch", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["check", f"{ME}:kernel", "--dtype", "float128"])
    assert exc.value.code == 2


def test_correct_kernel_conforms(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    assert main(["check", f"{ME}:kernel", "--examples", "3", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["conforms"] is True
    rep = data["reports"][0]
    assert {"target", "dtype", "verdicts", "seconds", "features", "forms"} <= set(rep)
    v = rep["verdicts"][0]
    assert {"stage", "name", "verdict", "worst", "not_judged", "message", "reproduction"} <= set(v)
    assert {x["stage"] for x in rep["verdicts"]} == set(C.STAGES)
    assert all(x["verdict"] in ("pass", "not applicable") for x in rep["verdicts"])
    assert sum(x["verdict"] == "pass" for x in rep["verdicts"]) >= 15
    assert "CONFORMS" in capsys.readouterr().out


def test_attnspec_conforms() -> None:
    t = C.load_target("attnspec")[0]
    rep = C.run(t, examples=2, stages=("properties", "families", "backward"))
    assert not rep.failed, rep.text()


@pytest.mark.parametrize(
    ("fn", "stages"),
    [
        ("wrong_scale", "families"),
        ("nan_leak", "properties/hidden_values"),
        ("causal_off_by_one", "sizes"),
        ("crashes", "sizes"),
        ("wrong_shape", "families"),
        ("writes_its_input", "families"),
    ],
)
def test_broken_kernels_caught(fn: str, stages: str, tmp_path: Any) -> None:
    path = tmp_path / "r.json"
    stage, _, only = stages.partition("/")  # one check: shrinking each failure takes seconds
    args = ["check", f"{ME}:{fn}", "--examples", "8", "--stages", stage, "--json", str(path)]
    assert main([*args, "--only", only] if only else args) == 1
    verdicts = json.loads(path.read_text())["reports"][0]["verdicts"]
    failed = [v for v in verdicts if v["verdict"] == "fail"]
    assert failed
    for v in failed:  # every reproduction reproduces: the same failure, not a NameError
        snippet = v["reproduction"]
        assert snippet
        want = RuntimeError if fn == "crashes" else AssertionError
        with pytest.raises(want) as exc:
            exec(snippet, {})
        if fn == "crashes":
            assert "boom" in str(exc.value)


def test_reproduction_passes_for_the_correct_kernel() -> None:
    t = C.load_target(f"{ME}:kernel")[0]
    case = C.sized_case(65, 63, 59, seed=0, features=["mask", "causal"], variant=1)
    res = C.judge(t, case)
    assert res["worst"] <= 1


def test_harness_survives_bad_results() -> None:
    def tuple_out(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        return (kernel(q, k, v), None)

    def float32_out(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        return kernel(q, k, v).astype(np.float32)

    for fn, text in ((tuple_out, "tuple"), (float32_out, "dtype float32")):
        t = C.Target(name="bad", fn=fn, spec="x:y")
        rep = C.run(t, examples=2, stages=("families",))
        assert rep.failed and text in rep.failed[0].message


def test_plugin(pytester: pytest.Pytester) -> None:
    pytester.makefile(".txt", skips="families/low_rank  # slow here\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parent))
    res = pytester.runpytest_inprocess(
        "-p",
        "attnspec.pytest_plugin",
        f"--attnspec-target={ME}:kernel",
        "--attnspec-examples=2",
        "--attnspec-skips=skips.txt",
        "-q",
    )
    out = res.stdout.str()
    assert res.ret == 0, out
    assert "passed" in out and "skipped" in out
    pytester.makefile(".txt", bad="families/low_rank\n")
    res = pytester.runpytest_inprocess(
        "-p",
        "attnspec.pytest_plugin",
        f"--attnspec-target={ME}:wrong_scale",
        "--attnspec-examples=2",
        "-q",
    )
    assert res.ret == 1
    res = pytester.runpytest_inprocess(
        "-p",
        "attnspec.pytest_plugin",
        f"--attnspec-target={ME}:kernel",
        "--attnspec-skips=bad.txt",
    )
    assert res.ret == 4  # usage error: an entry without a reason


def test_plugin_entry_point(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed, the plugin loads by its pytest11 entry point (no -p) and takes the
    target from ATTNSPEC_TARGET; a bad convention is a usage error."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="pytest11") if e.name.startswith("attnspec")] == [
        "attnspec.pytest_plugin"
    ]
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).parent))
    monkeypatch.setenv("ATTNSPEC_TARGET", f"{ME}:wrong_scale")
    res = pytester.runpytest_inprocess("--attnspec-examples=2", "-q")
    assert res.ret == 1 and "attnspec::" in res.stdout.str()
    res = pytester.runpytest_inprocess("--attnspec-convention=numpy")
    assert res.ret == 4


def fill_kernel(
    q: Any,
    k: Any,
    v: Any,
    scale: Any = None,
    mask: Any = None,
    bias: Any = None,
    causal: bool = False,
    align: Any = None,
    return_lse: bool = False,
) -> Any:
    """A float32 kernel written as jax.nn.dot_product_attention is: the bias added, then
    every hidden logit replaced by the finite fill -0.7 * float32 max, so that a row that
    sees no key gets uniform weights (the mean of V) and NaN behind a mask leaks."""
    f32 = np.float32
    L, S = q.shape[-2], k.shape[-2]
    tau = f32(1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    s = (q @ np.swapaxes(k, -1, -2)) * tau
    if bias is not None:
        s = s + bias
    vis = np.ones(s.shape, dtype=bool) if mask is None else mask.copy()
    if causal:
        off = S - L if align == "bottom_right" else 0
        vis &= np.arange(S)[None, :] <= np.arange(L)[:, None] + off
    s = np.where(vis, s, f32(-0.7 * np.finfo(f32).max))
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True, dtype=f32)
    out = ((e / den) @ v).astype(f32)
    if return_lse:
        return out, (m + np.log(den))[..., 0].astype(f32)
    return out


fill_kernel.attnspec_features = ("mask", "causal", "lse")  # type: ignore[attr-defined]


def test_convention_rejudges_rows_that_see_no_key() -> None:
    """Canonically a row that sees no key is 0 and NaN behind a mask must not leak; the
    jax convention promises neither (spec/conventions.py): the kernel that keeps jax's
    rules fails the first and conforms to the second, where such rows are judged against
    the mean of V in the sizes stage and left out of the properties' draws."""
    t = C.load_target(f"{ME}:fill_kernel", dtype="float32")[0]
    stages = ("properties", "sizes")
    canon = C.run(t, examples=4, sizes=3, stages=stages)
    assert {v.name for v in canon.failed} >= {"empty_rows", "hidden_values"}, canon.text()
    assert any(v.stage == "sizes" for v in canon.failed), canon.text()  # L > S bottom-right
    jax = C.run(t, examples=4, sizes=3, stages=stages, convention="jax")
    assert not jax.failed, jax.text()
    sized = next(v for v in jax.verdicts if v.stage == "sizes")
    assert sized.verdict == "pass" and sized.not_judged > 0  # the fill's lse, not judged
    # a kernel that gives such a row anything else still fails under the convention
    case = C.sized_case(3, 2, 4, seed=0, dtype="float32", features=["causal"], variant=1)
    case = case.with_kwargs(causal=True, align="bottom_right")  # query 0 sees no key
    assert C.blind_rows(case)[..., 0].all() and not C.blind_rows(case)[..., 1:].any()

    def zero_rows(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        res = fill_kernel(q, k, v, **kw)
        out = res[0] if isinstance(res, tuple) else res
        out = np.where(C.blind_rows(C.AttentionCase(q, k, v, kw))[..., None], 1.0, out)
        out = out.astype(np.float32)
        return (out, res[1]) if isinstance(res, tuple) else out

    bad = C.Target("ones", zero_rows, t.features, dtype="float32", spec="x:y")
    with pytest.raises(AssertionError, match="output"):
        C.judge(bad, case, convention="jax")
    C.judge(t, case, convention="jax")


def test_low_precision_backward_both_ways() -> None:
    """Correct float32 and bfloat16 backwards (attnspec's emulation of naive ones) conform
    in the backward stage, judged by the derived bounds of their dtype on inputs rounded
    to it; the float32 one with dK off by 1 % is caught by the gradients against the
    reference. (In bfloat16 even 25 % stays within the componentwise bound at these
    sizes: |dS|^T |Q| is an order of magnitude above |dK|.)"""
    from dataclasses import replace

    from tests.kernels.emulated import emulated_float32

    for dtype in ("float32", "bfloat16"):
        t = C.load_target(f"tests.kernels.emulated:emulated_{dtype}", dtype=dtype)[0]
        rep = C.run(t, examples=2, stages=("backward",))
        assert not rep.failed and rep.verdicts[0].verdict == "pass", rep.text()
        assert sum(v.verdict == "pass" for v in rep.verdicts) >= 10

    def off(q: Any, k: Any, v: Any, dout: Any, **kw: Any) -> Any:
        g = emulated_float32.attnspec_backward(q, k, v, dout, **kw)
        return g._replace(dk=g.dk * 1.01)

    t = C.load_target("tests.kernels.emulated:emulated_float32", dtype="float32")[0]
    bad = C.run(replace(t, backward=off), examples=2, stages=("backward",), only=["gradients"])
    assert [v.name for v in bad.failed] == ["gradients"], bad.text()
    assert "dk" in bad.failed[0].message
