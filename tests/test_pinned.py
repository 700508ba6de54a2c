"""The accurate results stay bit for bit on pinned inputs (see tests/pinned_cases.py)."""

from __future__ import annotations

import json

import pytest
from pinned_cases import PINNED, all_cases, digest

_EXPECTED: dict[str, str] = json.loads(PINNED.read_text())


def test_every_case_is_pinned() -> None:
    assert sorted(_EXPECTED) == sorted(all_cases())


@pytest.mark.parametrize("name", sorted(all_cases()))
def test_accurate_results_unchanged(name: str) -> None:
    assert digest(all_cases()[name]()) == _EXPECTED[name], (
        f"{name}: the accurate result changed; the digests were written at commit 62828eb "
        "by `python tests/pinned_cases.py --write`"
    )
