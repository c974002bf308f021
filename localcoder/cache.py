"""Per-layer inference state as plain data: the attention KV cache, and the DeltaNet conv and recurrent states.

`make_cache()` returns a ModelCache that the forward pass takes and updates; `snapshot()` / `restore()` copy it,
so a chat can roll back a turn without reprocessing the history.
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


@dataclass
class ModelCache:
    layers: list
    pos: int = 0  # tokens processed so far
    tokens: list[int] = field(default_factory=list)  # the ids those positions hold (for prompt reuse)

    def snapshot(self) -> "ModelCache":
        return ModelCache([layer.copy() for layer in self.layers], self.pos, list(self.tokens))

    def restore(self, snap: "ModelCache") -> None:
        fresh = snap.snapshot()
        self.layers, self.pos, self.tokens = fresh.layers, fresh.pos, fresh.tokens

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


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
