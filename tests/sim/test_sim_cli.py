"""`fmoe simulate` (through `python -m fmoe.sim` and the `register` hook)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmoe.sim.__main__ import main
from fmoe.sim.cli import register
from fmoe.sim.trace import write_trace
from sim_helpers import synthetic_ids

CONTRACT_KEYS = {"policy", "tokens", "capacity", "hit_rate", "tpot_ms", "stall_ms_per_token",
                 "bytes_per_token", "prefetch_precision"}


@pytest.fixture
def trace_path(tmp_path):
    ids = synthetic_ids(120, 3, 8, 2, seed=4)
    return write_trace(tmp_path / "tiny.npz", expert_ids=ids, seq_offsets=[0, 40, 90, 120],
                       num_experts=8, model="test/tiny-moe", texts=["a", "b", "c"])


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_last_line(capsys, trace_path, tiny_config):
    code, out, err = run_cli(capsys, "simulate", "--trace", trace_path, "--policy", "lru",
                             "--cache-fraction", "0.25", "--model-config", tiny_config, "--json")
    assert code == 0, err
    d = json.loads(out.strip().splitlines()[-1])
    assert CONTRACT_KEYS <= set(d)
    assert d["policy"] == "lru" and d["tokens"] == 120 and d["capacity"] == 6
    assert d["prefetch_precision"] is None and 0 <= d["hit_rate"] <= 1
    assert d["loads_per_token"] > 0 and d["hardware"] == "rtx3090-pcie4"
    assert d["tpot_ms"] == pytest.approx(d["compute_ms_per_token"] + d["stall_ms_per_token"])
    assert d["bytes_per_token"] == pytest.approx(d["loads_per_token"] * d["expert_bytes"])


def test_prefetching_policy_and_oracle_comparison(capsys, trace_path, tiny_config):
    code, out, err = run_cli(capsys, "--trace", trace_path, "--policy", "moe-infinity",
                             "--cache-fraction", "0.5", "--model-config", tiny_config,
                             "--hardware", "h100-pcie5", "--prefetch-distance", "2",
                             "--history", trace_path, "--vs-oracle", "--json")
    assert code == 0, err
    d = json.loads(out.strip().splitlines()[-1])
    assert d["prefetch_precision"] is not None and d["prefetch_distance"] == 2
    assert d["belady_loads_per_token"] <= d["loads_per_token"]
    assert d["loads_vs_belady"] >= 1


def test_table_output_and_max_tokens(capsys, trace_path, tiny_config):
    code, out, err = run_cli(capsys, "--trace", trace_path, "--policy", "oracle",
                             "--capacity", "5", "--model-config", tiny_config,
                             "--max-tokens", "50")
    assert code == 0, err
    assert "hit rate" in out and "TPOT" in out and "50" in out


def test_sweep_writes_csv_and_plot(capsys, tmp_path, trace_path, tiny_config):
    csv_path, png = tmp_path / "out" / "s.csv", tmp_path / "out" / "s.png"
    code, out, err = run_cli(capsys, "--trace", trace_path, "--sweep", "--fractions",
                             "0.25,0.5", "--policies", "lru,belady,oracle", "--hardware",
                             "rtx3090-pcie4,gh200-c2c", "--model-config", tiny_config,
                             "--csv", csv_path, "--plot", png, "--json")
    assert code == 0, err
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2 * 2 * 3
    assert {r["policy"] for r in rows} == {"lru", "belady", "oracle"}
    assert {r["hardware"] for r in rows} == {"rtx3090-pcie4", "gh200-c2c"}
    for r in rows:
        if r["policy"] == "oracle":
            assert float(r["loads_vs_oracle"]) == 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(out.strip().splitlines()[-1])["sweep"]
    assert len(sweep) == 12 and CONTRACT_KEYS <= set(sweep[0])


BAD = [
    (["--policy", "nope", "--cache-fraction", "0.25"], "unknown policy 'nope'"),
    (["--policy", "lru", "--cache-fraction", "0.25", "--hardware", "tpu"],
     "unknown hardware profile 'tpu'"),
    (["--policy", "lru", "--cache-fraction", "1.5"], "cache fraction must be in (0, 1]"),
    (["--policy", "lru", "--cache-fraction", "x"], "not a number"),
    (["--policy", "lru"], "--cache-fraction"),
    (["--cache-fraction", "0.2"], "--policy is required"),
    (["--policy", "lru", "--cache-fraction", "0.01"], "cannot hold one layer"),
    (["--policy", "lru", "--cache-fraction", "0.25", "--model", "gpt-5"],
     "unknown model shape 'gpt-5'"),
    (["--policy", "lru", "--cache-fraction", "0.25", "--model", "mixtral-8x7b"],
     "trace has 3 MoE layers x 8 experts but model shape 'mixtral-8x7b' has 32 x 8"),
    (["--policy", "lru", "--cache-fraction", "0.25", "--bogus"], "unrecognized arguments"),
    (["--policy", "lru", "--cache-fraction", "0.25", "--prefetch-distance", "3"],
     "--prefetch-distance: policy 'lru' does not prefetch"),
]


@pytest.mark.parametrize("extra,msg", BAD)
def test_bad_arguments_exit_2(capsys, trace_path, tiny_config, extra, msg):
    argv = ["--trace", trace_path] + extra
    if "--model" not in extra:
        argv += ["--model-config", tiny_config]
    with pytest.raises(SystemExit) as e:
        code = main([str(a) for a in argv])
        raise SystemExit(code)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmoe simulate: error:"), err
    assert msg in lines[0] and "Traceback" not in err and out == ""


def test_unknown_model_needs_a_shape(capsys, trace_path):
    code, out, err = run_cli(capsys, "--trace", trace_path, "--policy", "lru",
                             "--cache-fraction", "0.5")
    assert code == 2 and "cannot tell the model shape of trace model 'test/tiny-moe'" in err


def bad_trace(tmp_path, kind):
    p = tmp_path / f"{kind}.npz"
    ids = synthetic_ids(20, 3, 8, 2)
    d = dict(expert_ids=ids, seq_offsets=np.array([0, 20]), num_experts=np.array(8),
             model=np.array("test/m"))
    if kind == "missing":
        return tmp_path / "nope.npz"
    if kind == "keys":
        d["expert_idz"] = d.pop("expert_ids")
    elif kind == "dtype":
        d["expert_ids"] = ids.astype(np.float32)
    elif kind == "shape":
        d["expert_ids"] = ids.reshape(20, 6)
    elif kind == "range":
        d["num_experts"] = np.array(4)
    elif kind == "pickle":
        d["model"] = np.array([object()], dtype=object)
    np.savez(p, **d)
    return p


@pytest.mark.parametrize("kind,msg", [
    ("missing", "no such file"), ("keys", "missing required key(s) 'expert_ids'"),
    ("dtype", "'expert_ids' has dtype float32, expected int16"),
    ("shape", "'expert_ids' has shape [20, 6], expected [T, L, K]"),
    ("range", "is >= num_experts=4"), ("pickle", "pickled"),
])
def test_bad_traces_exit_2(capsys, tmp_path, tiny_config, kind, msg):
    p = bad_trace(tmp_path, kind)
    code, out, err = run_cli(capsys, "--trace", p, "--policy", "lru", "--cache-fraction", "0.5",
                             "--model-config", tiny_config)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and str(p) in lines[0], err


def test_register_adds_the_subcommand(trace_path, tiny_config):
    parser = argparse.ArgumentParser(prog="fmoe")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["simulate", "--trace", str(trace_path), "--policy", "lfu",
                              "--cache-fraction", "0.5", "--model-config", str(tiny_config),
                              "--json"])
    assert args.func.__name__ == "run" and args.policy == "lfu"
    assert args.func(args) == 0


def test_module_entry_point_no_traceback(tmp_path, tiny_config):
    p = bad_trace(tmp_path, "dtype")
    r = subprocess.run([sys.executable, "-m", "fmoe.sim", "--trace", str(p), "--policy", "lru",
                        "--cache-fraction", "0.5", "--model-config", str(tiny_config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "'expert_ids' has dtype float32" in r.stderr


def test_policy_options(capsys, trace_path, tiny_config):
    base = ("simulate", "--trace", trace_path, "--cache-fraction", "0.25", "--model-config",
            tiny_config, "--json", "--no-cache")
    code, out, err = run_cli(capsys, *base, "--policy", "fmoe", "--policy-option", "eviction=pfreq")
    assert code == 0, err
    code, out, err = run_cli(capsys, *base, "--policy", "horizon", "--policy-option", "tokens=2")
    assert code == 0, err
    code, out, err = run_cli(capsys, *base, "--policy", "lru", "--policy-option", "tokens=2")
    assert code == 2 and "takes no option tokens" in err
    code, out, err = run_cli(capsys, *base, "--policy", "fmoe", "--policy-option", "eviction")
    assert code == 2 and "KEY=VALUE" in err
    code, out, err = run_cli(capsys, *base, "--policy", "fmoe", "--policy-option", "eviction=nope")
    assert code != 0 and "unknown fmoe eviction rule" in err


@pytest.mark.parametrize("policy", ["fmoe", "oracle", "moe-infinity", "horizon"])
def test_policy_option_of_wrong_type(capsys, trace_path, tiny_config, policy):
    """Regression (issue 18): `--policy-option max_orders=abc` gave a raw TypeError (fmoe) or an
    int() message naming no option (oracle, moe-infinity): one line naming the option and the
    expected type, exit code 2, before the trace is replayed."""
    code, out, err = run_cli(capsys, "simulate", "--trace", trace_path, "--policy", policy,
                             "--cache-fraction", "0.25", "--model-config", tiny_config,
                             "--policy-option", "max_orders=abc", "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"policy {policy!r} option max_orders must be an integer" in err
    assert "got 'abc' (str)" in err


def test_policy_option_types_in_the_python_simulator(trace_path, tiny_config):
    from fmoe.sim.hardware import get_hardware
    from fmoe.sim.replay import simulate
    from fmoe.sim.shapes import load_config_shape
    from fmoe.sim.timing import TimingModel
    from fmoe.sim.trace import load_trace

    tm = TimingModel.from_shape(load_config_shape(tiny_config), get_hardware("rtx3090-pcie4"))
    trace = load_trace(trace_path)
    with pytest.raises(ValueError, match="option max_orders must be an integer"):
        simulate(trace, "oracle", tm, cache_fraction=0.25, policy_options={"max_orders": "abc"})
    r = simulate(trace, "oracle", tm, cache_fraction=0.25, policy_options={"max_orders": 2})
    assert r.tokens == 120


@pytest.mark.parametrize("policy", ["lru", "oracle", "fmoe"])
def test_progress_bar_on_stderr_only(capsys, monkeypatch, trace_path, tiny_config, policy):
    """Regression (issue 18): a long `fmoe simulate` printed nothing until it ended. A tqdm bar
    counts replayed tokens on stderr (on a terminal, or with FMOE_PROGRESS=1) once the run is
    longer than `PROGRESS_DELAY_S` (0 here, so that a short test run shows it); stdout keeps
    only the JSON line."""
    import fmoe.sim.cli as sim_cli

    argv = ("simulate", "--trace", trace_path, "--policy", policy, "--cache-fraction", "0.25",
            "--model-config", tiny_config, "--json", "--no-cache")
    monkeypatch.setattr(sim_cli, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setenv("FMOE_PROGRESS", "1")
    bars = []
    make = sim_cli._progress_bar

    def spy(total):
        bar = make(total)
        if bar is None:
            return None
        close = bar.close
        bar.close = lambda: (bars.append((bar.n, bar.total)), close())
        return bar
    monkeypatch.setattr(sim_cli, "_progress_bar", spy)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "replaying" in err and "tok" in err
    passes = 2 if policy == "oracle" else 1               # the oracle also replays belady
    assert bars[-1] == (passes * 120, passes * 120)       # every replayed token counted
    assert len(out.strip().splitlines()) == 1 and json.loads(out)["tokens"] == 120
    monkeypatch.setenv("FMOE_PROGRESS", "0")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    monkeypatch.delenv("FMOE_PROGRESS")                     # auto: stderr is not a terminal
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""


def test_no_progress_bar_for_a_short_run(capsys, monkeypatch, trace_path, tiny_config):
    """A run shorter than the delay leaves stderr empty (the delay set out of reach, so the
    test does not hang on the machine's speed)."""
    import fmoe.sim.cli as sim_cli

    monkeypatch.setattr(sim_cli, "PROGRESS_DELAY_S", 1e9)
    monkeypatch.setenv("FMOE_PROGRESS", "1")
    code, out, err = run_cli(capsys, "simulate", "--trace", trace_path, "--policy", "lru",
                             "--cache-fraction", "0.25", "--model-config", tiny_config, "--json")
    assert code == 0 and err == ""
    json.loads(out.strip().splitlines()[-1])


def test_a_shrunk_model_takes_the_traces_first_layers(capsys, tmp_path, tiny_config):
    """A model shape with fewer MoE layers than the trace (a checkpoint from `fmoe synth
    --layers`) replays the trace's first layers, as the live routing replay does: the same
    figures as a trace cut to those layers; more layers than the trace are still refused."""
    ids = synthetic_ids(120, 3, 8, 2, seed=4)
    full = write_trace(tmp_path / "full.npz", expert_ids=ids, seq_offsets=[0, 40, 90, 120],
                       num_experts=8, model="test/tiny-moe")
    cut = write_trace(tmp_path / "cut.npz", expert_ids=ids[:, :2].copy(),
                      seq_offsets=[0, 40, 90, 120], num_experts=8, model="test/tiny-moe")
    cfg = json.loads(tiny_config.read_text())
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    got = []
    for trace in (full, cut):
        code, out, err = run_cli(capsys, "simulate", "--trace", trace, "--policy", "lru",
                                 "--capacity", "5", "--model-config", small, "--json",
                                 "--no-cache")
        assert code == 0, err
        got.append(json.loads(out.strip().splitlines()[-1]))
    assert "first 2 of 3 MoE layers" in run_cli(
        capsys, "simulate", "--trace", full, "--policy", "lru", "--capacity", "5",
        "--model-config", small, "--no-cache")[2]
    for key in ("hit_rate", "tpot_ms", "loads_per_token", "tokens"):
        assert got[0][key] == got[1][key]
    (small / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    code, _, err = run_cli(capsys, "simulate", "--trace", full, "--policy", "lru",
                           "--capacity", "5", "--model-config", small)
    assert code == 2 and "3 MoE layers" in err


@pytest.fixture
def no_sweep(monkeypatch):
    """A sweep that fails loudly: a destination check must refuse before it."""
    import fmoe.sim.sweep

    def sweep(*a, **kw):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(fmoe.sim.sweep, "run_sweep", sweep)


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_sweep_destinations_checked_before_the_sweep(capsys, tmp_path, trace_path, tiny_config, no_sweep,
                                                     flag):
    (tmp_path / "afile").write_text("")
    sweep = ["--trace", trace_path, "--sweep", "--fractions", "0.5", "--policies", "lru",
             "--model-config", tiny_config]
    name = "s.csv" if flag == "--csv" else "s.png"
    bad = [(tmp_path / "afile" / name, "is not a directory"),          # was FileExistsError, after
           (tmp_path / "afile" / "sub" / name, "is not a directory"),
           (tmp_path, "is a directory")]
    if flag == "--plot":
        bad.append((tmp_path / "s.xyz", "matplotlib cannot write .xyz"))
    if os.path.isdir("/proc/self"):
        # /proc takes no new file, whoever asks (permission bits would not tell for root)
        bad.append((Path("/proc") / name, "cannot write in '/proc'"))
    for path, msg in bad:
        code, out, err = run_cli(capsys, *sweep, flag, path)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert f"{flag} {path}" in lines[0] and msg in lines[0] and "sweep ran" not in err
    assert not list(tmp_path.glob(".*")) and not (tmp_path / "afile").is_dir()   # the probes left nothing


def test_sweep_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that dies leaves the previous file as it was and no temporary file."""
    import csv as csv_module

    import matplotlib.figure

    from fmoe.sim.sweep import plot, write_csv

    row = {"hardware": "h", "policy": "lru", "cache_fraction": 0.5, "capacity": 4, "hit_rate": 0.5,
           "tpot_ms": 1.0, "compute_ms_per_token": 0.5}
    png, table = tmp_path / "s.png", tmp_path / "s.csv"
    png.write_bytes(b"old plot")
    table.write_text("old rows")

    def dying_savefig(self, fname, **kw):
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG half")
        else:
            with open(fname, "wb") as f:
                f.write(b"\x89PNG half")
        raise OSError("disk full")

    def dying_writerow(self, r):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dying_savefig)
    monkeypatch.setattr(csv_module.DictWriter, "writerow", dying_writerow)
    with pytest.raises(OSError, match="disk full"):
        plot([row], png)
    with pytest.raises(OSError, match="disk full"):
        write_csv([row], table)
    assert png.read_bytes() == b"old plot" and table.read_text() == "old rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.png"]
    monkeypatch.undo()
    plot([row], png)
    write_csv([row], table)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and table.read_text().startswith("hardware,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.png"]


def test_a_recorded_trace_named_after_a_builtin_model_replays_on_its_own_config(capsys, tmp_path):
    """A trace recorded from `fmoe synth deepseek-v2-lite DIR --layers 3` (with fewer experts)
    is named deepseek-v2-lite but carries its own config.json: that shape is the one its
    routing fits (the built-in 26 x 64 shape was taken and the replay refused)."""
    from fmoe.models.published import published_config

    cfg = {**published_config("deepseek-v2-lite", 3), "n_routed_experts": 8}
    ids = synthetic_ids(60, 2, 8, 6, seed=1)
    path = write_trace(tmp_path / "rec.npz", expert_ids=ids, seq_offsets=[0, 60], num_experts=8,
                       model="deepseek-v2-lite", model_config=cfg)
    code, out, err = run_cli(capsys, "simulate", "--trace", path, "--policy", "lru",
                             "--cache-fraction", "0.5", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["capacity"] == 8


def test_policy_options_after_one_flag_or_repeated(capsys, trace_path, tiny_config):
    """The contract's `--policy-option K=V ...`: several after one flag, or the flag repeated."""
    base = ["simulate", "--trace", trace_path, "--policy", "fmoe", "--cache-fraction", "0.5",
            "--model-config", tiny_config, "--json", "--no-cache"]
    one = run_cli(capsys, *base, "--policy-option", "eviction=lru", "prefetch=false")
    two = run_cli(capsys, *base, "--policy-option", "eviction=lru", "--policy-option", "prefetch=false")
    assert one[0] == two[0] == 0
    a, b = (json.loads(r[1].splitlines()[-1]) for r in (one, two))
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b
    bad = run_cli(capsys, *base, "--policy-option", "eviction=lru", "nope=1")
    assert bad[0] == 2 and "nope" in bad[2]
