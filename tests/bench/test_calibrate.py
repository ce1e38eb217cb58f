"""`fmoe calibrate` on a tiny model: a profile `fmoe simulate --hardware FILE` accepts, whose
timing is the measured one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_helpers import random_trace
from fmoe.bench.calibrate import calibrate
from fmoe.runtime.transfer import CopyEngine
from fmoe.serve.cli import main
from fmoe.sim.hardware import UnknownHardwareError, get_hardware


@pytest.fixture(scope="module")
def profile(tiny_synth, tmp_path_factory):
    prof = calibrate(tiny_synth, samples=6, steps=3, out=lambda s: None)
    path = tmp_path_factory.mktemp("prof") / "machine.json"
    path.write_text(json.dumps(prof))
    return path, prof


def test_profile_fields(profile):
    _, prof = profile
    t = prof["timing"]
    assert len(t["attn"]) == 2 and all(a > 0 for a in t["attn"])      # one per MoE layer
    assert t["copy"] > 0 and t["expert"] >= 0 and t["token_post"] > 0
    assert t["expert_bytes"] == 3 * 64 * 32 * 4                       # float32 expert of the tiny shape
    assert prof["model"]["num_experts"] == 8 and prof["model"]["top_k"] == 2
    assert prof["measured"]["reads"]["samples"] == 6
    # the reads ran with the CPU copy engine's reader count; the lanes come from them and the
    # reads alone
    reads = prof["measured"]["reads"]
    assert reads["readers"] == CopyEngine.cpu_readers and reads["read_alone_seconds"] > 0
    assert t["lanes"] == reads["lanes"] and 1 <= t["lanes"] <= reads["readers"]


def test_read_lanes():
    from fmoe.bench.calibrate import read_lanes

    assert read_lanes(0.030, 0.015, 2) == 2      # reads overlap: two at once, each 30 ms
    assert read_lanes(0.015, 0.015, 2) == 1      # one capped rate split between them
    assert read_lanes(0.016, 0.015, 4) == 1
    assert read_lanes(0.045, 0.015, 4) == 3
    assert read_lanes(0.200, 0.015, 2) == 2      # never more lanes than readers
    assert read_lanes(0.001, 0.015, 2) == 1
    assert read_lanes(0.010, 0.0, 2) == 1


def test_simulate_takes_the_profile(profile, tiny_synth, tmp_path, capsys):
    path, prof = profile
    tm = get_hardware(str(path)).timing_model()
    assert tm.copy == prof["timing"]["copy"] and tm.expert_bytes == prof["timing"]["expert_bytes"]
    assert tm.lanes == prof["timing"]["lanes"]
    # a profile from before lanes were recorded reads as one copy at a time
    old = json.loads(path.read_text())
    del old["timing"]["lanes"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert get_hardware(str(tmp_path / "old.json")).timing_model().lanes == 1
    random_trace(tmp_path / "t.npz", tokens=(20, 20), layers=2)
    rc = main(["simulate", "--trace", str(tmp_path / "t.npz"), "--policy", "lru", "--cache-fraction", "0.5",
               "--hardware", str(path), "--model-config", str(tiny_synth / "config.json"), "--json",
               "--no-cache"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    resident = sum(prof["timing"]["attn"]) + prof["timing"]["token_pre"] + prof["timing"]["token_post"] \
        + 2 * 2 * prof["timing"]["expert"]
    # every token costs at least its measured compute; misses add copies
    assert res["tpot_ms"] >= 1e3 * resident * 0.999


def test_bad_profile_files(tmp_path):
    (tmp_path / "x.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(UnknownHardwareError, match="not an fmoe hardware profile"):
        get_hardware(str(tmp_path / "x.json"))
    with pytest.raises(UnknownHardwareError, match="cannot read"):
        get_hardware(str(tmp_path / "missing.json"))
    with pytest.raises(UnknownHardwareError, match="unknown hardware profile"):
        get_hardware("rtx9090")


def test_cli_writes_profile(tiny_synth, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["calibrate", str(tiny_synth), "--samples", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["format"] == "fmoe-hardware-profile"
    capsys.readouterr()
    # without --out, stdout is the profile alone (progress goes to stderr)
    assert main(["calibrate", str(tiny_synth), "--samples", "4", "--miss-steps", "0"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["format"] == "fmoe-hardware-profile" and "calibrate:" in got.err


def test_memory_limit_sets_the_read_path(tiny_synth, monkeypatch):
    """`memory_limit` reads as the runtime would under that limit: experts larger than half of
    it go O_DIRECT (where the filesystem allows it), a limit far above them through the page
    cache; the CLI takes it as a size and refuses a bad one."""
    import os

    from fmoe.bench.calibrate import measure_reads

    monkeypatch.delenv("FMOE_DIRECT_IO", raising=False)
    files = sorted(tiny_synth.glob("*.safetensors"))
    try:
        os.close(os.open(files[0], os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert measure_reads(tiny_synth, 4, memory_limit=1)["o_direct"] is True
    assert measure_reads(tiny_synth, 4, memory_limit=1 << 50)["o_direct"] is False
    with pytest.raises(SystemExit, match="--memory-limit"):
        main(["calibrate", str(tiny_synth), "--samples", "2", "--memory-limit", "lots"])


def test_unaligned_direct_reads_suggest_the_store(tiny_synth, tmp_path, capsys, monkeypatch):
    """Experts read with O_DIRECT from a checkpoint whose tensors are not 4096-aligned (every
    read through a bounce buffer) print a hint to convert; the converted store, whose experts
    start aligned, reads without it."""
    import os

    from fmoe.bench.calibrate import measure_reads
    from fmoe.models.convert import convert

    monkeypatch.delenv("FMOE_DIRECT_IO", raising=False)
    try:
        os.close(os.open(sorted(tiny_synth.glob("*.safetensors"))[0], os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    capsys.readouterr()
    measure_reads(tiny_synth, 2, memory_limit=1)
    assert "fmoe convert" in capsys.readouterr().err
    measure_reads(tiny_synth, 2, memory_limit=1 << 50)        # buffered reads: no hint
    assert "fmoe convert" not in capsys.readouterr().err
    store = tmp_path / "store"
    convert(tiny_synth, store, progress=False)
    capsys.readouterr()
    assert measure_reads(store, 2, memory_limit=1)["o_direct"] is True
    assert "fmoe convert" not in capsys.readouterr().err


def test_reads_land_in_buffers_made_like_the_slots(tiny_synth, monkeypatch):
    # O_DIRECT reads into 4 KiB pages cost a throttled disk more requests than reads into the
    # cache's huge-page slots: on CPU the calibration reads into buffers made the slots' way
    import fmoe.runtime.offload as offload
    from fmoe.bench.calibrate import measure_reads
    from fmoe.runtime.transfer import CopyEngine

    made = []
    real = offload._zeros

    def spy(shape, device, dtype):
        made.append((tuple(shape), device.type))
        return real(shape, device, dtype)

    monkeypatch.setattr(offload, "_zeros", spy)
    measure_reads(tiny_synth, 4)
    assert [m[1] for m in made] == ["cpu", "cpu"] and all(m[0][0] == CopyEngine.cpu_readers for m in made)


def _bench_reads():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_reads.py"
    spec = importlib.util.spec_from_file_location("bench_reads_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_reads_tool(tiny_synth, capsys):
    tool = _bench_reads()
    assert tool.main([str(tiny_synth), "--rounds", "2", "--reads", "2", "--memory-limit", "1GiB"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["round 1", "round 2"]
    res = json.loads(lines[-1])
    assert set(res["ms_per_expert_median"]) == {"staging", "slots", "alone"}
    assert all(v > 0 for v in res["ms_per_expert_median"].values())
    # every read is a different cold expert: more than the model has is refused by name
    with pytest.raises(SystemExit, match="--rounds x --reads x 3"):
        tool.main([str(tiny_synth), "--rounds", "50", "--reads", "40"])
    with pytest.raises(SystemExit, match="--memory-limit"):
        tool.main([str(tiny_synth), "--memory-limit", "lots"])


def test_bench_blas_spin_tool(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_blas_spin.py"
    spec = importlib.util.spec_from_file_location("bench_blas_spin_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--rows", "3,5", "--dim", "8", "--reps", "1", "--sleep-ms", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["rows"], r["form"]) for r in rows] == [(3, "numpy @"), (3, "fmoe matvec"),
                                                      (5, "numpy @"), (5, "fmoe matvec")]
    assert all(r["product_us"] >= 0 and r["spin_cpu_ms"] >= 0 for r in rows)
    with pytest.raises(SystemExit):
        tool.main(["--rows", "a,b"])
    with pytest.raises(SystemExit):
        tool.main(["--rows", "0"])


def test_misses_time_the_runtimes_own_reads(tiny_synth):
    """The decode with a small cache: the misses counted per MoE layer add up to the runtime's
    count, and the all-hit twin steps miss nothing; with one lane a layer's k misses are k
    rounds, so the copy time is the stall per miss plus the compute each adds; with as many
    lanes as a layer can miss (top-2, one token), a layer's misses are one round."""
    from fmoe.bench.calibrate import measure_misses
    from fmoe.models import from_pretrained

    probe = from_pretrained(tiny_synth, expert_cache=4, policy="lru")
    try:
        one = measure_misses(probe, steps=4, lanes=1)
        two = measure_misses(probe, steps=4, lanes=2)
    finally:
        probe.close()
    assert one["misses"] > 0 and len(one["layer_misses"]) == 2
    # each miss step's twin, routed to the same experts, finds them all cached
    assert one["repeat_misses"] == 0 and two["repeat_misses"] == 0
    assert sum(one["layer_misses"]) == one["misses"] and one["rounds"] == one["misses"]
    assert one["copy"] == pytest.approx(one["stall_per_miss"] + one["cpu_per_miss"])
    assert one["stall_per_miss"] >= 0 and one["cpu_per_miss"] >= 0
    assert sum(two["layer_misses"]) == two["misses"]
    assert two["misses"] / 2 <= two["rounds"] <= min(two["misses"], 4 * 2)
    assert two["copy"] * 2 * two["rounds"] == pytest.approx(
        (two["stall_per_miss"] + two["cpu_per_miss"]) * two["misses"])


