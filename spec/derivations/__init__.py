"""SymPy derivations: each module proves its claims when run (see Claim).

Each topic module (``softmax``, ...) defines ``CLAIMS``, a tuple of
:class:`~attnspec.spec.derivations.claim.Claim` in reading order. :func:`all_claims`
lists every claim, topic by topic; :func:`claims` one topic's. ``claim.prove()`` runs
the derivation and raises :class:`~attnspec.spec.derivations.claim.ClaimFailed` when
SymPy does not confirm it.
"""

from __future__ import annotations

import importlib

from attnspec.spec import TOPICS
from attnspec.spec.derivations.claim import Claim, ClaimFailed, Proof, Step

__all__ = ["TOPICS", "Claim", "ClaimFailed", "Proof", "Step", "all_claims", "claims"]

#: topic name -> its claims, in reading order (``CLAIMS`` of each topic's module)
_BY_TOPIC: dict[str, tuple[Claim, ...]] = {
    topic: importlib.import_module(f"attnspec.spec.derivations.{topic}").CLAIMS for topic in TOPICS
}


def all_claims() -> list[Claim]:
    """Every claim, topic by topic, each topic in reading order."""
    return [c for topic in TOPICS for c in _BY_TOPIC[topic]]


def claims(topic: str) -> list[Claim]:
    """The claims of one topic, in reading order; ValueError for an unknown topic."""
    try:
        return list(_BY_TOPIC[topic])
    except KeyError:
        raise ValueError(
            f"topic must be one of {', '.join(map(repr, TOPICS))}, got {topic!r}"
        ) from None
