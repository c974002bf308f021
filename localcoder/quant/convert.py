"""safetensors (Hugging Face Qwen3-Next checkpoint) -> qwen3next GGUF, streamed.

Reproduces llama.cpp's `convert_hf_to_gguf.py` for `Qwen3NextForCausalLM` (tensor names, numeric folds,
tensor order, per-tensor types, metadata keys and values): converting the tiny fixture gives byte-identical
tensors and metadata to llama.cpp's own BF16 and Q8_0 files.

    plan    config.json -> metadata; safetensors headers -> one `Planned` GGUF tensor per output, via TABLE
    write   GGUF header + tensor infos, then each tensor chunk by chunk: read rows (memmap) -> float32 ->
            transform -> quantize -> append.  Peak memory is a few chunks, whatever the model size.

Every HF -> GGUF renaming and numeric fold is in TABLE below; nothing else renames or changes values.
`choose_type` picks each tensor's GGML type and `QUANTIZERS` turns float32 rows into that type's bytes.

Two kinds of output type:
    f32, f16, bf16, q8_0        what llama.cpp's converter writes (`convert_hf_to_gguf.py --outtype`)
    q4_0, q4_k_m, q5_k_m, q6_k  what `llama-quantize` writes from the converter's F32 GGUF: its per-tensor
                                mix (`mix_types`, after llama_tensor_get_type), its tensor order (by layer,
                                then name) and its metadata order (file type and quantization version
                                moved to the end). `requantize` is llama-quantize itself, for any type.
The quantizers (quantizers.py) are bit-exact with ggml's reference ones, so both paths reproduce
llama.cpp's files byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error
from typing import Any, Callable, Iterator, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from ..config import ARCH, MAX_LAYERS, ModelConfig, hyperparameter
from ..errors import LocalcoderError
from ..gguf_file import GGUF_MAGIC, GGUFFile, split_paths
from ..models.qwen3next import tensor_shapes
from ..paths import check_output_file, replacing
from ..tokenizer import QWEN2_PRE_REGEX, TT_CONTROL, TT_NORMAL, TT_UNUSED, TT_USER_DEFINED
from . import quantizers
from .formats import dequantize

HF_ARCHITECTURES = ("Qwen3NextForCausalLM",)
HF_MODEL_TYPES = {"qwen3_next": "Qwen3NextForCausalLM"}  # config.json without `architectures`
CHUNK_BYTES = 64 << 20  # float32 bytes read per chunk (one expert of an *_exps tensor is always one chunk)

# ---------------------------------------------------------------------------------------------------------
# Output types: file type -> default tensor type, and float32 rows -> bytes of each tensor type
# ---------------------------------------------------------------------------------------------------------

OUT_TYPES: dict[str, FT] = {"f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "bf16": FT.MOSTLY_BF16, "q8_0": FT.MOSTLY_Q8_0,
                           "q4_0": FT.MOSTLY_Q4_0, "q4_k_m": FT.MOSTLY_Q4_K_M, "q5_k_m": FT.MOSTLY_Q5_K_M,
                           "q6_k": FT.MOSTLY_Q6_K}
FTYPE_TENSOR_TYPE: dict[FT, QT] = {FT.ALL_F32: QT.F32, FT.MOSTLY_F16: QT.F16, FT.MOSTLY_BF16: QT.BF16,
                                   FT.MOSTLY_Q8_0: QT.Q8_0, FT.MOSTLY_Q4_0: QT.Q4_0, FT.MOSTLY_Q4_K_M: QT.Q4_K,
                                   FT.MOSTLY_Q5_K_M: QT.Q5_K, FT.MOSTLY_Q6_K: QT.Q6_K}
# file types only llama-quantize makes (the converter's own are the other four)
QUANTIZE_FTYPES = (FT.MOSTLY_Q4_0, FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M, FT.MOSTLY_Q6_K)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)

# float32 rows -> that type's bytes. BF16 rounds to nearest even; Q8_0, Q4_0 and the K-quants are the Numba
# ports of ggml's reference quantizers (bit-exact); Q5_0/Q5_1 (llama-quantize's fallbacks for Q4_K/Q5_K rows
# that are not whole 256-blocks) are gguf-py's, bit-exact too.
QUANTIZERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: lambda x: x.astype(np.float32, copy=False),
    QT.F16: lambda x: x.astype(np.float16),
    QT.BF16: lambda x: gguf.quants.quantize(x, QT.BF16),
    QT.Q5_0: lambda x: gguf.quants.quantize(x, QT.Q5_0),
    QT.Q5_1: lambda x: gguf.quants.quantize(x, QT.Q5_1),
    **quantizers.QUANTIZERS,
}

# 2-D tensors that llama.cpp keeps in F32 whatever the file type: the MoE routers (tiny, and routing is
# sensitive to them) and the DeltaNet causal-conv kernel (ggml's ssm_conv wants F32).
F32_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def choose_type(gguf_name: str, shape: Sequence[int], ftype: FT) -> QT:
    """The GGML type of one tensor in a converter file of type `ftype` (f32/f16/bf16/q8_0; llama.cpp's
    convert rules). llama-quantize's types depend on the other tensors too: see `mix_types`.

    1-D tensors, norms, non-`.weight` tensors (ssm_a, ssm_dt.bias) and F32_TENSORS stay F32; everything
    else gets the file type's tensor type, or F16 where a row is not a whole number of its blocks.
    """
    if ftype in QUANTIZE_FTYPES:
        raise ValueError(f"{ftype.name} is a llama-quantize mix: use mix_types() for the whole tensor list")
    base = gguf_name.split(".", 2)[2] if gguf_name.startswith("blk.") else gguf_name
    if (len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            or base in F32_TENSORS):
        return QT.F32
    qtype = FTYPE_TENSOR_TYPE[ftype]
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return QT.F16
    return qtype


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 (..., K) -> uint8 (rows, row_bytes) in `qtype`."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    return np.ascontiguousarray(QUANTIZERS[qtype](rows)).view(np.uint8).reshape(rows.shape[0], -1)


def tensor_nbytes(shape: Sequence[int], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


# ---------------------------------------------------------------------------------------------------------
# llama-quantize's mix (src/llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type and its
# fallbacks), for the tensors of a qwen3next GGUF and the file types above
# ---------------------------------------------------------------------------------------------------------

def llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (weight_name_comparer), which llama-quantize writes: by layer (tensors
    outside the layers first), then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization: 2-D or 3-D `*weight` tensors except norms, routers and the conv kernel.
    ggml counts dimensions without the trailing 1s of ne (numpy's leading ones): ffn_gate_inp_shexp
    (1, n_embd) is 1-D to it."""
    ne = tuple(shape)[::-1]
    n_dims = next((i + 1 for i in range(len(ne) - 1, 0, -1) if ne[i] > 1), 1)
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and "ssm_conv1d" not in name)


