"""The README's "## Example" runs and prints the figures its comments state.

The Python code blocks of that section are executed in a fresh namespace with stdout
captured. Every top-level ``print(...)`` prints one line; a comment on that line that
starts with a figure (``# 0.50 ulp (at most 1, always)``, ``# 498 ulps``) says what the
printed number rounds to, at the number of decimals the figure is written with (0.50:
two decimals; 498: an integer). A README whose figures disagree with what its code
prints fails, naming the line, the printed value and the figure.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import tokenize
import warnings
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Example"
#: a decimal number as written in a comment or printed by numpy/Python
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Block:
    """A fenced Python block: its code and the README line of its first code line."""

    code: str
    first_line: int


@dataclass(frozen=True)
class Expectation:
    """A top-level print and the figure its comment states (None: no figure)."""

    readme_line: int
    source: str
    comment: str | None
    figure: str | None


def example_blocks(text: str) -> list[Block]:
    """The ```python blocks between the heading ``## Example`` and the next heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == SECTION]
    assert len(starts) == 1, f"README.md has {len(starts)} headings {SECTION!r}, expected one"
    blocks: list[Block] = []
    i = starts[0] + 1
    while i < len(lines) and not re.match(r"#{1,2} ", lines[i]):
        if lines[i].strip() in ("```python", "```py"):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            assert j < len(lines), f"README.md line {i + 1}: the code block is not closed"
            blocks.append(Block("\n".join(lines[i + 1 : j]) + "\n", first_line=i + 2))
            i = j
        i += 1
    return blocks


def _is_print(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    )


def expectations(block: Block) -> list[Expectation]:
    """One per top-level print of ``block``, in order, with the figure of its comment."""
    tree = ast.parse(block.code)
    prints = [stmt for stmt in tree.body if isinstance(stmt, ast.Expr) and _is_print(stmt.value)]
    every_print = [node for node in ast.walk(tree) if _is_print(node)]
    assert len(every_print) == len(prints), (
        f"README.md line {block.first_line}: a print inside a statement (a loop, a function) "
        "cannot be matched with its output; the test reads top-level prints only"
    )
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(block.code).readline)
        if token.type == tokenize.COMMENT
    }
    lines = block.code.splitlines()
    found = []
    for stmt in prints:
        end = stmt.end_lineno or stmt.lineno
        comment = comments.get(end)
        match = NUMBER.match(comment) if comment else None
        found.append(
            Expectation(
                readme_line=block.first_line + end - 1,
                source=lines[end - 1].strip(),
                comment=comment,
                figure=match.group() if match else None,
            )
        )
    return found


def run_block(block: Block, namespace: dict[str, object]) -> list[str]:
    """Execute ``block`` in ``namespace`` (warnings are errors); return its stdout lines."""
    out = io.StringIO()
    code = compile(block.code, f"README.md (line {block.first_line})", "exec")
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("error")
        exec(code, namespace)
    return out.getvalue().splitlines()


def rounded(printed: str, figure: str) -> Decimal | None:
    """The first number of ``printed`` rounded to the decimals of ``figure`` (None: none)."""
    match = NUMBER.search(printed)
    if match is None:
        return None
    with localcontext(prec=1000):  # quantize fails where the result needs more digits
        return Decimal(match.group()).quantize(Decimal(figure), rounding=ROUND_HALF_EVEN)


def test_the_readme_example_prints_the_figures_it_states() -> None:
    blocks = example_blocks(README.read_text(encoding="utf-8"))
    assert blocks, f"README.md: no ```python block under {SECTION!r}"
    namespace: dict[str, object] = {"__name__": "readme_example"}
    problems: list[str] = []
    checked = 0
    for block in blocks:
        expected = expectations(block)
        printed = run_block(block, namespace)
        if len(printed) != len(expected):
            problems.append(
                f"README.md line {block.first_line}: the block has {len(expected)} top-level "
                f"prints but printed {len(printed)} lines: {printed!r}"
            )
            continue
        for want, line in zip(expected, printed, strict=True):
            if want.figure is None:
                continue
            checked += 1
            got = rounded(line, want.figure)
            if got is None or got != Decimal(want.figure):
                problems.append(
                    f"README.md line {want.readme_line}: `{want.source}` printed {line!r}, "
                    f"which rounds to {got} at the precision of the comment, but the README "
                    f"says {want.figure} (comment: {want.comment!r})"
                )
    assert not problems, "the README and its example disagree:\n" + "\n".join(problems)
    # the comparison must not pass by comparing nothing
    assert checked > 0, f"README.md: no print under {SECTION!r} has a comment with a figure"
