"""The `fmoe` console script: demo and generate, end to end in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fmoe
from fmoe.serve import demo


def fmoe_cli(*args, env=None, timeout=300):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "fmoe.serve.cli", *args], capture_output=True,
                          text=True, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fmoe-cache"))


def test_demo_prints_text_and_is_lossless(demo_cache):
    r = fmoe_cli("demo", "--max-new-tokens", "12", env={"FMOE_CACHE": demo_cache})
    assert r.returncode == 0, r.stderr
    assert "text:" in r.stdout and "tokens/s" in r.stdout
    assert "lossless: yes" in r.stdout
    assert "hit rate" in r.stdout


def test_generate_streams_same_tokens_as_api(demo_cache, monkeypatch):
    monkeypatch.setenv("FMOE_CACHE", demo_cache)
    path = demo.demo_checkpoint()
    prompt = "The quick brown fox"
    r = fmoe_cli("generate", str(path), "--prompt", prompt, "--max-new-tokens", "10",
                 "--expert-cache", "0.25", "--policy", "lfu", "--stats")
    assert r.returncode == 0, r.stderr
    model = fmoe.models.from_pretrained(path)
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    out = model.generate(ids, max_new_tokens=10)
    want = prompt + model.tokenizer.decode(out[0, ids.shape[1]:].tolist())
    assert r.stdout.rstrip("\n") == want
    assert "'capacity': 8" in r.stderr


def test_chat_template_renders(demo_cache, monkeypatch):
    monkeypatch.setenv("FMOE_CACHE", demo_cache)
    model = fmoe.models.from_pretrained(demo.demo_checkpoint())
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == model.tokenizer.bos_token_id
    assert model.tokenizer.decode(model.tokenizer.encode("fox jumps")) == "fox jumps"


@pytest.mark.parametrize("args,needle", [
    (["--expert-cache", "1B"], "holds no expert"),
    (["--expert-cache", "2.5"], "fraction must be in"),
    (["--policy", "nope", "--expert-cache", "0.5"], "unknown policy"),
    (["--max-new-tokens", "-3"], "max-new-tokens"),
    (["--dtype", "float8"], "unknown dtype"),
])
def test_generate_bad_flags(demo_cache, monkeypatch, args, needle):
    monkeypatch.setenv("FMOE_CACHE", demo_cache)
    path = demo.demo_checkpoint()
    r = fmoe_cli("generate", str(path), "--prompt", "x", *args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """SIGTERM in the middle of `fmoe synth` removes the partial directory, then ends the process
    as the signal does (Python's default action ended it at once and left gigabytes behind)."""
    import signal
    import subprocess
    import sys

    script = f"""
import os, signal, sys, time
import fmoe.models.synthetic as synthetic
from fmoe.serve.cli import main

def write(tmp, *a, **k):
    with open(os.path.join(tmp, "model-00001.safetensors"), "wb") as f:
        f.write(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)          # the handler interrupts this

synthetic.write_random_checkpoint = write
sys.exit(main(["synth", "deepseek-v2-lite", {str(tmp_path / 'out')!r}, "--layers", "2", "--quiet"]))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGTERM, r.stderr      # cleaned up, then ended by the signal
    assert "terminated" in r.stderr
    assert list(tmp_path.iterdir()) == []          # neither the target nor a partial directory
    # an ignored SIGTERM (a supervisor's choice, inherited) stays ignored
    ignored = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + script
    r = subprocess.run([sys.executable, "-c", ignored.replace("time.sleep(30)", "time.sleep(0.1)")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "terminated" not in r.stderr, r.stderr
