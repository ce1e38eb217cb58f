"""Fixtures for the tools' tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _sim_cache(tmp_path, monkeypatch):
    """Each test gets its own simulator disk cache."""
    monkeypatch.setenv("FMOE_SIM_CACHE", str(tmp_path / "simcache"))
