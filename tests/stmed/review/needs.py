"""Tests that need a system service (Chromium, PostgreSQL): skipped with the reason outside CI, failed in CI
(``CI=true``), where .ci/run installs and starts them."""

from __future__ import annotations

import os

import pytest


def need(available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI installs it in .ci/run: this must not be skipped there)")
    pytest.skip(reason)
