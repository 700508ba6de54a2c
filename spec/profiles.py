"""Hypothesis settings profiles shared by the tests and ``attnspec verify``.

``dev`` (default): quick, random, with a local example database.
``ci``: derandomized (the same examples every run), no deadline, no database.
``thorough``: many more examples, for a long run before a release.

The environment variable ``ATTNSPEC_PROFILE`` picks one (``dev`` when unset).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "PROFILE_ENV", "load_profile", "register_profiles"]

PROFILE_ENV = "ATTNSPEC_PROFILE"
PROFILES = ("dev", "ci", "thorough")

# Exact (mpmath) comparisons make some examples slow; no example is timed.
_BASE = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def register_profiles() -> None:
    """Register the three profiles with Hypothesis (idempotent)."""
    settings.register_profile("dev", _BASE, max_examples=60)
    settings.register_profile(
        "ci", _BASE, max_examples=100, derandomize=True, database=None, print_blob=True
    )
    settings.register_profile("thorough", _BASE, max_examples=2000)


def load_profile(name: str | None = None) -> str:
    """Load the profile ``name`` (or the one ``ATTNSPEC_PROFILE`` names); return its name."""
    register_profiles()
    chosen = name or os.environ.get(PROFILE_ENV) or "dev"
    if chosen not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={chosen!r} is not a profile; choose one of {PROFILES}")
    settings.load_profile(chosen)
    return chosen
