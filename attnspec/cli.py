"""The command line: ``attnspec verify``, ``attnspec docs`` and ``attnspec demo``.

``attnspec verify``
    proves every SymPy derivation in :mod:`attnspec.spec.derivations` and runs the
    property battery (:mod:`attnspec.spec.battery`) on the reference in each
    arithmetic; prints one line per claim (claim, how it was checked, result, time)
    and exits 1 if any failed. ``--thorough`` uses the ``thorough`` Hypothesis profile;
    ``--jobs 1`` runs everything in one process (default 2).
``attnspec docs``
    regenerates the generated parts of docs/ from spec/; ``--check`` only compares and
    exits 1 when they differ.
``attnspec demo``
    the worked example: attention over the seven characters of "写代码的中年人".

Exit status: 0 success, 1 a claim or check failed (or docs drifted), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ["main"]


@dataclass(frozen=True)
class Line:
    """One line of the verify report."""

    claim: str
    how: str
    passed: bool
    seconds: float
    detail: str = ""


def _timed(f: Callable[[], object]) -> tuple[bool, float, str]:
    start = time.perf_counter()
    try:
        f()
    except AssertionError as exc:
        return False, time.perf_counter() - start, str(exc) or type(exc).__name__
    return True, time.perf_counter() - start, ""


def _derivation_lines() -> list[Line]:
    from attnspec.spec.derivations import all_claims

    lines = []
    for claim in all_claims():
        passed, seconds, detail = _timed(claim.prove)
        lines.append(
            Line(f"{claim.topic}: {claim.name}", f"SymPy, {claim.method}", passed, seconds, detail)
        )
    return lines


#: the batteries, in the order of the report: (precision, topic)
def _jobs() -> list[tuple[str, str]]:
    from attnspec.spec import TOPICS

    return [(precision, topic) for precision in ("accurate", "fast") for topic in TOPICS]


def _battery_lines(
    profile: str, jobs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], list[Line]]:
    """Run the battery of each (precision, topic) on the reference; its lines, by job."""
    import importlib

    from hypothesis import settings

    from attnspec.spec.battery import run_battery
    from attnspec.spec.profiles import load_profile

    load_profile(profile)
    out = {}
    for precision, topic in jobs:
        module = importlib.import_module(f"attnspec.spec.properties.{topic}")
        impl = module.attnspec_implementation(precision)
        out[(precision, topic)] = [
            Line(
                f"{impl.name}: {result.name}",
                result.description,
                result.passed,
                result.seconds,
                result.message or "",
            )
            for result in run_battery(impl, settings())
        ]
    return out


def _claims_and_batteries(
    profile: str, jobs: Sequence[tuple[str, str]]
) -> tuple[list[Line], dict[tuple[str, str], list[Line]]]:
    """The derivations' lines and those of the batteries of ``jobs`` (one worker's share)."""
    return _derivation_lines(), _battery_lines(profile, jobs)


def _run_all(profile: str, workers: int) -> list[Line]:
    """Every claim's line, in the report's order: the derivations, then the batteries.
    With two workers, a second process proves the derivations and runs the online
    topic's batteries while this one runs the others (about half the time each)."""
    jobs = _jobs()
    if workers <= 1:
        claims, batteries = _claims_and_batteries(profile, jobs)
    else:
        import concurrent.futures
        import multiprocessing

        theirs = [job for job in jobs if job[1] in ("online",)]
        ours = [job for job in jobs if job not in theirs]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            future = pool.submit(_claims_and_batteries, profile, theirs)
            batteries = _battery_lines(profile, ours)
            claims, more = future.result()
        batteries.update(more)
    return claims + [line for job in jobs for line in batteries[job]]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _print_report(lines: Sequence[Line], out: TextIO) -> None:
    width = max([len(line.claim) for line in lines] + [5])
    out.write(f"{'result':<6}  {'time':>7}  {'claim':<{width}}  how it was checked\n")
    for line in lines:
        verdict = "ok" if line.passed else "FAILED"
        out.write(f"{verdict:<6}  {line.seconds:6.2f}s  {line.claim:<{width}}  {line.how}\n")
        if not line.passed:
            for detail in line.detail.splitlines()[:20]:
                out.write(f"    {detail}\n")


def _verify(args: argparse.Namespace) -> int:
    profile = "thorough" if args.thorough else "ci"
    start = time.perf_counter()
    lines = _run_all(profile, args.jobs)
    _print_report(lines, sys.stdout)
    failed = [line for line in lines if not line.passed]
    total = time.perf_counter() - start
    print(
        f"\n{len(lines) - len(failed)} passed, {len(failed)} failed "
        f"({len(lines)} claims, Hypothesis profile {profile!r}, {total:.1f}s)"
    )
    return 1 if failed else 0


def _docs(args: argparse.Namespace) -> int:
    from attnspec import docs

    root = Path(args.root) if args.root else docs.find_root()
    if args.check:
        drifted = docs.check(root)
        if drifted:
            print("docs/ differs from what spec/ generates; run `attnspec docs` to regenerate:")
            for path in drifted:
                print(f"  {path}")
            return 1
        print(f"docs are in sync with spec/ ({root})")
        return 0
    changed = docs.write(root)
    print(f"wrote {len(changed)} file(s)" + "".join(f"\n  {p}" for p in changed))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from attnspec import demo

    return demo.run(sys.stdout)


def _check(args: argparse.Namespace) -> int:
    from attnspec.spec.conformance import check_command

    return check_command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnspec",
        description="A property-tested math specification of softmax and attention.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser(
        "verify",
        help="prove every derivation and run the property battery on the reference",
        description="Prove every SymPy derivation and run the property battery on the "
        "reference; one line per claim; exit 1 on any failure.",
    )
    verify.add_argument(
        "--thorough",
        action="store_true",
        help="many more Hypothesis examples (minutes, not seconds)",
    )
    verify.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        help="processes (default 2: the derivations and the online batteries in a second one)",
    )
    verify.set_defaults(run=_verify)
    docs = sub.add_parser(
        "docs",
        help="regenerate docs/ from spec/ (--check: only compare)",
        description="Regenerate the generated parts of docs/ from spec/.",
    )
    docs.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    docs.add_argument("--root", help="the repository root (default: found from here upward)")
    docs.set_defaults(run=_docs)
    demo = sub.add_parser(
        "demo",
        help="walk through attention on seven characters, step by step",
        description="The classic first example of attention, step by step: scores, "
        "softmax weights, context vector; then attnspec.sdpa and the exact values.",
    )
    demo.set_defaults(run=_demo)
    from attnspec.spec.conformance import add_arguments

    check = sub.add_parser(
        "check",
        help="check an attention kernel (torch, jax, attnspec, module:function)",
        description="Check an attention kernel against the specification: properties, "
        "sizes across tiles, input families, gradients; derived tolerances; exit 0 "
        "conforms, 1 a property failed, 2 bad usage.",
    )
    add_arguments(check)
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
