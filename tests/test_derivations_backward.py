"""The backward claims (spec/derivations/backward.py) are proved; false variants are not.

One test per claim, ids = claim names. The negative tests run the same derivations with
one thing made wrong (dS without the -D term, dQ without tau, the softcap factor 1 - t^2,
the sink gradient with the wrong sign, ...) and require ClaimFailed at the step that
states the property: a derivation that "passes" cannot be one that checks nothing. The
zero test of the explicit claims (backward._rational) is tested on its own, and the forward
the explicit claims differentiate (backward._forward: softcap, bias, ALiBi, sink, dropout,
visibility) is checked against attnspec.exact.sdpa.

The topic is not yet in attnspec.spec.TOPICS: the module is imported directly.
"""

from __future__ import annotations

import dataclasses
import doctest
import io
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest
import sympy
from sympy import exp, symbols, tanh

import attnspec.exact
from attnspec.spec.derivations import backward
from attnspec.spec.derivations.claim import Claim, ClaimFailed, Step

CLAIMS = backward.CLAIMS
BY_NAME = {c.name: c for c in CLAIMS}


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
    assert backward.TOPIC == "backward"
    for c in CLAIMS:
        assert isinstance(c, Claim), c
        assert c.topic == "backward", c.name
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", c.name), f"not kebab-case: {c.name!r}"
        assert c.title.strip() and c.statement.strip(), c.name
        assert c.method.strip() and c.explanation.strip(), c.name
        assert "$$" not in c.statement, f"{c.name}: statement is LaTeX without delimiters"


# The claims the brief asks for, in reading order (and the source each must cite).
REQUIRED = {
    "softmax-vjp": None,
    "log-softmax-and-lse-vjp": None,
    "output-gradients-one-row": "2205.14135",
    "sdpa-closed-form": "2205.14135",
    "softcap-gradient": None,
    "bias-gradient": None,
    "sink-gradient": "2309.17453",
    "dropout-gradient": None,
    "gqa-gradient": "2305.13245",
    "dz-rows-sum": None,
    "hidden-zero-gradient": None,
    "key-shift-gradients": None,
    "permutation-gradients": None,
    "lse-gradient-is-weights": None,
    "central-difference-error": None,
}


def test_required_claims_in_reading_order() -> None:
    assert [c.name for c in CLAIMS] == list(REQUIRED)


@pytest.mark.parametrize("name", [n for n, src in REQUIRED.items() if src is not None])
def test_required_claim_cites_its_source(name: str) -> None:
    source = REQUIRED[name]
    assert source is not None
    refs = " ".join(BY_NAME[name].references)
    assert source in refs, f"{name}: does not cite {source}: {refs}"


def test_explicit_claims_state_their_sizes() -> None:
    # An explicit-size proof must say the sizes and why SymPy cannot do general ones.
    for c in CLAIMS:
        if c.method.startswith("explicit"):
            assert re.search(r"\b(L|S|E)\s*=\s*\d", c.method), f"{c.name}: no sizes: {c.method}"
            assert ":" in c.method, f"{c.name}: no reason given: {c.method}"


# --- false variants: the same derivation with one thing wrong ----------------------------

