"""The model configuration: one frozen dataclass, built from GGUF metadata in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import GGUFError

ARCH = "qwen3next"
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
INT_MAX = 2 ** 31 - 1  # llama.cpp keeps hyper-parameters in int32/uint32_t


def hyperparameter(value: Any, kind: type = int, low: float = 1, high: float | None = None) -> int | float:
    """`value` as a whole number in low..high (kind int; high defaults to INT_MAX) or a finite number in
    (low, high] (kind float); ValueError saying what was expected otherwise. The one check for the numbers of
    GGUF metadata and config.json alike: a string, a bool, a fraction, NaN or a negative epsilon would otherwise
    surface as a traceback deep in the converter or as NaN logits at the first token."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        if not (number and (isinstance(value, int) or value.is_integer()) and value >= low):
            raise ValueError(f"is not a whole number >= {low}")
        if value > (INT_MAX if high is None else high):
            raise ValueError(f"is too large (at most {INT_MAX if high is None else high:,})")
        return int(value)
    try:
        x = float(value) if number else math.nan
    except OverflowError:  # an int beyond float range
        x = math.inf
    if not (math.isfinite(x) and x > low):
        raise ValueError(f"is not a finite number > {low}")
    if high is not None and x > high:
        raise ValueError(f"is too large (at most {high:g})")
    return x


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    # gated attention
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_theta: float
    # gated DeltaNet: Hk query/key heads of Dk, Hv value heads of Dv, causal conv of width d_conv
    ssm_n_k_heads: int
    ssm_n_v_heads: int
    ssm_k_dim: int
    ssm_v_dim: int
    ssm_d_conv: int
    # mixture of experts
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    recurrent_layers: tuple[bool, ...]  # of the n_layer layers the forward pass runs
    # multi-token-prediction (nextn) layers stored after the n_layer body layers (block_count = n_layer +
    # n_nextn_layer). Like llama.cpp (hparams.n_layer()), the forward pass never runs them.
    n_nextn_layer: int = 0

    @property
    def n_block(self) -> int:
        """block_count of the file: the body layers and the MTP layers after them."""
        return self.n_layer + self.n_nextn_layer

    def is_recurrent(self, layer: int) -> bool:
        return self.recurrent_layers[layer]

    @property
    def ssm_conv_channels(self) -> int:
        """Channels of the causal conv: [q | k | v] of all heads."""
        return 2 * self.ssm_n_k_heads * self.ssm_k_dim + self.ssm_n_v_heads * self.ssm_v_dim

    @property
    def n_attention_layers(self) -> int:
        return sum(not r for r in self.recurrent_layers)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], n_vocab: int, path: str = "model") -> "ModelConfig":
        arch = metadata.get("general.architecture")
        if arch != ARCH:
            raise GGUFError(f"expected arch {ARCH}, file says {arch} ({path}); localcoder runs Qwen3-Next / "
                            "Qwen3-Coder-Next GGUFs only")

        def key(name: str, kind=int, low: float = 1, high: float | None = None, default: Any = None):
            full = f"{ARCH}.{name}"
            if full not in metadata and default is None:
                raise GGUFError(f"{path} lacks metadata key {full}; the file is incomplete or was made by an "
                                "old converter: re-convert it with `localcoder convert`")
            value = metadata.get(full, default)
            try:
                return hyperparameter(value, kind, low, high)
            except ValueError as e:
                raise GGUFError(f"{path}: metadata key {full} = {value!r} {e}; the file is damaged or was made by "
                                "a broken converter: re-download or re-convert it") from None

        n_block = key("block_count", high=MAX_LAYERS)
        # llama.cpp: n_layer() = block_count - nextn_predict_layers; the MTP blocks are not decoder layers
        n_nextn = key("nextn_predict_layers", low=0, default=0)
        if n_nextn >= n_block:
            raise GGUFError(f"{path}: metadata key {ARCH}.nextn_predict_layers = {n_nextn} leaves no decoder layer "
                            f"of block_count {n_block}; the file is damaged: re-download or re-convert it")
        n_layer = n_block - n_nextn
        n_embd = key("embedding_length")
        n_head = key("attention.head_count")
        n_head_kv = key("attention.head_count_kv")
        head_dim = key("attention.key_length")
        n_k_heads = key("ssm.group_count")
        n_v_heads = key("ssm.time_step_rank")
        d_inner = key("ssm.inner_size")
        if f"{ARCH}.attention.recurrent_layers" in metadata:
            flags = metadata[f"{ARCH}.attention.recurrent_layers"]
            if not isinstance(flags, list):
                raise GGUFError(f"{path}: metadata key {ARCH}.attention.recurrent_layers = {flags!r} is not a list "
                                "of per-layer flags; the file is damaged: re-download or re-convert it")
            recurrent = tuple(bool(x) for x in flags)
        else:
            interval = key("full_attention_interval")
            recurrent = tuple((i + 1) % interval != 0 for i in range(n_block))

        problems = []
        if len(recurrent) != n_block:
            problems.append(f"recurrent_layers has {len(recurrent)} entries for {n_block} layers")
        recurrent = recurrent[:n_layer]
        if n_head % n_head_kv:
            problems.append(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        if n_v_heads % n_k_heads:
            problems.append(f"ssm.time_step_rank {n_v_heads} is not a multiple of ssm.group_count {n_k_heads}")
        if d_inner % n_v_heads:
            problems.append(f"ssm.inner_size {d_inner} is not a multiple of ssm.time_step_rank {n_v_heads}")
        n_rot = key("rope.dimension_count")
        if n_rot > head_dim or n_rot % 2:
            problems.append(f"rope.dimension_count {n_rot} does not fit head dim {head_dim}")
        n_expert, n_used = key("expert_count"), key("expert_used_count")
        if not 0 < n_used <= n_expert:
            problems.append(f"expert_used_count {n_used} is not in 1..expert_count {n_expert}")
        if problems:
            raise GGUFError(f"{path} has inconsistent metadata: {'; '.join(problems)}")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and n_vocab != len(tokens):
            # llama.cpp: n_vocab is the token list's length and token_embd must be {n_embd, n_vocab}
            raise GGUFError(f"{path}: token_embd.weight has {n_vocab} rows but the vocabulary (tokenizer.ggml.tokens) "
                            f"has {len(tokens)} tokens; llama.cpp refuses such a file too: re-convert it from a "
                            "checkpoint whose vocab_size equals its embedding rows")

        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            n_vocab=n_vocab,
            n_ctx_train=key("context_length"),
            rms_eps=key("attention.layer_norm_rms_epsilon", float, low=0),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=n_rot,
            rope_theta=key("rope.freq_base", float, low=0),
            ssm_n_k_heads=n_k_heads,
            ssm_n_v_heads=n_v_heads,
            ssm_k_dim=key("ssm.state_size"),
            ssm_v_dim=d_inner // n_v_heads,
            ssm_d_conv=key("ssm.conv_kernel"),
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=key("expert_feed_forward_length"),
            n_ff_shexp=key("expert_shared_feed_forward_length", low=0, default=0),
            recurrent_layers=recurrent,
            n_nextn_layer=n_nextn,
        )
