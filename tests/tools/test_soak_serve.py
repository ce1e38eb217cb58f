"""tools/soak_serve.py: a short soak of a real server passes its checks; a server that cannot
start fails the run with its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[2]
BAD = ("bad_json", "bad_types", "huge", "unknown_model", "empty_messages", "negative",
       "ids_out_of_vocab")


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    from fmoe.serve import demo

    cache = tmp_path_factory.mktemp("fmoe-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", str(cache))
        return demo.demo_checkpoint()


def soak(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools/soak_serve.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_short_soak_passes_every_check(demo_ckpt, tmp_path):
    out = tmp_path / "soak.json"
    done = soak("--model", str(demo_ckpt), "--seconds", "3", "--clients", "3", "--sample", "1",
                "--server-args", "--expert-cache 0.25 --max-batch 4 --threads 1",
                "--max-growth", "1.0", "--json", str(out))   # the warm-up's growth is no leak
    assert done.returncode == 0, done.stdout + done.stderr
    for check in ("alive", "health ok", "greedy text unchanged", "no 5xx but 503",
                  "rss growth within limit", "SIGTERM exit 0"):
        assert f"ok   {check}" in done.stdout
    report = json.loads(out.read_text())
    assert report["requests"] == sum(report["counts"].values()) > 0
    # every client sends at least one request; the first one's (seed 0) is bad input
    bad = {k: v for k, v in report["counts"].items() if k.split()[0] in BAD}
    assert bad and all(k.split()[-1] in ("400", "404") for k in bad)


def test_a_server_that_cannot_start_fails_the_soak(demo_ckpt):
    done = soak("--model", str(demo_ckpt), "--seconds", "1", "--server-args", "--max-batch 0")
    assert done.returncode == 1
    assert "the server exited at start" in done.stdout
