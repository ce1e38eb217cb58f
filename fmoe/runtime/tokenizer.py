"""Tokenizer from ``tokenizer.json`` (the `tokenizers` library) and the chat template from
``tokenizer_config.json`` (jinja2), as HF transformers applies them."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from ..errors import CheckpointError


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(self, tok, config: dict | None = None, generation: dict | None = None):
        self.tok = tok
        cfg = config or {}
        self.chat_template = cfg.get("chat_template")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
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
        tmpl = root / "chat_template.jinja"
        if tmpl.exists() and not cfg.get("chat_template"):
            cfg["chat_template"] = tmpl.read_text()
        return cls(tok, cfg, read_generation_config(root))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's template."""
        if not self.chat_template:
            raise CheckpointError("this tokenizer has no chat_template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


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
