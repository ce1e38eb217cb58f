"""`fmoe serve` end to end: a real server process on loopback, driven with the official openai
client. Completions, chat, streaming, stop strings, usage, seeds, concurrency (greedy outputs
under load equal the same prompts served one at a time), disconnects, metrics, `fmoe chat`."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import fmoe  # noqa: E402
from fmoe.serve import demo  # noqa: E402
from server_process import ServerProcess  # noqa: E402

API_KEY = "test-key"
NAME = "demo-moe"
PROMPTS = ["The quick brown fox", "A mixture of experts", "Offloading keeps attention", "Numbers: 0 1 2",
           "The output of an offloaded model", "Prediction turns waiting", "Hello", "Expert maps record",
           "Only the chosen experts run", "The catch is memory", "similar prompts", "a router that sends",
           "every token", "host memory or disk", "the runtime knows", "token for token"]


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
    with ServerProcess(ckpt, "--served-model-name", NAME, "--api-key", API_KEY, "--max-batch", "16",
                       "--threads", "1", "--log-level", "warning", env=env) as srv:
        yield srv
    assert srv.proc.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    return lambda: openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(ckpt):
    torch.set_num_threads(1)
    return fmoe.models.from_pretrained(ckpt)


def reference(model, ids, n):
    """Greedy tokens of the in-process engine, ignoring EOS."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(ids):].tolist()