FALSE: dict[str, tuple[str, Callable[[], Sequence[Step]], str]] = {
    # dS = P * (dP + dl): the -D term left out.
    "ds-without-minus-d": (
        "sdpa-closed-form",
        partial(backward._sdpa_closed_form, subtract_d=False),
        r"\\partial F / \\partial Q = \\tau\\, dS\\, K\$ \(entry 0\): lhs - rhs simplifies to"
        r" <a numerator of \d+ terms",
    ),
    # dQ = dS K: the scale left out of the chain rule through s = tau q.k.
    "dq-without-tau": (
        "sdpa-closed-form",
        partial(backward._sdpa_closed_form, scale_dq=False),
        r"\\partial F / \\partial Q = \\tau\\, dS\\, K\$ \(entry 0\)",
    ),
    # The softcap's slope as 1 - t^2 (the slope of tanh, forgetting the cap c).
    "softcap-factor-1-minus-t-squared": (
        "softcap-gradient",
        partial(backward._softcap_gradient, factor=lambda t, c: 1 - t**2),
        r"1 - \(t/c\)\^2\$: lhs - rhs simplifies to \(c\*\*2 - 1\)\*tanh\(s/c\)\*\*2",
    ),
    # The same wrong factor inside the whole head (softcap, ALiBi, bias): dQ is refused.
    "softcap-factor-in-the-head": (
        "bias-gradient",
        partial(backward._bias_gradient, factor=lambda t, c: 1 - t**2),
        r"with the softcap, ALiBi and the bias: .* \(entry 0\)",
    ),
    # d sigma = + sum_i P_i,sink (D_i - dl_i): the wrong sign.
    "sink-gradient-wrong-sign": (
        "sink-gradient",
        partial(backward._sink_gradient, sign=1),
        r"one row, general \$n\$: .* lhs - rhs simplifies to",
    ),
    # Dropout: dP = dO V^T, not rescaled by the keep-mask.
    "dropout-dp-not-rescaled": (
        "dropout-gradient",
        partial(backward._dropout_gradient, rescale_dp=False),
        r"\\partial F / \\partial Q = \\tau\\, dZ\\, K\$ with \$dP = \(dO\\, V\^T\) \\odot"
        r" \\kappa\\, r\$ \(entry 0\)",
    ),
    # GQA gradients summed over the tiled group h % Hkv instead of h // G.
    "gqa-tiled-groups": (
        "gqa-gradient",
        partial(backward._gqa_gradient, group=lambda head, size, kv: head % kv),
        r"\$dK\$ of kv head 0 is the sum over query heads \[0, 2\]",
    ),
    # With an lse gradient, shifting the keys does move dQ.
    "key-shift-with-lse-gradient": (
        "key-shift-gradients",
        partial(backward._key_shift, with_dlse=True),
        r"\$dQ\$ with \$K \+ \\mathbf\{1\} u\^T\$ .* \(entry 0\)",
    ),
    # The softmax vjp as p * g, without the centring by p^T g.
    "softmax-vjp-not-centred": (
        "softmax-vjp",
        partial(backward._softmax_vjp, centre=False),
        r"the vjp: .* lhs - rhs simplifies to",
    ),
    # The rows of dZ with a sink do not sum to dl without the sink's own gradient.
    "dz-rows-without-sink-term": (
        "dz-rows-sum",
        partial(backward._dz_rows_sum, with_sink=False),
        r"\\sum_j dZ_j \+ d\\sigma = d\\ell\$ .* lhs - rhs simplifies to",
    ),
    # A one-sided quotient is only first-order accurate: h f''/2 is left over.
    "forward-difference-is-not-second-order": (
        "central-difference-error",
        partial(backward._central_difference, two_sided=False),
        r"the series of the quotient to \$O\(h\^4\)\$: lhs - rhs simplifies to"
        r" h\*\(h\*\*2\*Derivative\(f\(x\), \(x, 4\)\) \+ 12\*Derivative\(f\(x\), \(x, 2\)\)\)/24",
    ),
}


@pytest.mark.parametrize("variant", sorted(FALSE))
def test_false_variant_is_not_proved(variant: str) -> None:
    base, derivation, where = FALSE[variant]
    claim = dataclasses.replace(BY_NAME[base], name=f"{base}-false", derivation=derivation)
    with pytest.raises(ClaimFailed, match=where):
        claim.prove()


# --- the zero test of the explicit claims ----------------------------------------------

_a, _b, _c = symbols("a b c", real=True)


