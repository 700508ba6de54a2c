"""The attention claims (spec/derivations/attention.py) are proved; false variants are not.

One test per claim, ids = claim names. The negative tests run the same derivations with
one thing made wrong (the scale, the causal alignment, the GQA head mapping, ...) and
require ClaimFailed at the step that states the property: a derivation that "passes"
cannot be one that checks nothing. The symbolic transcription of the definition that the
explicit-size claims use is checked against attnspec.exact.sdpa.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import mpmath
import numpy as np
import pytest
import sympy

import attnspec.exact
from attnspec.spec.derivations import attention
from attnspec.spec.derivations.claim import ClaimFailed, Step

CLAIMS = attention.CLAIMS
BY_NAME = {c.name: c for c in CLAIMS}


def test_claims_are_well_formed() -> None:
    names = [c.name for c in CLAIMS]
    assert len(names) == len(set(names)), f"duplicate claim names: {names}"
    for c in CLAIMS:
        assert c.topic == "attention", c.name
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", c.name), f"not kebab-case: {c.name!r}"
        assert c.title.strip() and c.statement.strip(), c.name
        assert c.method.strip() and c.explanation.strip(), c.name
        assert "$$" not in c.statement, f"{c.name}: statement is LaTeX without delimiters"


# The properties the issue asks for, by claim name (and the source each must cite).
REQUIRED = {
    "weights-convex": None,
    "query-permutation-equivariance": "1810.00825",
    "key-value-permutation-invariance": "1810.00825",
    "key-shift-invariance": None,
    "value-affine-equivariance": None,
    "causal-prefix": None,
    "kv-cache-bottom-right": None,
    "alignments": None,
    "hidden-key": None,
    "gqa-repeat": None,
    "scale-zero-mean": None,
    "sink-rescales": "2309.17453",
    "alibi-causal-row-constant": "2108.12409",
    "softcap-range": None,
    "dropout-expectation": "srivastava14a",
    "scaling-variance": "1706.03762",
    "lse-is-softmax-lse": None,
    "empty-row": None,
    "split-kv-merge": "1805.02867",
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_required_claim_is_present(name: str) -> None:
    assert name in BY_NAME, f"missing claim {name!r}; have {sorted(BY_NAME)}"
    source = REQUIRED[name]
    if source is not None:
        refs = " ".join(BY_NAME[name].references)
        assert source in refs, f"{name}: does not cite {source}: {refs}"


# --- false variants: the same derivation with one thing wrong --------------------------

FALSE: dict[str, tuple[str, Callable[[], Sequence[Step]], str]] = {
    # Var(q.k / E) = 1/E, not 1: the scale 1/E instead of 1/sqrt(E).
    "scale-1-over-E": (
        "scaling-variance",
        partial(attention._scaling_variance, scale_power=1),
        r"lhs - rhs simplifies to \(1 - E\)/E",
    ),
    # Decoding with the top-left rule: a single new query sees only key 0.
    "kv-cache-top-left": (
        "kv-cache-bottom-right",
        partial(attention._kv_cache, align="top_left"),
        r"1 new queries against 2 cached keys, top_left",
    ),
    # Without causal visibility a key may lie right of the query: |d| != d.
    "alibi-without-causal": (
        "alibi-causal-row-constant",
        partial(attention._alibi, causal=False),
        r"-m\|i \+ o - j\| = -m\(i \+ o\) \+ m j",
    ),
    # Query head h reading kv head h % Hkv (tiling) instead of h // G.
    "gqa-tiled-heads": (
        "gqa-repeat",
        partial(attention._gqa, mapping=lambda head, groups, kv_heads: head % kv_heads),
        r"head 1, \$G = 2\$, \$H_\{kv\} = 2\$",
    ),
    # Keys permuted but values left in place.
    "keys-permuted-without-values": (
        "key-value-permutation-invariance",
        partial(attention._key_permutation, move_values=False),
        r"output, \$S = 2\$, keys and values permuted by \(1, 0\)",
    ),
    # Dropout without the 1 / (1 - p) rescaling: E[kappa] = 1 - p.
    "dropout-not-rescaled": (
        "dropout-expectation",
        partial(attention._dropout, scale=1),
        r"lhs - rhs simplifies to -p",
    ),
    # Scale 1 instead of 0: the weights are not uniform.
    "scale-one-is-not-the-mean": (
        "scale-zero-mean",
        partial(attention._scale_zero, tau=1),
        r"every visible weight is \$1/n\$",
    ),
}


@pytest.mark.parametrize("variant", sorted(FALSE))
def test_false_variant_is_not_proved(variant: str) -> None:
    base, derivation, where = FALSE[variant]
    claim = dataclasses.replace(BY_NAME[base], name=f"{base}-false", derivation=derivation)
    with pytest.raises(ClaimFailed, match=where):
        claim.prove()


# --- the transcription used by the explicit-size claims is the reference's definition --

_DPS = 60
# Both sides are the same real number evaluated with 60 significant digits (SymPy's
# evalf tracks its precision; attnspec.exact.sdpa works at dps=60 through a few dozen
# operations, each with relative error below 10**-60). 10**-50 leaves a factor 10**10
# for the accumulation; an actual difference in the definition is of order 1.
_AGREE = mpmath.mpf(10) ** -50


def _symbolic(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, tau: float, seen: attention.Seen, sink: Any
) -> tuple[list[Any], list[Any]]:
    out, lse = attention._attend(
        attention._logits(sympy.Matrix(q), sympy.Matrix(k), sympy.Float(tau, _DPS)),
        sympy.Matrix(v),
        seen,
        None if sink is None else sympy.Float(sink, _DPS),
    )
    values = [sympy.N(x, _DPS) for x in out]
    return values, [sympy.N(x, _DPS) for x in lse]


def _close(symbolic: Any, exact: Any) -> bool:
    if symbolic == -sympy.oo or exact == mpmath.ninf:
        return bool(symbolic == -sympy.oo and exact == mpmath.ninf)
    a, b = mpmath.mpf(str(symbolic)), mpmath.mpf(exact)
    return bool(abs(a - b) <= _AGREE * max(1, abs(b)))


# (L, S, options, the visibility rule of the transcription); inputs are binary fractions.
CASES = [
    pytest.param(3, 3, {"causal": True}, attention._causal(0), id="causal-top-left"),
    pytest.param(
        2,
        4,
        {"causal": True, "align": "bottom_right"},
        attention._causal(2),
        id="causal-bottom-right",
    ),
    pytest.param(
        3,
        2,
        {"causal": True, "align": "bottom_right"},
        attention._causal(-1),
        id="bottom-right-empty-rows",
    ),
    pytest.param(
        3, 3, {"causal": True, "sinks": np.array([0.75])}, attention._causal(0), id="sink"
    ),
]


@pytest.mark.parametrize(("n_q", "n_k", "options", "seen"), CASES)
def test_transcription_matches_exact_reference(
    n_q: int, n_k: int, options: dict[str, Any], seen: attention.Seen
) -> None:
    case = f"L={n_q}, S={n_k}, {options}"
    rng = np.random.default_rng(20261125)  # fixed inputs; any inputs would do
    q = rng.integers(-8, 9, size=(n_q, 2)) / 4.0
    k = rng.integers(-8, 9, size=(n_k, 2)) / 4.0
    v = rng.integers(-8, 9, size=(n_k, 3)) / 4.0
    tau = 0.5
    sinks = options.get("sinks")
    out, lse = attnspec.exact.sdpa(
        q[None], k[None], v[None], scale=tau, return_lse=True, dps=_DPS, **options
    )
    sym_out, sym_lse = _symbolic(q, k, v, tau, seen, None if sinks is None else sinks[0])
    flat_out, flat_lse = list(out[0].reshape(-1)), list(lse[0].reshape(-1))
    for name, got, want in (("out", sym_out, flat_out), ("lse", sym_lse, flat_lse)):
        bad = [
            (i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if not _close(g, w)
        ]
        assert not bad, f"{case}: {name} differs (index, symbolic, exact): {bad[:3]}"
