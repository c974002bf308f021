"""Routed experts of one MoE layer: each expert is one contiguous byte range of each `*_exps` tensor.

Files store the gate and up projections either as two tensors (`ffn_gate_exps`, `ffn_up_exps`) or fused
(`ffn_gate_up_exps`, gate rows first); `expert(e)` hides the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_file import QTensor


@dataclass(frozen=True)
class ExpertSet:
    layer: int
    down: QTensor  # (E, D, F)
    gate: QTensor | None = None  # (E, F, D)
    up: QTensor | None = None  # (E, F, D)
    gate_up: QTensor | None = None  # (E, 2F, D): [gate | up]

    @property
    def n_expert(self) -> int:
        return self.down.shape[0]

    @property
    def n_ff(self) -> int:
        return self.down.shape[2]

    def expert(self, e: int) -> tuple[QTensor, QTensor, QTensor]:
        """(gate (F, D), up (F, D), down (D, F)) of expert e, as views of the file."""
        if self.gate_up is not None:
            both = self.gate_up[e]
            return both.rows(0, self.n_ff), both.rows(self.n_ff, 2 * self.n_ff), self.down[e]
        return self.gate[e], self.up[e], self.down[e]

    def expert_nbytes(self) -> int:
        """Bytes one expert occupies across its tensors."""
        tensors = [self.gate_up] if self.gate_up is not None else [self.gate, self.up]
        return sum(t.nbytes // t.shape[0] for t in tensors + [self.down])
