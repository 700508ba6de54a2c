"""Every claim is tested by some property on an implementation, or marked symbolic only.

Each ``check_*`` of attnspec.spec.properties names the claims it tests
(``@tests_claims(...)``); the claims no property can test are listed with a reason in
``attnspec.spec.properties.SYMBOLIC_ONLY``.
"""

from __future__ import annotations

import importlib

import pytest

from attnspec.spec import TOPICS, derivations
from attnspec.spec.properties import SYMBOLIC_ONLY
from attnspec.spec.properties._core import claims_of

MODULES = {topic: importlib.import_module(f"attnspec.spec.properties.{topic}") for topic in TOPICS}
CLAIMS = {c.name for c in derivations.all_claims()}


def _tested() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for topic, mod in MODULES.items():
        for name, check in mod.PROPERTIES.items():
            for claim in claims_of(check):
                out.setdefault(claim, []).append(f"{topic}.{name}")
    return out


@pytest.mark.parametrize("topic", sorted(MODULES))
def test_every_property_names_the_claims_it_tests(topic: str) -> None:
    for name, check in MODULES[topic].PROPERTIES.items():
        named = claims_of(check)  # AttributeError for a property without @tests_claims
        assert set(named) <= CLAIMS, f"{topic}.{name} names unknown claims {set(named) - CLAIMS}"


def test_every_claim_is_tested_or_marked_symbolic_only() -> None:
    untested = CLAIMS - set(_tested()) - set(SYMBOLIC_ONLY)
    assert not untested, f"claims neither tested by a property nor in SYMBOLIC_ONLY: {untested}"


def test_symbolic_only_names_real_claims_that_no_property_tests() -> None:
    assert set(SYMBOLIC_ONLY) <= CLAIMS
    assert not set(SYMBOLIC_ONLY) & set(_tested())
