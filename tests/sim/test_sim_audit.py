"""Regression tests for the simulator audit (each failed on the code before its fix)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmoe.sim.__main__ import main
from fmoe.sim.replay import simulate
from fmoe.sim.timing import TimingModel
from fmoe.sim.trace import Trace, write_trace
from sim_helpers import synthetic_ids


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 1. the disk cache's key covers the routing's shape ------------------------------------

def _same_bytes_two_shapes():
    """One int16 buffer read as expert_ids [200, 4, 6] and as [200, 2, 12] (E = 64)."""
    rng = np.random.default_rng(0)
    rows = np.stack([rng.permutation(64)[:24] for _ in range(200)]).astype(np.int16)  # [200, 24]
    offs = np.array([0, 100, 200], dtype=np.int64)
    a = Trace(expert_ids=rows.reshape(200, 4, 6), seq_offsets=offs, num_experts=64, model="t/a")
    b = Trace(expert_ids=rows.reshape(200, 2, 12), seq_offsets=offs, num_experts=64, model="t/a")
    return a, b


def test_fingerprint_covers_shape_and_dtype():
    a, b = _same_bytes_two_shapes()
    assert a.expert_ids.tobytes() == b.expert_ids.tobytes()
    assert a.fingerprint() != b.fingerprint()
    # the same values under another dtype are other bytes anyway; the dtype is in the key too
    c = Trace(expert_ids=a.expert_ids.astype(np.int32), seq_offsets=a.seq_offsets,
              num_experts=64, model="t/a")
    assert c.fingerprint() != a.fingerprint()
    same = Trace(expert_ids=a.expert_ids.copy(), seq_offsets=a.seq_offsets.copy(),
                 num_experts=64, model="other/name")
    assert same.fingerprint() == a.fingerprint()        # content, not names


def test_cached_access_sequence_not_shared_across_shapes():
    """The second trace read the first's cached access sequence: 'belady: use of key 47 at
    position 6 does not follow the trace'."""
    a, b = _same_bytes_two_shapes()
    tm = TimingModel(copy=1e-3)
    ra = simulate(a, "belady", tm, capacity=48)
    rb = simulate(b, "belady", tm, capacity=48)
    fresh = simulate(b, "belady", tm, capacity=48, use_cache=False)
    assert ra.hits + ra.misses == 200 * 24 and rb.hits + rb.misses == 200 * 24
    assert (rb.hits, rb.misses) == (fresh.hits, fresh.misses)


# -- 2, 3. host-computed uses in the text output; host_ms -----------------------------------

@pytest.fixture
def trace_path(tmp_path):
    ids = synthetic_ids(120, 3, 8, 2, seed=4)
    return write_trace(tmp_path / "tiny.npz", expert_ids=ids, seq_offsets=[0, 40, 90, 120],
                       num_experts=8, model="test/tiny-moe", texts=["a", "b", "c"])


def test_host_text_output_names_host_uses(capsys, trace_path, tiny_config):
    """`--execution host` printed 'hit rate 0.96 (9881 hits, 416 misses, 0 late)' and nothing
    of the uses computed on the host, which are neither hits nor misses."""
    argv = ["--trace", trace_path, "--policy", "lru", "--cache-fraction", "0.25",
            "--model-config", tiny_config, "--execution", "host"]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    d = json.loads(out.strip().splitlines()[-1])
    assert d["host_computed"] > 0
    device = d["hits"] + d["misses"]
    assert device + d["host_computed"] == 120 * 3 * 2
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert f"{device} uses on the device" in lines["hit"]
    assert f"{d['host_computed']} uses computed on the host" in lines["host"]
    assert "not in the hit rate" in lines["host"]


def test_load_text_output_unchanged(capsys, trace_path, tiny_config):
    code, out, err = run_cli(capsys, "--trace", trace_path, "--policy", "lru",
                             "--cache-fraction", "0.25", "--model-config", tiny_config)
    assert code == 0, err
    assert not any(ln.startswith("host") for ln in out.splitlines())
    assert "uses on the device" not in out


