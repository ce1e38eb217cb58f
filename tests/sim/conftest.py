"""Fixtures for the simulator tests: synthetic traces only (never the shared data)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _sim_cache(tmp_path, monkeypatch):
    """Each test gets its own on-disk cache directory."""
    monkeypatch.setenv("FMOE_SIM_CACHE", str(tmp_path / "simcache"))


@pytest.fixture
def tiny_config(tmp_path):
    """A config.json of a small DeepSeek-style MoE (3 MoE layers x 8 experts, top-2)."""
    import json

    from tests.conftest import SIM_CONFIG

    cfg = SIM_CONFIG
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p
