"""Token samplers. make_sampler() returns a callable (logits (V,), history ids) -> next token id.

The chain follows llama.cpp's order: penalties (repetition, frequency, presence), top-k, top-p, min-p,
temperature, then a draw from the seeded generator. Temperature 0 is greedy (argmax after the penalties).

The penalties count, as llama.cpp's do, the last `repeat_last_n` tokens of the whole context (prompt and reply
alike), not OpenAI's "tokens of this reply so far": one window for all three, as in llama.cpp's one penalties
sampler. For a token seen `count` times there:
logit = logit / repeat_penalty (logit > 0) or logit * repeat_penalty (logit <= 0),
then logit -= count * frequency_penalty + presence_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import LocalcoderError

# Qwen3-Coder-Next model card: temperature 1.0, top_p 0.95, top_k 40
DEFAULTS = dict(temperature=1.0, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.0, frequency_penalty=0.0,
                presence_penalty=0.0)


class SamplingError(LocalcoderError):
    """A bad sampling option; `option` names the first one."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


@dataclass
class Sampler:
    temperature: float = DEFAULTS["temperature"]
    top_k: int = DEFAULTS["top_k"]
    top_p: float = DEFAULTS["top_p"]
    min_p: float = DEFAULTS["min_p"]
    repeat_penalty: float = DEFAULTS["repeat_penalty"]
    repeat_last_n: int = 64
    seed: int | None = None
    frequency_penalty: float = DEFAULTS["frequency_penalty"]
    presence_penalty: float = DEFAULTS["presence_penalty"]
    logit_bias: dict[int, float] | None = None  # added to a token's logit before anything else (OpenAI's)
    rng: np.random.Generator = field(init=False, repr=False)
    _bias: tuple = field(init=False, repr=False)  # logit_bias as (ids, biases) arrays, made once

    def __post_init__(self):
        problems = []  # (option, what is wrong)
        if not 0 <= self.temperature < float("inf"):  # also NaN
            problems.append(("temperature", f"temperature {self.temperature} is not a finite number >= 0"))
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            problems.append(("top_k", f"top_k {self.top_k!r} is not a whole number >= 0 (0 disables it)"))
        if not isinstance(self.repeat_last_n, (int, np.integer)) or self.repeat_last_n < -1:
            problems.append(("repeat_last_n", f"repeat_last_n {self.repeat_last_n!r} is not a whole number >= -1 "
                             "(0 disables the penalties, -1 covers the whole context)"))
        if not 0 <= self.top_p <= 1:
            problems.append(("top_p", f"top_p {self.top_p} not in [0, 1] (0 keeps only the most likely token)"))
        if not 0 <= self.min_p < 1:
            problems.append(("min_p", f"min_p {self.min_p} not in [0, 1)"))
        if not 0 < self.repeat_penalty < float("inf"):
            problems.append(("repeat_penalty", f"repeat_penalty {self.repeat_penalty} is not a finite number > 0 "
                             "(1 disables it)"))
        for name in ("frequency_penalty", "presence_penalty"):  # OpenAI's range
            if not -2 <= getattr(self, name) <= 2:
                problems.append((name, f"{name} {getattr(self, name)} not in [-2, 2] (0 disables it)"))
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, (int, np.integer)) or token < 0 or not -100 <= bias <= 100:
                problems.append(("logit_bias", f"logit_bias {{{token!r}: {bias!r}}}: a token id >= 0 and a bias "
                                 "in [-100, 100] (-100 bans the token)"))
                break
        if problems:
            raise SamplingError("bad sampling options: " + "; ".join(p for _, p in problems), problems[0][0])
        # a negative seed (llama.cpp's -1) draws a fresh one, as no seed does
        bias = self.logit_bias or {}
        values = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
        # what penalize adds per token: -100 bans the token (OpenAI)
        self._bias = (np.fromiter(bias, dtype=np.int64, count=len(bias)), np.where(values <= -100, -np.inf, values))
        self.reset()

    def reset(self) -> None:
        """Back to the seed's first draw (a new conversation samples as a new session would)."""
        self.rng = np.random.default_rng(None if self.seed is None or self.seed < 0 else self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def penalize(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The logits (float64, a copy) after the penalties for the last repeat_last_n tokens of history."""
        logits = np.asarray(logits, dtype=np.float64).copy()
        if self.logit_bias:
            ids, bias = self._bias
            keep = ids < len(logits)
            logits[ids[keep]] += bias[keep]
        window = history if self.repeat_last_n < 0 else history[max(len(history) - self.repeat_last_n, 0):]
        if len(window) and (self.repeat_penalty != 1.0 or self.frequency_penalty or self.presence_penalty):
            recent, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            vals = logits[recent]
            vals = np.where(vals > 0, vals / self.repeat_penalty, vals * self.repeat_penalty)
            logits[recent] = vals - (counts * self.frequency_penalty + self.presence_penalty)
        return logits

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        logits = self.penalize(logits, history)
        if self.greedy:
            return int(np.argmax(logits))
        if 0 < self.top_k < len(logits):
            # top-k without sorting the whole vocabulary every token: every id tied with the k-th value is a
            # candidate, so the stable sort of the candidates gives exactly the first k of a full stable argsort
            kth = np.partition(logits, len(logits) - self.top_k)[len(logits) - self.top_k]
            cand = np.flatnonzero(logits >= kth)
            order = cand[np.argsort(-logits[cand], kind="stable")][: self.top_k]
        else:
            order = np.argsort(-logits, kind="stable")
        top = logits[order]
        probs = np.exp(top - top[0])
        probs /= probs.sum()
        if self.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, top, probs = order[:keep], top[:keep], probs[:keep]
        if self.min_p > 0:
            keep = probs >= self.min_p * probs[0]
            order, top = order[keep], top[keep]
        scaled = (top - top[0]) / self.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])


def make_sampler(temperature: float = DEFAULTS["temperature"], top_k: int = DEFAULTS["top_k"],
                 top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
                 repeat_penalty: float = DEFAULTS["repeat_penalty"], repeat_last_n: int = 64,
                 seed: int | None = None, frequency_penalty: float = DEFAULTS["frequency_penalty"],
                 presence_penalty: float = DEFAULTS["presence_penalty"],
                 logit_bias: dict[int, float] | None = None) -> Sampler:
    return Sampler(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, frequency_penalty,
                   presence_penalty, logit_bias)


def greedy() -> Sampler:
    return Sampler(temperature=0.0)
