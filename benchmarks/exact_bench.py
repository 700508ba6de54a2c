"""The exact arithmetic: Arb balls against the mpmath path, and what the balls prove.

Run ``python benchmarks/exact_bench.py`` (``--repeat 3``, ``--skip-large``). It prints:

* time of ``attnspec.exact.sdpa`` and ``attnspec.exact.softmax`` (on the (B H L, S) logits
  of the same shape, as one array) with ``backend="arb"`` (the default: certified,
  correctly rounded) and ``backend="mpmath"`` (50 digits, nothing proved) on float64
  standard-normal inputs (seed 0) at (1, 1, 16, 16, 16), (1, 2, 64, 64, 64) and
  (1, 1, 256, 256, 64): the best of ``--repeat`` interleaved runs (one run of mpmath at
  the largest size), and the ratio mpmath / arb in the same run;
* how often the balls decide at the first working precision, and the worst precision
  needed, over the 303 adversarial rows of benchmarks/softmax_bench.py (softmax,
  log_softmax, logsumexp, one call per row) and the attention regimes below (sdpa with
  return_lse);
* the accurate path's worst error against the certified values: softmax family in ulps
  (as in softmax_bench.py), sdpa as a multiple of its claim 4u sum_j p_ij |v_jk| + eta.

This is a script, not a test: the figures are measurements, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import mpmath
import numpy as np

import attnspec
from attnspec import exact
from attnspec.reference import exact as ref_exact

sys.path.insert(0, str(Path(__file__).parent))
from softmax_bench import KINDS, _ulp_table, _ulps, adversarial_rows

SIZES = [(1, 1, 16, 16, 16), (1, 2, 64, 64, 64), (1, 1, 256, 256, 64)]
U = 2.0**-53
ETA = 2.0**-1074


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, ...]:
    b, h, n_q, n_k, e = shape
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, h, n_q, e)),
        rng.standard_normal((b, h, n_k, e)),
        rng.standard_normal((b, h, n_k, e)),
    )


def _best(f: Any, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def timing(repeat: int, skip_large: bool) -> list[str]:
    lines = [
        "| shape | sdpa arb s | sdpa mpmath s | ratio | softmax arb s | softmax mpmath s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in SIZES[:2] if skip_large else SIZES:
        q, k, v = _inputs(shape)
        x = (q @ np.swapaxes(k, -1, -2) / np.sqrt(shape[-1])).reshape(-1, shape[3])
        large = shape == SIZES[2]
        exact.sdpa(q[..., :2, :], k, v)  # warm-up (imports)
        row = [str(shape)]

        def run_sdpa(be: str, q: Any = q, k: Any = k, v: Any = v) -> None:
            exact.sdpa(q, k, v, backend=be)

        def run_softmax(be: str, x: Any = x) -> None:
            exact.softmax(x, backend=be)

        for f in (run_sdpa, run_softmax):
            t_arb = _best(lambda f=f: f("arb"), repeat)
            t_mp = _best(lambda f=f: f("mpmath"), 1 if large else repeat)
            row += [f"{t_arb:.3g}", f"{t_mp:.3g}", f"{t_mp / t_arb:.1f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def regimes() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]]:
    """The attention regimes (1, 2, 64, 64, 64) of the accuracy tests."""
    q, k, v = _inputs((1, 2, 64, 64, 64), seed=1)
    off = np.full((*q.shape[:-1], 1), 1e6)
    return {
        "randn": (q, k, v, {}),
        "q.k offset 1e12": (
            np.concatenate([off, q[..., 1:]], -1),
            np.concatenate([np.full((*k.shape[:-1], 1), 1e6), k[..., 1:]], -1),
            v,
            {"scale": 1.0},
        ),
        "values scaled 1e150": (q, k, v * 1e150, {}),
        "values scaled 1e-150": (q, k, v * 1e-150, {}),
        "subnormal outputs": (q, k, v * 1e-310, {}),
        "logits spanning -745..0 (sinks, bias)": (
            q,
            k,
            v,
            {
                "bias": -np.random.default_rng(2).uniform(0.0, 745.0, (64, 64)),
                "sinks": np.array([3.0, -2.0]),
            },
        ),
    }


def _stats(label: str, calls: list[tuple[int, int]]) -> str:
    top = ref_exact.MAX_BITS
    share = sum(n == 1 for n, _ in calls) / len(calls)
    return (
        f"| {label} | {len(calls)} | {share:.1%} | {max(b for _, b in calls)} | "
        f"{sum(b == top for _, b in calls)} |"
    )


def decisions() -> tuple[list[str], dict[str, float]]:
    """Precision statistics over the adversarial rows and the attention regimes; the
    accurate path's worst sdpa error as a multiple of its claim, per regime."""
    lines = [
        "| inputs | calls | decided at the first precision | worst bits | undecided at MAX_BITS |"
    ]
    lines.append("|---|---|---|---|---|")
    mid = {"undecided": "midpoint"}
    rows = adversarial_rows()
    with ref_exact.recording_precision() as bits:
        for kind in KINDS:
            for r in rows:
                getattr(exact, kind)(r[None, :], **mid)
    lines.append(_stats("softmax family, 303 adversarial rows x 3", bits))
    worst: dict[str, float] = {}
    for name, (q, k, v, kw) in regimes().items():
        with ref_exact.recording_precision() as bits:
            out, _ = exact.sdpa(q, k, v, return_lse=True, **mid, **kw)
            mass = exact.sdpa(q, k, np.abs(v), **mid, **kw)
        lines.append(_stats(f"sdpa (1, 2, 64, 64, 64): {name}", bits))
        got = attnspec.sdpa(q, k, v, **kw)
        with mpmath.workdps(60):  # the error against the exact mpf, not its rounding
            err = np.abs(got.astype(object) - out)
            claim = 4 * mpmath.mpf(U) * mass.astype(object) + mpmath.mpf(ETA)
            worst[name] = float(np.max(err / claim))
    return lines, worst


def accuracy_softmax() -> list[str]:
    rows = adversarial_rows()
    lines = ["| kind | accurate worst ulps (certified exact) |", "|---|---|"]
    for kind in KINDS:
        ref: list[Any] = []
        for r in rows:
            ref += list(np.ravel(getattr(exact, kind)(r[None, :], undecided="midpoint")))
        computed = np.concatenate(
            [np.ravel(getattr(attnspec, kind)(r[None, :], precision="accurate")) for r in rows]
        )
        lines.append(f"| {kind} | {_ulps(computed, ref, _ulp_table(ref)):.3g} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    import flint

    print(f"python-flint {flint.__version__}, mpmath, numpy {np.__version__}")
    print("\n## Time\n")
    print("\n".join(timing(args.repeat, args.skip_large)))
    print("\n## Precision needed\n")
    lines, worst = decisions()
    print("\n".join(lines))
    print("\n## Accurate path against certified values\n")
    print("\n".join(accuracy_softmax()))
    print("\n| sdpa regime | accurate worst error / claim |\n|---|---|")
    for name, w in worst.items():
        print(f"| {name} | {w:.3g} |")


if __name__ == "__main__":
    main()
