"""Incremental detokenization with stop strings: the text of one sequence as its tokens arrive
(the serving `Batcher`'s callbacks and `fmoe chat` use it on the engine thread)."""

from __future__ import annotations

from typing import Iterable
from typing import Sequence as Seq


class TextStream:
    """Incremental detokenization with stop strings for one sequence.

    `push(token_id)` returns ``(delta, stop)``: the text that became final with this token and
    whether a stop string has appeared (the text is then cut just before it, the stop string
    excluded, as in the OpenAI API). While stop strings are set, the last ``max(len(stop)) - 1``
    characters are held back until they cannot begin a stop string. EOS tokens add no text.
    `flush()` returns what is still held back once the sequence has finished; `text` is everything.

    Decoding works on a sliding window of tokens that starts a few tokens back (into the prompt at
    first), so tokenizers that drop a leading space at the start of a decode (SentencePiece) and
    multi-byte characters split across tokens come out right.
    """

    def __init__(self, tokenizer, stop: Seq[str] = (), prompt_ids: Seq[int] = (),
                 eos_token_ids: Iterable[int] = (), context: int = 5, include_stop: bool = False,
                 skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop          # the text ends with the stop string found
        self.skip_special = skip_special_tokens
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self._ids: list[int] = list(prompt_ids)[-context:] if context else []
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """`check_stop=False`: this token's text is not searched for stop strings, and a later
        token's search finds only matches that end in its own text (vLLM's rule: a stop
        string completed while stops were not checked, before min_tokens, is not found)."""
        if self.stopped:
            return "", True
        if int(token_id) in self.eos:
            return "", False
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return "", False          # an incomplete character: wait for more tokens
        self._prefix, self._read = self._read, len(self._ids)
        return self._add(new_text[len(prefix_text):], check_stop)

    def _decode(self, ids) -> str:
        if self.skip_special:
            return self.tok.decode(ids)
        return self.tok.decode(ids, skip_special_tokens=False)

    def _add(self, piece: str, check_stop: bool = True) -> tuple[str, bool]:
        before = len(self.text)
        self.text += piece
        if self.stop and check_stop:
            # only matches that end in this piece: one that ended earlier was either found
            # then or lay in text not searched (before min_tokens), as vLLM's rule
            hits = [(i, len(s)) for i, s in ((self.text.find(s, max(0, before - len(s) + 1)), s)
                                             for s in self.stop) if i >= 0]
            if hits:
                i, n = min(hits)
                self.text = self.text[:i + n if self.include_stop else i]
                self.stopped = True
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self.hold), False

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out = self.text[self._sent:upto]
        self._sent = upto
        return out

    def flush(self) -> str:
        """The rest of the text, once no more tokens will come."""
        if not self.stopped and self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix:self._read])
            new_text = self._decode(self._ids[self._prefix:])
            self._prefix = self._read = len(self._ids)
            if len(new_text) > len(prefix_text):
                delta, _ = self._add(new_text[len(prefix_text):])
                return delta + self._release(len(self.text))
        return self._release(len(self.text))