@pytest.mark.parametrize(
    ("expr", "zero"),
    [
        pytest.param(exp(_a + _b) - exp(_a) * exp(_b), True, id="exp-of-a-sum"),
        pytest.param(exp(2 * _a) - exp(_a) ** 2, True, id="exp-of-a-multiple"),
        pytest.param(exp(-_a) - 1 / exp(_a), True, id="exp-of-a-negation"),
        pytest.param(
            exp(_a) / (exp(_a) + exp(_b)) + exp(_b) / (exp(_a) + exp(_b)) - 1, True, id="weights"
        ),
        pytest.param(1 / (1 / _a + 1 / _b) - _a * _b / (_a + _b), True, id="nested-fractions"),
        pytest.param(tanh(_a) ** 2 - tanh(_a) * tanh(_a), True, id="tanh-as-a-leaf"),
        pytest.param(exp(_a + _b) - exp(_a) * exp(_c), False, id="another-exponent"),
        pytest.param(exp(_a) / (exp(_a) + exp(_b)) - 1, False, id="a-weight-is-not-1"),
        pytest.param(1 - tanh(_a) ** 2 - 1 / sympy.cosh(_a) ** 2, False, id="incomplete-tanh"),
    ],
)
def test_rational_zero_test(expr: Any, zero: bool) -> None:
    # Sound: only true identities give 0. Not complete: 1 - tanh^2 = 1/cosh^2 is true but
    # needs a relation between two leaves, so it is reported as not shown (never as 0).
    assert (backward._rational(expr) == 0) is zero


def test_rational_zero_test_refuses_floats() -> None:
    with pytest.raises(ClaimFailed, match="is not exact"):
        backward._rational(sympy.Float(0.5) * _a - _b)


# --- the forward the explicit claims differentiate is the reference's definition --------

_DPS = 60
# Both sides are the same real number evaluated with 60 significant digits (SymPy's
# evalf tracks its precision; attnspec.exact.sdpa works at dps=60 through a few dozen
# operations, each with relative error below 10**-60). 10**-50 leaves a factor 10**10
# for the accumulation; an actual difference in the definition is of order 1. (The same
# reasoning as tests/test_derivations_attention.py.)
_AGREE = mpmath.mpf(10) ** -50


def _close(symbolic: Any, exact: Any) -> bool:
    if symbolic == -sympy.oo or exact == mpmath.ninf:
        return bool(symbolic == -sympy.oo and exact == mpmath.ninf)
    a, b = mpmath.mpf(str(sympy.N(symbolic, _DPS))), mpmath.mpf(exact)
    return bool(abs(a - b) <= _AGREE * max(1, abs(b)))


def _f(x: float) -> sympy.Float:
    return sympy.Float(x, _DPS)


# (L, S, align, options): each option of the forward at least once; inputs binary fractions.
FORWARD_CASES = [
    pytest.param(
        3, 3, None, {"softcap": 1.5, "bias": True, "alibi_slopes": 0.25}, id="cap-bias-alibi"
    ),
    pytest.param(
        2, 3, "bottom_right", {"alibi_slopes": 0.5, "causal": True}, id="alibi-bottom-right"
    ),
    pytest.param(3, 2, None, {"sinks": 0.75, "mask": True}, id="sink-mask-empty-row"),
    pytest.param(2, 3, None, {"dropout_p": 0.25, "dropout_mask": True}, id="dropout"),
]


