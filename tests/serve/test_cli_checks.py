"""The CLI checks what the server checks, before loading anything, and never destroys a file it
did not write; a fuzz of `fmoe generate` and the Python API over sampling values and lengths
never lets a traceback reach the user."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from fmoe.serve import demo
from fmoe.serve.cli import main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", str(tmp_path_factory.mktemp("fmoe-cache")))
        return demo.demo_checkpoint()


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, command: str = "generate") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fmoe {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "nan", "--temperature"), ("--temperature", "1e-40", "--temperature"),
    ("--temperature", "inf", "--temperature"), ("--top-p", "0", "--top-p"), ("--top-p", "nan", "--top-p"),
    ("--top-k", "-2", "--top-k"), ("--max-new-tokens", "-1", "--max-new-tokens"),
    ("--seed", str(2 ** 64), "--seed"),
])
def test_sampling_values_are_checked_before_loading(capsys, tmp_path, flag, value, needle):
    # the model path does not exist: the value is refused first, so nothing was loaded
    rc, out, err = run(capsys, "generate", str(tmp_path / "no-such-model"), "--prompt", "hi", flag, value)
    assert rc == 1 and out == ""
    assert needle in one_line_error(err)


def test_an_undecodable_prompt_is_refused_before_loading(capsys, tmp_path):
    rc, out, err = run(capsys, "generate", str(tmp_path / "none"), "--prompt", "abc\udcff")
    assert rc == 1 and out == "" and "not valid text" in one_line_error(err)


def test_more_tokens_than_the_context_is_refused_before_printing(capsys, ckpt):
    rc, out, err = run(capsys, "generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "1100")
    assert rc == 1 and out == ""            # the prompt is not echoed before the error
    assert "context of 1024" in one_line_error(err)


def test_cache_flags_without_a_cache_are_refused(capsys, ckpt):
    rc, out, err = run(capsys, "generate", str(ckpt), "--prompt", "Hello", "--link-bandwidth", "25GB/s")
    assert rc == 1 and "needs --expert-cache" in one_line_error(err)


def test_policy_and_trace_out_without_a_cache_run(capsys, ckpt, tmp_path):
    """The contract's `fmoe generate MODEL --prompt TEXT [--expert-cache X] [--policy P]`: a
    policy without a cache runs, with a note that it changes nothing; --trace-out records
    through a cache of every expert (the output is the resident model's)."""
    from fmoe.trace import load_trace

    base = ["generate", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "3"]
    rc, plain, _ = run(capsys, *base)
    rc, out, err = run(capsys, *base, "--policy", "lru")
    assert rc == 0 and out == plain and "--policy lru changes nothing" in err
    rc, out, err = run(capsys, *base, "--trace-out", str(tmp_path / "t.npz"))
    assert rc == 0 and out == plain and "every expert" in err
    assert load_trace(tmp_path / "t.npz").num_tokens > 0


# -- --map-store never overwrites what fmoe did not write --------------------------------------
def chat(capsys, monkeypatch, ckpt, store):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    return run(capsys, "chat", str(ckpt), "--expert-cache", "0.25", "--map-store", str(store))


def test_map_store_refuses_a_users_file(capsys, monkeypatch, ckpt, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis notes\n")
    rc, _, err = chat(capsys, monkeypatch, ckpt, notes)
    assert rc == 1 and "not an fmoe expert-map store" in one_line_error(err, "chat")
    assert "pickle" not in err
    assert notes.read_text() == "my thesis notes\n"


def test_map_store_refuses_another_models_store(capsys, monkeypatch, ckpt, tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, format=np.int64(1), shape=np.array([26, 64, 2048]), maps=np.zeros((0, 26, 64)),
             sem=np.zeros((0, 2048)))
    before = other.read_bytes()
    rc, _, err = chat(capsys, monkeypatch, ckpt, other)
    assert rc == 1 and "26 MoE layers x 64 experts" in one_line_error(err, "chat")
    assert other.read_bytes() == before


def test_map_store_is_written_and_reread(capsys, monkeypatch, ckpt, tmp_path):
    store = tmp_path / "maps.npz"
    assert chat(capsys, monkeypatch, ckpt, store)[0] == 0
    assert store.exists()
    assert chat(capsys, monkeypatch, ckpt, store)[0] == 0      # its own store is accepted


# -- fuzz: no traceback ever reaches the user --------------------------------------------------
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1e-45, 1e-39, 1.2e-38, 1e-30, 1e-8, 0.5, 1.0, 2.0, -0.0, 1e308]))
ints = st.one_of(st.integers(-5, 8), st.sampled_from([1100, 2 ** 31, 2 ** 64, -2 ** 63 - 1]))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(temperature=floats, top_p=floats, top_k=ints, max_new=ints, seed=st.one_of(st.none(), ints),
       prompt=st.text(min_size=0, max_size=40))
def test_fuzz_generate_cli(capsys, ckpt, temperature, top_p, top_k, max_new, seed, prompt):
    argv = ["generate", str(ckpt), f"--prompt={prompt}", f"--temperature={temperature!r}",
            f"--top-p={top_p!r}", f"--top-k={top_k}", f"--max-new-tokens={max_new}"]
    if seed is not None:
        argv.append(f"--seed={seed}")
    try:
        rc, out, err = run(capsys, *argv)
    except SystemExit as e:              # argparse refusing a value: its usage line, exit 2
        err = capsys.readouterr().err
        assert e.code == 2 and "Traceback" not in err
        return
    assert "Traceback" not in out + err
    if rc:
        assert rc == 1
        one_line_error(err)
    else:
        ok = (math.isfinite(temperature) and temperature >= 0 and
              (temperature == 0 or temperature >= 1.1754943508222875e-38) and
              math.isfinite(top_p) and 1.1754943508222875e-38 <= top_p <= 1)
        assert ok and top_k >= 0 and 0 <= max_new


@pytest.fixture(scope="module")
def api_model(ckpt):
    import fmoe

    return fmoe.models.from_pretrained(ckpt, expert_cache=0.25, policy="lru")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(temperature=floats, top_p=floats, top_k=ints, max_new=ints, seed=st.one_of(st.none(), ints),
       prompt=st.lists(st.integers(-3, 520), min_size=0, max_size=6))
def test_fuzz_python_api(api_model, temperature, top_p, top_k, max_new, seed, prompt):
    """Bad values raise ValueError naming the problem before any work; good ones generate."""
    ids = torch.tensor([prompt], dtype=torch.long).reshape(1, len(prompt))
    try:
        out = api_model.generate(ids, max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=seed, eos_token_id=[])
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert out.shape == (1, len(prompt) + max_new)
    assert int(out.min()) >= 0 and int(out.max()) < 512
