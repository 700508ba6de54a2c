"""A fuzzer of the whole public API against its contract (issue 7).

Hypothesis drives the eight public functions (``attnspec.softmax``, ``log_softmax``,
``logsumexp``, ``sdpa`` and their ``attnspec.exact`` counterparts) and
``attnspec.exact.to_float64`` with every input form: every dtype (float64, float32, float16,
bfloat16, float8, integers, Python ints beyond int64; bool, complex, object, strings,
datetimes, structured and long double refused), empty axes, broadcast views, read-only,
negative-stride, strided, transposed, byte-swapped and Fortran-order arrays, nested lists
and tuples (ragged ones refused), 0-d inputs and numpy scalars, special values (NaN,
+-inf, -0.0, subnormals, +-1e308), and bad arguments of every kind. The contract
(``tests/fuzz_contract.py``, ``docs/reliability.md``):

(a) valid input: within the claimed bound of ``attnspec.exact`` (precision="accurate": one
    ulp for the softmax family and the lse, ``accurate_sdpa_bound`` for the output;
    "fast": the derived fast and textbook bounds), or the documented special value;
(b) invalid input: a TypeError or ValueError whose message names the argument;
(c) no input modified, no result sharing memory with an input;
(d) no warning escapes;
(e) hidden values (excluded entries, hidden keys, queries that see nothing, hidden bias
    entries, dropped values) never reach a result: bitwise the same with NaN or +-inf
    there, within the claimed bound with a huge finite value there.

Logits beyond the float64 range are a regime of their own
(:func:`test_sdpa_logits_beyond_the_float64_range`): no float64 arithmetic can hold them.

Sizes stay small (at most 4 per side, E <= 3) for the exact arithmetic. Example counts are
the profile's ``max_examples`` times a factor per test (``ci``: about a minute and a half
on 2 cores). ``python tests/test_fuzz.py --profile ci`` runs every test outside pytest and
prints how many inputs each function was given, by kind (the figures of
docs/reliability.md); ``--scale N`` multiplies the example counts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import fuzz_contract as fc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

SCALE_ENV = "ATTNSPEC_FUZZ_SCALE"


def _n(factor: float) -> int:
    """The examples of a test: the profile's max_examples times ``factor`` (and
    ATTNSPEC_FUZZ_SCALE), at least 5."""
    scale = float(os.environ.get(SCALE_ENV, "1"))
    return max(5, round(settings.default.max_examples * factor * scale))


# --- the softmax family -------------------------------------------------------------


@settings(max_examples=_n(12))
@given(case=fc.softmax_cases())
def test_softmax_family_on_any_valid_input(case: fc.SoftmaxCase) -> None:
    """(a, c, d): softmax, log_softmax, logsumexp and attnspec.exact's on every form."""
    fc.check_softmax_case(case)


@settings(max_examples=_n(1))
@given(case=fc.softmax_cases(big_ints=True))
def test_softmax_family_on_python_ints_beyond_int64(case: fc.SoftmaxCase) -> None:
    """(a, c, d): x a nested list of Python ints beyond int64 (documented: each rounds
    to the nearest float64)."""
    fc.check_softmax_case(case)


@settings(max_examples=_n(3))
@given(case=fc.softmax_cases(plain=True, need_excluded=True))
def test_softmax_family_hidden_values(case: fc.SoftmaxCase) -> None:
    """(e): NaN, +-inf and +-1e300 at excluded entries."""
    fc.check_softmax_hidden(case)


@settings(max_examples=_n(10))
@given(bad=fc.softmax_invalid())
def test_softmax_family_invalid_input(bad: fc.Invalid) -> None:
    """(b, c, d): bad x, axis, where, precision, keepdims, dps and unknown keywords."""
    bad.check()


# --- sdpa ------------------------------------------------------------------------------


@settings(max_examples=_n(25))
@given(case=fc.sdpa_cases())
def test_sdpa_on_any_valid_input(case: fc.SdpaCase) -> None:
    """(a, c, d): attnspec.sdpa and attnspec.exact.sdpa on every form and option."""
    fc.check_sdpa_case(case)


@settings(max_examples=_n(4))
@given(
    case=fc.sdpa_cases("hidden"),
    targets=st.sets(st.sampled_from(["q", "k", "v", "bias"]), min_size=1),
)
def test_sdpa_hidden_values(case: fc.SdpaCase, targets: set[str]) -> None:
    """(e): NaN, +-inf and +-1e300 at the hidden positions of ``targets``."""
    fc.check_sdpa_hidden(case, sorted(targets))


@settings(max_examples=_n(3))
@given(
    case=fc.sdpa_cases("hidden"),
    keys=st.sets(st.integers(0, 2), min_size=1),
    targets=st.sets(st.sampled_from(["k", "v"]), min_size=1),
)
def test_sdpa_values_hidden_from_some_rows(
    case: fc.SdpaCase, keys: set[int], targets: set[str]
) -> None:
    """(e) row by row: k, v of keys seen by some rows only, poisoned; the other rows keep
    their outputs (and every row its lse when only v changes)."""
    fc.check_sdpa_hidden_rows(case, sorted(keys), sorted(targets))


