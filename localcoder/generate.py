"""Chunked prefill, then one-token decode, as a generator. The library yields; the CLI renders."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ContextOverflow
from .sampling import Sampler, greedy

PREFILL_CHUNK = 512  # prompt tokens per forward call: bounds activation memory, not results


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens the forward pass processed for the prompt
    cached_tokens: int = 0  # prompt tokens reused from the cache
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "interrupted"

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


class TextStream:
    """Turns token ids into text pieces: never a broken UTF-8 sequence, never text that may begin a stop
    string (it is held back until it cannot), nothing from a stop string on, and no control or unused token
    (<|fim_middle|>, [PAD...]: as llama.cpp prints them, as nothing)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder(skip_special=True)
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.pending += self.decoder.add(token_id)
        return self._release()

    def flush(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        out, self.pending = self.pending, ""
        return out

    def _release(self) -> str:
        found = [at for at in (self.pending.find(s) for s in self.stop) if at >= 0]
        if found:  # the earliest stop string wins, whatever the order they were given in
            self.stopped = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        hold = 0
        for s in self.stop:  # the longest tail of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def prefill(model, ids: Sequence[int], cache, chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Run `ids` after the cache's history; returns the logits of the last position (V,)."""
    logits = None
    for start in range(0, len(ids), chunk):
        logits = model.forward(ids[start:start + chunk], cache, all_logits=False)
    return logits[-1]


def generate_steps(model, prompt_ids: Sequence[int], max_tokens: int = 256, sampler: Sampler | None = None,
                   stop: Sequence[str] = (), cache=None, stats: GenerationStats | None = None,
                   on_prefill: Callable[[], None] | None = None) -> Iterator[tuple[int, str]]:
    """Yields (token id, text piece) per generated token, at most max_tokens of them (a negative max_tokens:
    until a stop token or string, or the full context). `cache` may already hold a prefix of the
    conversation; `prompt_ids` are the tokens that follow it. `on_prefill` runs once all of the prompt but
    its last token is in the cache (a chat checkpoints there: the same prompt again, a retry, then reuses
    all of it, since a resumed prompt needs one token left to give logits)."""
    sampler = sampler or greedy()
    stats = stats if stats is not None else GenerationStats()
    cache = cache if cache is not None else model.new_cache()
    n_ctx = model.n_ctx
    if cache.pos + len(prompt_ids) > n_ctx:
        raise ContextOverflow(f"the prompt needs {cache.pos + len(prompt_ids)} tokens but the context holds "
                              f"{n_ctx}; shorten the prompt or raise --ctx (the model allows "
                              f"{model.config.n_ctx_train})")
    if not len(prompt_ids):
        raise ContextOverflow("the prompt is empty; give at least one token")
    t0 = time.perf_counter()
    prompt_ids = list(prompt_ids)
    stats.prompt_tokens += len(prompt_ids)
    if on_prefill is not None:
        if len(prompt_ids) > 1:
            prefill(model, prompt_ids[:-1], cache)
        on_prefill()
        prompt_ids = prompt_ids[-1:]
    logits = prefill(model, prompt_ids, cache)
    stats.prompt_seconds += time.perf_counter() - t0
    text = TextStream(model.tokenizer, stop)
    history = list(cache.tokens)
    stop_ids = model.tokenizer.stop_token_ids
    if max_tokens < 0:
        max_tokens = n_ctx  # the context ends generation first
    n = 0
    t0 = time.perf_counter()
    try:
        while True:
            if n >= max_tokens or cache.pos >= n_ctx:
                stats.finish_reason = "length"
                break
            token = sampler(logits, history)
            if token in stop_ids:
                stats.finish_reason = "stop"
                break
            n += 1
            stats.generated_tokens += 1
            history.append(token)
            piece = text.add(token)
            if text.stopped:
                stats.finish_reason = "stop"
                if piece:
                    yield token, piece
                break
            yield token, piece
            if n < max_tokens and cache.pos < n_ctx:
                logits = model.forward([token], cache, all_logits=False)[-1]
        tail = text.flush()
        if tail:
            yield -1, tail
    except GeneratorExit:
        stats.finish_reason = stats.finish_reason or "interrupted"
        raise
    finally:
        stats.generate_seconds += time.perf_counter() - t0


def generate(model, prompt_ids, max_tokens=256, sampler=None, stop=(), cache=None, stats=None) -> Iterator[int]:
    """Token ids only (see generate_steps)."""
    for token, _ in generate_steps(model, prompt_ids, max_tokens, sampler, stop, cache, stats):
        if token >= 0:
            yield token
