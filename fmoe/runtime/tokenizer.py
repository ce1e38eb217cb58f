"""Tokenizer from ``tokenizer.json`` (the `tokenizers` library) and the chat template from
``tokenizer_config.json`` (jinja2), as HF transformers applies them."""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from pathlib import Path

from ..errors import CheckpointError


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


# the special tokens a chat template sees by name, as transformers' special_tokens_map
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _templates(value) -> str | dict[str, str] | None:
    """tokenizer_config.json's chat_template: one template, or named ones (a list of
    {"name", "template"}, as the hub stores them, or a mapping)."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
        if set(value) == {"default"}:
            return value["default"]
        return value or None
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, tok, config: dict | None = None, generation: dict | None = None):
        self.tok = tok
        cfg = config or {}
        self.chat_template = _templates(cfg.get("chat_template"))
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        # what a chat template sees as bos_token, eos_token, ... (only those the config names)
        self.special_tokens_map = {k: _token_str(cfg[k]) for k in _SPECIAL if _token_str(cfg.get(k))}
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens")
        if isinstance(extra, list) and extra:
            self.special_tokens_map["additional_special_tokens"] = [_token_str(t) for t in extra]
        self.add_bos = bool(cfg.get("add_bos_token", False))
        gen = generation or {}
        eos = gen.get("eos_token_id")
        if eos is None and self.eos_token is not None:
            eos = self.tok.token_to_id(self.eos_token)
        self.eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        pad = self.tok.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    @classmethod
    def from_dir(cls, root: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tok

        root = Path(root)
        try:
            tok = _Tok.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise CheckpointError(f"{root / 'tokenizer.json'}: cannot load ({e})") from None
        cfg = _read_json(root / "tokenizer_config.json")
        # template files take priority over the config's entries, as in transformers
        files = {}
        if (root / "chat_template.jinja").is_file():
            files["default"] = (root / "chat_template.jinja").read_text()
        if (root / "chat_templates").is_dir():
            for f in sorted((root / "chat_templates").glob("*.jinja")):
                files[f.stem] = f.read_text()
        if files:
            cfg["chat_template"] = files
        return cls(tok, cfg, read_generation_config(root))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (HF's attribute; `eos_token_ids` has them all)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, add_special_tokens: bool = True, return_tensors: str | None = None) -> dict:
        """HF's call: ``{"input_ids", "attention_mask"}`` for a text or a list of texts, so that
        ``model.generate(**tok(text, return_tensors="pt"))`` works. A list is padded on the left
        with `pad_token_id` (generation needs left padding). `return_tensors`: None (lists) or
        "pt" (LongTensors [B, T]; a single text gives [1, T])."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: fmoe returns lists (None) or torch "
                             f"tensors ('pt')")
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else list(text))]
        width = max((len(r) for r in rows), default=0)
        ids = [[self.pad_token_id] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(mask, dtype=torch.long)}
        return {"input_ids": rows[0] if single else ids, "attention_mask": mask[0] if single else mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids (a list, a 1-D tensor, a [1, T] tensor or one id) -> text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError(f"decode takes one sequence, got {len(ids)}; use batch_decode")
            ids = ids[0]
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        """Several sequences (a list of lists, or a [B, T] tensor) -> their texts."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, return_tensors: str | None = None, **variables):
        """Render `messages` ([{"role", "content"}]) with the checkpoint's template: the text,
        or with `tokenize` its ids (a list, or a [1, T] tensor with ``return_tensors="pt"``).
        Other keywords (``tools=``, ``enable_thinking=``, ...) reach the template as variables,
        as in HF. Unlike HF, `add_generation_prompt` defaults to True (the next turn is the
        assistant's: what generation wants)."""
        if return_tensors is not None and not tokenize:
            raise ValueError("return_tensors needs tokenize=True (fmoe's apply_chat_template returns "
                             "the text by default)")
        text = self._render(messages, add_generation_prompt, variables)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        if return_tensors == "pt":
            import torch

            return torch.tensor([ids], dtype=torch.long)
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: use None or 'pt'")
        return ids

    def template_for(self, tools=None, name: str | None = None) -> str:
        """The template to render: the only one, or of named ones `name`, else "tool_use" when
        tools are given and the checkpoint has it, else "default" (transformers' choice)."""
        t = self.chat_template
        if not t:
            raise CheckpointError("this tokenizer has no chat_template")
        if isinstance(t, str):
            return t
        if name is not None and name in t:
            return t[name]
        if tools is not None and "tool_use" in t:
            return t["tool_use"]
        if "default" in t:
            return t["default"]
        raise CheckpointError(f"this tokenizer has several chat templates and none is 'default': "
                              f"pass chat_template= one of {sorted(t)}")

    def _render(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        variables = dict(variables)
        tools, documents = variables.pop("tools", None), variables.pop("documents", None)
        template = self.template_for(tools, variables.pop("chat_template", None))
        # transformers' variables: the special tokens by name (keywords override them), tools
        # and documents defined (None when absent), a message's reasoning under the name
        # templates read
        return _compile(template).render(
            **{**self.special_tokens_map, **variables}, tools=tools, documents=documents,
            messages=[_template_message(m) for m in messages], add_generation_prompt=add_generation_prompt)


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _template_message(message):
    """A message as transformers hands it to a template: keys whose value is None left out
    (``content: None`` would render as "None"), and its reasoning, under any of its names, as
    `reasoning_content` and `thinking` too."""
    if not isinstance(message, dict):
        return message
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING if k in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template compiled in a sandbox with transformers' globals and filters."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: marks the assistant's part for training
        masks; rendering keeps the body as it is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # not jinja's own filter, which escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env.from_string(template)


def read_generation_config(root: Path) -> dict:
    """``root/generation_config.json`` ({} when absent). A malformed one is reported and left out,
    as transformers does: it holds generation defaults, not weights, and the model still loads."""
    path = Path(root) / "generation_config.json"
    try:
        return _read_json(path)
    except CheckpointError as e:
        logging.getLogger("fmoe").warning("%s; generating without it", e)
        return {}


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
