"""`fmoe bench` and `fmoe calibrate` refuse bad options with one line naming the flag, before the
model is loaded or anything is measured (the load and the measurement are patched to fail
loudly here: a check that came after them would show their message instead)."""

from __future__ import annotations

import json

import pytest

import fmoe.bench.calibrate
import fmoe.models
from bench_helpers import random_trace
from fmoe.serve.cli import main


@pytest.fixture
def no_load(monkeypatch):
    """`from_pretrained` that fails: the checks must have refused before it."""
    def load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fmoe.models, "from_pretrained", load)


@pytest.fixture
def no_measure(monkeypatch):
    def measure(*a, **kw):
        raise AssertionError("the measurement ran")

    monkeypatch.setattr(fmoe.bench.calibrate, "calibrate", measure)


def _refused(capsys, argv, *words):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was loaded" not in err[0] and "measurement ran" not in err[0], err
    for w in words:
        assert w in err[0], err


def test_bench_refuses_more_tokens_than_the_context(tiny_synth, tmp_path, capsys, no_load):
    # the tiny config's max_position_embeddings is 512
    _refused(capsys, ["bench", str(tiny_synth), "--prompt-tokens", "500", "--new-tokens", "13"],
             "--prompt-tokens 500", "--new-tokens 13", "context of 512")
    # a replayed sequence runs one position per token too; --max-tokens caps it
    random_trace(tmp_path / "long.npz", tokens=(600, 5), layers=2)
    _refused(capsys, ["bench", str(tiny_synth), "--routing-trace", str(tmp_path / "long.npz")],
             "--routing-trace", "600 tokens", "context of 512")
    with pytest.raises(AssertionError, match="was loaded"):
        main(["--debug", "bench", str(tiny_synth), "--routing-trace", str(tmp_path / "long.npz"),
              "--max-tokens", "512"])
    with pytest.raises(AssertionError, match="was loaded"):
        main(["--debug", "bench", str(tiny_synth), "--prompt-tokens", "500", "--new-tokens", "12"])


def test_bench_policy_needs_a_cache(tiny_synth, capsys, no_load):
    _refused(capsys, ["bench", str(tiny_synth), "--prefetch-distance", "2"],
             "--prefetch-distance needs --expert-cache")
    # memory-mapped experts: no managed cache either (the policy was silently unused)
    _refused(capsys, ["bench", str(tiny_synth), "--expert-cache", "mmap", "--policy", "lru"],
             "--policy needs a managed --expert-cache", "mmap")
    _refused(capsys, ["bench", str(tiny_synth), "--expert-cache", "mmap", "--execution", "host"],
             "--execution host needs a managed --expert-cache")


def test_bench_policy_field(tiny_synth, capsys):
    """Resident: `policy` is null (stderr says resident); a cache without --policy: fmoe."""
    run = ["bench", str(tiny_synth), "--prompt-tokens", "4", "--new-tokens", "2", "--json"]
    assert main(run) == 0
    got = capsys.readouterr()
    assert json.loads(got.out.strip().splitlines()[-1])["policy"] is None and "policy=resident" in got.err
    assert main(run + ["--expert-cache", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["policy"] == "fmoe"
    assert main(run + ["--expert-cache", "mmap"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out.strip().splitlines()[-1])["policy"] is None and "policy=page cache" in got.err


def test_bench_threads_at_least_one(tiny_synth, capsys, no_load):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tiny_synth), "--threads", "0"])
    assert e.value.code == 2 and "--threads: must be >= 1, got 0" in capsys.readouterr().err


def test_bench_checks_the_hardware_profile_before_loading(tiny_synth, tmp_path, capsys, no_load):
    cache = ["--expert-cache", "0.5"]
    _refused(capsys, ["bench", str(tiny_synth), *cache, "--hardware-profile", str(tiny_synth / "config.json")],
             "--hardware-profile", "config.json", "not an fmoe hardware profile")
    _refused(capsys, ["bench", str(tiny_synth), *cache, "--hardware-profile", str(tmp_path / "nope.json")],
             "--hardware-profile", "nope.json", "cannot read")
    # also where the policy does not read it (lru with load execution)
    _refused(capsys, ["bench", str(tiny_synth), *cache, "--policy", "lru", "--hardware-profile",
                      str(tmp_path / "nope.json")], "--hardware-profile", "nope.json")


