"""Speed, memory and accuracy of scaled dot-product attention: attnspec against peers.

Run ``python benchmarks/attention_bench.py`` (options: ``--shapes small`` or ``long``, or
``--shape 1,8,4096,4096,64`` (repeatable), ``--impls "attnspec fast,torch float64"``,
``--repeat 3``, ``--accurate-rows 1024``, ``--exact-rows 2``). For each shape
(B, H, L, S, E) in (1, 8, 1024, 1024, 64), (1, 8, 4096, 4096, 64), (1, 1, 16384, 16384, 64)
and (1, 1, 65536, 65536, 64), with
float64 standard-normal q, k, v (seed 0) and the default scale 1/sqrt(E), it prints:

* time: the best of ``--repeat`` runs after one warm-up run (none for accurate), in a
  fresh child process per implementation and shape (so that one implementation's
  threads, caches and allocations do not affect the next);
* GFLOP/s: ``4 B H L S E`` flops (the two products) divided by the time;
* peak memory: the child's RSS high-water mark during the timed runs (VmHWM, reset
  before them through /proc/self/clear_refs; ``resource.getrusage`` where that is not
  allowed), which also sees BLAS workspaces that tracemalloc misses, minus its RSS just
  before them: the workspace beyond the inputs, including the output;
* max error: ``max |out - ref|`` over all outputs, in units of u = 2**-53, where ``ref`` is
  attnspec's accurate path (each output within ``4u sum_j p_ij |v_jk|`` of the exact
  value, so for these inputs within about 4u of it);
* a spot check of ``--exact-rows`` query rows of head 0 against ``attnspec.exact``
  (mpmath at 50 digits) on the first shape: the error of every implementation there.

Implementations: attnspec ``precision="accurate"`` and ``"fast"``, naive numpy (the
materialised softmax: ``q @ k^T * scale``, max-shift, exp, divide, ``@ v``) and torch's
``scaled_dot_product_attention`` in float64 when torch is importable. The accurate
path on the larger shapes is evaluated on its first ``--accurate-rows`` query rows only
(every row is independent and costs the same): its time is scaled by L / rows, the
errors of the others are measured on those rows, and the output says so.
At (1, 1, 65536, 65536, 64) the (L, S) logits alone are 32 GiB: only implementations
whose workspace does not grow with S run there (attnspec fast, which walks blocks of keys
and merges their (o, lse); torch, whose CPU kernel for float64 is blocked too: 10 MiB of
workspace measured at (1, 1, 8192, 8192, 64)); an implementation whose estimated memory
(:func:`needed_bytes`) exceeds the machine's available memory is skipped, and the output
says so; the accurate path is skipped there (its key blocks are not split: hours).
This is a script, not a test: the figures are measurements, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = {
    "small": [(1, 8, 1024, 1024, 64)],
    "long": [(1, 8, 4096, 4096, 64), (1, 1, 65536, 65536, 64)],
    "all": [
        (1, 8, 1024, 1024, 64),
        (1, 8, 4096, 4096, 64),
        (1, 1, 16384, 16384, 64),
        (1, 1, 65536, 65536, 64),
    ],
}
IMPLS = ("attnspec accurate", "attnspec fast", "naive numpy", "torch float64")
U = 2.0**-53


def inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b, h, n_q, n_k, e = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, n_q, e))
    k = rng.standard_normal((b, h, n_k, e))
    v = rng.standard_normal((b, h, n_k, e))
    return q, k, v


def needed_bytes(impl: str, shape: tuple[int, ...]) -> float:
    """An estimate of the memory ``impl`` needs at ``shape``: the inputs and the output,
    and the materialised (L, S) logits (twice: a temporary) where the implementation
    holds them whole (naive numpy)."""
    b, h, n_q, n_k, e = shape
    io = 8.0 * b * h * (2 * n_q * e + 2 * n_k * e)
    if impl == "naive numpy":
        return io + 2 * 8.0 * b * h * n_q * n_k
    return io


def available_bytes() -> float:
    """MemAvailable of /proc/meminfo (inf where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def naive_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = q @ np.swapaxes(k, -1, -2) * (1.0 / np.sqrt(q.shape[-1]))
    s -= np.max(s, axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= np.sum(s, axis=-1, keepdims=True)
    return s @ v


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM; Linux >= 4.0), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_bytes(reset: bool) -> int:
    """VmHWM since the reset, else the process's getrusage high-water mark."""
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(impl: str, shape: tuple[int, ...], rows: int, repeat: int, out_path: str) -> None:
    """Time one implementation on one shape; print a JSON line; save the output."""
    q, k, v = inputs(shape)
    q = np.ascontiguousarray(q[..., :rows, :])
    if impl.startswith("attnspec"):
        import attnspec

        precision = impl.split()[1]

        def run() -> np.ndarray:
            return np.asarray(attnspec.sdpa(q, k, v, precision=precision))

    elif impl == "naive numpy":

        def run() -> np.ndarray:
            return naive_numpy(q, k, v)

    else:
        import torch

        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

        def run() -> np.ndarray:
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).numpy()

    if impl != "attnspec accurate":  # (seconds a run: first-time costs do not matter)
        run()  # warm-up: imports, BLAS buffers, first-touch of the allocator's pages
    reset = _reset_peak()
    before = _rss_bytes()
    times = []
    out = None
    spent = 0.0
    for _ in range(repeat):
        out = None  # free the previous output before the next run
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > 60.0:  # enough: one more run of a slow path would not change the picture
            break
    peak = _peak_bytes(reset)
    assert out is not None
    np.save(out_path, out)
    print(json.dumps({"time": min(times), "runs": len(times), "peak": peak - before}))


