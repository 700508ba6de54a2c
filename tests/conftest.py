"""pytest configuration: the Hypothesis profile comes from ATTNSPEC_PROFILE."""

from __future__ import annotations

from attnspec.spec.profiles import load_profile

_PROFILE = load_profile()


def pytest_report_header() -> str:
    return f"attnspec hypothesis profile: {_PROFILE} (set ATTNSPEC_PROFILE=dev|ci|thorough)"
