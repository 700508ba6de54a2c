"""Time the accurate products against plain ``np.matmul``, in one run, as ratios.

For each attention shape (B, H, L, S, E) the script times

* ``q @ k^T * tau`` (plain) against ``dot_exact(q, k^T, scale=tau)``, for tau = 1/sqrt(E)
  (a power of two at E = 64) and for tau = 0.1 (not a power of two: the double-double
  product is multiplied by it with TwoProduct);
* ``p @ v`` (plain) against ``dot_dd(p_hi, p_lo, v)`` with softmax weights of the logits;

on randn data and with logits sharing an offset of 1e12 (a column of 1e6 in q and k). Each
time is the best of ``--repeat`` runs, wall-clock and CPU (all threads; with one BLAS
thread the CPU time is the figure least disturbed by other processes); the ratio is
accurate time / plain time measured in the same process. The header names the machine,
numpy and its BLAS, the BLAS thread setting and the load, since all of these move the
figures.

Usage::

    python benchmarks/matmul_bench.py                # (1, 8, 1024, 1024, 64)
    python benchmarks/matmul_bench.py --large        # also (1, 8, 4096, 4096, 64)
    OPENBLAS_NUM_THREADS=1 python benchmarks/matmul_bench.py
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from attnspec.reference.eft import two_sum
from attnspec.reference.matmul import dot_dd, dot_exact


def _best(f: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Best wall-clock and best CPU time (all threads) of ``repeat`` calls."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        f()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str:
    try:
        cfg: Any = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '?')}"
    except Exception:  # the config layout is not a stable API
        return "unknown"


def _softmax_dd(s: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    lo = rng.uniform(-1.0, 1.0, p.shape) * p * 2.0**-54
    return two_sum(p, lo)


def run(shape: tuple[int, int, int, int, int], repeat: int, offset: float) -> None:
    B, H, L, S, E = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, L, E))
    k = rng.standard_normal((B, H, S, E))
    v = rng.standard_normal((B, H, S, E))
    if offset:
        q[..., 0] = np.sqrt(offset)
        k[..., 0] = np.sqrt(offset)
    kt = np.swapaxes(k, -1, -2)
    label = f"{shape}" + (f" offset {offset:g}" if offset else " randn")
    rows: list[tuple[str, tuple[float, float], tuple[float, float]]] = []
    np.matmul(q, kt)  # warm up: BLAS threads and the first touch of an output's pages
    for tau in (float(1 / np.sqrt(E)), 0.1):

        def plain(tau: float = tau) -> object:
            return np.matmul(q, kt) * tau

        def accurate(tau: float = tau) -> object:
            return dot_exact(q, kt, scale=tau)

        t_plain = _best(plain, repeat)
        t_acc = _best(accurate, repeat)
        rows.append((f"q@k^T  scale={tau:.4g}", t_plain, t_acc))
    s_hi, _ = dot_exact(q, kt, scale=1 / np.sqrt(E))
    p_hi, p_lo = _softmax_dd(s_hi - offset / np.sqrt(E), rng)
    del s_hi
    t_plain = _best(lambda: np.matmul(p_hi, v), repeat)
    t_acc = _best(lambda: dot_dd(p_hi, p_lo, v), repeat)
    rows.append(("p@v    dot_dd", t_plain, t_acc))
    for name, (wp, cp), (wa, ca) in rows:
        print(
            f"{label:34s} {name:20s} wall: plain {wp:7.3f} s accurate {wa:7.3f} s"
            f" ratio {wa / wp:5.1f}x | cpu: {cp:7.3f} s {ca:7.3f} s ratio {ca / cp:5.1f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", action="store_true", help="also (1, 8, 4096, 4096, 64)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, BLAS {_blas()}")
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}")
    if hasattr(os, "getloadavg"):
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    shapes = [(1, 8, 1024, 1024, 64)]
    if args.large:
        shapes.append((1, 8, 4096, 4096, 64))
    for shape in shapes:
        for offset in (0.0, 1e12):
            run(shape, args.repeat if shape[2] <= 1024 else 2, offset)


if __name__ == "__main__":
    main()
