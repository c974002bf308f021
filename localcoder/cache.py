"""Per-layer inference state as plain data: the attention KV cache, and the DeltaNet conv and recurrent states.

`make_cache()` returns a ModelCache that the forward pass takes and updates; `snapshot()` / `restore()` copy it,
so a chat can roll back a turn without reprocessing the history.

The DeltaNet state cannot be rewound (it is a running sum), so prompt reuse works with checkpoints: a
`Checkpoint` copies the DeltaNet states (36 x 2 MB on Qwen3-Coder-Next) but only the *lengths* of the
append-only KV caches; `rollback(cp)` restores them and truncates the KV caches, which is exact as long as
the KV rows before the checkpoint were not overwritten (true for any checkpoint taken on the current line of
history, i.e. before the position being rolled back to).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of one attention layer: (capacity, Hkv, D), of which the first n are filled."""

    k: np.ndarray
    v: np.ndarray
    n: int = 0

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store T new positions (T, Hkv, D) and return views of all n + T positions."""
        T = k.shape[0]
        if self.n + T > self.k.shape[0]:
            capacity = max(2 * self.k.shape[0], self.n + T, 256)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
                grown[: self.n] = old[: self.n]
                setattr(self, name, grown)
        self.k[self.n : self.n + T] = k
        self.v[self.n : self.n + T] = v
        self.n += T
        return self.k[: self.n], self.v[: self.n]

    def copy(self) -> "KVCache":
        return KVCache(self.k[: self.n].copy(), self.v[: self.n].copy(), self.n)

    @property
    def nbytes(self) -> int:
        return self.k[: self.n].nbytes + self.v[: self.n].nbytes


@dataclass
class DeltaNetState:
    """conv: the last K-1 inputs of the causal conv (K-1, C); ssm: the recurrent state (Hv, Dk, Dv), float32."""

    conv: np.ndarray
    ssm: np.ndarray

    def copy(self) -> "DeltaNetState":
        return DeltaNetState(self.conv.copy(), self.ssm.copy())

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


@dataclass(frozen=True)
class Checkpoint:
    pos: int
    tokens: tuple[int, ...]
    states: tuple  # a DeltaNetState copy per recurrent layer, the KV length per attention layer

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states if isinstance(s, DeltaNetState))


@dataclass
class ModelCache:
    layers: list
    pos: int = 0  # tokens processed so far
    tokens: list[int] = field(default_factory=list)  # the ids those positions hold (for prompt reuse)
    broken: bool = False  # a forward pass was interrupted half-way: only checkpoints are trustworthy

    def snapshot(self) -> "ModelCache":
        return ModelCache([layer.copy() for layer in self.layers], self.pos, list(self.tokens), self.broken)

    def restore(self, snap: "ModelCache") -> None:
        fresh = snap.snapshot()
        self.layers, self.pos, self.tokens, self.broken = fresh.layers, fresh.pos, fresh.tokens, fresh.broken

    def checkpoint(self) -> Checkpoint:
        states = tuple(layer.copy() if isinstance(layer, DeltaNetState) else layer.n for layer in self.layers)
        return Checkpoint(self.pos, tuple(self.tokens), states)

    def rollback(self, cp: Checkpoint) -> None:
        """Return to a checkpoint taken earlier on this cache's current history."""
        if cp.pos > self.pos or tuple(self.tokens[:cp.pos]) != cp.tokens:
            raise ValueError("checkpoint is not on this cache's history")
        for i, saved in enumerate(cp.states):
            if isinstance(saved, DeltaNetState):
                self.layers[i] = saved.copy()
            else:
                self.layers[i].n = saved
        self.pos, self.tokens, self.broken = cp.pos, list(cp.tokens), False

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    a_, b_ = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.nonzero(a_ != b_)[0]
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """Checkpoints of one conversation line, and the choice of where to resume for a new prompt.

    The live cache is reused when its tokens are a prefix of the new prompt; otherwise the longest checkpoint
    that is a prefix is restored; otherwise it starts from empty. Keeps at most `max_checkpoints`.
    """

    def __init__(self, cache: ModelCache, max_checkpoints: int = 8):
        self.cache = cache
        self.checkpoints: list[Checkpoint] = []
        self.max_checkpoints = max_checkpoints

    def save(self) -> None:
        if self.cache.broken or self.checkpoints and self.checkpoints[-1].pos == self.cache.pos:
            return
        self.checkpoints.append(self.cache.checkpoint())
        del self.checkpoints[:-self.max_checkpoints]

    def resume(self, ids, make_empty) -> int:
        """Prepare the cache to continue with `ids`; returns how many leading ids it already holds.
        At least one id is always left to process, so the caller gets fresh logits."""
        limit = len(ids) - 1
        live = self.cache
        if not live.broken and live.pos <= limit and common_prefix(live.tokens, ids) == live.pos:
            return live.pos
        best = None
        for cp in self.checkpoints:
            if cp.pos <= limit and cp.pos <= live.pos and tuple(live.tokens[:cp.pos]) == cp.tokens \
                    and common_prefix(cp.tokens, ids) == cp.pos and (best is None or cp.pos > best.pos):
                best = cp
        if best is None:
            fresh = make_empty()
            self.cache.layers, self.cache.pos, self.cache.tokens, self.cache.broken = fresh.layers, 0, [], False
            self.checkpoints.clear()
            return 0
        self.cache.rollback(best)
        self.checkpoints = [cp for cp in self.checkpoints if cp.pos <= best.pos]
        return best.pos


def make_cache(cfg: ModelConfig, kv_dtype=np.float32) -> ModelCache:
    layers = []
    for i in range(cfg.n_layer):
        if cfg.is_recurrent(i):
            layers.append(DeltaNetState(
                conv=np.zeros((cfg.ssm_d_conv - 1, cfg.ssm_conv_channels), dtype=np.float32),
                ssm=np.zeros((cfg.ssm_n_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim), dtype=np.float32),
            ))
        else:
            empty = np.zeros((0, cfg.n_head_kv, cfg.head_dim), dtype=kv_dtype)
            layers.append(KVCache(empty, empty.copy()))
    return ModelCache(layers)


__all__ = ["KVCache", "DeltaNetState", "ModelCache", "make_cache"]