def metric(server, name, labels=""):
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- basics ------------------------------------------------------------------------------------
def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_api_key_is_required_on_v1(server):
    r = httpx.get(server.base_url + "/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/completions", json={"model": NAME, "prompt": "x"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completion_equals_engine_and_counts_usage(client, model):
    tok = model.tokenizer
    prompt = "The quick brown fox"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    ids = tok.encode(prompt)
    want = reference(model, ids, 12)
    assert r.choices[0].text == tok.decode(want)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12


def test_completion_token_prompt_echo_and_several_prompts(client, model):
    tok = model.tokenizer
    ids = tok.encode("Hello")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(reference(model, ids, 5))
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text.startswith("Hello")
    r = client.completions.create(model=NAME, prompt=["Hello", "The quick"], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == tok.decode(reference(model, tok.encode("The quick"), 4))
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(tok.encode("Hello")) + len(tok.encode("The quick"))


def test_chat_completion_uses_the_chat_template(client, model):
    tok = model.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ids = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content == tok.decode(reference(model, ids, 10))
    assert c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    # content given as a list of text parts renders the same
    r2 = client.chat.completions.create(
        model=NAME, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True},
        messages=[msgs[0], {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert r2.choices[0].message.content == c.message.content


def test_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt="A mixture of experts", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="A mixture of experts", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16

    msgs = [{"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream("POST", server.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": NAME, "prompt": "Hello", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"


def test_stop_strings(client):
    kw = dict(model=NAME, prompt="The quick brown fox", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 12
    stop = full[6:9]
    cut = full[:full.index(stop)]
    r = client.completions.create(stop=stop, **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    r = client.completions.create(stop=["\u2603never", stop], **kw)
    assert r.choices[0].text == cut
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_vllm_sampling_extensions(client, model):
    """repetition_penalty, min_p, min_tokens, stop_token_ids, include_stop_str_in_output and
    skip_special_tokens, as vLLM takes them, against the in-process engine."""
    tok = model.tokenizer
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    kw = dict(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    want = model.generate(torch.tensor([ids]), 12, eos_token_id=[], repetition_penalty=1.6)[0, len(ids):]
    r = client.completions.create(extra_body={"ignore_eos": True, "repetition_penalty": 1.6}, **kw)
    assert r.choices[0].text == tok.decode(want.tolist())
    assert want.tolist() != reference(model, ids, 12)           # the penalty did something

    plain = reference(model, ids, 12)
    stop_id = plain[3]
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]}, **kw)
    first = plain.index(stop_id)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == first + 1
    assert r.choices[0].text == tok.decode(plain[:first])      # the stop token adds no text
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [stop_id],
                                              "include_stop_str_in_output": True}, **kw)
    assert r.choices[0].text == tok.decode(plain[:first + 1])  # unless asked for, as vLLM
    # min_tokens holds the stop token back: the engine with it as EOS and min_new_tokens
    want = model.generate(torch.tensor([ids]), 12, eos_token_id=[stop_id], min_new_tokens=first + 2,
                          pad_token_id=0)[0, len(ids):].tolist()
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [stop_id],
                                              "min_tokens": first + 2}, **kw)
    assert r.usage.completion_tokens == (want.index(stop_id) + 1 if stop_id in want else 12)
    assert r.usage.completion_tokens > first + 1

    full = tok.decode(plain)
    stop = full[4:7]
    r = client.completions.create(stop=stop, extra_body={"ignore_eos": True,
                                                         "include_stop_str_in_output": True}, **kw)
    assert r.choices[0].text == full[:full.index(stop) + len(stop)]
    chunks = list(client.completions.create(stop=stop, stream=True, extra_body={
        "ignore_eos": True, "include_stop_str_in_output": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop) + len(stop)]

    # min_p: seeded samples equal the engine's with the same seed
    want = model.generate(torch.tensor([ids]), 8, temperature=1.0, top_k=0, min_p=0.2, seed=5,
                          eos_token_id=[])[0, len(ids):].tolist()
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True, "min_p": 0.2})
    assert r.choices[0].text == tok.decode(want)


@pytest.mark.parametrize("field, value", [
    ("guided_json", {"type": "object"}), ("use_beam_search", True), ("bad_words", ["x"]),
    ("prompt_logprobs", 1), ("truncate_prompt_tokens", 4), ("logits_processors", ["f"])])
def test_output_changing_fields_not_implemented_are_refused(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hello", max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={field: value})


@pytest.mark.parametrize("field, value", [
    ("echo", True), ("add_generation_prompt", False), ("continue_final_message", True),
    ("chat_template_kwargs", {"enable_thinking": False}), ("reasoning_effort", "low"),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("modalities", ["text", "audio"])])
def test_chat_fields_not_implemented_are_refused(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field
    # their neutral values are served
    neutral = {"echo": False, "add_generation_prompt": True, "continue_final_message": False,
               "chat_template_kwargs": {}, "reasoning_effort": None, "tool_choice": "none",
               "functions": [], "modalities": ["text"]}[field]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={field: neutral})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c
    r = client.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.choices[0].text == a and len({ch.text for ch in r.choices}) > 1


# -- concurrency ---------------------------------------------------------------------------------
def one_at_a_time(client, prompts, n):
    return [client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]


async def _stream_one(client, prompt, n):
    text, usage, finish, t0, first = "", None, None, time.perf_counter(), None
    stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for c in stream:
        if c.choices:
            if first is None:
                first = time.perf_counter() - t0
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage
    return text, usage, finish


async def _concurrent(make_client, prompts, budgets):
    async with make_client() as client:
        return await asyncio.gather(*[_stream_one(client, p, n) for p, n in zip(prompts, budgets)])


def test_concurrent_greedy_equals_one_at_a_time(client, aclient, server):
    budgets = [8 + (i % 5) * 3 for i in range(len(PROMPTS))]
    solo = [one_at_a_time(client, [p], n)[0] for p, n in zip(PROMPTS, budgets)]
    steps0 = metric(server, "fmoe_engine_decode_steps_total")
    results = asyncio.run(_concurrent(aclient, PROMPTS, budgets))
    for (text, usage, finish), want, n in zip(results, solo, budgets):
        assert text == want
        assert usage.completion_tokens == n and finish == "length"
    # they really ran together: far fewer decode steps than tokens
    steps = metric(server, "fmoe_engine_decode_steps_total") - steps0
    assert steps < sum(budgets) / 2


@pytest.mark.slow
def test_64_concurrent_streams_finish_with_the_right_counts(aclient, client):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(64)]
    budgets = [4 + (i * 7) % 29 for i in range(64)]
    results = asyncio.run(_concurrent(aclient, prompts, budgets))
    for (_text, usage, finish), n in zip(results, budgets):
        assert usage.completion_tokens == n and finish == "length"
    idx = [0, 13, 63]
    assert [results[i][0] for i in idx] == [one_at_a_time(client, [prompts[i]], budgets[i])[0] for i in idx]


def test_32_concurrent_streams_finish_with_the_right_counts(aclient):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(32)]
    budgets = [4 + (i * 7) % 13 for i in range(32)]
    results = asyncio.run(_concurrent(aclient, prompts, budgets))
    for (_text, usage, finish), n in zip(results, budgets):
        assert usage.completion_tokens == n and finish == "length"


def test_client_disconnect_cancels_its_sequence(server):
    cancelled0 = metric(server, "fmoe_request_success_total", '{finished_reason="cancelled"}')
    with httpx.stream("POST", server.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": NAME, "prompt": "Hello", "max_tokens": 900, "stream": True,
                            "ignore_eos": True}, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break
    deadline = time.time() + 30
    while time.time() < deadline:
        if metric(server, "fmoe_request_success_total", '{finished_reason="cancelled"}') > cancelled0:
            break
        time.sleep(0.1)
    assert metric(server, "fmoe_request_success_total", '{finished_reason="cancelled"}') == cancelled0 + 1
    assert metric(server, "fmoe_num_requests_running") == 0


def test_non_streaming_disconnect_cancels_too(server):
    cancelled0 = metric(server, "fmoe_request_success_total", '{finished_reason="cancelled"}')
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": NAME, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True}, timeout=0.5)
    deadline = time.time() + 30
    while time.time() < deadline:
        if metric(server, "fmoe_request_success_total", '{finished_reason="cancelled"}') > cancelled0:
            break
        time.sleep(0.1)
    assert metric(server, "fmoe_request_success_total", '{finished_reason="cancelled"}') == cancelled0 + 1


# -- metrics -------------------------------------------------------------------------------------
def test_metrics_exposition(server, client):
    client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*'
                        r'(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? '
                        r'(-?[0-9.e+-]+|NaN|\+Inf|-Inf)$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("fmoe_time_to_first_token_seconds_bucket", "fmoe_time_per_output_token_seconds_count",
                 "fmoe_prompt_tokens_total", "fmoe_generation_tokens_total", "fmoe_expert_hit_rate",
                 "fmoe_expert_bytes_loaded_total", "fmoe_expert_stall_seconds_total",
                 "fmoe_num_requests_running", "fmoe_num_requests_waiting", "fmoe_http_requests_total"):
        assert name in text
    assert metric(server, "fmoe_generation_tokens_total") >= 4
    assert metric(server, "fmoe_time_to_first_token_seconds_count") >= 1
    assert metric(server, "fmoe_time_to_first_token_seconds_bucket", '{le="+Inf"}') == \
        metric(server, "fmoe_time_to_first_token_seconds_count")
    assert metric(server, "fmoe_http_requests_total", '{code="200",endpoint="completions"}') >= 1


# -- fmoe chat -----------------------------------------------------------------------------------
def test_fmoe_chat_shares_the_engine(client, ckpt, env):
    r = subprocess.run([sys.executable, "-m", "fmoe.serve.cli", "chat", str(ckpt), "--max-new-tokens", "8"],
                       input="hi\nhow are you\n", capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr
    first = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0).choices[0].message.content
    second = client.chat.completions.create(
        model=NAME, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                  {"role": "user", "content": "how are you"}]).choices[0].message.content
    assert r.stdout == first + "\n" + second + "\n"