def _run_child(
    impl: str, shape: tuple[int, ...], rows: int, repeat: int, out_path: str
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", impl, ",".join(map(str, shape)), str(rows)]
    cmd += [str(repeat), out_path]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def machine() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"machine: {cpu}, {os.cpu_count()} logical cores, {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}",
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    versions = [f"numpy {np.__version__}"]
    try:
        import torch

        versions.append(
            f"torch {torch.__version__} (torch.get_num_threads() = {torch.get_num_threads()})"
        )
    except ImportError:
        versions.append("torch not installed")
    lines.append("versions: " + ", ".join(versions))
    try:
        from threadpoolctl import threadpool_info

        pools = [
            f"{p['internal_api']} {p['version']}: {p['num_threads']} threads"
            for p in threadpool_info()
        ]
        lines.append("BLAS (threadpoolctl): " + "; ".join(pools))
    except ImportError:
        config: Any = np.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        unset = "unset: OpenBLAS uses one thread per core"
        env = {
            k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ
        }
        lines.append(
            f"BLAS: {blas.get('name', '?')} {blas.get('version', '')} "
            f"(threadpoolctl not installed; thread variables {env or unset})"
        )
    return lines


def spot_check(shape: tuple[int, ...], n_rows: int, outputs: dict[str, np.ndarray]) -> list[str]:
    """Errors of each implementation on a few rows of head 0 against attnspec.exact."""
    import attnspec

    q, k, v = inputs(shape)
    t0 = time.perf_counter()
    exact = attnspec.exact.sdpa(q[0, 0, :n_rows], k[0, 0], v[0, 0])
    lines = [
        f"spot check against attnspec.exact (mpmath, 50 digits), rows 0-{n_rows - 1} of head 0, "
        f"shape {shape} ({time.perf_counter() - t0:.0f} s):"
    ]
    ref = attnspec.exact.to_float64(exact)
    for impl, out in outputs.items():
        got = out[0, 0, :n_rows]
        # the float64 rounding of the exact value, ref, is within u/2 * |exact|
        err = float(np.max(np.abs(got - ref)))
        lines.append(f"  {impl:18s} max |out - fl(exact)| = {err / U:.3g} u")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--accurate-rows", type=int, default=1024)
    parser.add_argument("--exact-rows", type=int, default=2)
    parser.add_argument("--impls", default="", help="comma-separated subset of " + str(IMPLS))
    parser.add_argument(
        "--shape", action="append", default=[], help="B,H,L,S,E instead of --shapes (repeatable)"
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, shape, rows, repeat, out_path = args.child
        child(impl, tuple(map(int, shape.split(","))), int(rows), int(repeat), out_path)
        return

    try:
        import torch  # noqa: F401

        impls: tuple[str, ...] = IMPLS
    except ImportError:
        impls = IMPLS[:3]
    if args.impls:
        chosen = [x.strip() for x in args.impls.split(",")]
        unknown = sorted(set(chosen) - set(IMPLS))
        if unknown:
            parser.error(f"--impls: unknown {unknown}; choose from {IMPLS}")
        impls = tuple(x for x in impls if x in chosen)
    for line in machine():
        print(line)
    print(f"command: python benchmarks/attention_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(
        "| shape (B, H, L, S, E) | implementation | time s | / torch | GFLOP/s | peak MiB "
        "| max err (u) |"
    )
    print("|" + "---|" * 7)
    notes: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shapes = [tuple(map(int, x.split(","))) for x in args.shape] or SHAPES[args.shapes]
        for shape in shapes:
            b, h, n_q, n_k, e = shape
            flops = 4.0 * b * h * n_q * n_k * e
            rows = min(n_q, args.accurate_rows) if n_q > 1024 else n_q
            results: dict[str, dict[str, Any]] = {}
            outs: dict[str, np.ndarray] = {}
            free = available_bytes()
            for impl in impls:
                if n_k > 16384 and impl == "attnspec accurate":
                    results[impl] = {"skip": "not run beyond S = 16384 (hours)"}
                    continue
                need = needed_bytes(impl, shape)
                if need > 0.8 * free:
                    results[impl] = {
                        "skip": f"does not fit: needs about {need / 2**30:.0f} GiB, "
                        f"{free / 2**30:.0f} GiB available"
                    }
                    continue
                r = rows if impl == "attnspec accurate" else n_q
                path = str(Path(tmp) / f"{impl.replace(' ', '_')}.npy")
                res = _run_child(impl, shape, r, args.repeat if r == n_q else 1, path)
                if "error" not in res:
                    res["time"] *= n_q / r  # scaled to all rows
                    outs[impl] = np.load(path)
                results[impl] = res
            ref = outs.get("attnspec accurate")
            torch_time = results.get("torch float64", {}).get("time")
            for impl in impls:
                res = results[impl]
                if "skip" in res:
                    print(f"| {shape} | {impl} | skipped: {res['skip']} | | | | |")
                    continue
                if "error" in res:
                    print(f"| {shape} | {impl} | failed: {res['error']} | | | | |")
                    continue
                t = res["time"]
                ratio = f"{t / torch_time:.2f}x" if torch_time else "-"
                err = "-"
                if ref is not None:
                    diff = np.abs(outs[impl][..., : ref.shape[-2], :] - ref)
                    err = f"{float(np.max(diff)) / U:.3g}"
                scaled = " (scaled)" if impl == "attnspec accurate" and rows < n_q else ""
                print(
                    f"| {shape} | {impl} | {t:.3g}{scaled} | {ratio} | {flops / t / 1e9:.3g} | "
                    f"{res['peak'] / 2**20:.0f} | {err} |"
                )
            if ref is None and "attnspec fast" in outs and "torch float64" in outs:
                diff = np.abs(outs["attnspec fast"] - outs["torch float64"])
                notes.append(
                    f"{shape}: no accurate reference; max |attnspec fast - torch float64| = "
                    f"{float(np.max(diff)) / U:.3g} u"
                )
            if rows < n_q and "attnspec accurate" in outs:
                notes.append(
                    f"{shape}: attnspec accurate ran on the first {rows} of {n_q} query rows "
                    f"(time scaled by {n_q // rows}, peak memory that of {rows} rows); the max "
                    f"errors of the others are over those rows."
                )
            if args.exact_rows and shape == shapes[0]:
                notes += spot_check(shape, args.exact_rows, outs)
    print()
    for line in notes:
        print(line)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