@pytest.mark.parametrize(("n_q", "n_k", "align", "options"), FORWARD_CASES)
def test_forward_matches_exact_reference(
    n_q: int, n_k: int, align: str | None, options: dict[str, Any]
) -> None:
    rng = np.random.default_rng(20261201)  # fixed inputs; any inputs would do
    q = rng.integers(-8, 9, size=(n_q, 2)) / 4.0
    k = rng.integers(-8, 9, size=(n_k, 2)) / 4.0
    v = rng.integers(-8, 9, size=(n_k, 2)) / 4.0
    tau = 0.5
    call: dict[str, Any] = {"scale": tau}
    sym: dict[str, Any] = {"tau": _f(tau)}
    offset = n_k - n_q if align == "bottom_right" else 0
    if align is not None:
        call["align"] = align
    if "softcap" in options:
        call["softcap"] = options["softcap"]
        sym["softcap"] = _f(options["softcap"])
    if options.get("bias"):
        bias = rng.integers(-8, 9, size=(n_q, n_k)) / 8.0
        call["bias"] = bias[None]
        sym["bias"] = sympy.Matrix(bias).applyfunc(sympy.Rational)
    if "alibi_slopes" in options:
        call["alibi_slopes"] = np.array([options["alibi_slopes"]])
        sym["slope"], sym["offset"] = _f(options["alibi_slopes"]), offset
    if "sinks" in options:
        call["sinks"] = np.array([options["sinks"]])
        sym["sink"] = _f(options["sinks"])
    mask = np.ones((n_q, n_k), dtype=bool)
    if options.get("causal"):
        call["causal"] = True
        mask = np.array([[j <= i + offset for j in range(n_k)] for i in range(n_q)])
    if options.get("mask"):
        mask = np.array([[False, False], [True, False], [True, True]])  # row 0 sees nothing
        call["mask"] = mask
    sym["seen"] = lambda i, j: bool(mask[i, j])
    if "dropout_mask" in options:
        keep = np.array([[True, False, True], [False, True, True]])
        call["dropout_mask"], call["dropout_p"] = keep, options["dropout_p"]
        sym["keep"] = sympy.Matrix(keep.astype(int))
        sym["keep_scale"] = 1 / (1 - sympy.Rational(options["dropout_p"]))
    out, lse = attnspec.exact.sdpa(q[None], k[None], v[None], return_lse=True, dps=_DPS, **call)
    fw = backward._forward(sympy.Matrix(q), sympy.Matrix(k), sympy.Matrix(v), **sym)
    case = f"L={n_q}, S={n_k}, {options}"
    for name, got, want in (
        ("out", list(fw.out), list(out[0].reshape(-1))),
        ("lse", fw.lse, list(lse[0].reshape(-1))),
    ):
        bad = [
            (i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if not _close(g, w)
        ]
        assert not bad, f"{case}: {name} differs (index, symbolic, exact): {bad[:3]}"


# --- the page's template: its example runs, its slots are those of a topic page ----------

TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "_templates" / "backward.md"
#: the slots the generator fills: a topic page's, the picture of dS and the references
SLOTS = ["header", "gradient_picture", "claims_heading", "index", "claims", "references"]


def test_template_has_the_slots_in_order() -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    found = re.findall(r"^\{\{ ([a-z0-9_]+) \}\}$", text, flags=re.MULTILINE)
    assert found == SLOTS, f"{TEMPLATE.name}: slots {found}, expected {SLOTS}"
    assert text.count("{{") == len(SLOTS), f"{TEMPLATE.name}: a '{{{{' that is not a slot"


def test_template_links_only_to_claims_of_the_topic() -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    anchors = set(re.findall(r"\]\(#([a-z0-9-]+)\)", text))
    assert anchors <= set(BY_NAME), f"links to no claim: {sorted(anchors - set(BY_NAME))}"
    missing = set(BY_NAME) - anchors
    assert not missing, f"claims the prose never links to: {sorted(missing)}"


def test_template_example_prints_what_it_says() -> None:
    # The ```python block of the page is a doctest: every >>> runs and prints what it shows.
    text = TEMPLATE.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks, f"{TEMPLATE.name}: no ```python example"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for number, block in enumerate(blocks):
        test = parser.get_doctest(block, {}, f"{TEMPLATE.name}[{number}]", str(TEMPLATE), 0)
        assert test.examples, f"{TEMPLATE.name}: block {number} has no >>> example"
        out = io.StringIO()
        with np.printoptions(legacy=False):
            result = runner.run(test, out=out.write)
        assert result.failed == 0, out.getvalue()
