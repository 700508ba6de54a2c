"""The power and false-alarm figures of ``attnspec check`` (docs/conformance.md).

``python -m tests.kernels.measure`` runs ``attnspec check`` with its default settings
(:func:`attnspec.spec.conformance.run` with only ``seed`` set, the target's dtype as
``--dtype``) on

* every buggy kernel of :mod:`tests.kernels.buggy` at seed 0 (``--bug-seeds``): caught
  when the exit code is 1;
* every correct kernel of :mod:`tests.kernels.correct`, the two low-precision kernels
  with a backward of :mod:`tests.kernels.emulated` and ``attnspec`` itself at seeds
  0 ... 19 (``--seeds``): a false alarm when the exit code is not 0;

and prints one line per target: the seeds run, how many failed, the checks that failed
(with their worst error / bound) and the time. ``--json PATH`` writes the same as data;
``--only NAME,...`` limits the targets; ``--jobs N`` runs N processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

#: correct targets: name -> (TARGET, dtype)
CORRECT: dict[str, tuple[str, str]] = {
    "naive_float32": ("tests.kernels.correct:naive_float32", "float32"),
    "naive_float16": ("tests.kernels.correct:naive_float16", "float16"),
    "online_float32": ("tests.kernels.correct:online_float32", "float32"),
    "loop_float64": ("tests.kernels.correct:loop_float64", "float64"),
    "naive_float64": ("tests.kernels.correct:naive_float64", "float64"),
    "emulated_float32": ("tests.kernels.emulated:emulated_float32", "float32"),
    "emulated_bfloat16": ("tests.kernels.emulated:emulated_bfloat16", "bfloat16"),
    "attnspec": ("attnspec", "float64"),
}


def buggy_targets() -> dict[str, tuple[str, str]]:
    """Every kernel of :data:`tests.kernels.buggy.BUGS` as (TARGET, dtype)."""
    from .buggy import BUGS

    return {
        name: (f"tests.kernels.buggy:{name}", str(fn.attnspec_dtype)) for name, fn in BUGS.items()
    }


def check(spec: str, dtype: str, seed: int) -> dict[str, Any]:
    """``attnspec check SPEC --dtype DTYPE --seed SEED`` in this process: the exit code,
    the failed checks with their worst ratio and message head, the seconds."""
    from attnspec.spec.conformance import load_target, run

    t0 = time.perf_counter()
    failed: list[dict[str, Any]] = []
    code = 0
    try:
        for target in load_target(spec, dtype=dtype):
            rep = run(target, seed=seed)
            code = max(code, rep.exit_code())
            for v in rep.failed:
                worst = v.worst if v.worst is None or math.isfinite(v.worst) else "inf"
                head = v.message.splitlines()[0][:160] if v.message else ""
                failed.append({"check": f"{v.stage}/{v.name}", "worst": worst, "message": head})
    except Exception as exc:  # the harness itself crashed: reported, not hidden
        code = -1
        failed.append({"check": "harness crashed", "worst": None, "message": repr(exc)[:300]})
    return {
        "target": spec,
        "dtype": dtype,
        "seed": seed,
        "exit": code,
        "failed": failed,
        "seconds": time.perf_counter() - t0,
    }


def _job(args: tuple[str, str, str, int]) -> tuple[str, dict[str, Any]]:
    name, spec, dtype, seed = args
    return name, check(spec, dtype, seed)


def measure(
    names: Sequence[str] | None, seeds: int, bug_seeds: int, jobs: int
) -> dict[str, list[dict[str, Any]]]:
    """name -> the results of its seeds (buggy kernels first)."""
    plan: list[tuple[str, str, str, int]] = []
    for name, (spec, dtype) in buggy_targets().items():
        plan += [(name, spec, dtype, s) for s in range(bug_seeds)]
    for s in range(seeds):  # seed after seed, so that a cut-short run covers every target
        plan += [(name, spec, dtype, s) for name, (spec, dtype) in CORRECT.items()]
    if names:
        plan = [p for p in plan if p[0] in names]
    found: dict[str, list[dict[str, Any]]] = {}
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_job, plan))
    else:
        results = []
        for p in plan:
            results.append(_job(p))
            name, res = results[-1]
            failed = "; ".join(
                f"{f['check']} ({f['worst']}) {f['message'][:80]}" for f in res["failed"]
            )
            print(
                f"  {name} seed {res['seed']}: exit {res['exit']} in {res['seconds']:.1f} s"
                f"  {failed}",
                file=sys.stderr,
                flush=True,
            )
    for name, res in results:
        found.setdefault(name, []).append(res)
    return found


def table(found: dict[str, list[dict[str, Any]]]) -> str:
    """One line per target: kind, expected exit, seeds, how many went otherwise, the
    failed checks, the mean seconds."""
    bugs = set(buggy_targets())
    lines = [
        f"{'target':32s} {'dtype':8s} {'kind':7s} {'seeds':>5s} {'wrong':>5s} {'s/run':>6s}  checks"
    ]
    for name, runs in found.items():
        kind = "buggy" if name in bugs else "correct"
        want = 1 if kind == "buggy" else 0
        wrong = sum(r["exit"] != want for r in runs)
        checks: dict[str, Any] = {}
        for r in runs:
            for f in r["failed"]:
                checks.setdefault(f["check"], f["worst"])
        text = ", ".join(
            f"{c} ({w if isinstance(w, str) or w is None else format(w, '.3g')})"
            for c, w in checks.items()
        )
        secs = sum(r["seconds"] for r in runs) / max(1, len(runs))
        lines.append(
            f"{name:32s} {runs[0]['dtype']:8s} {kind:7s} {len(runs):5d} {wrong:5d} {secs:6.1f}  "
            f"{text or '-'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.kernels.measure", description=__doc__)
    p.add_argument("--seeds", type=int, default=20, help="seeds per correct target (20)")
    p.add_argument("--bug-seeds", type=int, default=1, help="seeds per buggy kernel (1)")
    p.add_argument("--only", help="comma-separated target names")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    names = None if a.only is None else [n for n in a.only.split(",") if n]
    found = measure(names, a.seeds, a.bug_seeds, a.jobs)
    print(table(found))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(found, fh, indent=1)
    bugs = set(buggy_targets())
    ok = all(r["exit"] == (1 if name in bugs else 0) for name, runs in found.items() for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
