"""The online claims (spec/derivations/online.py) are proved; false variants are not.

One test per claim, ids = claim names. The negative tests run the same derivations with
one thing made wrong (no rescaling, an averaging merge, no guard for an empty side, the
sink merged twice, a wrong bound) and require ClaimFailed at the step that states the
property: a derivation that "passes" cannot be one that checks nothing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from functools import partial

import pytest

from attnspec.spec.derivations import online
from attnspec.spec.derivations.claim import ClaimFailed, Step

CLAIMS = online.CLAIMS
BY_NAME = {c.name: c for c in CLAIMS}


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.name for c in CLAIMS])
def test_claim_proves(claim: online.Claim) -> None:
    proof = claim.prove()
    assert proof.claim == claim.name and proof.key_steps


def test_claims_are_well_formed() -> None:
    names = [c.name for c in CLAIMS]
    assert len(names) == len(set(names)), f"duplicate claim names: {names}"
    for c in CLAIMS:
        assert c.topic == "online", c.name
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", c.name), f"not kebab-case: {c.name!r}"
        assert c.title.strip() and c.statement.strip(), c.name
        assert c.method.strip() and c.explanation.strip(), c.name
        assert "$$" not in c.statement, f"{c.name}: statement is LaTeX without delimiters"


# The claims the brief asks for (and the source each must cite).
REQUIRED = {
    "online-rescale-exact": "1805.02867",
    "online-merge-monoid": None,
    "online-any-partition": None,
    "online-partials-merge": "2307.08691",
    "online-hidden-block": None,
    "online-sink-once": "2309.17453",
    "online-merge-rounding": "10.1137/1.9780898718027",
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_required_claim_is_present(name: str) -> None:
    assert name in BY_NAME, f"missing claim {name!r}; have {sorted(BY_NAME)}"
    source = REQUIRED[name]
    if source is not None:
        refs = " ".join(BY_NAME[name].references)
        assert source in refs, f"{name}: does not cite {source}: {refs}"


FALSE: dict[str, tuple[str, Callable[[], Sequence[Step]], str]] = {
    # The update adds the block's sums without rescaling the old ones by e^{m - m'}.
    "update-without-rescaling": (
        "online-rescale-exact",
        partial(online._rescale, merge=online._merge_unscaled),
        r"stands for \$Z \+ \\sum_j",
    ),
    # A merge that averages the outputs and ignores the lse.
    "merge-averages": (
        "online-any-partition",
        partial(online._partition, merge=online._average_merge),
        r"stands for the sums over all the keys",
    ),
    # No guard: the factor of an empty side is e^{-inf - (-inf)} = e^NaN.
    "no-guard-for-an-empty-first-block": (
        "online-hidden-block",
        partial(online._hidden_block, factor=online._unguarded),
        r"a fully hidden first block",
    ),
    # The sink merged in two blocks instead of once.
    "sink-in-every-block": (
        "online-sink-once",
        partial(online._sink, times=2),
        r"merged once",
    ),
    # exp and log1p within 2 ulp instead of 1: the stated u(|l| + 3) is too small.
    "merge-bound-with-2-ulp-exp": (
        "online-merge-rounding",
        partial(online._merge_rounding, exp_ulps=2),
        r"u\(\|\\ell\| \+ 3\)",
    ),
    # A bound of 1/4 on e^d / (1 + e^d) over d <= 0 (it reaches 1/2 at d = 0).
    "merge-bound-coefficient-too-small": (
        "online-merge-rounding",
        partial(online._merge_rounding, c2_bound=0.25),
        r"c_2 \\le 1/2",
    ),
}


@pytest.mark.parametrize("variant", sorted(FALSE))
def test_false_variant_is_not_proved(variant: str) -> None:
    base, derivation, where = FALSE[variant]
    claim = dataclasses.replace(BY_NAME[base], name=f"{base}-false", derivation=derivation)
    with pytest.raises(ClaimFailed, match=where):
        claim.prove()


def test_partition_claim_covers_every_partition_and_tree_of_three_keys() -> None:
    # Bell(3) = 5 partitions; trees over k blocks with both child orders: 1, 2, 12
    blocks = list(online._set_partitions([0, 1, 2]))
    assert len(blocks) == 5
    counts = sorted(len(list(online._trees(list(range(len(b)))))) for b in blocks)
    assert counts == [1, 2, 2, 2, 12]
