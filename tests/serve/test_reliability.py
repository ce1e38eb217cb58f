"""`fmoe serve` as a real process under the failures that must not hurt anyone else: values that
cannot be sampled, read errors (with /health telling the truth and recovering), an 8 MB prompt,
small protocol edges, and SIGTERM during active streams."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from fmoe.serve import demo  # noqa: E402
from server_process import ServerProcess  # noqa: E402

KEY = "sekret"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("fmoe-cache"))
    return {"FMOE_CACHE": cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(env, tmp_path_factory):
    """A private copy of the demo checkpoint (the read-error test damages and repairs it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", env["FMOE_CACHE"])
        src = demo.demo_checkpoint()
    dst = tmp_path_factory.mktemp("ck") / "demo"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def server(ckpt, env):
    with ServerProcess(ckpt, "--expert-cache", "0.25", "--policy", "lru", "--max-batch", "4",
                       "--threads", "1", "--api-key", KEY, "--log-level", "warning", env=env) as srv:
        yield srv


def post(server, path, body, headers=AUTH, timeout=120):
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=timeout)


def completion(server, **kw):
    body = {"model": "demo", "prompt": "Offloading keeps", "max_tokens": 4, "temperature": 0}
    body.update(kw)
    return post(server, "/completions", body)


def error_of(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- defect 1: values that cannot be sampled are refused (they used to poison the batch) --------
@pytest.mark.parametrize("field, value", [("temperature", 1e-39), ("temperature", 5e-324),
                                          ("top_p", 1e-46)])
def test_unsamplable_values_get_400_and_nobody_else_suffers(server, field, value):
    bystander = []
    t = threading.Thread(target=lambda: bystander.append(completion(server, max_tokens=8)))
    t.start()
    err = error_of(completion(server, **{field: value}), 400)
    assert err["param"] == field and "float32" in err["message"]
    t.join()
    assert bystander[0].status_code == 200
    assert completion(server, temperature=1.2e-38).status_code == 200   # just above the smallest accepted


# -- defect 9: small ones ---------------------------------------------------------------------
def test_a_lone_surrogate_is_a_400_naming_the_problem(server):
    body = '{"model": "demo", "prompt": "abc \\ud800 def", "max_tokens": 2}'
    r = httpx.post(server.base_url + "/completions", content=body, timeout=60,
                   headers={**AUTH, "content-type": "application/json"})
    err = error_of(r, 400)
    assert "surrogate" in err["message"] and "Error" not in err["message"]
    body = '{"model": "demo", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    r = httpx.post(server.base_url + "/chat/completions", content=body, timeout=60,
                   headers={**AUTH, "content-type": "application/json"})
    assert "surrogate" in error_of(r, 400)["message"]