def test_host_ms_doc_matches_json(capsys, trace_path, tiny_config):
    """docs/simulator.md said host_ms is '0 under load'; it is the timing model's time for one
    routed expert on the host, reported under every execution."""
    from pathlib import Path

    code, out, err = run_cli(capsys, "--trace", trace_path, "--policy", "lru",
                             "--cache-fraction", "0.25", "--model-config", tiny_config, "--json")
    assert code == 0, err
    d = json.loads(out.strip().splitlines()[-1])
    assert d["execution"] == "load" and d["host_computed"] == 0
    assert d["host_ms"] == pytest.approx(d["expert_bytes"] / 40e9 * 1e3)   # rtx3090's host_bw
    doc = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text()
    assert "`host_ms` (0 under `load`)" not in doc
    row = [ln for ln in doc.splitlines() if ln.startswith("| `host_ms` |")]
    assert len(row) == 1 and "every execution" in row[0] and "0 under" not in row[0]


# -- 6. what a recorded trace replays to; the docs say when counts match --------------------

def _record(tmp_path, ckpt, prompt_len: int, cache: int = 4):
    import torch

    import fmoe
    from fmoe.sim.trace import load_trace

    path = tmp_path / f"live{prompt_len}.npz"
    model = fmoe.models.from_pretrained(ckpt, expert_cache=cache, policy="lru", trace_path=path)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        model.generate(torch.randint(3, 128, (1, prompt_len), generator=g), max_new_tokens=10,
                       eos_token_id=[])
    live = model.expert_stats()
    model.close()
    return load_trace(path), live


def test_one_token_prompts_replay_to_live_counts(tmp_path, mixtral_ckpt):
    trace, live = _record(tmp_path, mixtral_ckpt[0], prompt_len=1)
    sim = simulate(trace, "lru", TimingModel(copy=1e-3), capacity=4, use_cache=False)
    assert (sim.hits, sim.misses) == (live["hits"], live["misses"])
    assert live["misses"] > 0 and live["hits"] > 0


def test_multi_token_prompt_is_one_pass_live_and_per_token_in_the_replay(tmp_path, mixtral_ckpt):
    """docs/simulator.md said a recorded trace replays to the runtime's counts without a
    condition. A live prefill takes each layer's experts once for all the prompt's tokens; the
    replay takes the recorded prompt one token at a time (its semantics stay: published figures
    depend on them). Pins both sides of the documented condition."""
    trace, live = _record(tmp_path, mixtral_ckpt[0], prompt_len=6)
    sim = simulate(trace, "lru", TimingModel(copy=1e-3), capacity=4, use_cache=False)
    uses = int((trace.expert_ids >= 0).sum())
    assert sim.hits + sim.misses == uses                   # one hit or miss per recorded use
    prompt = trace.phase == 0
    assert prompt.sum() == 3 * 6
    # live: one forward pass per prompt, each layer's distinct experts counted once
    per_pass = sum(len(np.unique(trace.expert_ids[trace.sequence(n)][prompt[trace.sequence(n)], l]))
                   for n in range(trace.num_sequences) for l in range(trace.num_layers))
    decode = int((trace.expert_ids[~prompt] >= 0).sum())
    assert live["hits"] + live["misses"] == per_pass + decode < uses
    assert (sim.hits, sim.misses) != (live["hits"], live["misses"])


def test_simulator_doc_states_when_counts_match():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text()
    flat = " ".join(doc.split())
    assert "own hit and miss counts **when every forward pass was one token**" in flat
    assert "A live prefill of a multi-token prompt is one forward pass" in flat
    assert "Missed experts are always loaded, never computed on the CPU" not in flat
    concepts = " ".join((Path(__file__).resolve().parents[2] / "docs" / "concepts.md")
                        .read_text().split())
    assert "records one from any live run" not in concepts
    assert "without an `expert_cache` the run goes through a cache of every expert" in concepts


