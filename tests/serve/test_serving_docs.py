"""docs/serving.md's openai snippet runs as written against the demo server, and the error
table's claims about empty prompts and the body limit hold."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from fmoe.serve import demo  # noqa: E402
from server_process import ServerProcess  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"FMOE_CACHE": str(tmp_path_factory.mktemp("fmoe-cache")), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", env["FMOE_CACHE"])
        ckpt = demo.demo_checkpoint()
    with ServerProcess(ckpt, "--threads", "1", "--log-level", "warning", env=env) as srv:
        yield srv


def test_the_openai_snippet_runs_against_the_demo_server(server):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (snippet,) = [b for b in blocks if "from openai import OpenAI" in b]
    assert "http://127.0.0.1:8000/v1" in snippet
    code = snippet.replace("http://127.0.0.1:8000/v1", server.base_url)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), scope)
    assert scope["model"] == "demo-mixtral-v1"
    r = scope["r"]
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert out.getvalue().strip() == r.choices[0].message.content.strip()


def test_an_empty_prompt_is_a_400(server):
    r = httpx.post(server.base_url + "/completions", json={"model": "demo-mixtral-v1", "prompt": ""},
                   timeout=60)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_a_body_over_32_mib_is_a_413(server):
    body = b'{"model": "demo-mixtral-v1", "prompt": "' + b"a" * (33 << 20) + b'"}'
    r = httpx.post(server.base_url + "/completions", content=body, timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "32 MiB" in r.json()["error"]["message"]
