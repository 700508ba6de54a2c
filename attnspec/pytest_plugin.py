"""``attnspec check`` inside pytest, array-api-tests style.

``pytest --attnspec-target module:function`` (or the environment variable
``ATTNSPEC_TARGET``) adds one test per line of the report (``attnspec::<target>::<stage>/
<name>``): it passes, fails with the report's message and reproduction, or is skipped where
the check does not apply (with its reason). ``--attnspec-skips PATH`` names a file of
entries ``stage/name  # reason``, one a line; every entry must give a reason (a usage error
otherwise), and its test is skipped with it. ``--attnspec-dtype``, ``--attnspec-examples``
``--attnspec-seed`` and ``--attnspec-convention`` are those of ``attnspec check``.

Installing attnspec registers it (the ``pytest11`` entry point ``attnspec.pytest_plugin``);
it does nothing until a target is named. ``-p attnspec.pytest_plugin`` loads it where
entry points are disabled (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), ``-p
no:attnspec.pytest_plugin`` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_collection_modifyitems", "read_skips"]


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("attnspec", "attnspec conformance checks")
    g.addoption(
        "--attnspec-target",
        default=None,
        help="module:function, torch, jax or attnspec (env ATTNSPEC_TARGET)",
    )
    g.addoption(
        "--attnspec-skips", default=None, help="file of 'stage/name  # reason' entries to skip"
    )
    g.addoption("--attnspec-dtype", default="float64", help="the dtype the target works in")
    g.addoption("--attnspec-examples", type=int, default=6, help="Hypothesis examples per property")
    g.addoption("--attnspec-seed", type=int, default=0)
    g.addoption(
        "--attnspec-convention",
        default="canonical",
        help="canonical, torch, jax or flash: judge the target by what that peer promises",
    )


def read_skips(path: str | os.PathLike[str]) -> dict[str, str]:
    """``stage/name -> reason`` from a skips file; ValueError for an entry without a
    reason (``#`` and text after it)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry, _, reason = line.partition("#")
        if not reason.strip():
            raise ValueError(
                f"{path}:{n}: {entry.strip()!r} gives no reason (write 'stage/name  # why')"
            )
        out[entry.strip()] = reason.strip()
    return out


class AttnspecItem(pytest.Item):
    def __init__(self, *, verdict: Any, skip: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.verdict = verdict
        self.skip = skip

    def runtest(self) -> None:
        v = self.verdict
        if self.skip is not None:
            pytest.skip(f"skips file: {self.skip}")
        if v.verdict in ("not applicable", "not judged"):
            pytest.skip(f"{v.verdict}: {v.message.splitlines()[0] if v.message else ''}")
        if v.verdict == "fail":
            raise AssertionError(f"{v.message}\nreproduce:\n{v.reproduction}")

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        return str(excinfo.value)

    def reportinfo(self) -> tuple[str, None, str]:
        return ("attnspec", None, self.name)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    text = config.getoption("--attnspec-target") or os.environ.get("ATTNSPEC_TARGET")
    if not text:
        return
    from attnspec.spec.conformance import CONVENTIONS, load_target, run

    skips_path = config.getoption("--attnspec-skips")
    try:
        skips = read_skips(skips_path) if skips_path else {}
        targets = load_target(text, dtype=config.getoption("--attnspec-dtype"))
        if config.getoption("--attnspec-convention") not in CONVENTIONS:
            raise ValueError(
                f"--attnspec-convention must be one of {CONVENTIONS}, "
                f"got {config.getoption('--attnspec-convention')!r}"
            )
    except (ValueError, OSError) as exc:
        raise pytest.UsageError(f"attnspec: {exc}") from None
    for t in targets:
        rep = run(
            t,
            examples=config.getoption("--attnspec-examples"),
            seed=config.getoption("--attnspec-seed"),
            convention=config.getoption("--attnspec-convention"),
        )
        for v in rep.verdicts:
            key = f"{v.stage}/{v.name}"
            items.append(
                AttnspecItem.from_parent(
                    session, name=f"attnspec::{t.name}::{key}", verdict=v, skip=skips.get(key)
                )
            )
