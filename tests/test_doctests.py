"""The ``>>>`` examples in the docstrings of every module of attnspec run and print what
they say.

The modules are those of the installed package: ``pkgutil.walk_packages`` over the
``__path__`` of ``attnspec`` and of its subpackages ``attnspec.reference`` and
``attnspec.spec``, which setuptools maps from the folders reference/ and spec/ (in an
editable install they do not lie under attnspec/, so walking ``attnspec.__path__``
alone would not find them). ``attnspec.__main__`` is left out: importing it runs the
command line. One test per module runs its examples with :mod:`doctest` and fails with
doctest's report; a floor on the number of examples keeps the tests from passing by
finding none.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

#: packages whose ``__path__`` is walked (the subpackages setuptools maps from other folders)
PACKAGES = ("attnspec", "attnspec.reference", "attnspec.spec")
#: modules not imported: ``python -m attnspec`` runs the command line when imported
SKIPPED = frozenset({"attnspec.__main__"})
OPTIONFLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
#: numpy's default print options (numpy 2.x, ``legacy=False``): examples print arrays as a
#: fresh interpreter would, whatever another test set.
NUMPY_PRINT_DEFAULTS = {
    "precision": 8,
    "threshold": 1000,
    "edgeitems": 3,
    "linewidth": 75,
    "suppress": False,
    "nanstr": "nan",
    "infstr": "inf",
    "sign": "-",
    "floatmode": "maxprec",
    "legacy": False,
}
#: The examples found when this test was written (at commit cf0ac54):
#: attnspec.reference.attention 7, attnspec.reference.matmul 6, attnspec.reference.softmax 7,
#: attnspec.spec.conventions 3, 23 in all (no other module has any). The test asserts at
#: least that many, so that it cannot pass by finding nothing; raise it when adding examples.
MIN_EXAMPLES = 23


def _raise(name: str) -> None:
    # walk_packages ignores an ImportError of a subpackage unless told otherwise
    raise ImportError(f"cannot import the package {name} while walking attnspec")


def _module_names() -> list[str]:
    names: set[str] = set()
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.add(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + ".", onerror=_raise):
            names.add(info.name)
    return sorted(names - SKIPPED)


MODULES = _module_names()


def _doctests(module: ModuleType) -> list[doctest.DocTest]:
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


def _run(module: ModuleType) -> tuple[doctest.TestResults, str]:
    """Run the examples of ``module``; return the results and doctest's report."""
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report = io.StringIO()
    with warnings.catch_warnings(), np.printoptions(**NUMPY_PRINT_DEFAULTS):
        # a warning in an example is a failure of that example, reported by doctest
        warnings.simplefilter("error")
        for test in _doctests(module):
            runner.run(test, out=report.write)
    return doctest.TestResults(runner.failures, runner.tries), report.getvalue()


def test_the_walk_finds_every_part_of_the_package() -> None:
    # a few modules from each folder: discovery must not silently shrink
    expected = {
        "attnspec",
        "attnspec.cli",
        "attnspec.exact",
        "attnspec.reference",
        "attnspec.reference.softmax",
        "attnspec.reference.attention",
        "attnspec.spec",
        "attnspec.spec.conventions",
        "attnspec.spec.derivations.claim",
        "attnspec.spec.properties.softmax",
        "attnspec.spec.strategies.attention",
        "attnspec.spec.tolerances.softmax",
    }
    assert expected <= set(MODULES), sorted(expected - set(MODULES))
    assert not SKIPPED & set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_examples(name: str) -> None:
    results, report = _run(importlib.import_module(name))
    if results.failed:
        pytest.fail(
            f"{results.failed} of {results.attempted} examples in {name} failed:\n{report}",
            pytrace=False,
        )


def test_the_examples_are_found() -> None:
    counts = {name: 0 for name in MODULES}
    for name in MODULES:
        for test in _doctests(importlib.import_module(name)):
            counts[name] += len(test.examples)
    found = {name: n for name, n in counts.items() if n}
    total = sum(found.values())
    assert total >= MIN_EXAMPLES, f"{total} examples found, expected >= {MIN_EXAMPLES}: {found}"


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    # A fresh interpreter, warnings as errors: importing prints nothing, warns nothing,
    # runs no command line (that would print, or exit), and leaves numpy's state alone.
    # It runs in an empty folder, so that it imports the installed package and not the
    # checkout's attnspec/ folder (which is only the facade: CI installs a wheel).
    script = textwrap.dedent(
        f"""
        import importlib
        import numpy as np
        options, errors = np.get_printoptions(), np.geterr()
        for name in {MODULES!r}:
            importlib.import_module(name)
        assert np.get_printoptions() == options, "numpy print options changed"
        assert np.geterr() == errors, "numpy error handling changed"
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", f"importing printed to stdout:\n{done.stdout}"
    assert done.stderr == "", f"importing printed to stderr:\n{done.stderr}"
