"""Accuracy and speed of softmax, log_softmax and logsumexp: attnspec against peers.

Run ``python benchmarks/softmax_bench.py`` (options: ``--size 4096 --repeat 5``). It
prints, in one run:

* the worst error in ulps, against attnspec.exact (mpmath at 50 digits), over a few
  hundred adversarial rows of moderate length (wide rows, +-1e308, the underflow edge,
  30*randn, ties and -inf entries, logsumexp near 0);
* the time (min of ``--repeat`` runs) on a ``size x size`` float64 standard-normal array,
  absolute and as a ratio to scipy.special's time measured in the same run.

Implementations: attnspec (precision "accurate" and "fast"), numpy's shifted formula
(``e = exp(x - max); e / sum(e)``), scipy.special, and torch in float64 when importable.
This is a script, not a test: performance claims are ratios measured here, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np
import scipy
import scipy.special

import attnspec
from attnspec.spec.tolerances.softmax import ulp_of_exact

torch: Any
try:
    import torch
except ImportError:  # torch is optional
    torch = None

KINDS = ("softmax", "log_softmax", "logsumexp")
Impl = Callable[[np.ndarray], np.ndarray]


def _numpy_shifted(kind: str) -> Impl:
    def f(x: np.ndarray) -> np.ndarray:
        m = np.max(x, axis=-1, keepdims=True)
        # the -inf - (-inf) of an all -inf row does not occur in the adversarial set
        with np.errstate(over="ignore", invalid="ignore"):  # x - max overflows at 1e308
            d = x - m
        e = np.exp(d)
        s = np.sum(e, axis=-1, keepdims=True)
        if kind == "softmax":
            return e / s
        if kind == "log_softmax":
            return d - np.log(s)
        return (m + np.log(s))[..., 0]

    return f


def _scipy(kind: str) -> Impl:
    fn = {"softmax": scipy.special.softmax, "log_softmax": scipy.special.log_softmax}
    if kind in fn:
        return lambda x: fn[kind](x, axis=-1)
    return lambda x: scipy.special.logsumexp(x, axis=-1)


def _torch(kind: str) -> Impl:
    assert torch is not None
    fn: dict[str, Any] = {
        "softmax": torch.softmax,
        "log_softmax": torch.log_softmax,
        "logsumexp": torch.logsumexp,
    }
    return lambda x: fn[kind](torch.from_numpy(x), -1).numpy()


def implementations(kind: str) -> dict[str, Impl]:
    f = getattr(attnspec, kind)
    out: dict[str, Impl] = {
        "attnspec accurate": lambda x: f(x),
        "attnspec fast": lambda x: f(x, precision="fast"),
        "numpy shifted": _numpy_shifted(kind),
        "scipy.special": _scipy(kind),
    }
    if torch is not None:
        out["torch float64"] = _torch(kind)
    return out


def adversarial_rows(seed: int = 0) -> list[np.ndarray]:
    """A few hundred hard rows of 2-40 entries (no row is entirely -inf)."""
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    rows += [rng.uniform(-1e3, 1e3, 32) for _ in range(60)]  # x - max rounds
    rows += [rng.choice([1e308, -1e308, 0.0, 5e307, -7e307], 8) for _ in range(20)]
    rows += [np.concatenate([[0.0], -rng.uniform(700.0, 745.1, 15)]) for _ in range(40)]
    rows += [30.0 * rng.standard_normal(32) for _ in range(60)]
    for _ in range(40):  # ties with the max and -inf entries
        r = np.round(rng.standard_normal(24), 1)
        r[rng.integers(0, 24, 3)] = np.max(r)
        r[rng.integers(0, 24, 4)] = -np.inf
        rows.append(r)
    rows += [np.full(n, -np.log(n)) for n in range(2, 42)]  # logsumexp near 0
    rows += [np.log(rng.dirichlet(np.ones(16))) for _ in range(40)]  # log-probabilities
    rows += [np.array([0.0, -720.0]), np.array([0.0, -745.0]), np.array([0.0, -40.0])]
    return rows


def _ulps(computed: np.ndarray, exact: list[Any], ulp: list[Any]) -> float:
    worst = 0.0
    with mpmath.workdps(60):
        for c, y, u in zip(np.ravel(computed), exact, ulp, strict=True):
            if mpmath.isinf(y) or mpmath.isnan(y) or np.isinf(c) or np.isnan(c):
                same = (np.isnan(c) and mpmath.isnan(y)) or (
                    not np.isnan(c) and mpmath.mpf(float(c)) == y
                )
                # beyond the float64 range the correct rounding is inf
                big = mpmath.isfinite(y) and abs(y) > mpmath.mpf(2) ** 1024 and np.isinf(c)
                err = 0.0 if same or big else np.inf
            elif u is None:  # |y| beyond float64 range but c finite
                err = np.inf
            else:
                err = float(abs(mpmath.mpf(float(c)) - y) / u)
            worst = max(worst, err)
    return worst


def _ulp_table(values: list[Any]) -> list[Any]:
    tiny = mpmath.mpf(2) ** -1074
    out: list[Any] = []
    with mpmath.workdps(60):
        for y in values:
            if not mpmath.isfinite(y):
                out.append(None)
            elif abs(y) < tiny:
                out.append(tiny)  # ulp_of_exact is slow there (see docs/performance.md)
            elif abs(y) >= mpmath.mpf(2) ** 1024:
                out.append(None)
            else:
                out.append(ulp_of_exact(y))
    return out


def accuracy(rows: list[np.ndarray]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        exact: list[Any] = []
        for r in rows:
            exact += list(np.ravel(getattr(attnspec.exact, kind)(r[None, :], dps=50)))
        ulp = _ulp_table(exact)
        for name, f in implementations(kind).items():
            # Peers warn when x - max overflows (rows with +-1e308); the values are what
            # is measured, the warnings are not.
            with np.errstate(over="ignore", invalid="ignore"):
                computed = np.concatenate([np.ravel(f(r[None, :].copy())) for r in rows])
            table.setdefault(name, {})[kind] = _ulps(computed, exact, ulp)
    return table


def timing(size: int, repeat: int) -> dict[str, dict[str, float]]:
    x = np.random.default_rng(1).standard_normal((size, size))  # writeable: see docs
    table: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        impls = implementations(kind)
        best = dict.fromkeys(impls, np.inf)
        for _ in range(repeat):  # interleaved, so that load changes hit every one alike
            for name, f in impls.items():
                t0 = time.perf_counter()
                f(x)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, t in best.items():
            table.setdefault(name, {})[kind] = t
    return table


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = f"numpy {np.__version__}, scipy {scipy.__version__}, mpmath {mpmath.__version__}"
    versions += f", torch {torch.__version__}" if torch is not None else ", torch not installed"
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}\n{versions}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    rows = adversarial_rows()
    acc = accuracy(rows)
    tim = timing(args.size, args.repeat)
    print(f"\nmax error in ulps over {len(rows)} adversarial rows (exact: mpmath at 50 digits);")
    print(f"time on a {args.size}x{args.size} float64 randn array, min of {args.repeat} runs\n")
    head = "| implementation | " + " | ".join(f"{k} ulps | {k} ms | {k} / scipy" for k in KINDS)
    print(head + " |")
    print("|---" * (1 + 3 * len(KINDS)) + "|")
    for name in acc:
        cells = []
        for k in KINDS:
            ratio = tim[name][k] / tim["scipy.special"][k]
            cells += [f"{acc[name][k]:.3g}", f"{tim[name][k] * 1e3:.0f}", f"{ratio:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