def test_top_logprobs_is_refused_like_every_unsupported_field(server):
    r = post(server, "/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                           "top_logprobs": 2, "max_tokens": 2})
    assert error_of(r, 400)["param"] == "top_logprobs"


@pytest.mark.parametrize("header", [f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"])
def test_the_auth_scheme_is_case_insensitive(server, header):
    assert completion(server).status_code == 200
    r = post(server, "/completions", {"model": "demo", "prompt": "x", "max_tokens": 1},
             headers={"authorization": header})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("header", [f"Basic {KEY}", "Bearer nope", KEY, ""])
def test_wrong_credentials_stay_refused(server, header):
    r = post(server, "/completions", {"model": "demo", "prompt": "x", "max_tokens": 1},
             headers={"authorization": header})
    assert r.status_code == 401


# -- defect 4: a big prompt is refused without freezing anyone -------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_an_8mb_prompt_is_refused_while_health_answers(server, path):
    assert completion(server).status_code == 200       # warm: RSS at its serving level
    before = rss_bytes(server.proc.pid)
    text = "lorem ipsum dolor sit amet " * (8 * 2 ** 20 // 27)
    body = ({"model": "demo", "prompt": text, "max_tokens": 4} if path == "/completions" else
            {"model": "demo", "messages": [{"role": "user", "content": text}], "max_tokens": 4})
    result = []
    t = threading.Thread(target=lambda: result.append(post(server, path, body)))
    latencies = []
    t.start()
    while t.is_alive() or not latencies:
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
    t.join()
    err = error_of(result[0], 400)
    assert err["code"] == "context_length_exceeded"
    assert "characters long" in err["message"] or "bytes long" in err["message"], err
    assert max(latencies) < 1.0, latencies
    after = rss_bytes(server.proc.pid)
    assert after - before < 100 * 2 ** 20, (before, after)
    assert completion(server).status_code == 200


# -- defect 2: a read error fails its requests, /health says so, repair recovers -------------
def test_read_errors_carry_their_cause_and_recover(server, ckpt):
    files = sorted(ckpt.glob("*.safetensors"))
    saved = {f: f.read_bytes() for f in files}
    try:
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(int.from_bytes(saved[f][:8], "little") + 8 + 64)
        # a prompt never seen: its experts are not all in the cache
        r = completion(server, prompt="The quick brown fox jumps over the lazy dog. Numbers: 0 1 2",
                       max_tokens=8)
        err = error_of(r, 500)
        assert "end of file" in err["message"] and ".safetensors" in err["message"], err
        assert err["message"].count("end of file") == 1
        h = httpx.get(server.url + "/health", timeout=30)
        assert h.status_code == 503 and "end of file" in h.json()["message"], h.text
        assert httpx.get(server.url + "/health", timeout=30).status_code == 503   # still broken
    finally:
        for f in files:
            with open(f, "r+b") as fh:
                fh.write(saved[f])
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert completion(server, prompt="The quick brown fox jumps over the lazy dog. Numbers: 0 1 2",
                      max_tokens=8).status_code == 200


# -- defect 3: SIGTERM ends every stream with an error event and [DONE], saves state, exits 0 --
def read_stream(url, body, out: list, started: threading.Event):
    lines = []
    try:
        with httpx.stream("POST", url, json=body, headers=AUTH, timeout=120) as r:
            out.append(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if line[6:] != "[DONE]" and json.loads(line[6:]).get("choices"):
                        started.set()
    except httpx.HTTPError as e:
        lines.append(f"!{type(e).__name__}")
    out.append(lines)


def running(srv) -> int:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return int(float(re.search(r"^fmoe_num_requests_running (\S+)$", text, re.M).group(1)))


# SIGINT takes the same path as SIGTERM (one handler): the default suite runs SIGTERM
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_during_streams(ckpt, env, tmp_path, sig):
    maps, trace = tmp_path / "maps.npz", tmp_path / "trace.npz"
    # a slow emulated link: these streams cannot finish before the signal, whatever the machine
    srv = ServerProcess(ckpt, "--expert-cache", "0.25", "--link-bandwidth", "20MB/s",
                        "--map-store", str(maps), "--trace-out", str(trace), "--shutdown-grace", "0.2",
                        "--threads", "1", "--api-key", KEY, "--log-level", "warning", env=env)
    srv.start()
    try:
        threads, outs = [], []
        for i, chat in enumerate([False, True, False]):
            started = threading.Event()
            out: list = []
            if chat:
                url = srv.base_url + "/chat/completions"
                body = {"model": "demo", "messages": [{"role": "user", "content": f"hello {i}"}],
                        "max_tokens": 900, "stream": True, "ignore_eos": True}
            else:
                url = srv.base_url + "/completions"
                body = {"model": "demo", "prompt": f"stream number {i}", "max_tokens": 900,
                        "stream": True, "ignore_eos": True}
            t = threading.Thread(target=read_stream, args=(url, body, out, started))
            t.start()
            assert started.wait(120), "a stream never started"
            threads.append(t)
            outs.append(out)
        blocking: list = []
        tb = threading.Thread(target=lambda: blocking.append(httpx.post(
            srv.base_url + "/completions", headers=AUTH, timeout=120,
            json={"model": "demo", "prompt": "a blocking one", "max_tokens": 900, "ignore_eos": True})))
        tb.start()
        deadline = time.monotonic() + 120
        while running(srv) < 4:                  # the blocking request is in the batch too
            assert time.monotonic() < deadline and tb.is_alive()
            time.sleep(0.1)
        srv.proc.send_signal(sig)
        for t in threads + [tb]:
            t.join(120)
        rc = srv.proc.wait(60)
        log = srv.output()
    finally:
        srv.close()
    assert rc == 0, log[-3000:]
    for status, lines in outs:
        assert status == 200
        assert lines[-1] == "[DONE]", lines[-3:]
        errors = [json.loads(x)["error"] for x in lines[:-1] if "error" in json.loads(x)]
        assert len(errors) == 1 and "shutting down" in errors[0]["message"], lines[-3:]
    r = blocking[0]                              # JSON, not a plain-text 500
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert maps.exists() and trace.exists(), log[-3000:]
    import numpy as np

    with np.load(trace, allow_pickle=False) as z:      # the streams' routing was recorded
        assert int(z["seq_offsets"][-1]) > 0
    assert signal.Signals(sig).name in log
