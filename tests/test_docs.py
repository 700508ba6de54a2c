"""The generated docs are in sync with the spec, and drift is caught.

docs/softmax.md and docs/attention.md are rendered from the claims in spec/derivations
and the templates in docs/_templates; check() must report nothing on the repository,
and must report a page whose generated content was edited, or whose claims changed
without regenerating. A template whose slots do not match what the generator fills is
refused, and no template lies unused. Proving every claim takes seconds, so the module
proves them once (``proofs``) and renders once from those proofs (``rendered``).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import attnspec
from attnspec import docs
from attnspec.reference.visibility import visible
from attnspec.spec import derivations
from attnspec.spec.derivations import Proof

ROOT = docs.find_root(Path(__file__).parent)
#: page -> the topic whose claims it prints
TOPIC_PAGES = {"docs/softmax.md": "softmax", "docs/attention.md": "attention"}
ATTENTION = "docs/attention.md"


@pytest.fixture(scope="module")
def proofs() -> dict[str, Proof]:
    return {claim.name: claim.prove() for claim in derivations.all_claims()}


@pytest.fixture(scope="module")
def rendered(proofs: dict[str, Proof]) -> dict[str, str]:
    return docs.render(proofs)


def _copy_repo_docs(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_docs_are_in_sync_with_the_spec(rendered: dict[str, str]) -> None:
    # The files on disk were rendered by another process (`attnspec docs`), so this
    # also checks that SymPy's output does not vary between runs.
    assert set(TOPIC_PAGES) <= set(rendered)
    stale = docs.check(ROOT, rendered)
    assert stale == [], f"{stale} differ from the spec: run `attnspec docs` and commit"


def test_render_is_deterministic(proofs: dict[str, Proof], rendered: dict[str, str]) -> None:
    assert docs.render(proofs) == rendered


def test_render_proves_the_claims_it_is_not_given(
    proofs: dict[str, Proof], rendered: dict[str, str]
) -> None:
    # Leave one claim's proof out: render() proves it itself, to the same page.
    partial = {name: proof for name, proof in proofs.items() if name != "empty-row"}
    assert docs.render(partial)[ATTENTION] == rendered[ATTENTION]


@pytest.mark.parametrize("page", TOPIC_PAGES)
def test_every_claim_appears_in_its_page(
    page: str, proofs: dict[str, Proof], rendered: dict[str, str]
) -> None:
    text = rendered[page]
    positions = []
    for number, claim in enumerate(derivations.claims(TOPIC_PAGES[page]), start=1):
        anchor = f'<a id="{claim.name}"></a>'
        assert anchor in text, claim.name
        assert f"### {number}. {claim.title}\n" in text, claim.name
        assert f"{number}. [{claim.title}](#{claim.name})" in text, f"{claim.name} not indexed"
        assert claim.statement in text, claim.name
        assert claim.method in text, claim.name
        assert claim.explanation in text, claim.name
        for ref in claim.references:
            assert ref in text, f"{claim.name}: reference missing: {ref}"
        # The key steps are SymPy's output, printed with sympy.latex.
        for step in proofs[claim.name].key_steps:
            assert step.latex() in text, f"{claim.name}: key step {step.label!r} missing"
        positions.append(text.index(anchor))
    assert positions == sorted(positions), "claims are out of reading order"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading (letters, digits, '-' and '_' kept)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", TOPIC_PAGES)
def test_links_within_the_page_resolve(page: str, rendered: dict[str, str]) -> None:
    text = rendered[page]
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    anchors |= {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}
    targets = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert targets, "the page links to none of its claims"
    assert targets <= anchors, f"links to missing anchors: {sorted(targets - anchors)}"
    # Links into the repository (../reference/attention.py, ...) name files that exist.
    for rel in re.findall(r"\]\((\.\./[^)#]+)\)", text):
        assert (ROOT / "docs" / rel).resolve().is_file(), f"{page} links to missing {rel}"


# Each line: (what the attention page must state, the text that states it).
ATTENTION_STATEMENTS = [
    ("the shape letters", "| `Hq`, `Hkv` | query heads and key/value heads, $H_q = G\\, H_{kv}$ |"),
    ("the arrays' shapes", "`q (..., Hq, L, E)`, `k (..., Hkv, S, E)` and `v (..., Hkv, S, Ev)`"),
    ("step 1", r"1. **Logits.** $s_{ij} = \tau\, q_i \cdot k_j$"),
    ("step 2", r"$s_{ij} \leftarrow c \tanh(s_{ij} / c)$"),
    ("step 3", r"$s_{ij} \leftarrow s_{ij} + b_{ij} - m_h \lvert i + o - j \rvert$"),
    ("step 4", "4. **Visibility.** Key $j$ is visible to query $i$"),
    ("step 5", r"$\ell_i = \log\bigl(\sum_{j \in \mathcal{V}_i} e^{s_{ij}} + e^{\sigma_h}\bigr)$"),
    ("step 6", r"6. **Weights.** $p_{ij} = e^{s_{ij} - \ell_i}$ for $j \in \mathcal{V}_i$"),
    ("step 7", r"$p_{ij} \leftarrow p_{ij}\, \kappa_{ij} / (1 - p_{\mathrm{drop}})$"),
    ("step 8", r"8. **Output.** $o_i = \sum_j p_{ij} v_j$."),
    ("causal", r"j \le i + o \ \ (\text{causal})"),
    ("window", r"i + o - \text{left} \le j \le i + o + \text{right}"),
    ("top-left", '`align="top_left"`: $o = 0$'),
    ("bottom-right", '`align="bottom_right"`: $o = S - L$'),
    ("GQA", r"query head $h$ reads key/value head $\lfloor h / G \rfloor$"),
    ("sinks", r"o^{\sigma}_i = \frac{o_i}{1 + e^{\sigma_h - \ell_i}}"),
    ("a sink in an empty row", "returns output 0 and\nlse $\\sigma_h$"),
    ("softcap", "## Softcap"),
    ("ALiBi", "## ALiBi"),
    ("dropout", "## Dropout"),
    ("an empty row", "o_i = 0, \\qquad \\ell_i = -\\infty."),
    ("hidden NaN/inf", "What sits at a hidden position never reaches the result."),
    ("the accurate contract", r"\le 4u \sum_j p_{ij} \lvert v_{jk} \rvert"),
    ("lse within 1 ulp", r"\hat\ell_i \text{ within 1 ulp of } \ell_i"),
    ("fast", '`"fast"` is plain float64'),
    ("link: softmax", "[softmax.md](softmax.md)"),
    ("link: conventions", "[conventions.md](conventions.md)"),
    ("link: worked example", "[worked-example.md](worked-example.md)"),
    ("link: performance", "[performance.md](performance.md)"),
    ("Vaswani et al. 2017", "[arXiv:1706.03762](https://arxiv.org/abs/1706.03762)"),
    ("Dao 2023", "[arXiv:2307.08691](https://arxiv.org/abs/2307.08691)"),
    ("Milakov & Gimelshein 2018", "[arXiv:1805.02867](https://arxiv.org/abs/1805.02867)"),
]


@pytest.mark.parametrize(
    ("what", "text"), ATTENTION_STATEMENTS, ids=[w for w, _ in ATTENTION_STATEMENTS]
)
def test_attention_page_states(what: str, text: str, rendered: dict[str, str]) -> None:
    assert text in rendered[ATTENTION], f"the attention page does not state {what}"


def test_attention_page_lists_each_reference_once(rendered: dict[str, str]) -> None:
    refs = rendered[ATTENTION].split("\n## References\n", 1)[1]
    items = [line for line in refs.splitlines() if line.startswith("- ")]
    cited = {ref for claim in derivations.claims("attention") for ref in claim.references}
    assert len(items) == len(set(items)) == len(cited) + 1  # + Higham 2002, cited by the prose
    for ref in cited:
        assert f"- {ref}.\n" in refs, ref


def _picture_panels(text: str) -> list[tuple[str, int, np.ndarray]]:
    """Parse the visibility picture: (heading, offset, grid) for each panel."""
    block = text.split("(`x`: visible, `.`: hidden", 1)[1]
    block = block.split("```text\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    headings = re.findall(r'\S[^"]*"[a-z_]+"', lines[0])
    offsets = [int(o) for o in re.findall(r"o = (\d+)", lines[1])]
    keys = [list(map(int, m.split())) for m in re.findall(r"key((?: +\d+)+)", lines[2])]
    assert len(headings) == len(offsets) == len(keys), lines[:3]
    grids = []
    for n, line in enumerate(lines[3:]):
        cells = re.findall(rf"query {n}((?: +[x.])+)", line)
        assert len(cells) == len(headings), line
        grids.append([c.split() for c in cells])
    for columns, row in zip(keys, grids[0], strict=True):
        assert columns == list(range(len(row))), f"key numbers {columns} for {len(row)} cells"
    return [
        (heading, offset, np.array([grids[i][p] for i in range(len(grids))]) == "x")
        for p, (heading, offset) in enumerate(zip(headings, offsets, strict=True))
    ]


def test_visibility_picture_matches_visible(rendered: dict[str, str]) -> None:
    panels = _picture_panels(rendered[ATTENTION])
    n_q, n_k = 3, 5  # the sizes the page announces: "$L = 3$ queries and $S = 5$ keys"
    assert f"$L = {n_q}$ queries and $S = {n_k}$ keys" in rendered[ATTENTION]
    expected = {  # heading -> (causal, window, offset): top-left o = 0, bottom-right o = S - L
        'causal, align="top_left"': (True, None, 0),
        'causal, align="bottom_right"': (True, None, n_k - n_q),
        'window=(1, 1), align="bottom_right"': (False, (1, 1), n_k - n_q),
    }
    assert [h for h, _, _ in panels] == list(expected)
    for heading, offset, grid in panels:
        causal, window, o = expected[heading]
        assert offset == o, heading
        assert grid.shape == (n_q, n_k), heading
        np.testing.assert_array_equal(
            grid, visible(n_q, n_k, causal=causal, window=window, offset=o), err_msg=heading
        )


def test_visibility_panel_without_a_rule_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs, "_VISIBILITY_PANELS", (("everything", False, None, "top_left"),))
    with pytest.raises(ValueError, match="'everything' has neither causal nor window"):
        docs._visibility_picture()


def test_fill_replaces_block_and_inline_slots() -> None:
    # A slot alone on its line takes the line (its part ends with a newline); a slot
    # inside a line is replaced as it is. LaTeX braces are left alone.
    template = "{{ head }}\n$e^{x_j}$ and {{ word }}.\n{{ block }}\nend\n"
    parts = {"head": "H\n", "word": "w", "block": "B1\nB2\n"}
    assert docs._fill(template, parts, "t.md") == "H\n$e^{x_j}$ and w.\nB1\nB2\nend\n"
    assert docs._fill("a\n{{ x }}", {"x": "X\n"}, "t.md") == "a\nX\n"
    with pytest.raises(ValueError, match=r"t\.md: the slot \{\{ x \}\} stands alone"):
        docs._fill("a\n{{ x }}\nb\n", {"x": "no newline"}, "t.md")


def test_fill_refuses_slots_that_do_not_match() -> None:
    with pytest.raises(ValueError, match=r"t\.md has the slot \{\{ y \}\}, which the generator"):
        docs._fill("a {{ x }} {{ y }}", {"x": "1"}, "t.md")
    with pytest.raises(ValueError, match=r"t\.md lacks the slot \{\{ y \}\}, which the generator"):
        docs._fill("a {{ x }} b", {"x": "1", "y": "2"}, "t.md")
    with pytest.raises(ValueError, match=r"t\.md has the slot \{\{ x \}\} more than once"):
        docs._fill("{{ x }}{{ x }}", {"x": "1"}, "t.md")
    for malformed in ("{{x}}", "{{  x }}", "{{ X }}", "{{{ x }}", "{{ x}}", "{{"):
        with pytest.raises(ValueError, match=r"t\.md, line 2: .* is not a slot"):
            docs._fill("a\n" + malformed + "\n", {}, "t.md")


def _templates() -> list[str]:
    """The names of the files in docs/_templates (there must be some)."""
    names = sorted(p.name for p in (ROOT / docs._TEMPLATES).iterdir())
    assert names, "docs/_templates holds no templates"
    return names


def _slots(name: str) -> list[str]:
    return re.findall(
        r"\{\{ ([a-z][a-z0-9_]*) \}\}", (ROOT / docs._TEMPLATES / name).read_text(encoding="utf-8")
    )


def _edit_template(root: Path, name: str, old: str, new: str) -> None:
    path = root / docs._TEMPLATES / name
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{name} lacks {old!r}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize("name", _templates())
def test_template_with_an_unknown_slot_is_refused(
    name: str, tmp_path: Path, proofs: dict[str, Proof]
) -> None:
    root = _copy_repo_docs(tmp_path)
    assert docs.render(proofs, root=root)  # the copy renders, before the edit
    _edit_template(root, name, "\n", "\nSee {{ no_such_part }} here.\n")
    message = (
        rf"docs/_templates/{re.escape(name)} has the slot \{{\{{ no_such_part \}}\}},"
        " which the generator does not fill"
    )
    with pytest.raises(ValueError, match=message):
        docs.render(proofs, root=root)


def test_template_missing_a_slot_is_refused(tmp_path: Path, proofs: dict[str, Proof]) -> None:
    # Take each slot out of its template in turn: the generator still fills it, so the
    # page is refused, naming the template and the slot.
    cases = [(name, slot) for name in _templates() for slot in _slots(name)]
    assert len(cases) >= 10, cases  # header, index, claims, ... of the three pages
    for name, slot in cases:
        root = _copy_repo_docs(tmp_path / f"{name}-{slot}")
        _edit_template(root, name, "{{ " + slot + " }}", "")
        message = rf"docs/_templates/{re.escape(name)} lacks the slot \{{\{{ {slot} \}}\}}"
        with pytest.raises(ValueError, match=message):
            docs.render(proofs, root=root)


def test_every_template_is_used_by_some_page(
    monkeypatch: pytest.MonkeyPatch, proofs: dict[str, Proof]
) -> None:
    read: list[str] = []
    template = docs._template

    def spy(root: Path, name: str) -> str:
        read.append(name)
        return template(root, name)

    monkeypatch.setattr(docs, "_template", spy)
    docs.render(proofs, root=ROOT)
    orphans = sorted(set(_templates()) - set(read))
    assert orphans == [], f"templates no page uses: {orphans}"
    # Each page's template is named after it.
    assert {Path(page).name for page in TOPIC_PAGES} <= set(read)


def test_missing_template_is_reported(tmp_path: Path, proofs: dict[str, Proof]) -> None:
    root = _copy_repo_docs(tmp_path)
    (root / docs._TEMPLATES / "attention.md").unlink()
    with pytest.raises(FileNotFoundError, match=r"no template .*_templates.attention\.md"):
        docs.render(proofs, root=root)


@pytest.mark.parametrize("page", TOPIC_PAGES)
def test_edited_generated_part_is_reported(
    page: str, tmp_path: Path, proofs: dict[str, Proof], rendered: dict[str, str]
) -> None:
    root = _copy_repo_docs(tmp_path)
    target = root / page
    text = target.read_text(encoding="utf-8")
    step = proofs[derivations.claims(TOPIC_PAGES[page])[0].name].key_steps[0].latex()
    assert step in text
    target.write_text(text.replace(step, step + " + 1", 1), encoding="utf-8")
    assert docs.check(root, rendered) == [page]
    # write() repairs it, reports what it changed, and then nothing is stale.
    assert docs.write(root, rendered) == [page]
    assert docs.check(root, rendered) == []
    assert docs.write(root, rendered) == []
    assert target.read_text(encoding="utf-8") == rendered[page]


def test_missing_pages_are_reported(tmp_path: Path, rendered: dict[str, str]) -> None:
    (tmp_path / "docs").mkdir()
    assert docs.check(tmp_path, rendered) == list(rendered)
    assert set(TOPIC_PAGES) <= set(rendered)


@pytest.mark.parametrize("page", TOPIC_PAGES)
def test_changed_claim_without_regenerating_is_reported(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proofs: dict[str, Proof]
) -> None:
    root = _copy_repo_docs(tmp_path)
    topic = TOPIC_PAGES[page]
    original = derivations.claims(topic)
    changed = dataclasses.replace(original[1], statement=original[1].statement + r",\ n \ge 1")
    monkeypatch.setitem(derivations._BY_TOPIC, topic, (original[0], changed, *original[2:]))
    assert docs.check(root, docs.render(proofs)) == [page]


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
    # A checkout laid out like the repository, with the package inside it (an editable
    # install); from a folder outside it, find_root() falls back to the package's parent.
    repo = tmp_path / "checkout"
    (repo / "docs").mkdir(parents=True)
    (repo / "attnspec").mkdir()
    (repo / "pyproject.toml").write_text('[project]\nname = "attnspec"\n', encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(attnspec, "__file__", str(repo / "attnspec" / "__init__.py"))
    monkeypatch.chdir(elsewhere)
    assert docs.find_root() == repo.resolve()