def test_from_pretrained_names_a_bad_hardware_profile(tiny_synth, tmp_path):
    """The Python API: a ValueError naming the argument, not a KeyError 'timing'."""
    from fmoe.runtime.offload import profile_seconds

    with pytest.raises(ValueError, match=r"hardware_profile .*config\.json.*fmoe calibrate"):
        fmoe.models.from_pretrained(tiny_synth, expert_cache=0.5,
                                    hardware_profile=str(tiny_synth / "config.json"))
    with pytest.raises(ValueError, match=r"hardware_profile .*nope\.json.*cannot read"):
        fmoe.models.from_pretrained(tiny_synth, expert_cache=0.5, hardware_profile=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="hardware_profile: not a profile"):
        profile_seconds({"attn": 0.1}, 2)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bench_max_tokens_at_least_one(tiny_synth, tmp_path, capsys, no_load, value):
    random_trace(tmp_path / "t.npz", tokens=(5, 5), layers=2)
    _refused(capsys, ["bench", str(tiny_synth), "--routing-trace", str(tmp_path / "t.npz"),
                      "--max-tokens", value], f"--max-tokens must be >= 1, got {value}")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_calibrate_samples_at_least_one(tiny_synth, capsys, no_measure, value):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(tiny_synth), "--samples", value])
    assert e.value.code == 2 and f"--samples: must be >= 1, got {value}" in capsys.readouterr().err


def test_calibrate_checks_out_before_measuring(tiny_synth, tmp_path, capsys, no_measure):
    _refused(capsys, ["calibrate", str(tiny_synth), "--out", str(tmp_path / "nodir" / "p.json")],
             "--out", "nodir")
    _refused(capsys, ["calibrate", str(tiny_synth), "--out", str(tmp_path)], "--out", "is a directory")
    (tmp_path / "afile").write_text("")
    _refused(capsys, ["calibrate", str(tiny_synth), "--out", str(tmp_path / "afile" / "p.json")], "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]       # the probe left nothing


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_calibrate_out_in_an_unwritable_directory(tiny_synth, capsys, no_measure):
    # /proc takes no new file, whoever asks (permission bits would not tell for root)
    _refused(capsys, ["calibrate", str(tiny_synth), "--out", "/proc/p.json"], "--out /proc/p.json",
             "cannot write in '/proc'")


def _profile(model: dict) -> dict:
    return {"format": "fmoe-hardware-profile", "version": 1, "model": model,
            "timing": {"attn": [0.001, 0.001], "expert": 0.0005, "copy": 0.002, "lanes": 1}}


def test_a_hardware_profile_where_nothing_reads_it_or_of_another_model_is_refused(tiny_synth):
    """`hardware_profile` with policy 'lru' and load execution changed nothing, silently; a
    profile measured with another model's shape gave its times to this one."""
    cfg = json.loads((tiny_synth / "config.json").read_text())
    mine = {"num_layers": 2, "num_experts": cfg["n_routed_experts"], "hidden": cfg["hidden_size"],
            "inter": cfg["moe_intermediate_size"]}
    with pytest.raises(ValueError, match="policy='fmoe'.*would change nothing"):
        fmoe.models.from_pretrained(tiny_synth, expert_cache=0.5, policy="lru",
                                    hardware_profile=_profile(mine))
    with pytest.raises(ValueError, match="measured with another model"):
        fmoe.models.from_pretrained(tiny_synth, expert_cache=0.5,
                                    hardware_profile=_profile({**mine, "num_experts": 32}))
    for kw in (dict(), dict(policy="lru", execution="host")):        # read by both
        fmoe.models.from_pretrained(tiny_synth, expert_cache=0.5, hardware_profile=_profile(mine),
                                    **kw).close()


@pytest.mark.parametrize("argv, words", [
    (["--expert-cache", "0.5", "--prefetch-distance", "0"], ["--prefetch-distance", "must be >= 1"]),
    (["--max-tokens", "4"], ["--max-tokens", "needs --routing-trace"]),
    (["--seed", str(2 ** 64)], ["--seed", "must be in"]),
])
def test_bench_flags_refused_before_loading(tiny_synth, capsys, no_load, argv, words):
    try:
        code = main(["bench", str(tiny_synth), *argv])
    except SystemExit as e:                     # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and "was loaded" not in err and all(w in err for w in words), err


def test_bench_model_after_policy_options(tiny_synth, capsys, no_load):
    """`--policy-option K=V ...` takes every value up to the next flag: a MODEL after it is
    still the model (it was swallowed: 'the following arguments are required: model')."""
    with pytest.raises(AssertionError, match="was loaded"):
        main(["--debug", "bench", "--expert-cache", "0.5", "--policy-option", "max_orders=1",
              str(tiny_synth)])
    with pytest.raises(SystemExit) as e:
        main(["bench", "--policy-option", "max_orders=1"])
    assert e.value.code == 2 and "required: model" in capsys.readouterr().err
