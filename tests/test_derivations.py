"""Every claim of spec/derivations is proved by SymPy; the framework can fail.

One test per claim, with the claim's name as its id. The negative tests build false
claims with the same framework and require ClaimFailed, so a proof that "passes"
cannot be one that checks nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import pytest
import sympy
from sympy import IndexedBase, Sum, exp, oo, symbols

from attnspec.spec.derivations import TOPICS, Claim, ClaimFailed, Step, all_claims, claims
from attnspec.spec.derivations.claim import equal, holds, limit, nonnegative, unify_sums

CLAIMS = all_claims()


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.name for c in CLAIMS])
def test_claim_is_proved(claim: Claim) -> None:
    proof = claim.prove()
    assert proof.claim == claim.name
    assert proof.steps, f"{claim.name}: proved with no checked step"
    for step in proof.key_steps:
        assert step.latex(), f"{claim.name}: key step {step.label!r} prints nothing"


def test_claims_are_well_formed() -> None:
    names = [c.name for c in CLAIMS]
    assert len(names) == len(set(names)), f"duplicate claim names: {names}"
    for c in CLAIMS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", c.name), f"not kebab-case: {c.name!r}"
        assert c.topic in TOPICS
        assert c.statement.strip() and c.method.strip() and c.explanation.strip(), c.name
        assert "$$" not in c.statement, f"{c.name}: statement is LaTeX without delimiters"


def test_claims_by_topic_in_reading_order() -> None:
    assert claims("softmax") == [c for c in CLAIMS if c.topic == "softmax"]
    assert claims("softmax")[0].name == "max-shift"


def test_unknown_topic_is_refused() -> None:
    with pytest.raises(ValueError, match=r"topic must be one of 'softmax'.*got 'softmaks'"):
        claims("softmaks")


# --- the required claims are all there -------------------------------------------------

REQUIRED = [
    "rows-sum-to-one",
    "shift-invariance",
    "lse-shift",
    "lse-bounds",
    "max-shift",
    "grad-lse",
    "jacobian",
    "jacobian-psd",
    "log-softmax-derivative",
    "temperature-zero",
    "temperature-infinity",
    "jacobian-inf-norm",
    "order-preservation",
    "posinf-limit",
    "neginf-limit",
    "empty-sum",
    "tie-invariance",
]


def test_required_claims_exist() -> None:
    missing = sorted(set(REQUIRED) - {c.name for c in claims("softmax")})
    assert not missing, f"softmax claims missing: {missing}"


# --- the framework can fail ------------------------------------------------------------

_x = IndexedBase("x", real=True)
_j, _l = symbols("j l", integer=True, positive=True)
_n = symbols("n", integer=True, positive=True)
_Z = Sum(exp(_x[_l]), (_l, 1, _n))


def _false_claim(derivation: Callable[[], Sequence[Step]]) -> Claim:
    return Claim(
        topic="softmax",
        name="false-claim",
        title="A false claim",
        statement=r"\sum_j p_j = 2",
        method="symbolic, general n",
        explanation="Deliberately false: the framework must reject it.",
        derivation=derivation,
    )


def test_false_identity_fails() -> None:
    # The true derivation of rows-sum-to-one, with 2 in place of 1.
    claim = _false_claim(lambda: [equal("weights sum to 2", Sum(exp(_x[_j]) / _Z, (_j, 1, _n)), 2)])
    with pytest.raises(ClaimFailed, match=r"false-claim: weights sum to 2: .* not 0"):
        claim.prove()


def test_false_lse_shift_fails() -> None:
    # LSE(x + c 1) = LSE(x) + c; claiming + 2c must fail.
    c = symbols("c", real=True)
    shifted = sympy.log(Sum(exp(_x[_l] + c), (_l, 1, _n)))
    claim = _false_claim(lambda: [equal("lse shift", shifted, sympy.log(_Z) + 2 * c)])
    with pytest.raises(ClaimFailed, match="lse shift: lhs - rhs simplifies to -c"):
        claim.prove()


def test_sympy_crash_is_a_failed_claim() -> None:
    # SymPy 1.14's simplify raises StopIteration on this false identity (softmax is not
    # invariant to scaling); a crash must not pass for a proof.
    scaled = exp(2 * _x[_j]) / Sum(exp(2 * _x[_l]), (_l, 1, _n))
    claim = _false_claim(lambda: [equal("scaling", scaled, exp(_x[_j]) / _Z)])
    with pytest.raises(ClaimFailed):
        claim.prove()


def test_false_limit_fails() -> None:
    t = symbols("t", real=True)
    claim = _false_claim(lambda: [limit("wrong limit", exp(-t), t, oo, 1)])
    with pytest.raises(ClaimFailed, match="the limit is 0, not 1"):
        claim.prove()


def test_false_sign_fails() -> None:
    # p - 1/2 equals itself but is not >= 0 for every real p: the sign check must refuse.
    p = symbols("p", real=True)
    half = sympy.Rational(1, 2)
    claim = _false_claim(lambda: [nonnegative("sign", p - half, p - half)])
    with pytest.raises(ClaimFailed, match="cannot show"):
        claim.prove()


def test_wrong_rewriting_fails_even_if_nonnegative() -> None:
    p = symbols("p", real=True)
    claim = _false_claim(lambda: [nonnegative("rewrite", p**2 - 1, p**2)])
    with pytest.raises(ClaimFailed, match="not 0"):
        claim.prove()


def test_false_relation_fails() -> None:
    d = symbols("d", real=True)
    claim = _false_claim(
        lambda: [
            holds(
                "wrong set",
                "e^d <= 1 iff d >= 0",
                sympy.solveset(exp(d) <= 1, d, sympy.S.Reals) == sympy.Interval(0, oo),
            )
        ]
    )
    with pytest.raises(ClaimFailed, match="not True"):
        claim.prove()


def test_derivation_that_checks_nothing_fails() -> None:
    with pytest.raises(ClaimFailed, match="checked nothing"):
        _false_claim(lambda: []).prove()


def test_sympy_refusal_is_a_failed_claim() -> None:
    def refuses() -> list[Step]:
        raise NotImplementedError("SymPy cannot do this limit")

    with pytest.raises(ClaimFailed, match="NotImplementedError"):
        _false_claim(refuses).prove()


def test_unify_sums_is_alpha_equivalence_only() -> None:
    a = Sum(exp(_x[_j]), (_j, 1, _n))
    b = Sum(exp(_x[_l]), (_l, 1, _n))
    assert unify_sums(a) == unify_sums(b)
    # Different summands or ranges stay different.
    assert unify_sums(a) != unify_sums(Sum(exp(2 * _x[_l]), (_l, 1, _n)))
    assert unify_sums(a) != unify_sums(Sum(exp(_x[_l]), (_l, 2, _n)))