def test_trace_path_records_through_a_cache_of_every_expert(tmp_path, mixtral_ckpt):
    """What docs/concepts.md now says: without an expert cache, trace_path records through a
    cache of every expert (as the contract has fmoe record traces from live runs); with mmap it
    is refused; expert_cache=1.0 records."""
    import torch

    import fmoe
    from fmoe.trace import load_trace

    with pytest.raises(ValueError, match="trace_path needs a managed expert cache"):
        fmoe.models.from_pretrained(mixtral_ckpt[0], expert_cache="mmap", trace_path=tmp_path / "m.npz")
    m = fmoe.models.from_pretrained(mixtral_ckpt[0], trace_path=tmp_path / "none.npz")
    assert m.expert_stats()["capacity"] == 16
    m.generate(torch.tensor([[5, 6, 7]]), 3, eos_token_id=[])
    m.close()
    assert load_trace(tmp_path / "none.npz").num_tokens == 5
    # ... unless they do not fit in memory (the run would be killed and the trace lost)
    import fmoe.runtime.memory as memory
    from fmoe.runtime.memory import MemoryLimit

    real = memory.memory_limit
    memory.memory_limit = lambda: MemoryLimit(2**16, 0, "test")
    try:
        with pytest.raises(ValueError, match="do not fit.*expert_cache='auto'"):
            fmoe.models.from_pretrained(mixtral_ckpt[0], trace_path=tmp_path / "big.npz")
    finally:
        memory.memory_limit = real
    trace, live = _record(tmp_path, mixtral_ckpt[0], prompt_len=1, cache=1.0)
    used = {(l, int(e)) for l in range(trace.num_layers) for e in np.unique(trace.expert_ids[:, l])}
    assert trace.num_tokens == 30 and live["misses"] == len(used)     # each loaded once, kept


# -- 7. small CLI checks -------------------------------------------------------------------

def test_empty_hardware_is_an_error(capsys, trace_path, tiny_config):
    """`--hardware ""` ran under the default profile (rtx3090-pcie4) without a word."""
    for value in ("", " , "):
        code, out, err = run_cli(capsys, "--trace", trace_path, "--policy", "lru",
                                 "--cache-fraction", "0.25", "--model-config", tiny_config,
                                 "--hardware", value, "--json")
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "--hardware" in err and "empty" in err


@pytest.mark.parametrize("value", ["0", "0GiB", "-1", "0.0001KB"])
def test_calibrate_memory_limit_must_be_positive(capsys, mixtral_ckpt, value):
    """`--memory-limit 0` said "cannot parse byte size '0'"."""
    from fmoe.serve.cli import main as fmoe_main

    with pytest.raises(SystemExit) as exc:
        fmoe_main(["calibrate", str(mixtral_ckpt[0]), "--memory-limit", value])
    assert "--memory-limit must be a positive size" in str(exc.value)
    assert "cannot parse" not in str(exc.value)
    assert "cold reads" not in capsys.readouterr().err


def test_calibrate_checks_the_model_directory_first(capsys, tmp_path):
    """`fmoe calibrate DIR` without a config.json printed 'cold reads of 48 experts ...' before
    failing on the missing config."""
    from fmoe.serve.cli import main as fmoe_main

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for where, words in (("empty", "empty/config.json: missing"),
                         ("nope", "nope: no such directory"),
                         ("file", "file: not a directory")):
        code = fmoe_main(["calibrate", str(tmp_path / where), "--samples", "2"])
        err = capsys.readouterr().err
        assert code != 0 and words in err, err
        assert "cold reads" not in err and err.count("\n") == 1


def test_submodules_stay_reachable_as_attributes():
    import fmoe.sim

    assert fmoe.sim.replay.simulate is fmoe.sim.simulate
    assert fmoe.sim.trace.load_trace is fmoe.sim.load_trace
    with pytest.raises(AttributeError):
        getattr(fmoe.sim, "no_such_thing")  # noqa: B009
