"""Loading shows a progress bar when it is long (FMOE_PROGRESS forces it on or off)."""

from __future__ import annotations

import fmoe


def test_progress_bar_when_asked(mixtral_ckpt, capfd, monkeypatch):
    monkeypatch.setenv("FMOE_PROGRESS", "1")
    fmoe.models.from_pretrained(mixtral_ckpt[0])
    err = capfd.readouterr().err
    assert "load weights" in err and "load experts" in err


def test_no_bar_for_a_small_model_or_when_off(mixtral_ckpt, capfd, monkeypatch):
    fmoe.models.from_pretrained(mixtral_ckpt[0])          # far below the 1 GiB threshold
    monkeypatch.setenv("FMOE_PROGRESS", "0")
    fmoe.models.from_pretrained(mixtral_ckpt[0])
    assert "load" not in capfd.readouterr().err
