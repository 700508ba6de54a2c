r"""The claim framework: a statement, and a SymPy derivation that proves it when run.

A :class:`Claim` pairs a statement in LaTeX with a derivation: a function that builds
the statement in SymPy and returns the :class:`Step` records it checked. Each step is
one of a few kinds of check, each of which can fail:

* :func:`equal` -- ``lhs - rhs`` simplifies to exactly ``0``;
* :func:`limit` -- ``sympy.limit`` returns exactly the expected value;
* :func:`nonnegative` -- an expression is rewritten into a form (checked equal by
  :func:`equal`'s rule) whose sign SymPy's assumption system decides as ``>= 0``;
* :func:`holds` -- a SymPy relation or set equality that evaluates to ``True``.

A check that SymPy does not confirm raises :class:`ClaimFailed`; a check that merely
ran proves nothing. :meth:`Claim.prove` runs the derivation and returns a
:class:`Proof`: the steps, with the expressions SymPy produced, so that the docs can
print the key step with :func:`sympy.latex`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy

__all__ = [
    "Claim",
    "ClaimFailed",
    "Proof",
    "Step",
    "equal",
    "holds",
    "limit",
    "nonnegative",
    "unify_sums",
]


class ClaimFailed(AssertionError):
    """SymPy did not confirm a claim (or a step of its derivation)."""


@dataclass(frozen=True)
class Step:
    r"""One checked step of a derivation.

    Attributes
    ----------
    label : str
        What the step shows, in words (Markdown).
    lhs, rhs : sympy.Basic
        The two sides as SymPy built them; the docs print ``lhs relation rhs``.
    relation : str
        The LaTeX relation between the sides: ``=``, ``\ge``, ``\to`` ...
    key : bool
        Whether the docs print this step (the key step(s) of the proof).
    """

    label: str
    lhs: Any
    rhs: Any
    relation: str = "="
    key: bool = True

    def latex(self) -> str:
        """The step as one LaTeX formula."""
        return f"{_latex(self.lhs)} {self.relation} {_latex(self.rhs)}".strip()


@dataclass(frozen=True)
class Proof:
    """What a successful :meth:`Claim.prove` showed.

    ``seconds`` is the wall time of the derivation; it is for reports only and is
    never written into the docs (which must be deterministic).
    """

    claim: str
    steps: tuple[Step, ...]
    seconds: float = field(default=0.0, compare=False)

    @property
    def key_steps(self) -> tuple[Step, ...]:
        """The steps marked for the docs."""
        return tuple(s for s in self.steps if s.key)


@dataclass(frozen=True)
class Claim:
    r"""A mathematical claim and the SymPy derivation that proves it.

    Attributes
    ----------
    topic : str
        The spec topic, e.g. ``"softmax"``; one docs page per topic.
    name : str
        Short kebab-case id, e.g. ``"rows-sum-to-one"``; test ids use it.
    title : str
        A heading for the docs.
    statement : str
        The claim in LaTeX (without ``$`` delimiters; rendered as display math).
    method : str
        How it is proved: ``"symbolic, general n"``, or ``"symbolic, each n <= 6"``
        with the reason SymPy cannot do general n.
    explanation : str
        A short Markdown paragraph for the docs (inline math in ``$...$``).
    derivation : callable
        Builds the claim in SymPy and returns the checked :class:`Step` records;
        raises :class:`ClaimFailed` when a check fails.
    references : tuple of str
        Sources, each a Markdown citation with a DOI or arXiv id.
    """

    topic: str
    name: str
    title: str
    statement: str
    method: str
    explanation: str
    derivation: Callable[[], Sequence[Step]] = field(repr=False, compare=False)
    references: tuple[str, ...] = ()

    def prove(self) -> Proof:
        """Run the derivation; return the :class:`Proof`, or raise :class:`ClaimFailed`.

        A derivation that checks nothing fails: a claim must be shown by at least
        one step. Any other exception (a limit SymPy cannot take, an internal error
        of SymPy's) also means SymPy did not confirm the claim; it is re-raised as
        :class:`ClaimFailed` with the original as its cause, so it stays visible.
        """
        start = time.perf_counter()
        try:
            steps = tuple(self.derivation())
        except ClaimFailed as exc:
            raise ClaimFailed(f"{self.topic}/{self.name}: {exc}") from exc
        except Exception as exc:  # SymPy gave up (NotImplementedError, or crashed)
            raise ClaimFailed(
                f"{self.topic}/{self.name}: SymPy raised {type(exc).__name__}: {exc}"
            ) from exc
        if not steps:
            raise ClaimFailed(f"{self.topic}/{self.name}: the derivation checked nothing")
        if not any(s.key for s in steps):
            raise ClaimFailed(f"{self.topic}/{self.name}: no step is marked as key for the docs")
        return Proof(self.name, steps, time.perf_counter() - start)


# --- checks -------------------------------------------------------------------------


def _latex(expr: Any) -> str:
    if isinstance(expr, str):
        return expr
    return str(sympy.latex(expr))


_U = sympy.Dummy("u", integer=True)


def unify_sums(expr: Any) -> Any:
    r"""Rename the index of every ``Sum`` in ``expr`` to one fixed dummy.

    Renaming a bound variable does not change a sum (alpha-equivalence), but SymPy
    treats :math:`\sum_i e^{x_i}` and :math:`\sum_j e^{x_j}` as different objects. The
    dummy occurs in no user expression, so it cannot be captured; a sum whose summand
    holds another sum is left alone (renaming both to one dummy could capture).
    """

    def rename(s: Any) -> Any:
        (var, lo, hi), *rest = s.limits
        if rest or s.function.has(sympy.Sum):
            return s
        return sympy.Sum(s.function.xreplace({var: _U}), (_U, lo, hi))

    return expr.replace(lambda e: isinstance(e, sympy.Sum), rename)


def _simplify(expr: Any) -> Any:
    return sympy.simplify(unify_sums(sympy.factor_terms(expr)))


def equal(
    label: str,
    lhs: Any,
    rhs: Any,
    *,
    simplify: Callable[[Any], Any] = _simplify,
    shown: tuple[Any, Any] | None = None,
    key: bool = True,
) -> Step:
    """Check that ``lhs - rhs`` simplifies to exactly 0; return the step.

    ``shown`` is what the docs print for the two sides when the checked expressions
    are results SymPy already evaluated (a derivative it took, a sum it did): an
    unevaluated SymPy object or a LaTeX string for each side.
    """
    difference = simplify(sympy.sympify(lhs) - sympy.sympify(rhs))
    if difference != 0:
        raise ClaimFailed(f"{label}: lhs - rhs simplifies to {difference}, not 0")
    left, right = (lhs, rhs) if shown is None else shown
    return Step(label, left, right, "=", key)


def limit(
    label: str,
    expr: Any,
    var: Any,
    point: Any,
    expected: Any,
    *,
    direction: str = "+",
    key: bool = True,
) -> Step:
    r"""Check that ``sympy.limit(expr, var, point, direction)`` is exactly ``expected``."""
    value = sympy.limit(expr, var, point, direction)
    expected = sympy.sympify(expected)
    same = value == expected
    if not same and expected.is_finite and value.is_finite:
        same = _simplify(value - expected) == 0
    if not same:
        raise ClaimFailed(f"{label}: the limit is {value}, not {expected}")
    side = "^+" if direction == "+" and point not in (sympy.oo, -sympy.oo) else ""
    if direction == "-" and point not in (sympy.oo, -sympy.oo):
        side = "^-"
    lhs = rf"\lim_{{{_latex(var)} \to {_latex(point)}{side}}} {_latex(expr)}"
    return Step(label, lhs, expected, "=", key)


def nonnegative(label: str, expr: Any, form: Any, *, shown: Any = None, key: bool = True) -> Step:
    """Check ``expr == form`` (by :func:`equal`'s rule) and that SymPy finds ``form >= 0``.

    ``form`` is a rewriting of ``expr`` whose sign SymPy's assumptions decide (a
    square, a product of positive symbols); the step records ``expr = form >= 0``
    (``shown``, a LaTeX string, replaces ``expr`` in the docs).
    """
    equal(label, expr, form)
    if sympy.sympify(form).is_nonnegative is not True:
        raise ClaimFailed(f"{label}: SymPy cannot show {form} >= 0")
    left = _latex(expr if shown is None else shown)
    return Step(label, f"{left} = {_latex(form)}", sympy.S.Zero, r"\ge", key)


def holds(label: str, shown: Any, value: Any, *, key: bool = True) -> Step:
    """Check that ``value`` is SymPy's ``True``; the docs print ``shown``.

    ``value`` is a relation or a comparison SymPy evaluates (``Eq(a, b)``,
    ``solveset(...) == Interval(...)``, an assumption query); ``shown`` is what it
    says, as a SymPy object or a LaTeX string.
    """
    if value is not True and value is not sympy.true:
        raise ClaimFailed(f"{label}: SymPy gives {value}, not True")
    return Step(label, shown, "", "", key)
