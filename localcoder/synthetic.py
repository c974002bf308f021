"""Random-weight qwen3next GGUFs with real dimensions and the real Qwen tokenizer.

Used by `localcoder demo` (a small model written on first use, so the product runs with no download) and
`localcoder bench --synthetic` (the full Qwen3-Coder-Next shapes with llama.cpp's Q4_K_M type mix, for speed
and memory figures). Quantized tensors are random blocks: random quant bytes with scales chosen so the
weights have roughly the spread of a trained model's (std ~0.02); their words are noise.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .errors import LocalcoderError
from .paths import replacing

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    ssm_n_k_heads: int
    ssm_n_v_heads: int
    ssm_k_dim: int
    ssm_v_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    n_ctx_train: int = 262144
    rope_theta: float = 5e6
    d_conv: int = 4
    full_attention_interval: int = 4
    tied: bool = False


PRESETS = {
    # Qwen3-Coder-Next: 48 layers = 12 x [3 x DeltaNet, 1 x attention], hidden 2048, 512 experts top-10
    "qwen3-coder-next": Dims(n_layer=48, n_embd=2048, n_vocab=151936, n_head=16, n_head_kv=2, head_dim=256,
                             n_rot=64, ssm_n_k_heads=16, ssm_n_v_heads=32, ssm_k_dim=128, ssm_v_dim=128,
                             n_expert=512, n_expert_used=10, n_ff_exp=512, n_ff_shexp=512),
    # the demo: the same layer pattern and tokenizer at toy width, tied embeddings
    "demo": Dims(n_layer=4, n_embd=256, n_vocab=151936, n_head=4, n_head_kv=2, head_dim=64, n_rot=16,
                 ssm_n_k_heads=2, ssm_n_v_heads=4, ssm_k_dim=64, ssm_v_dim=64, n_expert=16, n_expert_used=4,
                 n_ff_exp=128, n_ff_shexp=128, n_ctx_train=32768, tied=True),
}

# Random blocks: where each block's f16 scale fields sit, and the scale giving weights of std ~0.02.
# (offset of d, offset of dmin or None, d, dmin/d)
_BLOCK_SCALES = {
    Q.Q8_0: (0, None, 0.02 / 74, 0.0),
    Q.Q4_0: (0, None, 0.02 / 4.6, 0.0),
    Q.Q4_K: (0, 2, 0.02 / (32 * 4.6), 7.5),
    Q.Q5_K: (0, 2, 0.02 / (32 * 9.2), 15.5),
    Q.Q6_K: (208, None, 0.02 / (74 * 18.5), 0.0),
}


def load_tokenizer_metadata() -> dict:
    """The real Qwen3 vocabulary (151,643 BPE ranks + specials) and the Qwen3-Coder chat template."""
    with resources.files("localcoder.data").joinpath("qwen3-tokenizer.json.gz").open("rb") as f:
        meta = json.loads(gzip.decompress(f.read()).decode("utf-8"))
    meta["tokenizer.chat_template"] = resources.files("localcoder.data").joinpath("qwen3_coder.jinja").read_text()
    return meta


def q4_k_m_type(name: str, layer: int | None, n_layer: int) -> Q:
    """llama-quantize's Q4_K_M choice for a qwen3next tensor (the rules the synthetic bench file mimics)."""
    if name.endswith("norm.weight") or name in ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight",
                                                  "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias"):
        return Q.F32
    if name == "output.weight":
        return Q.Q6_K
    if name == "attn_qkv.weight":
        return Q.Q5_K
    more_bits = layer is not None and (layer < n_layer // 8 or layer >= 7 * n_layer // 8
                                       or (layer - n_layer // 8) % 3 == 2)
    if more_bits and (name == "attn_v.weight" or name.startswith("ffn_down")):
        return Q.Q6_K
    return Q.Q4_K


def uniform_type(qtype: Q) -> Callable[[str, int | None, int], Q]:
    def choose(name: str, layer: int | None, n_layer: int) -> Q:
        return Q.F32 if q4_k_m_type(name, layer, n_layer) == Q.F32 else qtype
    return choose


MIXES = {"q4_k_m": q4_k_m_type, "q8_0": uniform_type(Q.Q8_0), "q4_0": uniform_type(Q.Q4_0)}


def tensor_shapes(d: Dims) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """(GGUF name without the blk prefix, layer or None, numpy shape) for every tensor, in file order."""
    D, E = d.n_embd, d.n_expert
    conv = 2 * d.ssm_n_k_heads * d.ssm_k_dim + d.ssm_n_v_heads * d.ssm_v_dim
    out = [("token_embd.weight", None, (d.n_vocab, D))]
    for i in range(d.n_layer):
        t = [("attn_norm.weight", (D,)), ("post_attention_norm.weight", (D,))]
        if (i + 1) % d.full_attention_interval:
            t += [("attn_qkv.weight", (conv, D)), ("attn_gate.weight", (d.ssm_n_v_heads * d.ssm_v_dim, D)),
                  ("ssm_ba.weight", (2 * d.ssm_n_v_heads, D)), ("ssm_conv1d.weight", (conv, d.d_conv)),
                  ("ssm_a", (d.ssm_n_v_heads,)), ("ssm_dt.bias", (d.ssm_n_v_heads,)),
                  ("ssm_norm.weight", (d.ssm_v_dim,)), ("ssm_out.weight", (D, d.ssm_n_v_heads * d.ssm_v_dim))]
        else:
            hd = d.head_dim
            t += [("attn_q.weight", (2 * d.n_head * hd, D)), ("attn_k.weight", (d.n_head_kv * hd, D)),
                  ("attn_v.weight", (d.n_head_kv * hd, D)), ("attn_q_norm.weight", (hd,)),
                  ("attn_k_norm.weight", (hd,)), ("attn_output.weight", (D, d.n_head * hd))]
        t += [("ffn_gate_inp.weight", (E, D)), ("ffn_gate_exps.weight", (E, d.n_ff_exp, D)),
              ("ffn_up_exps.weight", (E, d.n_ff_exp, D)), ("ffn_down_exps.weight", (E, D, d.n_ff_exp)),
              ("ffn_gate_inp_shexp.weight", (D,)), ("ffn_gate_shexp.weight", (d.n_ff_shexp, D)),
              ("ffn_up_shexp.weight", (d.n_ff_shexp, D)), ("ffn_down_shexp.weight", (D, d.n_ff_shexp))]
        out += [(name, i, shape) for name, shape in t]
    out.append(("output_norm.weight", None, (D,)))
    if not d.tied:
        out.append(("output.weight", None, (d.n_vocab, D)))
    return out


def _float_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """float32 values with the ranges of a trained model (the fixture README's initialisation)."""
    if name == "ssm_a":  # -exp(A_log), A log-uniform in [0.01, 4]
        return (-np.exp(rng.uniform(np.log(0.01), np.log(4), shape))).astype(np.float32)
    if name == "ssm_dt.bias":
        return rng.uniform(-3, 1, shape).astype(np.float32)
    if name == "ssm_norm.weight":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("norm.weight"):  # GGUF stores 1 + w of the zero-centred norms
        return (1 + rng.uniform(-0.6, 0.6, shape)).astype(np.float32)
    return rng.normal(0, 0.02, shape).astype(np.float32)


def random_blocks(qtype: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw bytes (*shape[:-1], row_bytes) of random `qtype` blocks with sane f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    d_at, m_at, d, m_ratio = _BLOCK_SCALES[qtype]
    jitter = rng.uniform(0.5, 1.5, n_blocks).astype(np.float32)
    raw[:, d_at:d_at + 2] = (d * jitter).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if m_at is not None:
        raw[:, m_at:m_at + 2] = (d * m_ratio * jitter).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def _header(tmp: Path, dims: Dims, mix: str, tensors) -> gguf.GGUFWriter:
    """A GGUFWriter on tmp with the synthetic model's metadata and the infos of tensors, (name, layer, shape,
    type) each (nothing written yet)."""
    arch = "qwen3next"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(f"synthetic {mix} ({dims.n_layer} layers, random weights)")
    w.add_block_count(dims.n_layer)
    w.add_context_length(dims.n_ctx_train)
    w.add_embedding_length(dims.n_embd)
    w.add_feed_forward_length(dims.n_ff_exp)
    w.add_head_count(dims.n_head)
    w.add_head_count_kv(dims.n_head_kv)
    w.add_rope_freq_base(dims.rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(dims.n_expert)
    w.add_expert_used_count(dims.n_expert_used)
    w.add_key_length(dims.head_dim)
    w.add_value_length(dims.head_dim)
    w.add_expert_feed_forward_length(dims.n_ff_exp)
    w.add_expert_shared_feed_forward_length(dims.n_ff_shexp)
    w.add_ssm_conv_kernel(dims.d_conv)
    w.add_ssm_state_size(dims.ssm_k_dim)
    w.add_ssm_group_count(dims.ssm_n_k_heads)
    w.add_ssm_time_step_rank(dims.ssm_n_v_heads)
    w.add_ssm_inner_size(dims.ssm_n_v_heads * dims.ssm_v_dim)
    w.add_array(f"{arch}.attention.recurrent_layers",
                [(i + 1) % dims.full_attention_interval != 0 for i in range(dims.n_layer)])
    w.add_uint32(f"{arch}.full_attention_interval", dims.full_attention_interval)
    w.add_rope_dimension_count(dims.n_rot)
    tok = load_tokenizer_metadata()
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"][: dims.n_vocab])
    w.add_token_types(tok["tokenizer.ggml.token_type"][: dims.n_vocab])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_pad_token_id(tok["tokenizer.ggml.padding_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok["tokenizer.chat_template"])
    for name, layer, shape, qtype in tensors:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        full = name if layer is None else f"blk.{layer}.{name}"
        w.add_tensor_info(full, (*shape[:-1], shape[-1] // block * size) if qtype != Q.F32 else shape,
                          np.dtype(np.uint8) if qtype != Q.F32 else np.dtype(np.float32), nbytes, raw_dtype=qtype)
    return w


def write_synthetic(path: str | os.PathLike, dims: Dims, mix: str = "q4_k_m", seed: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a random-weight qwen3next GGUF (to PATH.tmp, renamed when complete)."""
    if mix not in MIXES:
        raise LocalcoderError(f"unknown quant mix {mix!r}; choose one of {', '.join(MIXES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    choose = MIXES[mix]
    tensors = [(name, layer, shape, choose(name, layer, dims.n_layer)) for name, layer, shape in tensor_shapes(dims)]
    rng = np.random.default_rng(seed)
    with replacing(path) as tmp:
        w = _header(tmp, dims, mix, tensors)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            done, total = 0, len(tensors)
            for name, layer, shape, qtype in tensors:
                data = _float_values(name, shape, rng) if qtype == Q.F32 else random_blocks(qtype, shape, rng)
                w.write_tensor_data(data)
                done += 1
                if progress:
                    progress(done, total)
        finally:
            w.close()
    return path


def demo_model_path() -> Path:
    from .paths import HOME

    return HOME / "demo" / "localcoder-demo-random-Q8_0.gguf"


def ensure_demo_model(progress=None) -> Path:
    """The demo model, written on first use (about 45 MB)."""
    path = demo_model_path()
    if not path.exists():
        write_synthetic(path, PRESETS["demo"], mix="q8_0", seed=0, progress=progress)
    return path


def with_layers(dims: Dims, n_layer: int | None) -> Dims:
    if n_layer is None:
        return dims
    if n_layer < 1 or n_layer % dims.full_attention_interval:
        raise LocalcoderError(f"--layers {n_layer} must be a positive multiple of {dims.full_attention_interval} "
                              "(the DeltaNet/attention pattern)")
    return replace(dims, n_layer=n_layer)


def ensure_synthetic(name: str, layers: int | None = None, quant: str = "q4_k_m", announce=None) -> Path:
    """The synthetic model `name` (a PRESETS key other than demo), written once into ~/.localcoder/synthetic/.
    announce(message) is called before a file is written."""
    from .paths import HOME

    if name not in PRESETS or name == "demo":
        raise LocalcoderError(f"unknown synthetic model {name!r}; use qwen3-coder-next")
    dims = with_layers(PRESETS[name], layers)
    path = HOME / "synthetic" / f"{name}-{dims.n_layer}L-{quant}.gguf"
    if not path.exists():
        if announce:
            announce(f"writing {path} (random weights, {dims.n_layer} layers, {quant}) once ...")
        write_synthetic(path, dims, quant)
    return path
