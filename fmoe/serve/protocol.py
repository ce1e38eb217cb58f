"""The OpenAI-compatible wire protocol of `fmoe serve`: request models, limits, the error shape.

Request models are pydantic and strict ("5" is not an integer, true is not a number); unknown
fields are ignored, as by the OpenAI API. Fields the server checks by hand (a completions
`prompt`, unsupported options) are declared loosely here so that the error names them clearly.
Errors travel as `APIError` and reach the client as
``{"error": {"message", "type", "param", "code"}}``.

This module needs the serve extras (pydantic comes with fastapi); `fmoe` imports it only when
a server starts.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1     # what torch.Generator.manual_seed accepts
MAX_CHOICES = 64          # prompts x n in one request
MAX_STOP = 16             # stop strings in one request
MAX_STOP_IDS = 64         # stop_token_ids in one request
MAX_BODY_BYTES = 32 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields completions and chat share."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)                 # vLLM extension; -1 or 0: off
    n: Optional[int] = Field(1, ge=1, le=16)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: Optional[bool] = False                       # vLLM extension
    # vLLM's sampling extensions
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    min_tokens: Optional[int] = Field(0, ge=0)
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    # fields that change the output and are not implemented: declared loosely so that a
    # request setting one is refused by name (`unsupported`), not silently served without it
    bad_words: Any = None
    allowed_token_ids: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    logits_processors: Any = None

    @property
    def stops(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first field set (to anything but its neutral value) whose effect on the output
        this server does not implement, or None."""
        for name, neutral in self.UNSUPPORTED.items():
            v = getattr(self, name, None)
            if v is not None and v not in neutral:
                return name
        return None

    UNSUPPORTED: ClassVar[dict] = {"bad_words": ([],), "allowed_token_ids": (), "guided_json": (),
                    "guided_regex": (), "guided_choice": (), "guided_grammar": (),
                    "structured_outputs": (), "use_beam_search": (False,),
                    "truncate_prompt_tokens": (), "prompt_logprobs": (), "logits_processors": ([],)}

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Any = None                                       # checked by hand: clearer message
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None       # an assistant turn's calls, earlier in the chat
    tool_call_id: Optional[str] = None                # the call a tool message answers


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    # not implemented (see `SamplingRequest.unsupported`)
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    echo: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None

    UNSUPPORTED: ClassVar[dict] = {**SamplingRequest.UNSUPPORTED, "tool_choice": ("none", "auto"),
                    "functions": ([],), "function_call": ("none", "auto"),
                    "modalities": (["text"],), "audio": (), "prediction": (),
                    "reasoning_effort": (), "verbosity": (), "web_search_options": (),
                    "echo": (False,), "add_generation_prompt": (True,),
                    "continue_final_message": (False,), "chat_template": (),
                    "chat_template_kwargs": ({},), "documents": ([],)}


class APIError(Exception):
    """An error answered to the client: HTTP `status` and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# the names pydantic puts in an error's path for the member of a union it tried
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


def loc_text(loc) -> str:
    """An error path as the client wrote the field: ``messages[0].content`` (list indices in
    brackets; the union member pydantic tried, such as ``str`` or ``list[ContentPart]``, left
    out)."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif isinstance(x, str) and (x in _UNION_TAGS or "[" in x):
            continue
        else:
            out += f".{x}" if out else str(x)
    return out


def validation_message(e: ValidationError, offset: tuple = ()) -> tuple[str, str | None]:
    """pydantic's errors -> (one message naming at most four fields, the first field's path);
    `offset` is prepended to each path's first index (a list validated in slices)."""
    parts, param = [], None
    for err in e.errors()[:4]:
        loc = tuple(err.get("loc", ()))
        if offset:
            name, start = offset
            loc = (name, loc[0] + start, *loc[1:]) if loc and isinstance(loc[0], int) else (name, *loc)
        text = loc_text(loc)
        param = param or (text or None)
        parts.append(f"{text}: {err.get('msg')}" if text else str(err.get("msg")))
    more = len(e.errors()) - 4
    if more > 0:
        parts.append(f"... and {more} more")
    return "invalid request: " + "; ".join(parts), param


def parse_json(raw: bytes):
    """A request body -> its JSON value, or APIError 400 (NaN and Infinity are not JSON)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None


def ignored_fields(data, schema: type[BaseModel]) -> list[str]:
    """The top-level fields of a request body `schema` does not know (served without them, as
    by vLLM, which logs them)."""
    if not isinstance(data, dict):
        return []
    return [k for k in data if k not in schema.model_fields]


def validate(data, schema: type[BaseModel]):
    """A parsed body -> a `schema` instance, or APIError 400 naming the fields at fault."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


_MESSAGES = None


def validate_messages(items: list, offset: int = 0) -> list:
    """Chat `messages[offset:offset + len(items)]` -> `ChatMessage`s, or APIError 400 naming
    the message at fault by its index in the whole list."""
    global _MESSAGES
    if _MESSAGES is None:
        from pydantic import TypeAdapter

        _MESSAGES = TypeAdapter(list[ChatMessage], config=ConfigDict(strict=True))
    try:
        return _MESSAGES.validate_python(items)
    except ValidationError as e:
        msg, param = validation_message(e, ("messages", offset))
        raise APIError(400, msg, param=param) from None


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def sse(obj) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"
