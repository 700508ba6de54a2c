"""The generated docs are in sync with the spec, and drift is caught.

docs/softmax.md is rendered from the claims in spec/derivations; check() must report
nothing on the repository, and must report a page whose generated content was edited,
or whose claims changed without regenerating.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

import attnspec
from attnspec import docs
from attnspec.spec import derivations

ROOT = docs.find_root(Path(__file__).parent)
PAGE = "docs/softmax.md"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return docs.render()


def _copy_repo_docs(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_docs_are_in_sync_with_the_spec() -> None:
    stale = docs.check(ROOT)
    assert stale == [], f"{stale} differ from the spec: run `attnspec docs` and commit"


def test_render_is_deterministic(rendered: dict[str, str]) -> None:
    assert docs.render() == rendered


def test_every_claim_appears_in_its_page(rendered: dict[str, str]) -> None:
    page = rendered[PAGE]
    for claim in derivations.claims("softmax"):
        assert f'<a id="{claim.name}"></a>' in page
        assert claim.statement in page
        assert claim.method in page
        # The key steps are SymPy's output, printed with sympy.latex.
        for step in claim.prove().key_steps:
            assert step.latex() in page, f"{claim.name}: key step {step.label!r} missing"


def test_edited_generated_part_is_reported(tmp_path: Path, rendered: dict[str, str]) -> None:
    root = _copy_repo_docs(tmp_path)
    page = root / PAGE
    text = page.read_text(encoding="utf-8")
    step = derivations.claims("softmax")[0].prove().key_steps[0].latex()
    assert step in text
    page.write_text(text.replace(step, step.replace("e^{- a}", "e^{a}"), 1), encoding="utf-8")
    assert docs.check(root) == [PAGE]
    # write() repairs it, reports what it changed, and then nothing is stale.
    assert docs.write(root, rendered) == [PAGE]
    assert docs.check(root, rendered) == []
    assert docs.write(root, rendered) == []
    assert page.read_text(encoding="utf-8") == rendered[PAGE]


def test_missing_page_is_reported(tmp_path: Path, rendered: dict[str, str]) -> None:
    (tmp_path / "docs").mkdir()
    assert docs.check(tmp_path, rendered) == [PAGE]


def test_changed_claim_without_regenerating_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy_repo_docs(tmp_path)
    original = derivations.claims("softmax")
    changed = dataclasses.replace(original[1], statement=original[1].statement + r",\ n \ge 1")
    monkeypatch.setitem(derivations._BY_TOPIC, "softmax", (original[0], changed, *original[2:]))
    assert docs.check(root) == [PAGE]


def test_find_root_walks_up_from_a_subfolder() -> None:
    assert docs.find_root(ROOT / "docs") == ROOT
    assert (ROOT / "pyproject.toml").is_file()


def test_find_root_ignores_other_projects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder with someone else's pyproject.toml and docs/ is not the attnspec root.
    (tmp_path / "docs").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n', encoding="utf-8")
    monkeypatch.setattr(attnspec, "__file__", str(tmp_path / "site" / "attnspec" / "__init__.py"))
    with pytest.raises(FileNotFoundError, match="no attnspec repository root"):
        docs.find_root(tmp_path)


def test_find_root_falls_back_to_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert docs.find_root() == Path(attnspec.__file__).resolve().parents[1] == ROOT