# tensor_get_category: first match wins; attn_qkv and attn_kv_b are "attn_v-like"
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
               ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))
# a row that is not a whole number of 256-blocks: the nearest 32-block type, else F16. llama-quantize has no
# fallback for Q4_0/Q8_0 rows that are not whole 32-blocks (it stops); we write those F16 as the converter does.
_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for key, cat in _CATEGORIES if key in name), "other")


def _more_bits(i: int, n: int) -> bool:
    """use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block(qtype: QT) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def mix_types(tensors: Sequence[tuple[str, Sequence[int]]], ftype: FT, n_expert: int,
              n_layer: int) -> list[QT | None]:
    """llama-quantize's type for every (name, numpy shape) of a model, given in llama_order (the attn_v
    counter runs in that order); None where the tensor is not quantized and keeps its input type.

    For Q4_K_M / Q5_K_M: attn_v and attn_qkv of the use_more_bits layers (by position among those tensors)
    and ffn_down* of the use_more_bits layers (by layer index) get Q6_K; output.weight (or token_embd when
    there is no output.weight) gets Q6_K in every quantized mix. Models with exactly 8 experts (llama.cpp's
    Mixtral rules; the tiny fixture has 8, Qwen3-Next 512) also get attn_k/attn_v/attn_qkv in Q8_0 and,
    in Q4_K_M, attn_output in Q5_K.
    """
    default = FTYPE_TENSOR_TYPE[ftype]
    mixed = default not in FLOAT_TYPES
    tied = all(name != "output.weight" for name, _ in tensors)
    n_attention_wv = sum(_category(name) == "attn_v" for name, _ in tensors)
    i_attention_wv = i_ffn_down = 0
    k_mix = ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M)
    types: list[QT | None] = []
    for name, shape in tensors:
        if not quantizable(name, shape):
            types.append(None)
            continue
        t, cat, ncols = default, _category(name), shape[-1]
        if not mixed:
            types.append(t)
            continue
        if cat == "output" or (tied and cat == "token_embd"):
            t = QT.Q8_0 if ncols % _block(t) else (QT.Q6_K if t != QT.Q8_0 else t)
        elif cat == "attn_v":
            if k_mix and _more_bits(i_attention_wv, n_attention_wv):
                t = QT.Q6_K
            if n_expert == 8:
                t = QT.Q8_0
            i_attention_wv += 1
        elif cat == "attn_k" and n_expert == 8:
            t = QT.Q8_0
        elif cat == "ffn_down":
            m = re.match(r"blk\.(\d+)\.", name)
            i_layer = int(m.group(1)) if n_expert > 1 and m else i_ffn_down
            if k_mix and _more_bits(i_layer, n_layer):
                t = QT.Q6_K
            i_ffn_down += 1
        elif cat == "attn_output" and n_expert == 8 and ftype == FT.MOSTLY_Q4_K_M:
            t = QT.Q5_K
        if ncols % _block(t):
            t = _FALLBACK.get(t, QT.F16)
            t = QT.F16 if ncols % _block(t) else t
        types.append(t)
    return types


# ---------------------------------------------------------------------------------------------------------
# Reading safetensors: headers parsed and checked here, data read as float32 slices along the first axis
# ---------------------------------------------------------------------------------------------------------

ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class Source:
    """One tensor of a safetensors file."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 copy of [start:stop] along the first axis."""
        stop = self.rows if stop is None else stop
        inner = self.shape[1:]
        dt = ST_DTYPES[self.dtype]
        row_bytes = math.prod(inner) * dt.itemsize
        n = (stop - start) * row_bytes
        if n == 0:
            return np.zeros((stop - start, *inner), np.float32)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset + start * row_bytes, shape=(n,))
        if self.dtype == "BF16":  # bf16 is the top half of a float32
            out = (raw.view(dt).astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.view(dt).astype(np.float32)
        del raw
        return out.reshape(stop - start, *inner)

    def chunks(self) -> Iterator[np.ndarray]:
        """The whole tensor as float32 pieces along the first axis, about CHUNK_BYTES each."""
        row_bytes = 4 * math.prod(self.shape[1:])
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for start in range(0, self.rows, step):
            yield self.read(start, min(start + step, self.rows))


def read_safetensors_header(path: Path) -> dict[str, Source]:
    """Tensor name -> Source, with every offset checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit the file's {size:,} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        base = 8 + n
        sources = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            if dtype not in ST_DTYPES:
                raise LocalcoderError(f"{path.name}: tensor {name} is {dtype}; localcoder converts F32/F16/BF16 "
                                      "checkpoints only (use the bf16 release of the model, not an FP8/quantized one)")
            if not 0 <= begin <= end or end - begin != math.prod(shape) * ST_DTYPES[dtype].itemsize:
                raise ValueError(f"tensor {name} has data_offsets {[begin, end]} for shape {list(shape)} {dtype}")
            if end > size - base:
                raise LocalcoderError(f"{path} is truncated: tensor {name} ends at byte {base + end:,} but the file "
                                      f"has {size:,} bytes; the download is incomplete, re-download it")
            sources[name] = Source(name, path, dtype, shape, base + begin)
        return sources
    except OSError as e:
        raise LocalcoderError(f"cannot read {path}: {e.strerror}; check the path and permissions") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LocalcoderError(f"{path} has a corrupt safetensors header ({e}); re-download the file") from None


def checkpoint_sources(hf_dir: Path) -> dict[str, Source]:
    """Every tensor of the checkpoint: model.safetensors, or the shards listed in model.safetensors.index.json."""
    index_path = hf_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise LocalcoderError(f"{index_path} is not a valid safetensors index ({e}); re-download it") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise LocalcoderError(f"{hf_dir} is missing {len(missing)} of {len(files)} shards listed in "
                                  f"{index_path.name} ({', '.join(missing[:3])}); download every shard")
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        if not files:
            raise LocalcoderError(f"{hf_dir} has no .safetensors files; pass the folder of a Hugging Face "
                                  "checkpoint (config.json, model*.safetensors, tokenizer.json)")
        weight_map = None
    sources: dict[str, Source] = {}
    for f in files:
        for name, src in read_safetensors_header(hf_dir / f).items():
            if name in sources:
                raise LocalcoderError(f"tensor {name} appears in both {sources[name].path.name} and {f}; "
                                      "the checkpoint is inconsistent")
            sources[name] = src
    if weight_map is not None:
        absent = [n for n, f in weight_map.items() if n not in sources or sources[n].path.name != f]
        if absent:
            raise LocalcoderError(f"{index_path.name} lists {len(absent)} tensors its shards lack "
                                  f"({', '.join(absent[:3])}); re-download the checkpoint")
    return sources


# ---------------------------------------------------------------------------------------------------------
# Transforms: the numeric folds, as float32 chunk streams along the first axis
# ---------------------------------------------------------------------------------------------------------

Chunks = Callable[[], Iterator[np.ndarray]]


def elementwise(fn: Callable[[np.ndarray], np.ndarray]):
    def transform(srcs: list[Source], cfg: ModelConfig) -> tuple[tuple[int, ...], Chunks]:
        (src,) = srcs
        return src.shape, lambda: (fn(x) for x in src.chunks())
    return transform


copy = elementwise(lambda x: x)
# HF RMSNorms are zero-centred, x * (1 + w); GGUF stores 1 + w (added in float32, as llama.cpp does).
plus_one = elementwise(lambda x: x + np.float32(1))
# ssm_a = -exp(A_log). exp in float64 then rounded: the correctly rounded float32, which equals torch's
# float32 exp (what llama.cpp's converter uses) on every value in the fixtures.
neg_exp = elementwise(lambda x: (-np.exp(x.astype(np.float64))).astype(np.float32))


def squeeze(srcs: list[Source], cfg: ModelConfig):
    """conv1d (C, 1, K) -> (C, K)."""
    (src,) = srcs
    shape = tuple(d for d in src.shape if d != 1)
    return shape, lambda: (x.reshape(x.shape[0], *shape[1:]) for x in src.chunks())


QKVZ_KEYS = "linear_num_key_heads, linear_key_head_dim, linear_num_value_heads, linear_value_head_dim, hidden_size"


def _check_qkvz(src: Source, cfg: ModelConfig) -> None:
    """in_proj_qkvz must be (Hk * (2Dk + 2rDv), D): checked when the conversion is planned, before any write."""
    Hk, Dk, Dv, r = cfg.ssm_n_k_heads, cfg.ssm_k_dim, cfg.ssm_v_dim, cfg.ssm_n_v_heads // cfg.ssm_n_k_heads
    _check_shape(src.name, src.path.name, src.shape, (Hk * (2 * Dk + 2 * r * Dv), cfg.n_embd), QKVZ_KEYS)


def _check_shape(hf_name: str, file: str, shape, expected, keys: str, gguf_name: str | None = None) -> None:
    if tuple(shape) != tuple(expected):
        into = f" (as GGUF {gguf_name})" if gguf_name else ""
        raise LocalcoderError(f"{hf_name} in {file} has shape {list(shape)}{into}, but config.json implies "
                              f"{list(expected)} (from {keys}); the checkpoint does not match its config.json: "
                              "correct config.json or re-download the checkpoint")


def _qkvz_groups(src: Source, cfg: ModelConfig) -> np.ndarray:
    """in_proj_qkvz (Hk * (2Dk + 2rDv), D): rows grouped per key head as [q_g | k_g | v_g | z_g]."""
    Hk, Dk, Dv, r = cfg.ssm_n_k_heads, cfg.ssm_k_dim, cfg.ssm_v_dim, cfg.ssm_n_v_heads // cfg.ssm_n_k_heads
    return src.read().reshape(Hk, 2 * Dk + 2 * r * Dv, cfg.n_embd)


def qkv_rows(srcs: list[Source], cfg: ModelConfig):
    """attn_qkv = [q of all key heads | k of all key heads | v of all value heads] (conv channel order)."""
    (src,) = srcs
    Dk, Dv, r = cfg.ssm_k_dim, cfg.ssm_v_dim, cfg.ssm_n_v_heads // cfg.ssm_n_k_heads
    _check_qkvz(src, cfg)

    def chunks():
        g = _qkvz_groups(src, cfg)  # (Hk, 2Dk + 2rDv, D)
        q, k, v = g[:, :Dk], g[:, Dk:2 * Dk], g[:, 2 * Dk:2 * Dk + r * Dv]
        yield np.concatenate([x.reshape(-1, cfg.n_embd) for x in (q, k, v)], axis=0)

    return (cfg.ssm_conv_channels, cfg.n_embd), chunks


def z_rows(srcs: list[Source], cfg: ModelConfig):
    """attn_gate = z of all value heads, value heads grouped by key head (consecutive)."""
    (src,) = srcs
    Dk, Dv, r = cfg.ssm_k_dim, cfg.ssm_v_dim, cfg.ssm_n_v_heads // cfg.ssm_n_k_heads
    _check_qkvz(src, cfg)
    return (cfg.ssm_n_v_heads * Dv, cfg.n_embd), \
        lambda: iter([_qkvz_groups(src, cfg)[:, 2 * Dk + r * Dv:].reshape(-1, cfg.n_embd)])


def stack(srcs: list[Source], cfg: ModelConfig):
    """Per-expert (out, in) matrices -> (E, out, in), one expert per chunk."""
    shapes = {s.shape for s in srcs}
    if len(shapes) != 1:
        raise LocalcoderError(f"experts {srcs[0].name} .. {srcs[-1].name} have different shapes {sorted(shapes)}")
    return (len(srcs), *srcs[0].shape), lambda: (s.read()[None] for s in srcs)


def _half(which: int):
    def transform(srcs: list[Source], cfg: ModelConfig):
        """Fused experts gate_up_proj (E, 2F, D): gate = rows [0, F), up = rows [F, 2F) of each expert."""
        (src,) = srcs
        if len(src.shape) != 3 or src.shape[1] % 2:
            raise LocalcoderError(f"{src.name} has shape {list(src.shape)}; expected (experts, 2 * ffn, hidden)")
        F = src.shape[1] // 2
        return (src.shape[0], F, src.shape[2]), \
            lambda: (src.read(e, e + 1)[:, which * F:(which + 1) * F] for e in range(src.shape[0]))
    return transform


first_half, second_half = _half(0), _half(1)


# ---------------------------------------------------------------------------------------------------------
# THE table: HF name -> GGUF name, transform. {bid} = layer, {xid} = expert (a {xid} rule stacks experts),
# {w} = an optional ".weight" (fused expert parameters have none in transformers 5's state dict).
# MTP tensors are renamed into the layer namespace first (see _mtp_name), as llama.cpp does.
# ---------------------------------------------------------------------------------------------------------

L = "model.layers.{bid}."
B = "blk.{bid}."
TABLE: tuple[tuple[str, str, Callable], ...] = (
    ("lm_head.weight",                          "output.weight",                     copy),
    ("model.embed_tokens.weight",               "token_embd.weight",                 copy),
    ("model.norm.weight",                       "output_norm.weight",                plus_one),
    (L + "input_layernorm.weight",              B + "attn_norm.weight",              plus_one),
    (L + "post_attention_layernorm.weight",     B + "post_attention_norm.weight",    plus_one),
    # gated DeltaNet
    (L + "linear_attn.A_log",                   B + "ssm_a",                         neg_exp),
    (L + "linear_attn.dt_bias",                 B + "ssm_dt.bias",                   copy),
    (L + "linear_attn.conv1d.weight",           B + "ssm_conv1d.weight",             squeeze),
    (L + "linear_attn.in_proj_ba.weight",       B + "ssm_ba.weight",                 copy),  # per key head [b | a]
    (L + "linear_attn.in_proj_qkvz.weight",     B + "attn_qkv.weight",               qkv_rows),
    (L + "linear_attn.in_proj_qkvz.weight",     B + "attn_gate.weight",              z_rows),
    (L + "linear_attn.norm.weight",             B + "ssm_norm.weight",               copy),  # plain gated norm
    (L + "linear_attn.out_proj.weight",         B + "ssm_out.weight",                copy),
    # gated attention (q_proj rows are per head [q_h | gate_h], kept as is)
    (L + "self_attn.q_proj.weight",             B + "attn_q.weight",                 copy),
    (L + "self_attn.k_proj.weight",             B + "attn_k.weight",                 copy),
    (L + "self_attn.v_proj.weight",             B + "attn_v.weight",                 copy),
    (L + "self_attn.o_proj.weight",             B + "attn_output.weight",            copy),
    (L + "self_attn.q_norm.weight",             B + "attn_q_norm.weight",            plus_one),
    (L + "self_attn.k_norm.weight",             B + "attn_k_norm.weight",            plus_one),
    # mixture of experts: per-expert matrices (published layout) or fused (transformers 5 in memory)
    (L + "mlp.gate.weight",                     B + "ffn_gate_inp.weight",           copy),
    (L + "mlp.experts.{xid}.down_proj.weight",  B + "ffn_down_exps.weight",          stack),
    (L + "mlp.experts.{xid}.gate_proj.weight",  B + "ffn_gate_exps.weight",          stack),
    (L + "mlp.experts.{xid}.up_proj.weight",    B + "ffn_up_exps.weight",            stack),
    (L + "mlp.experts.down_proj{w}",            B + "ffn_down_exps.weight",          copy),
    (L + "mlp.experts.gate_up_proj{w}",         B + "ffn_gate_exps.weight",          first_half),
    (L + "mlp.experts.gate_up_proj{w}",         B + "ffn_up_exps.weight",            second_half),
    (L + "mlp.shared_expert.down_proj.weight",  B + "ffn_down_shexp.weight",         copy),
    (L + "mlp.shared_expert.gate_proj.weight",  B + "ffn_gate_shexp.weight",         copy),
    (L + "mlp.shared_expert.up_proj.weight",    B + "ffn_up_shexp.weight",           copy),
    (L + "mlp.shared_expert_gate.weight",       B + "ffn_gate_inp_shexp.weight",     copy),  # (1, D)
    # multi-token prediction head (keep_mtp=True), after _mtp_name; its norms are zero-centred too
    (L + "eh_proj.weight",                      B + "nextn.eh_proj.weight",          copy),
    (L + "enorm.weight",                        B + "nextn.enorm.weight",            plus_one),
    (L + "hnorm.weight",                        B + "nextn.hnorm.weight",            plus_one),
    (L + "shared_head.norm.weight",             B + "nextn.shared_head_norm.weight", plus_one),
)
_FIELDS = {r"\{bid\}": r"(?P<bid>\d+)", r"\{xid\}": r"(?P<xid>\d+)", r"\{w\}": r"(?:\.weight)?"}
_RULES = [(re.compile(re.sub("|".join(map(re.escape, _FIELDS)), lambda m: _FIELDS[m.group(0)], re.escape(hf)) + "$"),
           out, fn) for hf, out, fn in TABLE]

_MTP_HEAD = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
             "norm": "shared_head.norm"}


def _mtp_name(name: str, n_layer: int) -> str:
    """mtp.layers.j.X -> model.layers.{n_layer + j}.X; mtp.fc/norms -> model.layers.{n_layer}.<nextn name>."""
    parts = name.removeprefix("model.").split(".", 3)
    if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
        return f"model.layers.{n_layer + int(parts[2])}.{parts[3]}"
    if len(parts) == 3 and parts[1] in _MTP_HEAD:
        return f"model.layers.{n_layer}.{_MTP_HEAD[parts[1]]}.{parts[2]}"
    raise LocalcoderError(f"unexpected MTP tensor {name}; convert with keep_mtp=False to drop the MTP head")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class Planned:
    """One GGUF tensor: its name, numpy-order shape, type, and its float32 data as a chunk stream
    (or, with `raw`, the bytes to copy as they are: a tensor re-quantized to its own type)."""

    name: str
    shape: tuple[int, ...]
    chunks: Chunks
    qtype: QT = QT.F32
    raw: bool = False
    source: tuple[str, str] = ("", "")  # (HF tensor name(s), file) it is made from, for error messages

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def plan_tensors(sources: dict[str, Source], cfg: ModelConfig, ftype: FT, keep_mtp: bool) -> list[Planned]:
    """Map every checkpoint tensor through TABLE, in llama.cpp's converter order (HF names sorted, experts
    stacked when a layer's last expert arrives). For a llama-quantize type the tensors are typed as in the
    converter's F32 file; `_apply_mix` then re-orders and re-types them."""
    base_ftype = FT.ALL_F32 if ftype in QUANTIZE_FTYPES else ftype
    n_body = cfg.n_layer  # the decoder layers; MTP layers (cfg.n_nextn_layer) follow them
    _check_layer_count(sources, n_body)
    renamed = {}
    for name, src in sources.items():
        if name.startswith(("mtp.", "model.mtp.")):
            if not keep_mtp:
                continue
            name = _mtp_name(name, n_body)
        renamed[name] = src
    planned: list[Planned] = []
    experts: dict[str, dict[int, Source]] = {}
    for name in sorted(renamed, key=_natural_key):
        matched = False
        for pattern, out, fn in _RULES:
            m = pattern.match(name)
            if not m:
                continue
            matched = True
            gguf_name = out.format(bid=m.group("bid")) if "bid" in pattern.groupindex else out
            if "xid" in pattern.groupindex:
                xid = int(m.group("xid"))
                if xid >= cfg.n_expert:  # else it would wait for experts that never come ("a shard is incomplete")
                    raise LocalcoderError(f"the checkpoint has expert {xid} ({name} in {renamed[name].path.name}) but "
                                          f"config.json says num_experts = {cfg.n_expert} (experts 0..{cfg.n_expert - 1});"
                                          f" correct num_experts in config.json")
                group = experts.setdefault(gguf_name, {})
                group[xid] = renamed[name]
                if len(group) < cfg.n_expert:  # ids below n_expert (checked above): complete when all are in
                    continue
                srcs = [group[e] for e in range(cfg.n_expert)]
                del experts[gguf_name]
            else:
                srcs = [renamed[name]]
            shape, chunks = fn(srcs, cfg)
            source = srcs[0].name if len(srcs) == 1 else f"{srcs[0].name} .. {srcs[-1].name}"
            planned.append(Planned(gguf_name, tuple(shape), chunks, choose_type(gguf_name, shape, base_ftype),
                                   source=(source, srcs[0].path.name)))
        if not matched:
            raise LocalcoderError(f"unexpected tensor {name} in {renamed[name].path.name}: not part of a "
                                  "Qwen3-Next checkpoint (dense MLP layers, biases and quantized weights are "
                                  "not supported)")
    if experts:
        name, group = next(iter(experts.items()))
        raise LocalcoderError(f"{name}: the checkpoint has {len(group)} of {cfg.n_expert} experts; "
                              "a shard is incomplete, re-download it")
    _check_planned(planned, cfg)
    return planned


def _check_layer_count(sources: dict[str, Source], n_layer: int) -> None:
    """Tensors of a layer past num_hidden_layers would be written but never run (block_count stops before
    them), so a config.json that undercounts its layers is refused, naming the first layer past it."""
    beyond = {}
    for name in sources:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= n_layer:
            beyond.setdefault(int(m.group(1)), name)
    if beyond:
        first, last = min(beyond), max(beyond)
        raise LocalcoderError(f"the checkpoint has tensors of layer {first} ({beyond[first]} in "
                              f"{sources[beyond[first]].path.name}) but config.json says num_hidden_layers = "
                              f"{n_layer} (layers 0..{n_layer - 1}); correct num_hidden_layers in config.json "
                              f"(the checkpoint's layers go up to {last})")


def _count_mtp(sources: dict[str, Source]) -> int:
    layers = {int(m.group(1)) for n in sources if (m := re.match(r"(?:model\.)?mtp\.layers\.(\d+)\.", n))}
    return len(layers)


_H, _DN = "hidden_size", "linear_num_value_heads, linear_value_head_dim"
_CONV = "linear_num_key_heads, linear_key_head_dim, " + _DN
_SHARED = "shared_expert_intermediate_size"
CONFIG_KEYS = {  # a GGUF tensor (less its blk.N. prefix) -> the config.json keys its shape comes from
    "token_embd.weight": f"vocab_size, {_H}", "output.weight": f"vocab_size, {_H}",
    "attn_qkv.weight": f"{_CONV}, {_H}", "attn_gate.weight": f"{_DN}, {_H}",
    "ssm_ba.weight": f"linear_num_value_heads, {_H}", "ssm_conv1d.weight": f"{_CONV}, linear_conv_kernel_dim",
    "ssm_a": "linear_num_value_heads", "ssm_dt.bias": "linear_num_value_heads",
    "ssm_norm.weight": "linear_value_head_dim", "ssm_out.weight": f"{_H}, {_DN}",
    "attn_q.weight": f"2 x num_attention_heads x head_dim, {_H}",
    "attn_k.weight": f"num_key_value_heads x head_dim, {_H}", "attn_v.weight": f"num_key_value_heads x head_dim, {_H}",
    "attn_q_norm.weight": "head_dim", "attn_k_norm.weight": "head_dim",
    "attn_output.weight": f"{_H}, num_attention_heads x head_dim", "ffn_gate_inp.weight": f"num_experts, {_H}",
    "ffn_down_exps.weight": f"num_experts, {_H}, moe_intermediate_size",
    "ffn_gate_exps.weight": f"num_experts, moe_intermediate_size, {_H}",
    "ffn_up_exps.weight": f"num_experts, moe_intermediate_size, {_H}",
    "ffn_gate_shexp.weight": f"{_SHARED}, {_H}", "ffn_up_shexp.weight": f"{_SHARED}, {_H}",
    "ffn_down_shexp.weight": f"{_H}, {_SHARED}",
}


def _check_planned(planned: list[Planned], cfg: ModelConfig) -> None:
    """What the runtime loader will require (qwen3next.tensor_shapes), checked before anything is written
    (else the GGUF would be refused when run, and re-converting would not help): every tensor is there (the
    output head may be tied, MTP layers' nextn tensors dropped), and each has its shape (refused naming the HF
    tensor and the config.json keys the shape comes from)."""
    shapes = tensor_shapes(cfg)
    have = {p.name for p in planned}
    missing = [n for n in shapes if n not in have and n != "output.weight" and ".nextn." not in n]
    if missing:
        raise LocalcoderError(f"the checkpoint lacks {len(missing)} tensors a qwen3next GGUF needs "
                              f"(GGUF names {', '.join(missing[:3])}); it is incomplete or not Qwen3-Next")
    for p in planned:
        want = shapes.get(p.name)
        if want is not None:
            keys = CONFIG_KEYS.get(p.name.split(".", 2)[2] if p.name.startswith("blk.") else p.name, _H)
            _check_shape(p.source[0] or p.name, p.source[1] or "the checkpoint", p.shape, want, keys,
                         gguf_name=p.name)


# ---------------------------------------------------------------------------------------------------------
# Metadata: config.json + tokenizer files -> GGUF key/values, in llama.cpp's order
# ---------------------------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocalcoderError(f"{path.parent} has no {path.name}; pass the folder of a Hugging Face checkpoint "
                              f"({what})") from None
    except UnicodeDecodeError as e:
        raise LocalcoderError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              "re-download it") from None
    except (OSError, ValueError) as e:
        raise LocalcoderError(f"cannot parse {path}: {e}; re-download it") from None
    if not isinstance(value, dict):
        raise LocalcoderError(f"{path} is not a JSON object; re-download it")
    return value