@settings(max_examples=_n(10))
@given(bad=fc.sdpa_invalid())
def test_sdpa_invalid_input(bad: fc.Invalid) -> None:
    """(b, c, d): bad q, k, v, shapes and every option."""
    bad.check()


@settings(max_examples=_n(4))
@given(case=fc.sdpa_cases())
def test_spec_textbook_bounds_on_every_valid_case(case: fc.SdpaCase) -> None:
    """Not the API: the spec's textbook bounds (the fast claim the sdpa tests hold
    precision="fast" to) evaluate on every valid case as it is given."""
    fc.textbook_bounds_evaluate(case)


@settings(max_examples=_n(1))
@given(case=fc.sdpa_cases("overflow"))
def test_sdpa_logits_beyond_the_float64_range(case: fc.SdpaCase) -> None:
    """(c, d) and the decision of issue 7 where a logit (or tau q.k on the way) is beyond
    the float64 range from finite inputs (a scale of +-1e308, q and k of 1e160, a bias of
    1e308 on a logit of 1e308, an ALiBi slope of 1e308): precision="accurate" refuses
    with a ValueError naming the logit (or, where no visible logit gets there, is within
    its bound); "fast" gives float64 results of the documented shapes (IEEE overflow, no
    bound); attnspec.exact holds the logits: finite results, each output row within the
    range of its visible values (see fuzz_contract.check_sdpa_overflow)."""
    fc.check_sdpa_overflow(case)


# --- to_float64 ------------------------------------------------------------------------


@settings(max_examples=_n(5))
@given(case=fc.to_float64_cases())
def test_to_float64_rounds_to_nearest(case: fc.ToFloatCase) -> None:
    """(a, c, d): mpf of any precision, ints and floats round to the nearest float64."""
    fc.check_to_float64(case)


@settings(max_examples=_n(1))
@given(case=fc.to_float64_cases(big_ints=True))
def test_to_float64_python_ints_beyond_the_float64_range(case: fc.ToFloatCase) -> None:
    """(a, c, d): a Python int beyond the float64 range rounds to the infinity of its sign
    (or is refused with a TypeError or ValueError)."""
    fc.check_to_float64(case)


@pytest.mark.parametrize("code", fc.TO_FLOAT64_INVALID)
def test_to_float64_refuses_what_is_not_a_real_number(code: str) -> None:
    """(b, c, d): strings, None, complex, ragged lists: a TypeError or ValueError."""
    fc.check_to_float64_invalid(code)


# --- the figures -------------------------------------------------------------------------

TESTS = (
    "test_softmax_family_on_any_valid_input",
    "test_softmax_family_on_python_ints_beyond_int64",
    "test_softmax_family_hidden_values",
    "test_softmax_family_invalid_input",
    "test_sdpa_on_any_valid_input",
    "test_sdpa_hidden_values",
    "test_sdpa_values_hidden_from_some_rows",
    "test_sdpa_invalid_input",
    "test_sdpa_logits_beyond_the_float64_range",
    "test_spec_textbook_bounds_on_every_valid_case",
    "test_to_float64_rounds_to_nearest",
    "test_to_float64_python_ints_beyond_the_float64_range",
    "test_to_float64_refuses_what_is_not_a_real_number",
)


def run_counts(profile: str = "ci", scale: float = 1.0) -> tuple[str, list[str]]:
    """Run every test of this module outside pytest under ``profile`` (example counts
    times ``scale``); return the table of inputs tried and the failures (test: message)."""
    from attnspec.spec.profiles import load_profile

    os.environ[SCALE_ENV] = str(scale)
    load_profile(profile)
    sys.modules.pop("test_fuzz", None)
    module = importlib.import_module("test_fuzz")  # fresh: the decorators read the profile
    fc.COUNTS.clear()
    fc.INVALID_ARGS.clear()
    fc.UNDECIDED.clear()
    failures = []
    for name in TESTS:
        test = getattr(module, name)
        params = fc.TO_FLOAT64_INVALID if name.endswith("real_number") else (None,)
        for p in params:
            try:
                test() if p is None else test(p)
            except Exception as exc:  # report and go on: every test's failures are wanted
                subs = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
                for e in subs:
                    failures.append(f"{name}{'' if p is None else f'[{p}]'}: {e}")
    return fc.counts_table(), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci", choices=("dev", "ci", "thorough"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the example counts")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    start = time.perf_counter()
    table, failures = run_counts(args.profile, args.scale)
    elapsed = time.perf_counter() - start
    print(f"profile {args.profile}, scale {args.scale}: {elapsed:.0f} s\n")
    print(table)
    print(f"\ninvalid arguments tried: {dict(sorted(fc.INVALID_ARGS.items()))}")
    print(f"\nexact calls undecided at MAX_BITS (read as midpoints): {dict(fc.UNDECIDED)}")
    print(f"\n{len(failures)} failing test(s)")
    for f in failures:
        print("\n---", f[:3000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
