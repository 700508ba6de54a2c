"""The recipe for a topic (README, Development) is true of every topic in TOPICS.

attnspec.spec.TOPICS is the one place where topics are listed; each topic has a module of
its name in reference/ and in every kind of spec/, and a page template in docs/_templates/.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from attnspec import docs
from attnspec.spec import TOPICS
from attnspec.spec.battery import BATTERIES
from attnspec.spec.derivations import claims
from attnspec.spec.properties._core import Check, Implementation

ROOT = docs.find_root(Path(__file__).parent)


@pytest.mark.parametrize("topic", TOPICS)
def test_a_topic_has_a_module_in_every_kind(topic: str) -> None:
    for kind in ("reference", "spec.derivations", "spec.properties", "spec.strategies"):
        importlib.import_module(f"attnspec.{kind}.{topic}")
    importlib.import_module(f"attnspec.spec.tolerances.{topic}")
    assert claims(topic), f"{topic} has no claims"
    assert (ROOT / "docs" / "_templates" / f"{docs.topic_page(topic)}.md").is_file()


@pytest.mark.parametrize("topic", TOPICS)
def test_a_topic_has_a_battery_and_a_reference_implementation(topic: str) -> None:
    module = importlib.import_module(f"attnspec.spec.properties.{topic}")
    assert module.BATTERY is BATTERIES[topic] and module.BATTERY
    assert all(isinstance(check, Check) for check in module.BATTERY)
    assert {check.prop for check in module.BATTERY} <= set(module.PROPERTIES.values())
    for precision in ("accurate", "fast"):
        impl = module.attnspec_implementation(precision)
        assert isinstance(impl, Implementation) and impl.topic == topic
        assert impl.accuracy == precision
