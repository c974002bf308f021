"""Qwen3-Next (GGUF arch `qwen3next`), top to bottom, over backend ops only.

    x = embed(tokens)
    for each layer:                                  # 3 x Gated DeltaNet, then 1 x gated attention, repeated
        x = x + token_mixer(rms_norm(x))
        x = x + moe(rms_norm(x))                      # top-k routed experts + sigmoid-gated shared expert
    logits = output(rms_norm(x))

Runtime names are the GGUF names. RMSNorm weights in GGUF already hold (1 + w) of the zero-centred HF
norms, except `ssm_norm`, the DeltaNet output norm, which is a plain gated RMSNorm: rms_norm(o) * w * silu(z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends import SharedExpert
from ..cache import DeltaNetState, KVCache, ModelCache
from ..config import ModelConfig
from ..errors import GGUFError
from ..experts import ExpertSet
from ..gguf_file import QTensor


@dataclass(frozen=True)
class Layer:
    index: int
    tensors: dict[str, QTensor]  # this layer's tensors by GGUF name without the `blk.N.` prefix
    experts: ExpertSet

    def __post_init__(self):
        # layer.attn_qkv etc.: the tensors as attributes, set once (the forward pass reads them every token)
        for name, t in self.tensors.items():
            object.__setattr__(self, name.removesuffix(".weight"), t)

    def __getattr__(self, name: str) -> None:
        return None  # a tensor this layer's layout does not have (e.g. ssm_in when split)


@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    output_norm: QTensor
    output: QTensor  # token_embd when the file ties them
    layers: tuple[Layer, ...]


def load_weights(cfg: ModelConfig, tensors: dict[str, QTensor], path: str = "model") -> Weights:
    """Pick and shape-check every tensor the forward pass needs; loading accepts every published layout."""
    D, V, E = cfg.n_embd, cfg.n_vocab, cfg.n_expert
    Hk, Hv, Dk, Dv = cfg.ssm_n_k_heads, cfg.ssm_n_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim

    def need(name: str, shape: tuple[int, ...], alt_shapes=()) -> QTensor:
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path} lacks tensor {name}; the file is incomplete or not a qwen3next model")
        if t.shape != shape and t.shape not in alt_shapes:
            raise GGUFError(f"{path}: tensor {name} has shape {list(t.shape)}, the metadata implies "
                            f"{list(shape)}; the file is inconsistent, re-convert it")
        return t

    token_embd = need("token_embd.weight", (V, D))
    output = tensors.get("output.weight")
    output = token_embd if output is None else need("output.weight", (V, D))
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        t = {"attn_norm.weight": need(p + "attn_norm.weight", (D,)),
             "post_attention_norm.weight": need(p + "post_attention_norm.weight", (D,))}
        if cfg.is_recurrent(i):
            if p + "ssm_in.weight" in tensors:  # fused [q | k | v | z] per key head
                t["ssm_in.weight"] = need(p + "ssm_in.weight", (2 * Hk * Dk + 2 * Hv * Dv, D))
            else:
                t["attn_qkv.weight"] = need(p + "attn_qkv.weight", (cfg.ssm_conv_channels, D))
                t["attn_gate.weight"] = need(p + "attn_gate.weight", (Hv * Dv, D))
            t["ssm_ba.weight"] = need(p + "ssm_ba.weight", (2 * Hv, D))
            t["ssm_conv1d.weight"] = need(p + "ssm_conv1d.weight", (cfg.ssm_conv_channels, cfg.ssm_d_conv))
            t["ssm_a"] = need(p + "ssm_a", (Hv,))
            t["ssm_dt"] = need(p + "ssm_dt.bias", (Hv,))
            t["ssm_norm.weight"] = need(p + "ssm_norm.weight", (Dv,), alt_shapes=((Hv, Dv),))
            t["ssm_out.weight"] = need(p + "ssm_out.weight", (D, Hv * Dv))
        else:
            Hq, Hkv, Dh = cfg.n_head, cfg.n_head_kv, cfg.head_dim
            t["attn_q.weight"] = need(p + "attn_q.weight", (2 * Hq * Dh, D))
            t["attn_k.weight"] = need(p + "attn_k.weight", (Hkv * Dh, D))
            t["attn_v.weight"] = need(p + "attn_v.weight", (Hkv * Dh, D))
            t["attn_q_norm.weight"] = need(p + "attn_q_norm.weight", (Dh,))
            t["attn_k_norm.weight"] = need(p + "attn_k_norm.weight", (Dh,))
            t["attn_output.weight"] = need(p + "attn_output.weight", (D, Hq * Dh))
        F = cfg.n_ff_exp
        t["ffn_gate_inp.weight"] = need(p + "ffn_gate_inp.weight", (E, D))
        down = need(p + "ffn_down_exps.weight", (E, D, F))
        if p + "ffn_gate_up_exps.weight" in tensors:
            experts = ExpertSet(i, down, gate_up=need(p + "ffn_gate_up_exps.weight", (E, 2 * F, D)))
        else:
            experts = ExpertSet(i, down, gate=need(p + "ffn_gate_exps.weight", (E, F, D)),
                                up=need(p + "ffn_up_exps.weight", (E, F, D)))
        if cfg.n_ff_shexp:
            Fs = cfg.n_ff_shexp
            t["ffn_gate_inp_shexp.weight"] = need(p + "ffn_gate_inp_shexp.weight", (D,), alt_shapes=((1, D),))
            t["ffn_gate_shexp.weight"] = need(p + "ffn_gate_shexp.weight", (Fs, D))
            t["ffn_up_shexp.weight"] = need(p + "ffn_up_shexp.weight", (Fs, D))
            t["ffn_down_shexp.weight"] = need(p + "ffn_down_shexp.weight", (D, Fs))
        layers.append(Layer(i, t, experts))
    return Weights(token_embd, need("output_norm.weight", (D,)), output, tuple(layers))


def gated_deltanet(be, cfg: ModelConfig, w: Layer, x, state: DeltaNetState):
    """Gated DeltaNet token mixer. x (T, D) -> (T, D); updates state.conv and state.ssm."""
    xp = be.xp
    T = x.shape[0]
    Hk, Hv, Dk, Dv = cfg.ssm_n_k_heads, cfg.ssm_n_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim
    r = Hv // Hk  # value heads per key head (consecutive)
    # the input projections share x: one pass over their weights
    if w.ssm_in is not None:
        # fused projection, grouped per key head as [q_g | k_g | v_g | z_g]
        qkvz, ba = be.matmuls(x, (w.ssm_in, w.ssm_ba))
        qkvz = qkvz.reshape(T, Hk, 2 * Dk + 2 * r * Dv)
        q, k = qkvz[..., :Dk], qkvz[..., Dk:2 * Dk]
        v, z = qkvz[..., 2 * Dk:2 * Dk + r * Dv], qkvz[..., 2 * Dk + r * Dv:]
        qkv = xp.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=-1)
    else:  # qkv (T, Hk*Dk | Hk*Dk | Hv*Dv), the output gate z, and [b | a]
        qkv, z, ba = be.matmuls(x, (w.attn_qkv, w.attn_gate, w.ssm_ba))
    z = z.reshape(T, Hv, Dv)
    ba = ba.reshape(T, Hk, 2 * r)  # per key head [b_g | a_g]
    b, a = ba[..., :r].reshape(T, Hv), ba[..., r:].reshape(T, Hv)

    qkv, state.conv = be.conv1d(qkv, be.vector(w.ssm_conv1d), state.conv)  # causal conv + SiLU
    q = qkv[:, :Hk * Dk].reshape(T, Hk, Dk)
    k = qkv[:, Hk * Dk:2 * Hk * Dk].reshape(T, Hk, Dk)
    v = qkv[:, 2 * Hk * Dk:].reshape(T, Hv, Dv)
    q = be.l2_norm(q, 1e-6) * np.float32(Dk ** -0.5)
    k = be.l2_norm(k, 1e-6)
    q, k = xp.repeat(q, r, axis=1), xp.repeat(k, r, axis=1)  # (T, Hv, Dk): value heads share their key head

    beta = be.sigmoid(b)  # (T, Hv)
    g = be.vector(w.ssm_a) * be.softplus(a + be.vector(w.ssm_dt))  # ssm_a = -exp(A_log): g <= 0
    o, state.ssm = be.gated_delta(q, k, v, g, beta, state.ssm)  # (T, Hv, Dv)

    o = be.rms_norm(o, be.vector(w.ssm_norm), cfg.rms_eps) * be.silu(z)
    return be.matmul(o.reshape(T, Hv * Dv), w.ssm_out)


def gated_attention(be, cfg: ModelConfig, w: Layer, x, positions, kv: KVCache):
    """Softmax attention with an output gate, q/k RMSNorm and partial RoPE. x (T, D) -> (T, D)."""
    T = x.shape[0]
    Hq, Hkv, Dh = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    qg, k, v = be.matmuls(x, (w.attn_q, w.attn_k, w.attn_v))
    qg = qg.reshape(T, Hq, 2 * Dh)  # per head [q_h | gate_h]
    q, gate = qg[..., :Dh], qg[..., Dh:].reshape(T, Hq * Dh)
    k, v = k.reshape(T, Hkv, Dh), v.reshape(T, Hkv, Dh)
    q = be.rope(be.rms_norm(q, be.vector(w.attn_q_norm), cfg.rms_eps), positions, cfg.n_rot, cfg.rope_theta)
    k = be.rope(be.rms_norm(k, be.vector(w.attn_k_norm), cfg.rms_eps), positions, cfg.n_rot, cfg.rope_theta)
    keys, values = be.kv_append(kv, k, v)
    o = be.attention(q, keys, values, positions)  # (T, Hq, Dh)
    return be.matmul(o.reshape(T, Hq * Dh) * be.sigmoid(gate), w.attn_output)


def route(be, cfg: ModelConfig, w: Layer, x):
    """Softmax over the router logits, top-k, renormalised. -> ids (T, k) int, weights (T, k) float32."""
    logits = be.matmul(x, w.ffn_gate_inp)  # (T, E)
    return be.topk_softmax(logits, cfg.n_expert_used)


def moe(be, cfg: ModelConfig, w: Layer, x, next_layer: Layer | None = None):
    ids, weights = route(be, cfg, w, x)
    if next_layer is not None and next_layer.experts.speculative:
        # streaming: guess the next layer's experts by applying its router to this layer's input, and start
        # reading them now (Eliseev & Mazur); a wrong guess costs bandwidth, never correctness
        guess, _ = route(be, cfg, next_layer, x)
        next_layer.experts.prefetch(np.unique(np.asarray(guess)))
    shared = None
    if w.ffn_gate_shexp is not None:  # y = routed + sigmoid(x . shared gate) * swiglu_shared(x)
        shared_gate = be.sigmoid(x @ be.vector(w.ffn_gate_inp_shexp).reshape(-1, 1))  # (T, 1)
        shared = SharedExpert(w.ffn_gate_shexp, w.ffn_up_shexp, w.ffn_down_shexp, shared_gate)
    return be.moe(x, w.experts, ids, weights, shared)


def forward(be, cfg: ModelConfig, weights: Weights, tokens, cache: ModelCache, all_logits: bool = True,
            layer_out: list | None = None):
    """Process `tokens` after the cache's history; returns logits (T, V) or (1, V) for the last position."""
    xp = be.xp
    T = len(tokens)
    positions = xp.arange(cache.pos, cache.pos + T)
    x = be.embed(xp.asarray(tokens), weights.token_embd)  # (T, D)
    for i, (layer, state) in enumerate(zip(weights.layers, cache.layers)):
        h = be.rms_norm(x, be.vector(layer.attn_norm), cfg.rms_eps)
        if cfg.is_recurrent(layer.index):
            x = x + gated_deltanet(be, cfg, layer, h, state)
        else:
            x = x + gated_attention(be, cfg, layer, h, positions, state)
        h = be.rms_norm(x, be.vector(layer.post_attention_norm), cfg.rms_eps)
        x = x + moe(be, cfg, layer, h, weights.layers[i + 1] if i + 1 < len(weights.layers) else None)
        if layer_out is not None:
            layer_out.append(x)
    cache.pos += T
    cache.tokens.extend(int(t) for t in tokens)
    if not all_logits:
        x = x[-1:]
    return be.matmul(be.rms_norm(x, be.vector(weights.output_norm), cfg.rms_eps), weights.output)
