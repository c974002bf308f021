"""The Python API: localcoder.load(path) -> Model."""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from . import generate as gen
from .backends import get_backend
from .cache import ModelCache, make_cache
from .chat_template import template_from_metadata
from .config import ModelConfig
from .errors import LocalcoderError
from .gguf_file import GGUFFile
from .models import qwen3next
from .tokenizer import Tokenizer

DEFAULT_CTX = 32768


class Model:
    """A loaded qwen3next GGUF: config, tokenizer, chat template, weights (mmapped) and a backend."""

    def __init__(self, file: GGUFFile, backend="auto", n_ctx: int | None = None):
        self.file = file
        embd = file.tensors.get("token_embd.weight")
        n_vocab = embd.shape[0] if embd is not None else len(file.get("tokenizer.ggml.tokens", []))
        self.config = ModelConfig.from_gguf(file.metadata, n_vocab, str(file.path))
        self.weights = qwen3next.load_weights(self.config, file.tensors, str(file.path))
        self.tokenizer = Tokenizer.from_metadata(file.metadata)
        self.chat_template = template_from_metadata(file.metadata)
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        n_ctx = n_ctx or min(DEFAULT_CTX, self.config.n_ctx_train)
        if not 0 < n_ctx <= self.config.n_ctx_train:
            raise LocalcoderError(f"context {n_ctx} is outside 1..{self.config.n_ctx_train}, the model's "
                                  "trained context; choose a --ctx in that range")
        self.n_ctx = n_ctx
        self.forward_tokens = 0  # tokens run through the forward pass, for tests and stats

    @property
    def path(self):
        return self.file.path

    def new_cache(self) -> ModelCache:
        return make_cache(self.config)

    def forward(self, ids: Sequence[int], cache: ModelCache, all_logits: bool = True) -> np.ndarray:
        """Process ids after the cache's history; logits (T, V) float32, or (1, V) for the last position."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.n_vocab):
            raise LocalcoderError(f"token id out of range 0..{self.config.n_vocab - 1}")
        self.forward_tokens += len(ids)
        try:
            out = qwen3next.forward(self.backend, self.config, self.weights, ids, cache, all_logits)
        except BaseException:
            cache.broken = True  # some layers advanced, others not (Ctrl-C mid-step)
            raise
        return np.asarray(out, dtype=np.float32)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """A fresh prefill from an empty cache: logits for every position, (T, V) float32."""
        return self.forward(token_ids, self.new_cache(), all_logits=True)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 256, sampler=None,
                 stop: Sequence[str] = (), cache: ModelCache | None = None, stats=None) -> Iterator[int]:
        return gen.generate(self, prompt_ids, max_tokens, sampler, stop, cache, stats)

    def stream(self, prompt_ids: Sequence[int], max_tokens: int = 256, sampler=None,
               stop: Sequence[str] = (), cache: ModelCache | None = None, stats=None) -> Iterator[str]:
        """Text pieces as they are generated."""
        for _, piece in gen.generate_steps(self, prompt_ids, max_tokens, sampler, stop, cache, stats):
            if piece:
                yield piece

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], tools=None, add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, tools, add_generation_prompt)
        return self.tokenizer.encode(text, parse_special=True)


def load(path: str | os.PathLike, backend="auto", n_ctx: int | None = None) -> Model:
    """Open and validate a qwen3next GGUF (nothing but its header is read here)."""
    return Model(GGUFFile(path), backend=backend, n_ctx=n_ctx)
