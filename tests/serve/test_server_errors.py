"""`fmoe serve` under bad input: malformed JSON, missing fields, wrong types, out-of-range values,
over-long prompts, unknown models answer 4xx with a message and the server stays up (including a
property-based fuzz over request bodies); a full queue answers 503; bad start-up flags print one
line and exit non-zero."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fmoe.serve import demo  # noqa: E402
from server_process import ServerProcess  # noqa: E402

CTX = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("fmoe-cache"))
    return {"FMOE_CACHE": cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ckpt(env):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CACHE", env["FMOE_CACHE"])
        return demo.demo_checkpoint()


@pytest.fixture(scope="module")
def server(ckpt, env):
    with ServerProcess(ckpt, "--max-batch", "2", "--max-queue", "2", "--max-model-len", str(CTX),
                       "--threads", "1", "--log-level", "warning", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def name(server):
    return httpx.get(server.base_url + "/models").json()["data"][0]["id"]


def post(server, path, body, raw=False, timeout=60):
    content = body if raw else json.dumps(body)
    return httpx.post(server.base_url + path, content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


def assert_error(r, status, needle=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert needle.lower() in err["message"].lower(), err["message"]
    return err


def test_model_name_defaults_to_the_directory_name(name, ckpt):
    assert name == ckpt.name


BAD_COMPLETIONS = [
    # (body, status, needle)
    ({"prompt": "x"}, 400, "model"),
    ({"model": "M"}, 400, "prompt"),
    ({"model": "M", "prompt": 5}, 400, "prompt must be"),
    ({"model": "M", "prompt": [1, "a"]}, 400, "prompt must be"),
    ({"model": "M", "prompt": []}, 400, "prompt must be"),
    ({"model": "M", "prompt": [[]]}, 400, "prompt must be"),
    ({"model": "M", "prompt": [10 ** 6]}, 400, "vocabulary"),
    ({"model": "M", "prompt": [-1]}, 400, "vocabulary"),
    ({"model": "M", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "M", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "M", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "M", "prompt": "x", "max_tokens": -1}, 400, "max_tokens must be at least 1"),
    ({"model": "M", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"model": "M", "prompt": "x", "max_tokens": 10 ** 30}, 400, "maximum context length"),
    ({"model": "M", "prompt": "x", "max_tokens": CTX}, 400, "maximum context length"),
    ({"model": "M", "prompt": "word " * 400, "max_tokens": 1}, 400, "maximum context length"),
    ({"model": "M", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "M", "prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"model": "M", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": "M", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "M", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "M", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "M", "prompt": "x", "n": 1000}, 400, "n"),
    ({"model": "M", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "M", "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": "M", "prompt": "x", "stop": ["a"] * 40}, 400, "stop"),
    ({"model": "M", "prompt": "x", "seed": "x"}, 400, "seed"),
    ({"model": "M", "prompt": "x", "seed": 2 ** 70}, 400, "seed"),
    ({"model": "M", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": "M", "prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"model": "M", "prompt": "x", "stream_options": {"include_usage": "yes"}}, 400, "include_usage"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": 5, "prompt": "x"}, 400, "model"),
]


@pytest.mark.parametrize("body,status,needle", BAD_COMPLETIONS,
                         ids=[f"{i}-{json.dumps(b)[:40]}" for i, (b, _, _) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_requests(server, name, body, status, needle):
    body = {k: (name if k == "model" and v == "M" else v) for k, v in body.items()}
    assert_error(post(server, "/completions", body), status, needle)


BAD_CHAT = [
    ({"model": "M"}, 400, "messages"),
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": "hi"}, 400, "messages"),
    ({"model": "M", "messages": [{"content": "hi"}]}, 400, "role"),
    ({"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "content"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10 ** 9},
     400, "maximum context length"),
    ({"model": "M", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "maximum context length"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"model": "x/y", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
]


@pytest.mark.parametrize("body,status,needle", BAD_CHAT,
                         ids=[f"{i}-{json.dumps(b)[:40]}" for i, (b, _, _) in enumerate(BAD_CHAT)])
def test_bad_chat_requests(server, name, body, status, needle):
    body = {k: (name if k == "model" and v == "M" else v) for k, v in body.items()}
    assert_error(post(server, "/chat/completions", body), status, needle)


@pytest.mark.parametrize("raw", [b"{bad", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe",
                                 b'{"model": "m", "prompt": "x", "temperature": NaN}', b"[" * 100000])
def test_malformed_bodies(server, raw):
    for path in ("/completions", "/chat/completions"):
        r = post(server, path, raw, raw=True)
        assert_error(r, 400)


def test_oversized_body_is_refused(server):
    assert_error(post(server, "/completions", b"x" * (33 << 20), raw=True), 413, "larger than")


def test_wrong_method_and_unknown_route(server):
    assert_error(httpx.get(server.base_url + "/completions"), 405)
    assert_error(httpx.get(server.url + "/nowhere"), 404)


def test_openai_client_sees_typed_errors(server, name):
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=name, prompt="hi", max_tokens=10 ** 6)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    r = client.completions.create(model=name, prompt="hi", max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_the_server_is_still_up(server, name):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = post(server, "/completions", {"model": name, "prompt": "hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_model_name_that_is_not_unicode_is_a_404(server):
    # the message repeats the name: a lone surrogate must still encode (as an escape)
    for path, extra in (("/completions", {"prompt": "x"}),
                        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        err = assert_error(post(server, path, {"model": "\ud800x", **extra}), 404, "does not exist")
        assert err["code"] == "model_not_found"


def test_a_405_names_the_allowed_method(server):
    r = httpx.get(server.base_url + "/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers


def test_more_sequences_than_the_queue_is_a_400(server, name):
    # --max-queue 2: three choices can never be queued, so "retry later" (503) would be wrong
    err = assert_error(post(server, "/completions", {"model": name, "prompt": "x", "max_tokens": 1,
                                                    "n": 3}), 400, "at most 2")
    assert err["param"] == "n"


@pytest.mark.parametrize("body,needle,param", [
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream_options"),
    ({"messages": [{"role": "user", "content": None}]}, "content is required", "messages[0].content"),
    ({"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}, "content is required",
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}] * (CTX + 1)}, "maximum context length", "messages"),
    ({"prompt": ["a"] * 65}, "at most 64 prompts", "prompt"),
    ({"prompt": [1] * CTX}, "maximum context length", "prompt"),
    ({"prompt": [[1], [1] * CTX]}, "maximum context length", "prompt"),
])
def test_requests_refused_by_their_shape(server, name, body, needle, param):
    path = "/chat/completions" if "messages" in body else "/completions"
    err = assert_error(post(server, path, {"model": name, **body}), 400, needle)
    assert err["param"] == param


def test_an_assistant_turn_without_content_is_served(server, name):
    r = post(server, "/chat/completions", {"model": name, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "again"}]})
    assert r.status_code == 200, r.text


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n{")
        head = s.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head


def test_long_message_lists_are_validated_in_slices():
    from fmoe.serve import app, protocol

    ok = [{"role": "user", "content": "hi"}] * 3
    assert [m.content for m in protocol.validate_messages(ok, 700)] == ["hi"] * 3
    with pytest.raises(protocol.APIError) as e:
        protocol.validate_messages(ok + [{"role": "robot", "content": "x"}], 1024)
    assert e.value.param == "messages[1027].role" and "messages[1027].role" in e.value.message

    class Req:                      # what the handlers read the body from
        def __init__(self, body):
            self.headers, self.body = {}, json.dumps(body).encode()

        async def stream(self):
            yield self.body

    class State:
        max_model_len = 4096

    n = 3 * app.MESSAGE_SLICE + 5
    body = {"model": "m", "messages": [{"role": "user", "content": str(i)} for i in range(n)]}
    req = asyncio.run(app.read_body(State(), Req(body), protocol.ChatRequest))
    assert [m.content for m in req.messages] == [str(i) for i in range(n)]
    body["messages"][2 * app.MESSAGE_SLICE + 1]["role"] = "robot"
    with pytest.raises(protocol.APIError, match=rf"messages\[{2 * app.MESSAGE_SLICE + 1}\]\.role"):
        asyncio.run(app.read_body(State(), Req(body), protocol.ChatRequest))


# -- the queue bound -----------------------------------------------------------------------------
def test_full_queue_answers_503_and_the_rest_complete(server, name):
    body = {"model": name, "prompt": "Hello", "max_tokens": 50, "temperature": 0, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(server.base_url + "/completions", json=body) for _ in range(10)])

    rs = asyncio.run(go())
    codes = sorted(r.status_code for r in rs)
    assert 503 in codes and 200 in codes, codes
    assert set(codes) == {200, 503}
    for r in rs:
        if r.status_code == 503:
            assert_error(r, 503, "busy")
        else:
            assert r.json()["usage"]["completion_tokens"] == 50
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert "fmoe_requests_rejected_total 0\n" not in text
    # (prometheus_client writes counters as floats, "0.0": the value itself must be positive)
    assert float(re.search(r"^fmoe_requests_rejected_total (\S+)$", text, re.M).group(1)) > 0


# -- property-based fuzz over request bodies ---------------------------------------------------------
def json_values(depth=2):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=6)


def field(valid, garbage_weight=True):
    return st.one_of(valid, json_values()) if garbage_weight else valid


def bodies(name):
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"]),
         "content": st.one_of(st.text(max_size=40), st.integers(), st.none())}), max_size=3)
    common = {
        "model": field(st.sampled_from([name, "other"])),
        "max_tokens": field(st.integers(-3, 6)),
        "temperature": field(st.floats(-1, 3, allow_nan=False)),
        "top_p": field(st.floats(-0.5, 1.5, allow_nan=False)),
        "stream": field(st.booleans()),
        "stop": field(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3))),
        "seed": field(st.integers(-2 ** 65, 2 ** 65)),
        "n": field(st.integers(-1, 3)),
        "ignore_eos": field(st.booleans()),
    }
    completion = st.fixed_dictionaries({}, optional={
        **common, "prompt": field(st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 600), max_size=8))),
        "echo": field(st.booleans())})
    chat = st.fixed_dictionaries({}, optional={**common, "messages": field(messages)})
    return st.one_of(st.tuples(st.just("/completions"), completion), st.tuples(st.just("/chat/completions"), chat))


def check_response(r):
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.splitlines() if ln]
        assert lines[-1] == "data: [DONE]"
        for ln in lines[:-1]:
            obj = json.loads(ln[len("data: "):])
            assert "error" not in obj, obj
    else:
        obj = r.json()
        assert obj["choices"] and obj["usage"]["completion_tokens"] >= 0


def fuzz(server, name, examples):
    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(req=bodies(name))
    def run(req):
        path, body = req
        check_response(post(server, path, body))

    run()

    @settings(max_examples=max(10, examples // 4), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=64))
    def run_raw(raw):
        r = post(server, "/completions", raw, raw=True)
        assert r.status_code in (200, 400, 404), r.text

    run_raw()
    assert httpx.get(server.url + "/health").status_code == 200


def test_fuzz_request_bodies(server, name):
    fuzz(server, name, 60)


@pytest.mark.slow
def test_fuzz_request_bodies_heavy(server, name):
    fuzz(server, name, 600)


# -- start-up errors --------------------------------------------------------------------------------
def fmoe_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "fmoe.serve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def one_line_error(r, needle):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]


def test_bad_model_path_is_one_line(tmp_path, env):
    r = fmoe_cli("serve", str(tmp_path / "missing"), "--port", "0", env=env)
    one_line_error(r, "missing")


def test_busy_port_is_one_line(ckpt, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = fmoe_cli("serve", str(ckpt), "--port", str(s.getsockname()[1]), env=env)
    one_line_error(r, "cannot listen")


def test_flags_that_would_refuse_every_request_are_one_line(ckpt, env):
    one_line_error(fmoe_cli("serve", str(ckpt), "--port", "0", "--max-queue", "0", env=env),
                   "--max-queue must be >= 1")
    one_line_error(fmoe_cli("serve", str(ckpt), "--port", "0", "--max-model-len", "100000",
                            "--threads", "1", env=env), "max_position_embeddings")
    # before the model loads (its path does not even exist)
    one_line_error(fmoe_cli("serve", "no/such/model", "--port", "0", "--kv-cache-memory", "lots", env=env),
                   "--kv-cache-memory: cannot parse byte size 'lots'")


def test_map_store_flag_reaches_from_pretrained(monkeypatch, tmp_path):
    """--map-store is passed as map_store= only when given; without an expert cache the real
    loader refuses it with a message naming it."""
    import fmoe.models
    from fmoe.serve.cli import build_parser
    from fmoe.serve.demo import demo_checkpoint
    from fmoe.serve.server import load_model

    real = fmoe.models.from_pretrained
    seen = []
    monkeypatch.setattr(fmoe.models, "from_pretrained", lambda path, **kw: seen.append(kw) or "model")
    parser = build_parser()
    args = parser.parse_args(["serve", "m", "--expert-cache", "0.5", "--map-store", str(tmp_path / "maps")])
    assert load_model(args) == "model" and seen[-1]["map_store"] == str(tmp_path / "maps")
    assert "map_store" not in (load_model(parser.parse_args(["serve", "m"])) and seen[-1])

    monkeypatch.setattr(fmoe.models, "from_pretrained", real)
    monkeypatch.setenv("FMOE_CACHE", str(tmp_path / "cache"))
    args = parser.parse_args(["serve", str(demo_checkpoint()), "--map-store", str(tmp_path / "maps")])
    with pytest.raises(ValueError, match="--map-store needs --expert-cache"):
        load_model(args)


def test_cors_only_for_the_allowed_origins():
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from fmoe.serve.app import create_app

    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(SimpleNamespace(), ["http://localhost:3000"])) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    with TestClient(create_app(SimpleNamespace())) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


def test_error_paths_name_fields_as_the_client_wrote_them():
    from fmoe.serve import protocol

    with pytest.raises(protocol.APIError) as e:
        protocol.validate({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                          protocol.ChatRequest)
    assert e.value.param.startswith("messages[0].content") and ".str" not in e.value.message
    with pytest.raises(protocol.APIError) as e:
        protocol.validate({"model": "m", "messages": [{"role": "user", "content": "hi"}, {"content": "x"}]},
                          protocol.ChatRequest)
    assert e.value.param == "messages[1].role"
    assert protocol.loc_text(("stream_options", "include_usage")) == "stream_options.include_usage"


def test_unset_sampling_values_default_to_the_generation_config(tmp_path):
    """As vLLM: temperature, top_p and top_k a request leaves unset come from the checkpoint's
    generation_config.json; values the request sets win; `--generation-config none` (no
    defaults) gives OpenAI's."""
    from types import SimpleNamespace

    from fmoe.serve import protocol
    from fmoe.serve.app import sampling, sampling_defaults

    d = sampling_defaults({"temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": 2,
                           "do_sample": True})
    assert d == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert sampling_defaults({}) == {}
    assert sampling_defaults({"temperature": "hot", "top_k": 2.5}) == {}

    def params(defaults, **body):
        state = SimpleNamespace(defaults=defaults, eos_ids=[2])
        req = protocol.validate({"model": "m", "prompt": "x", **body}, protocol.CompletionRequest)
        p = sampling(state, req, 4, 0)
        return p.temperature, p.top_p, p.top_k

    assert params(d) == (0.7, 0.8, 20)
    assert params(d, temperature=0, top_k=0) == (0.0, 0.8, 0)
    assert params({}) == (1.0, 1.0, 0)