def test_copy_from_the_misses_or_the_reads(profile, tiny_synth, tmp_path):
    """By default a CPU profile's copy time is the decode's per miss; `--miss-steps 0` keeps the
    cold reads' and leaves the decode out; a negative count is refused."""
    _, prof = profile
    assert prof["timing"]["copy"] == prof["measured"]["misses"]["copy"]
    assert prof["measured"]["misses"]["steps"] == 8
    out = tmp_path / "reads.json"
    assert main(["calibrate", str(tiny_synth), "--samples", "2", "--miss-steps", "0", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["measured"]["misses"] is None
    assert got["timing"]["copy"] == got["measured"]["reads"]["read_seconds"]
    with pytest.raises(SystemExit, match="--miss-steps"):
        main(["calibrate", str(tiny_synth), "--miss-steps", "-1"])


def test_steal_during_calibration_is_recorded(tiny_synth, monkeypatch):
    """The share of CPU time the hypervisor gave other guests while calibrating goes into the
    profile, with a warning above 5%."""
    import fmoe.bench.cgroup as cgroup

    readings = iter([(1000, 10), (2000, 310)])          # 300 of 1000 ticks stolen
    monkeypatch.setattr(cgroup, "cpu_times", lambda stat="/proc/stat": next(readings))
    lines = []
    prof = calibrate(tiny_synth, samples=2, steps=2, miss_steps=2, out=lines.append)
    assert prof["measured"]["steal_fraction"] == pytest.approx(0.3)
    assert any("30% of the CPU time" in ln for ln in lines)
    readings = iter([(1000, 10), (2000, 20)])           # 1%: no warning
    lines.clear()
    prof = calibrate(tiny_synth, samples=2, steps=2, miss_steps=2, out=lines.append)
    assert prof["measured"]["steal_fraction"] == pytest.approx(0.01)
    assert not any("other guests" in ln for ln in lines)


def test_simulate_takes_the_model_shape_from_the_profile(profile, tmp_path, capsys):
    """Without --model or --model-config, the calibrated profile's model gives the shape (its
    config.json; the trace's first layers when the trace has more); a shape the profile was not
    measured with is refused by name."""
    path, prof = profile
    random_trace(tmp_path / "t.npz", tokens=(20, 20), layers=5)       # model "test/tiny": unknown
    run = ["simulate", "--trace", str(tmp_path / "t.npz"), "--policy", "lru", "--cache-fraction",
           "0.5", "--hardware", str(path), "--json", "--no-cache"]
    assert main(run) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["capacity"] == 8                 # 0.5 x 2 MoE layers x 8 experts
    assert main(run + ["--model", "deepseek-v2-lite"]) != 0
    assert "measured with 2 MoE layers x 8 experts" in capsys.readouterr().err


def test_calibrate_a_mixtral_checkpoint(tmp_path):
    import torch

    from fmoe.models.synthetic import write_random_checkpoint

    cfg = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
           "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 128}
    path = write_random_checkpoint(tmp_path / "mixtral", cfg, dtype=torch.float32, seed=0)
    prof = calibrate(path, samples=2, steps=2, out=lambda s: None)
    assert len(prof["timing"]["attn"]) == cfg["num_hidden_layers"]
    assert prof["model"]["model_type"] == "mixtral"


def test_more_samples_than_experts_keeps_one_cold_for_the_read_alone(tiny_synth, monkeypatch):
    """16 routed experts: 15 read side by side, the 16th alone (a second read of one already
    read is warm, which made the read alone, and the lanes from it, wrong)."""
    import fmoe.bench.calibrate as cal

    order = []
    real = cal.cold_store

    def spying(*a, **k):
        store, reader, files, n_all = real(*a, **k)
        read = store.read_into

        def read_into(key, *bufs):
            order.append(key)
            return read(key, *bufs)
        store.read_into = read_into
        return store, reader, files, n_all

    monkeypatch.setattr(cal, "cold_store", spying)
    lines = []
    prof = calibrate(tiny_synth, samples=100, steps=2, out=lines.append, miss_steps=0)
    assert prof["measured"]["reads"]["samples"] == 15
    assert len(order) == 16 and len(set(order)) == 16
    assert any("16 routed experts" in line for line in lines)


def test_out_replaces_only_a_profile(tiny_synth, tmp_path, capsys):
    """An existing --out is refused unless it is a hardware profile (it replaced a checkpoint's
    config.json)."""
    out = tmp_path / "config.json"
    out.write_text('{"model_type": "mixtral"}')
    assert main(["calibrate", str(tiny_synth), "--samples", "2", "--miss-steps", "0", "--out", str(out)]) == 1
    assert "not a hardware profile" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"model_type": "mixtral"}
    out.write_text(json.dumps({"format": "fmoe-hardware-profile", "version": 1}))
    assert main(["calibrate", str(tiny_synth), "--samples", "2", "--miss-steps", "0", "--out", str(out)]) == 0
    assert "timing" in json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]      # no temporary left
