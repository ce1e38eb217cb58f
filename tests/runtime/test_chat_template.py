"""Chat templates rendered as transformers renders them (`AutoTokenizer.apply_chat_template` on
the same directory): which template (a chat_template.jinja file before the config's entry,
named templates picked by tools), the variables a template sees (tools and documents None when
absent, every special token, keywords over them), the filters and tags it may use (tojson's
options, {% generation %}), and messages as transformers passes them (None values left out,
reasoning under its aliases)."""

from __future__ import annotations

import json

import pytest

from fmoe.models.synthetic import write_tokenizer
from fmoe.runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "b": 1, "a": 2}}]


def pair(tmp_path, template, jinja_file=None, extra=None):
    """(fmoe's Tokenizer, transformers' AutoTokenizer) of one directory with `template` in its
    tokenizer_config.json (and `jinja_file` as chat_template.jinja)."""
    d = tmp_path / f"tok{len(list(tmp_path.iterdir()))}"     # a fresh directory per call
    d.mkdir(exist_ok=True)
    write_tokenizer(d, 320, {"<s>": 300, "</s>": 301, "<pad>": 302, "<unk>": 303})
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(chat_template=template, pad_token="<pad>", unk_token="<unk>", **(extra or {}))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja_file is not None:
        (d / "chat_template.jinja").write_text(jinja_file)
    return Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


def same(tmp_path, template, messages=USER, jinja_file=None, extra=None, **kw):
    ours, hf = pair(tmp_path, template, jinja_file, extra)
    got = ours.apply_chat_template(messages, add_generation_prompt=True, **kw)
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
    assert got == want
    return got


@pytest.mark.parametrize("template, kw, expect", [
    ("{% if tools is not none %}[T]{% endif %}{% if documents is not none %}[D]{% endif %}|"
     "{{ messages[0]['content'] }}", {}, "|hi"),
    ("{{ tools | tojson(sort_keys=true, separators=(',', ':')) }}", {"tools": TOOLS},
     '[{"function":{"a":2,"b":1,"name":"f"},"type":"function"}]'),
    ("{{ bos_token }}{{ eos_token }}{{ pad_token }}{{ unk_token }}|{{ messages[0]['content'] }}", {},
     "<s></s><pad><unk>|hi"),
    ("{{ bos_token }}|{{ messages[0]['content'] }}", {"bos_token": "<BOS>"}, "<BOS>|hi"),
])
def test_variables_and_filters(tmp_path, template, kw, expect):
    assert same(tmp_path, template, **kw) == expect


def test_generation_tag_and_messages(tmp_path):
    gen = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
           "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %};{% endfor %}")
    assert same(tmp_path, gen, USER + [{"role": "assistant", "content": "yo"}]) == "hi;yo;"
    none = ("{% for m in messages %}{{ m['role'] }}:{% if m['content'] is defined %}{{ m['content'] }}"
            "{% else %}-{% endif %};{% endfor %}")
    assert same(tmp_path, none, USER + [{"role": "assistant", "content": None}]) == "user:hi;assistant:-;"
    think = "{% for m in messages %}{{ m.get('reasoning_content', '') }}/{{ m.get('thinking', '') }};{% endfor %}"
    assert same(tmp_path, think, [{"role": "assistant", "content": "a", "reasoning": "r"}]) == "r/r;"


def test_which_template(tmp_path):
    assert same(tmp_path, "CONFIG {{ messages[0]['content'] }}",
                jinja_file="FILE {{ messages[0]['content'] }}") == "FILE hi"
    named = [{"name": "default", "template": "D {{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "T {{ messages[0]['content'] }}"}]
    assert same(tmp_path, named) == "D hi"
    assert same(tmp_path, named, tools=TOOLS) == "T hi"
    ours, _ = pair(tmp_path, [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}])
    with pytest.raises(Exception, match="none is 'default'.*'a', 'b'"):
        ours.apply_chat_template(USER)
    assert ours.apply_chat_template(USER, chat_template="b") == "B"


def test_the_servers_chat_prompt_keeps_tool_calls(tmp_path):
    """An OpenAI chat with an assistant's tool call and the tool's answer renders as
    transformers renders it (the call's JSON arguments as an object, the answer's id), not as
    an empty assistant turn."""
    import asyncio

    pytest.importorskip("fastapi")
    from fmoe.serve import app, protocol

    template = ("{% for m in messages %}<{{ m.role }}>{% if m.content is defined %}{{ m.content }}{% endif %}"
                "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} "
                "{{ c.function.arguments | tojson }}]{% endfor %}{% if m.tool_call_id %}"
                "({{ m.tool_call_id }}){% endif %}{% endfor %}")
    ours, hf = pair(tmp_path, template)
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "snow"}]

    class State:
        tokenizer, max_prompt_bytes, max_model_len = ours, 10**6, 10**6

        async def off_loop(self, fn):
            return fn()

    req = protocol.ChatRequest.model_validate({"model": "m", "messages": messages})
    text, _ = asyncio.run(app.chat_prompt(State(), req))
    as_dicts = [messages[0], {"role": "assistant", "tool_calls": [
        {**call, "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}, messages[2]]
    assert text == hf.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
    assert text == '<user>Oslo?<assistant>[c1 weather {"city": "Oslo"}]<tool>snow(c1)'
