"""tools/bench_sim.py: a sweep under a calibrated profile takes the profile's own timing (as
`fmoe simulate` does); bad arguments are one line and a non-zero exit; --md is written
atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fmoe.sim.trace import write_trace
from tests.conftest import SIM_CONFIG, load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tmp_path):
    """(trace path, config.json path): 3 MoE layers x 8 experts, top-2."""
    cfg = SIM_CONFIG
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.permutation(8)[:2] for _ in range(3)] for _ in range(60)])
    trace = write_trace(tmp_path / "tiny.npz", expert_ids=ids, seq_offsets=[0, 30, 60],
                        num_experts=8, model="test/tiny-moe")
    return trace, config


def _profile(tmp_path) -> Path:
    """A profile as `fmoe calibrate` writes it (its roofline fields are 0: measured timing)."""
    p = tmp_path / "cal.json"
    p.write_text(json.dumps({
        "format": "fmoe-hardware-profile", "version": 1, "name": "calibrated:test",
        "model": {"num_layers": 3, "num_experts": 8, "top_k": 2, "hidden": 64, "inter": 32},
        "link_bw": 1e9,
        "timing": {"attn": 1e-4, "shared": 0.0, "expert": 2e-5, "copy": 1e-3,
                   "expert_bytes": 12288, "token_pre": 1e-4, "token_post": 1e-4}}))
    return p


def run_tool(capsys, *argv):
    code = load_tool("bench_sim").main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrated_profile_uses_its_own_timing(capsys, tmp_path, tiny):
    """bench_sim built TimingModel.from_shape for every profile: a calibrated one (no roofline
    figures) raised ZeroDivisionError in timing.roof."""
    trace, config = tiny
    csv = tmp_path / "out.csv"
    code, out, err = run_tool(capsys, "--trace", trace, "--model-config", config, "--hardware",
                              _profile(tmp_path), "--fractions", "0.5", "--policies", "lru",
                              "--jobs", "1", "--csv", csv, "--md", tmp_path / "page.md")
    assert code == 0, err
    assert "calibrated:test" in csv.read_text()
    # the page's environment line comes from the timing model, measured or built
    assert "- `calibrated:test`: expert 0.0 MB, copy 1.000 ms" in (tmp_path / "page.md").read_text()
    # the same figures as `fmoe simulate` under that profile
    from fmoe.sim.__main__ import main

    code = main(["--trace", str(trace), "--model-config", str(config), "--hardware",
                 str(_profile(tmp_path)), "--policy", "lru", "--cache-fraction", "0.5", "--json"])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    from fmoe.sim.sweep import read_csv

    row = read_csv(csv)[0]
    assert row["tpot_ms"] == pytest.approx(d["tpot_ms"], rel=1e-3)


@pytest.mark.parametrize("flag,value,words", [
    ("--fractions", "0", "--fractions"),
    ("--fractions", "a,0.5", "not a number"),
    ("--fractions", "1.5", "--fractions"),
    ("--policies", "nope", "unknown policy 'nope'"),
    ("--hardware", "nohw", "unknown hardware profile 'nohw'"),
])
def test_bad_arguments_are_one_line(capsys, tmp_path, tiny, flag, value, words):
    """A bad --fractions, --policies or --hardware gave a traceback."""
    trace, config = tiny
    argv = ["--trace", trace, "--model-config", config, "--fractions", "0.5", "--policies", "lru",
            "--csv", tmp_path / "out.csv", flag, value]
    try:
        code = load_tool("bench_sim").main([str(a) for a in argv])
    except SystemExit as e:         # argparse's own errors exit 2 with one line
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None)
    assert len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "out.csv").exists()


def test_md_written_atomically(capsys, tmp_path, tiny, monkeypatch):
    """--md was written with Path.write_text: a failure midway left a truncated page. It goes
    to a temporary file that replaces the page only when complete."""
    trace, config = tiny
    md = tmp_path / "page.md"
    md.write_text("# Page\n\nbefore\n\n<!-- sim-sweep:start -->\nold\n<!-- sim-sweep:end -->\n\nafter\n")
    argv = ["--trace", trace, "--model-config", config, "--fractions", "0.5", "--policies", "lru",
            "--hardware", "rtx3090-pcie4", "--csv", tmp_path / "out.csv", "--md", md]
    tool = load_tool("bench_sim")
    real = os.replace
    seen = []

    def replace(src, dst):
        seen.append((Path(src), Path(dst)))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    assert tool.main([str(a) for a in argv]) == 0
    text = md.read_text()
    assert text.startswith("# Page\n\nbefore\n") and text.endswith("\nafter\n")
    assert "\nold\n" not in text and "lru" in text
    assert any(dst == md and src.parent == md.parent and src != md for src, dst in seen)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".page")) == []