def _section(config: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """A sub-object of config.json ({} when absent or null)."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise LocalcoderError(f"{path}: {key} = {value!r} is not an object; correct it in config.json (or "
                              "re-download the checkpoint)")
    return value


def config_number(config: dict[str, Any], key: str, path: str = "config.json", kind: type = int, low: float = 1,
                  high: float | None = None, default: Any = None) -> int | float:
    """A number of config.json (or of its rope_parameters), checked by the one rule GGUF metadata follows too
    (config.hyperparameter), so that a string or a negative size is a one-line error naming the key."""
    value = config.get(key)
    value = _section(config, "rope_parameters", path).get(key) if value is None else value  # null: absent
    value = default if value is None else value
    if value is None:
        raise LocalcoderError(f"{path} lacks {key}; the config is incomplete, re-download it")
    try:
        return hyperparameter(value, kind, low, high)
    except ValueError as e:
        raise LocalcoderError(f"{path}: {key} = {value!r} {e}; correct it in config.json (or re-download "
                              "the checkpoint)") from None


def hf_metadata(config: dict[str, Any], n_mtp: int, path: str = "config.json") -> dict[str, Any]:
    """The `qwen3next.*` keys (llama.cpp's order) from a Qwen3-Next config.json; n_mtp MTP layers appended."""
    archs = config.get("architectures")
    if not archs:
        model_type = config.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise LocalcoderError(f"{path} lacks architectures (and its model_type is {model_type!r}, not "
                                  f"{', '.join(HF_MODEL_TYPES)}); localcoder converts "
                                  f"{', '.join(HF_ARCHITECTURES)} checkpoints only: re-download config.json")
        archs = [HF_MODEL_TYPES[model_type]]
    if not isinstance(archs, list):
        raise LocalcoderError(f"{path}: architectures = {archs!r} is not a list; correct it in config.json (or "
                              "re-download the checkpoint)")
    arch = archs[0]
    if arch not in HF_ARCHITECTURES:
        raise LocalcoderError(f"{path}: architecture {arch} is not supported; localcoder converts "
                              f"{', '.join(HF_ARCHITECTURES)} (Qwen3-Next / Qwen3-Coder-Next) checkpoints only")

    def get(key: str, kind: type = int, low: float = 1, high: float | None = None, default: Any = None):
        return config_number(config, key, path, kind, low, high, default)

    scaling = _section(config, "rope_scaling", path)
    rope_type = scaling.get("rope_type", scaling.get("type", _section(config, "rope_parameters", path).get(
        "rope_type", "default")))
    if rope_type != "default":
        raise LocalcoderError(f"{path}: rope scaling {rope_type!r} is not supported; remove rope_scaling "
                              "from config.json (the runtime uses plain RoPE)")
    dense = config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1
    if dense or not config.get("norm_topk_prob", True):
        raise LocalcoderError(f"{path}: norm_topk_prob=false or dense MLP layers are not supported by qwen3next")
    n_layer = get("num_hidden_layers", high=MAX_LAYERS - n_mtp)
    layer_types = config.get("layer_types")
    if layer_types is None:
        interval = get("full_attention_interval", default=4)
        recurrent = [(i + 1) % interval != 0 for i in range(n_layer)]
    elif not isinstance(layer_types, list):
        raise LocalcoderError(f"{path}: layer_types = {layer_types!r} is not a list of per-layer types; correct "
                              "it in config.json (or re-download the checkpoint)")
    else:
        recurrent = [t == "linear_attention" for t in layer_types]
        interval = get("full_attention_interval", default=recurrent.index(False) + 1 if False in recurrent else 4)
    if config.get("head_dim") is not None:
        head_dim = get("head_dim")
    else:
        head_dim = get("hidden_size") // get("num_attention_heads")
    p = ARCH + "."
    return {
        p + "block_count": n_layer + n_mtp,
        p + "context_length": get("max_position_embeddings"),
        p + "embedding_length": get("hidden_size"),
        p + "feed_forward_length": get("intermediate_size"),
        p + "attention.head_count": get("num_attention_heads"),
        p + "attention.head_count_kv": get("num_key_value_heads"),
        p + "rope.freq_base": get("rope_theta", float, low=0),
        p + "attention.layer_norm_rms_epsilon": get("rms_norm_eps", float, low=0),
        p + "expert_count": get("num_experts"),
        p + "expert_used_count": get("num_experts_per_tok"),
        p + "attention.key_length": head_dim,
        p + "attention.value_length": head_dim,
        "general.file_type": None,  # set by convert()
        p + "expert_feed_forward_length": get("moe_intermediate_size"),
        p + "expert_shared_feed_forward_length": get("shared_expert_intermediate_size", low=0),
        p + "ssm.conv_kernel": get("linear_conv_kernel_dim"),
        p + "ssm.state_size": get("linear_key_head_dim"),
        p + "ssm.group_count": get("linear_num_key_heads"),
        p + "ssm.time_step_rank": get("linear_num_value_heads"),
        p + "ssm.inner_size": get("linear_value_head_dim") * get("linear_num_value_heads"),
        p + "attention.recurrent_layers": recurrent + [False] * n_mtp,  # an MTP layer is a full-attention layer
        p + "full_attention_interval": interval,
        p + "rope.dimension_count": int(head_dim * get("partial_rotary_factor", float, 0, 1, default=0.25)),
        **({p + "nextn_predict_layers": n_mtp} if n_mtp else {}),
    }


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special, for added tokens not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_metadata(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer name) as llama.cpp's get_vocab_base writes them.

    Ids missing from the tokenizer up to vocab_size become `[PAD<id>]` (UNUSED); added tokens are CONTROL
    when flagged special or `<|...|>`-looking, else USER_DEFINED; the rest are NORMAL.
    """
    tok = _read_json(hf_dir / "tokenizer.json", "tokenizer.json is needed for the vocabulary")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise LocalcoderError(f"{hf_dir}/tokenizer.json is not a byte-level BPE tokenizer; Qwen3-Next uses one")
    pre = _pre_tokenizer(tok.get("pre_tokenizer"))
    if pre is None:
        raise LocalcoderError(f"{hf_dir}/tokenizer.json has an unknown pre-tokenizer; localcoder supports the "
                              "qwen2 byte-level BPE of Qwen3-Next")
    reverse = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    reverse.update({i: a["content"] for i, a in added.items()})
    if reverse and max(reverse) >= vocab_size:
        raise LocalcoderError(f"tokenizer id {max(reverse)} is outside vocab_size {vocab_size} of config.json")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TT_UNUSED)
        elif i in added:
            token = reverse[i]
            if added[i].get("special") or _looks_special(token):
                types.append(TT_CONTROL)
            else:
                token = token.replace("\u2581", " ")  # llama.cpp pre-normalises user-defined spaces
                types.append(TT_USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(reverse[i])
            types.append(TT_NORMAL)
    return tokens, types, pre


def special_vocab(hf_dir: Path, vocab_size: int) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab (merges, special token ids, add-bos/eos flags, chat template), with its input files
    checked first: it reads them with bare open()/json.load, so a file that is not UTF-8 or not a JSON object
    would end the conversion in a traceback."""
    for name in ("tokenizer_config.json", "chat_template.json"):
        if (hf_dir / name).exists():
            _read_json(hf_dir / name, name)
    jinja = hf_dir / "chat_template.jinja"
    if jinja.exists():
        try:
            jinja.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise LocalcoderError(f"cannot read {jinja}: {e}; re-download it") from None
    try:
        return gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise LocalcoderError(f"cannot read the tokenizer files in {hf_dir} ({type(e).__name__}: {e}); "
                              "re-download tokenizer.json and tokenizer_config.json") from None


def _pre_tokenizer(pre: Any) -> str | None:
    """llama.cpp identifies the pre-tokenizer by hashing its output; we compare the Split regex instead."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True):
        return None
    return "qwen2" if (steps[0].get("pattern") or {}).get("Regex") == QWEN2_PRE_REGEX else None


# ---------------------------------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------------------------------

def _apply_mix(planned: list[Planned], ftype: FT, n_expert: int, n_layer: int) -> list[Planned]:
    """llama-quantize on the converter's F32 file: its tensor order, and mix_types' types."""
    planned = sorted(planned, key=lambda p: llama_order(p.name))
    for p, t in zip(planned, mix_types([(p.name, p.shape) for p in planned], ftype, n_expert, n_layer)):
        p.shape = ggml_shape(p.shape)
        if t is not None:
            p.qtype = t
    return planned


def ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ggml's GGUF writer records: without leading 1s (ggml_n_dims drops trailing ne of 1), so
    llama-quantize writes ffn_gate_inp_shexp (1, n_embd) as 1-D, where the converter wrote 2-D."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, out_type: str = "bf16", keep_mtp: bool = False,
            progress: Callable[[int, int, str], None] | None = None, name: str | None = None) -> Path:
    """Convert a Hugging Face Qwen3-Next checkpoint folder to a qwen3next GGUF at out_path.

    out_type: f32, f16, bf16, q8_0 (as llama.cpp's converter) or q4_0, q4_k_m, q5_k_m, q6_k (as the
    converter's F32 file run through llama-quantize). keep_mtp: also write the multi-token-prediction head
    (as llama.cpp's blk.<n_layer>.nextn.* tensors; block_count grows by its layer count).
    progress(done_bytes, total_bytes, tensor_name) is called as tensor data is written. The file is written
    to a temporary file of its own beside it (paths.replacing) and renamed at the end; on any error the
    temporary file is removed.
    """
    hf_dir, out_path = Path(hf_dir).expanduser(), Path(out_path).expanduser()
    if not hf_dir.is_dir():
        raise LocalcoderError(f"{hf_dir} is not a folder; pass the folder of a Hugging Face checkpoint")
    ftype = _out_ftype(out_type, out_path)
    if out_path.exists() and out_path.resolve().parent == hf_dir.resolve() and not _is_gguf(out_path):
        raise LocalcoderError(f"{out_path} is a file of the checkpoint being converted; write the GGUF to a new path")
    _check_not_input(out_path, [hf_dir / f for f in CHECKPOINT_FILES], "a file of the checkpoint being converted")
    config = _read_json(hf_dir / "config.json", "config.json, model*.safetensors, tokenizer.json")
    vocab_size = config_number(config, "vocab_size", str(hf_dir / "config.json"))
    sources = checkpoint_sources(hf_dir)
    _check_not_input(out_path, sorted({s.path for s in sources.values()}), "a file of the checkpoint being converted")
    n_mtp = _count_mtp(sources) if keep_mtp else 0
    meta = hf_metadata(config, n_mtp, str(hf_dir / "config.json"))
    cfg = ModelConfig.from_gguf({"general.architecture": ARCH, **meta}, vocab_size, str(hf_dir / "config.json"))
    planned = plan_tensors(sources, cfg, ftype, keep_mtp)
    if "output.weight" not in {p.name for p in planned} and config.get("tie_word_embeddings") is not True:
        # Qwen3NextConfig's default is false: without lm_head the model would silently run tied
        raise LocalcoderError(f"the checkpoint in {hf_dir} has no lm_head.weight but config.json has "
                              f"tie_word_embeddings = {json.dumps(config.get('tie_word_embeddings'))}; a shard is "
                              "missing: re-download the checkpoint (or set tie_word_embeddings to true if the model "
                              "really ties its output to the embeddings)")
    mixed = ftype in QUANTIZE_FTYPES
    if mixed:
        planned = _apply_mix(planned, ftype, cfg.n_expert, cfg.n_block)
    tokens, types, pre = vocab_metadata(hf_dir, vocab_size)
    special = special_vocab(hf_dir, vocab_size)
    if not special.merges:
        raise LocalcoderError(f"{hf_dir}/tokenizer.json has no BPE merges; re-download the tokenizer files")
    _check_space(out_path, planned, extra=len(json.dumps(tokens)) + 4 * len(special.merges) + (1 << 20))

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or hf_dir.resolve().name)
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
        for key, value in meta.items():
            if key == "general.file_type":
                if not mixed:
                    writer.add_file_type(ftype)
            elif isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_uint32(key, value)
        if not mixed:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp writes both flags, False where tokenizer_config.json does not set them
        special.add_special_token = {"bos": special.add_special_token.get("bos", False),
                                     "eos": special.add_special_token.get("eos", False)}
        special.add_to_gguf(writer, quiet=True)
        if mixed:  # llama-quantize re-sets these two keys, which moves them to the end
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_file_type(ftype)

    return _write_file(out_path, planned, metadata, progress)


# what a conversion reads besides the safetensors (gguf.SpecialVocab reads the tokenizer files)
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
                    "chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.json",
                    "generation_config.json", "model.safetensors.index.json")


def _same_file(a: Path, b: Path) -> bool:
    """a and b name one file: the same path (before symlinks are resolved) or the same inode (after)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _check_not_input(out_path: Path, inputs, what: str) -> None:
    """Refuse an output path that names a file the command reads (a Hugging Face cache snapshot is symlinks into
    blobs/: the output would replace the link and the checkpoint would be lost)."""
    for f in inputs:
        if _same_file(out_path, f):
            raise LocalcoderError(f"{out_path} is {what} ({f}); write the GGUF to a new path")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _out_ftype(out_type: str, out_path: Path) -> FT:
    ftype = OUT_TYPES.get(str(out_type).lower())
    if ftype is None:
        raise LocalcoderError(f"unknown output type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    check_output_file(out_path, "output GGUF")
    if not out_path.parent.is_dir():
        raise LocalcoderError(f"cannot write {out_path}: folder {out_path.parent} does not exist; create it first")
    return ftype


def _check_space(out_path: Path, planned: list[Planned], extra: int) -> None:
    """Refuse before writing anything when the output cannot fit on its disk."""
    need = sum(p.nbytes + 32 for p in planned) + extra
    free = shutil.disk_usage(out_path.parent).free
    if need > free:
        raise LocalcoderError(f"not enough disk space for {out_path.name}: it needs {need / 1e9:.2f} GB, "
                              f"{out_path.parent} has {free / 1e9:.2f} GB free; free some space or write elsewhere")


def _write_file(out_path: Path, planned: list[Planned], metadata: Callable[[gguf.GGUFWriter], None],
                progress) -> Path:
    """Write a temporary file beside out_path (paths.replacing: a name of its own per run, so that two runs
    writing one output never share it) and rename it to out_path; remove it on error."""
    try:
        with replacing(out_path) as tmp:
            writer = gguf.GGUFWriter(tmp, ARCH)
            try:
                for p in planned:
                    writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
                metadata(writer)
                _write(writer, planned, progress)
            finally:
                writer.close()
    except OSError as e:
        raise LocalcoderError(f"cannot write {out_path}: {e.strerror or e}; check free disk space and "
                              "permissions") from None
    return out_path


def _write(writer: gguf.GGUFWriter, planned: list[Planned], progress) -> None:
    """Header, key/values and tensor infos, then each tensor's data chunk by chunk, aligned as GGUF wants."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    (fout,) = writer.fout
    writer.write_padding(fout, fout.tell())
    total, done = sum(p.nbytes for p in planned), 0
    for p in planned:
        written = 0
        for chunk in p.chunks():
            data = chunk if p.raw else quantize(chunk, p.qtype)
            fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            written += data.nbytes
            done += data.nbytes
            if progress is not None:
                progress(done, total, p.name)
        if written != p.nbytes:
            raise LocalcoderError(f"internal error: {p.name} produced {written} bytes, expected {p.nbytes}")
        writer.write_padding(fout, written)
    fout.flush()


# ---------------------------------------------------------------------------------------------------------
# requantize(): llama-quantize for an F32/F16/BF16 qwen3next GGUF
# ---------------------------------------------------------------------------------------------------------

_DROPPED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment",
                 "split.no", "split.count", "split.tensors.count")


def _gguf_chunks(path: Path, offset: int, qtype: QT, shape: tuple[int, ...], raw: bool) -> Chunks:
    """A tensor of a GGUF file as row chunks of about CHUNK_BYTES float32 (plain reads, nothing mapped)."""
    K = shape[-1]
    rows = math.prod(shape[:-1])
    row_bytes = tensor_nbytes((K,), qtype)

    def chunks():
        step = max(1, CHUNK_BYTES // (4 * K))
        with open(path, "rb") as f:
            for start in range(0, rows, step):
                n = min(step, rows - start)
                f.seek(offset + start * row_bytes)
                data = np.frombuffer(f.read(n * row_bytes), np.uint8)
                if data.size != n * row_bytes:
                    raise LocalcoderError(f"{path} is truncated; re-download or re-convert it")
                yield data if raw else dequantize(data, qtype, (n, K))
    return chunks


def requantize(in_path: str | os.PathLike, out_path: str | os.PathLike, out_type: str,
               progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Re-quantize an F32/F16/BF16 qwen3next GGUF to out_type, as `llama-quantize IN OUT TYPE` does.

    Same per-tensor mix, tensor order and metadata as llama-quantize (every key copied, general.file_type
    and general.quantization_version re-set at the end); tensors it does not quantize (norms, routers, the
    conv kernel, 1-D tensors) are copied byte for byte. Streams one chunk of rows at a time; writes a
    temporary file of its own (paths.replacing) and renames it at the end. A split input
    (NAME-00001-of-0000N.gguf, any part given) is read whole, every part, and written as one file (as
    llama-quantize does without --keep-split). progress(done_bytes, total_bytes, tensor_name) as for convert().
    """
    in_path, out_path = Path(in_path).expanduser(), Path(out_path).expanduser()
    if not in_path.is_file():
        problem = "is a folder" if in_path.is_dir() else "does not exist"
        raise LocalcoderError(f"{in_path} {problem}; pass the F32/F16/BF16 GGUF to re-quantize")
    ftype = _out_ftype(out_type, out_path)
    parts = split_paths(in_path)  # every part of a split model (a one-line error when one is missing)
    _check_not_input(out_path, parts, "the input file" if len(parts) == 1 else "a part of the input model")
    # our reader: a truncated or corrupt file (offsets, sizes, header) is a one-line error naming the problem;
    # the tensors of every part come from it, the typed metadata (copied as it is) from gguf's reader
    gf = GGUFFile(in_path)
    try:
        reader = gguf.GGUFReader(parts[0])  # the metadata is the first part's
    except (ValueError, OSError, KeyError, IndexError, struct_error) as e:
        raise LocalcoderError(f"{in_path} is not a valid GGUF file ({e}); pass a GGUF made by localcoder "
                              "convert or llama.cpp") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != ARCH:
        raise LocalcoderError(f"expected arch {ARCH}, file says {arch} ({in_path.name}); localcoder "
                              "re-quantizes Qwen3-Next GGUFs only")
    in_tensors = list(gf.tensors.values())
    for t in in_tensors:
        if t.ggml_type not in FLOAT_TYPES:
            raise LocalcoderError(f"{in_path.name} is already quantized (tensor {t.name} is "
                                  f"{t.ggml_type.name}); re-quantize from its F32/F16/BF16 GGUF or convert "
                                  "the Hugging Face checkpoint with localcoder convert")
    # the hyper-parameters, checked as the runtime checks them (the mix depends on the expert and layer counts)
    cfg = ModelConfig.from_gguf({k: f.contents() for k, f in reader.fields.items()
                                 if k.startswith(ARCH + ".") or k == "general.architecture"}, 0, str(in_path))
    in_tensors.sort(key=lambda t: llama_order(t.name))
    shapes = [ggml_shape(t.shape) for t in in_tensors]
    # llama-quantize's layer count is block_count (MTP layers included)
    types = mix_types([(t.name, sh) for t, sh in zip(in_tensors, shapes)], ftype, cfg.n_expert, cfg.n_block)
    planned = []
    for t, shape, qtype in zip(in_tensors, shapes, types):
        qtype = t.ggml_type if qtype is None else qtype
        raw = qtype == t.ggml_type
        planned.append(Planned(t.name, shape, _gguf_chunks(Path(t.path), t.file_offset, t.ggml_type, shape, raw),
                               qtype, raw))
    _check_space(out_path, planned, extra=int(reader.data_offset))

    def metadata(writer: gguf.GGUFWriter) -> None:
        for key, f in reader.fields.items():
            if key == "general.alignment":  # the writer must pad with it too
                writer.add_custom_alignment(int(f.contents()))
            if key.startswith("GGUF.") or key in _DROPPED_KEYS:
                continue
            sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(ftype)

    return _write_file(out_path, planned, metadata, progress)