def test_generation_config_penalties_and_length_are_defaults_too(tmp_path):
    """As vLLM: repetition_penalty, min_p and max_new_tokens (as max_tokens) from
    generation_config.json are request defaults as well; a value no request could use is left
    out, with the others kept."""
    from types import SimpleNamespace

    from fmoe.serve import protocol
    from fmoe.serve.app import sampling, sampling_defaults

    d = sampling_defaults({"repetition_penalty": 1.05, "min_p": 0.1, "max_new_tokens": 256,
                           "temperature": 0.7})
    assert d == {"repetition_penalty": 1.05, "min_p": 0.1, "max_tokens": 256, "temperature": 0.7}
    assert sampling_defaults({"repetition_penalty": 0.0, "min_p": 3, "temperature": 0.6,
                              "max_new_tokens": 0}) == {"temperature": 0.6}

    state = SimpleNamespace(defaults=d, eos_ids=[2], vocab_size=100)

    def params(**body):
        req = protocol.validate({"model": "m", "prompt": "x", **body}, protocol.CompletionRequest)
        return sampling(state, req, 8, 0)

    p = params()
    assert (p.repetition_penalty, p.min_p, p.eos_ids) == (1.05, 0.1, [2])
    p = params(repetition_penalty=1.0, min_p=0.0, stop_token_ids=[7, 2], ignore_eos=True, min_tokens=3)
    assert (p.repetition_penalty, p.min_p, p.eos_ids, p.min_new_tokens) == (1.0, 0.0, [7, 2], 3)
    with pytest.raises(protocol.APIError, match="min_tokens"):
        params(min_tokens=9)
    with pytest.raises(protocol.APIError, match="stop_token_ids"):
        params(stop_token_ids=[100])


def test_unknown_fields_are_named_for_the_log():
    from fmoe.serve import protocol

    body = {"model": "m", "prompt": "x", "temprature": 0, "user": "u", "repetition_penalty": 1.1}
    assert protocol.ignored_fields(body, protocol.CompletionRequest) == ["temprature"]
    assert protocol.ignored_fields({"model": "m", "messages": [], "echo": True},
                                   protocol.ChatRequest) == []
