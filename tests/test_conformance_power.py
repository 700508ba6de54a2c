"""The power of the conformance oracle, measured on kernels written as kernel authors write
them (issue 10, "Its power, measured").

(a) Each single-bug kernel of :mod:`kernels.buggy` is wrong on its witness, the smallest
valid input its docstring names: its output, lse or a gradient differs from
:func:`attnspec.sdpa` / :func:`attnspec.sdpa_backward` (``precision="fast"``) by more than
the derived bound of its dtype: :func:`attnspec.spec.tolerances.precision.forward_bound`
for float32 and float16 (which includes the float64 reference's own textbook bound),
:func:`~attnspec.spec.tolerances.attention.textbook_sdpa_bound` and
:func:`~attnspec.spec.tolerances.attention.textbook_lse_bound` doubled for float64 (the
kernel's and the fast reference's errors, each within it), and
:func:`~attnspec.spec.tolerances.backward.fast_backward_bound` doubled for the gradients
(the same reason).

(b) Each correct kernel of :mod:`kernels.correct` stays within the same bounds on many
inputs (every feature, sizes across the 64-key tiles) and on every witness.

(c) ``attnspec check`` (:mod:`attnspec.spec.conformance`) with its default settings
catches every buggy kernel and passes every correct kernel and attnspec itself: at seed 0
for the bugs and seeds 0-2 for the correct kernels here under the thorough profile
(ATTNSPEC_PROFILE=thorough: each run takes 15-60 s on the 2-core machine);
``python -m tests.kernels.measure`` runs 20 seeds and prints the table of
docs/conformance.md. A short run of the command line (the properties stage only) is
always tested.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from kernels import buggy, correct

import attnspec
from attnspec.reference.emulate import round_to
from attnspec.spec.tolerances.attention import textbook_lse_bound, textbook_sdpa_bound
from attnspec.spec.tolerances.backward import fast_backward_bound
from attnspec.spec.tolerances.precision import forward_bound

F64 = npt.NDArray[np.float64]
ROOT = Path(__file__).resolve().parents[1]


def ratio(err: Any, bound: Any) -> float:
    """The worst error / bound over the entries the bound judges (an infinite bound says
    nothing); a NaN error, or a NaN or inf where the reference is finite, is infinite."""
    err = np.asarray(err, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(err == 0, 0.0, err / bound)
    r = np.where(np.isnan(r), np.inf, r)
    r = np.where(bound == np.inf, 0.0, r)
    r = np.where(np.isnan(err), np.inf, r)  # whatever the bound (NaN inputs make it NaN)
    return float(np.max(r, initial=0.0))


def distance(got: Any, want: F64) -> F64:
    """|got - want|, 0 where both are the same (inf = inf, -inf = -inf, NaN and NaN), NaN
    where one only is NaN."""
    g = np.asarray(got, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        d = np.where((g == want) | (np.isnan(g) & np.isnan(want)), 0.0, np.abs(g - want))
    return np.where(np.isnan(g) != np.isnan(want), np.nan, d)


def judge(kernel: Any, w: buggy.Witness) -> dict[str, float]:
    """The kernel on a witness: worst error / bound of the output, the lse and (with a
    backward and ``w.dout``) each gradient."""
    dtype = kernel.attnspec_dtype
    o = w.opts
    ref, ref_lse = attnspec.sdpa(w.q, w.k, w.v, precision="fast", return_lse=True, **o)
    if dtype == "float64":
        # the kernel and the fast reference are each within the textbook bound of the
        # exact output: their distance within twice it
        _, ob = textbook_sdpa_bound(w.q, w.k, w.v, **o)
        ob, lb = 2 * ob, 2 * textbook_lse_bound(w.q, w.k, **o)
    else:  # against="fast": the reference's own bound is included
        ob, lb = forward_bound(w.q, w.k, w.v, dtype=dtype, **o)
    out, lse = kernel(w.q, w.k, w.v, return_lse=True, **o)
    assert out.dtype == np.dtype(dtype)
    found = {"out": ratio(distance(out, ref), ob), "lse": ratio(distance(lse, ref_lse), lb)}
    back = getattr(kernel, "attnspec_backward", None)
    if back is not None and w.dout is not None:
        got = back(w.q, w.k, w.v, w.dout, dlse=w.dlse, **o)
        want = attnspec.sdpa_backward(w.q, w.k, w.v, w.dout, dlse=w.dlse, precision="fast", **o)
        bounds = fast_backward_bound(w.q, w.k, w.v, w.dout, w.dlse, **o)
        for name, b in bounds.items():
            found[name] = ratio(distance(getattr(got, name), getattr(want, name)), 2 * b)
    return found


# -- (a) every bug is shown on its witness ----------------------------------------------


def test_the_corpus_is_large_enough() -> None:
    assert len(buggy.BUGS) >= 25
    for name, fn in buggy.BUGS.items():
        assert fn.__doc__ and "Smallest" in fn.__doc__, name
        assert fn.attnspec_features <= correct.ALL_FEATURES


@pytest.mark.parametrize("name", sorted(buggy.BUGS))
def test_each_buggy_kernel_is_wrong_on_its_witness(name: str) -> None:
    kernel = buggy.BUGS[name]
    w = kernel.attnspec_witness()
    dtype = kernel.attnspec_dtype
    for x in (w.q, w.k, w.v):  # the witness is a valid input of the kernel's dtype
        finite = np.isfinite(x)
        assert np.array_equal(round_to(x, dtype)[finite], x[finite]) if dtype != "float64" else True
    found = judge(kernel, w)
    assert max(found.values()) > 1, f"{name} is within the bound on its witness: {found}"


@pytest.mark.parametrize("name", sorted(buggy.BUGS))
def test_correct_kernels_are_right_on_every_witness(name: str) -> None:
    w = buggy.BUGS[name].attnspec_witness()
    for kname, kernel in correct.KERNELS.items():
        found = judge(kernel, w)
        assert max(found.values()) <= 1, f"{kname} on the witness of {name}: {found}"


def test_the_cores_without_a_bug_are_the_correct_kernels() -> None:
    # each buggy kernel is a copy of a correct one with one switch: with none, bitwise
    # the same results
    rng = np.random.default_rng(5)
    q = round_to(rng.standard_normal((1, 4, 5, 8)), "float16")
    k = round_to(rng.standard_normal((1, 2, 70, 8)), "float16")
    v = round_to(rng.standard_normal((1, 2, 70, 8)), "float16")
    dout = rng.standard_normal((1, 4, 5, 8))
    opts: dict[str, Any] = {
        "mask": rng.random((1, 4, 5, 70)) < 0.8,
        "bias": rng.standard_normal((1, 4, 5, 70)),
        "causal": True,
        "align": "bottom_right",
        "softcap": 3.0,
        "alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625]),
        "sinks": rng.standard_normal(4),
    }
    for store, kernel in (
        (np.float32, correct.naive_float32),
        (np.float16, correct.naive_float16),
        (np.float64, correct.naive_float64),
    ):
        a = buggy._naive(q, k, v, None, store, opts, True)
        b = kernel(q, k, v, return_lse=True, **opts)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    a = buggy._online(q, k, v, None, opts, True)
    b = correct.online_float32(q, k, v, return_lse=True, **opts)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    ga = buggy._backward(q, k, v, dout, None, None, opts)
    gb = correct.naive_float64_backward(q, k, v, dout, **opts)
    for x, y in zip(ga, gb, strict=True):
        assert (x is None and y is None) or np.array_equal(np.asarray(x), np.asarray(y))


# -- (b) the correct kernels on many inputs -----------------------------------------------

#: (L, S, E, Hq, Hkv): keys across the tile of 64 (63, 65, 129) and L != S both ways
SHAPES = [
    (1, 1, 4, 2, 2),
    (3, 63, 8, 2, 1),
    (5, 65, 16, 4, 2),
    (70, 20, 8, 2, 2),
    (2, 129, 8, 2, 2),
]
FEATURE_SETS = [
    (),
    ("mask", "bias"),
    ("causal",),
    ("window", "alibi"),
    ("softcap", "sinks"),
    ("dropout", "mask"),
    ("causal", "sinks", "softcap", "bias"),
]


def problem(seed: int, shape: tuple[int, ...], feats: tuple[str, ...], dtype: str) -> buggy.Witness:
    """q, k, v and options in full form, values of ``dtype``; masks with a fully hidden
    row, NaN at some hidden values (nothing hidden may leak)."""
    n_q, n_k, width, hq, hkv = shape
    rng = np.random.default_rng([seed, n_k, len(feats)])
    rd = (lambda x: x) if dtype == "float64" else (lambda x: round_to(x, dtype))
    q = rd(rng.standard_normal((2, hq, n_q, width)) * 1.5)
    k = rd(rng.standard_normal((2, hkv, n_k, width)))
    v = rd(rng.standard_normal((2, hkv, n_k, width)))
    full = (2, hq, n_q, n_k)
    o: dict[str, Any] = {}
    if "mask" in feats:
        o["mask"] = rng.random(full) < 0.7
        o["mask"][0, 0, 0] = False  # a row with nothing visible
        hidden_everywhere = ~o["mask"].any(axis=(1, 2))  # (B, S): keys no query sees
        v = np.where(hidden_everywhere[:, None, :, None], np.nan, v)
    if "bias" in feats:
        o["bias"] = rd(rng.standard_normal(full) * 2)
    if "causal" in feats:
        o["causal"] = True
    if "window" in feats:
        o["window"] = (int(rng.integers(0, 5)), int(rng.integers(0, 5)))
    if "alibi" in feats:
        o["alibi_slopes"] = rd(2.0 ** -rng.uniform(1, 6, hq))
    if "softcap" in feats:
        o["softcap"] = 2.0
    if "sinks" in feats:
        o["sinks"] = rd(rng.standard_normal(hq))
    if "dropout" in feats:
        o["dropout_p"] = 0.25
        o["dropout_mask"] = rng.random(full) >= 0.25
    if {"causal", "window", "alibi"} & set(feats) and n_q != n_k:
        o["align"] = ("top_left", "bottom_right")[seed % 2]
    return buggy.Witness(q, k, v, o, dout=rng.standard_normal((2, hq, n_q, width)))


@pytest.mark.parametrize("name", sorted(correct.KERNELS))
def test_correct_kernels_stay_within_the_bound(name: str) -> None:
    kernel = correct.KERNELS[name]
    worst: dict[str, float] = {}
    for seed in range(2 if name == "loop_float64" else 3):
        for shape in SHAPES:
            if name == "loop_float64" and shape[0] * shape[1] > 400:
                continue  # plain Python: small sizes only
            for feats in FEATURE_SETS:
                w = problem(seed, shape, feats, kernel.attnspec_dtype)
                for key, r in judge(kernel, w).items():
                    worst[key] = max(worst.get(key, 0.0), r)
                    assert r <= 1, (name, seed, shape, feats, key, r)
    # the bound is not vacuous: the worst output error uses a measurable part of it
    assert worst["out"] > 1e-3, worst


# -- (c) attnspec check ---------------------------------------------------------------------


def _check_cli(target: str, dtype: str, *extra: str) -> subprocess.CompletedProcess[str]:
    # the installed attnspec (the repository root's attnspec/ folder is not the package:
    # package-dir maps reference/ and spec/ into it), with the root appended to the path for
    # the tests.kernels targets, run from a folder of its own
    args = [target, "--dtype", dtype, *extra]
    code = (
        f"import sys; sys.path.append({str(ROOT)!r}); "
        "from attnspec.spec.conformance import main; "
        f"sys.exit(main({args!r}))"
    )
    with tempfile.TemporaryDirectory() as where:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=where, capture_output=True, text=True, timeout=300
        )


def test_the_command_line_flags_a_bug_and_passes_its_correct_kernel() -> None:
    # a short run (the families stage only, about 1 s): the plumbing of module:function
    # targets, the exit codes and the report
    bad = _check_cli("tests.kernels.buggy:scale_missing", "float32", "--stages", "families")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout
    good = _check_cli("tests.kernels.correct:naive_float32", "float32", "--stages", "families")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "CONFORMS" in good.stdout


# The full default-settings runs (every buggy kernel, the correct kernels at 20 seeds) take
# 15-60 s each here: `python -m tests.kernels.measure` runs them and prints the table.
