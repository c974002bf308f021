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


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy-order shape of every tensor in the layout llama.cpp's converter writes (split
    attn_qkv + attn_gate, separate gate and up experts), MTP layers included (attention layers, plus their
    nextn tensors). What the loader requires and the converter checks before writing."""
    D, V, E, F, Fs = cfg.n_embd, cfg.n_vocab, cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
    Hv, Dv = cfg.ssm_n_v_heads, cfg.ssm_v_dim
    Hq, Hkv, Dh = cfg.n_head, cfg.n_head_kv, cfg.head_dim
    out = {"token_embd.weight": (V, D), "output.weight": (V, D), "output_norm.weight": (D,)}
    for i in range(cfg.n_block):
        t = {"attn_norm.weight": (D,), "post_attention_norm.weight": (D,)}
        if i < cfg.n_layer and cfg.is_recurrent(i):
            t.update({"attn_qkv.weight": (cfg.ssm_conv_channels, D), "attn_gate.weight": (Hv * Dv, D),
                      "ssm_ba.weight": (2 * Hv, D), "ssm_conv1d.weight": (cfg.ssm_conv_channels, cfg.ssm_d_conv),
                      "ssm_a": (Hv,), "ssm_dt.bias": (Hv,), "ssm_norm.weight": (Dv,), "ssm_out.weight": (D, Hv * Dv)})
        else:
            t.update({"attn_q.weight": (2 * Hq * Dh, D), "attn_k.weight": (Hkv * Dh, D),
                      "attn_v.weight": (Hkv * Dh, D), "attn_q_norm.weight": (Dh,), "attn_k_norm.weight": (Dh,),
                      "attn_output.weight": (D, Hq * Dh)})
        t.update({"ffn_gate_inp.weight": (E, D), "ffn_down_exps.weight": (E, D, F),
                  "ffn_gate_exps.weight": (E, F, D), "ffn_up_exps.weight": (E, F, D)})
        if Fs:
            t.update({"ffn_gate_inp_shexp.weight": (1, D), "ffn_gate_shexp.weight": (Fs, D),
                      "ffn_up_shexp.weight": (Fs, D), "ffn_down_shexp.weight": (D, Fs)})
        if i >= cfg.n_layer:
            t.update({"nextn.eh_proj.weight": (D, 2 * D), "nextn.enorm.weight": (D,), "nextn.hnorm.weight": (D,),
                      "nextn.shared_head_norm.weight": (D,)})
        out.update({f"blk.{i}.{k}": shape for k, shape in t.items()})
    return out


def load_weights(cfg: ModelConfig, tensors: dict[str, QTensor], path: str = "model") -> Weights:
    """Pick and shape-check every tensor the forward pass needs; loading accepts every published layout."""
    D, E, F = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp
    Hk, Hv, Dk, Dv = cfg.ssm_n_k_heads, cfg.ssm_n_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim
    shapes = tensor_shapes(cfg)

    def need(name: str, shape: tuple[int, ...] | None = None, alt_shapes=()) -> QTensor:
        """The tensor, with its shape in tensor_shapes (or `shape`, for the fused layouts), or one of
        alt_shapes."""
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path} lacks tensor {name}; the file is incomplete or not a qwen3next model")
        shape = shape or shapes[name]
        if t.shape != shape and t.shape not in alt_shapes:
            raise GGUFError(f"{path}: tensor {name} has shape {list(t.shape)}, the metadata implies "
                            f"{list(shape)}; the file is inconsistent, re-convert it")
        return t

    token_embd = need("token_embd.weight")
    output = need("output.weight") if "output.weight" in tensors else token_embd
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."

        def take(*names: str) -> dict[str, QTensor]:
            return {n: need(p + n) for n in names}

        t = take("attn_norm.weight", "post_attention_norm.weight")
        if cfg.is_recurrent(i):
            if p + "ssm_in.weight" in tensors:  # fused [q | k | v | z] per key head
                t["ssm_in.weight"] = need(p + "ssm_in.weight", (2 * Hk * Dk + 2 * Hv * Dv, D))
            else:
                t.update(take("attn_qkv.weight", "attn_gate.weight"))
            t.update(take("ssm_ba.weight", "ssm_conv1d.weight", "ssm_a"))
            t["ssm_dt"] = need(p + "ssm_dt.bias")
            t["ssm_norm.weight"] = need(p + "ssm_norm.weight", alt_shapes=((Hv, Dv),))
            t.update(take("ssm_out.weight"))
        else:
            t.update(take("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q_norm.weight",
                          "attn_k_norm.weight", "attn_output.weight"))
        t.update(take("ffn_gate_inp.weight"))
        down = need(p + "ffn_down_exps.weight")
        if p + "ffn_gate_up_exps.weight" in tensors:
            experts = ExpertSet(i, down, gate_up=need(p + "ffn_gate_up_exps.weight", (E, 2 * F, D)))
        else:
            experts = ExpertSet(i, down, gate=need(p + "ffn_gate_exps.weight"), up=need(p + "ffn_up_exps.weight"))
        if cfg.n_ff_shexp:
            t["ffn_gate_inp_shexp.weight"] = need(p + "ffn_gate_inp_shexp.weight", (D,), alt_shapes=((1, D),))
            t.update(take("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"))
        layers.append(Layer(i, t, experts))
    return Weights(token_embd, need("output_norm.weight"), output, tuple(layers))


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
        guess, guess_weights = route(be, cfg, next_layer, x)
        guessed, at = np.unique(np.asarray(guess), return_inverse=True)
        score = np.bincount(at.reshape(-1), weights=np.asarray(guess_weights).reshape(-1), minlength=len(guessed))
        next_layer.experts.prefetch(guessed[np.argsort(-score, kind="stable")])  # the most probable first
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
