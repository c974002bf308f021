"""The MLX backend: MLX arrays end to end, GGUF blocks mapped onto MLX's quantized matmuls.

Runs on Apple silicon through Metal and on Linux through `mlx[cpu]` (what CI tests). The model file calls the
same op set as on the NumPy reference (`numpy_ref.py`, the oracle these ops are tested against); every op here
stays lazy, so a decode step builds one graph and `Model.forward`'s `np.asarray(logits)` is its one evaluation:
no host round trip inside the layer loop (except to stream experts when they do not all fit in the budget).

Weights: GGML blocks become MLX affine quantization (w = scale * q + bias per group of 32) where the values are
the same floats the reference dequantizer produces, with float32 scales and biases (a K-quant sub-block scale
d * sc has up to 17 significant bits, which float16 would round). Bits per weight in MLX form in brackets:

    Q4_0   4-bit, scale d, bias -8d             exact (6)   Q4_1   4-bit, scale d, bias m         exact (6)
    Q5_0   5-bit, scale d, bias -16d            exact (7)   Q5_1   5-bit, scale d, bias m         exact (7)
    Q8_0   8-bit (q + 128), d, -128d            exact (10)  Q4_K   4-bit, d*sc, -dmin*m           exact (6)
    Q5_K   5-bit, d*sc, -dmin*m                 exact (7)   IQ4_NL 8-bit codebook + 128, d, -128d exact (10)
    IQ4_XS 8-bit codebook + 128, d*(ls-32)      exact (10)  MXFP4  MLX mxfp4 (same E2M1 + E8M0)   exact (4.25)
    Q6_K   sub-blocks of 16, which MLX lacks (groups are 32, 64 or 128):
           q6_k="int8" (default, 10): each 32-group on an 8-bit grid a quarter of its larger sub-block's step;
             that sub-block stays exact, the other is rounded to the grid. Measured on every Q6_K tensor of the
             fixtures (llama-quantize output): relative RMS error 3.9e-3 of the weights, 54 % of weights exact,
             max |error| 1/4 of the larger sub-block's Q6_K step (1/8 unless the two ranges overflow 256 codes)
           q6_k="exact" (16): each 16-weight sub-block in a 6-bit group of its own, padded with zero weights
             (and zero inputs): exact at twice the matmul work
    F32 / F16 / BF16  kept as stored, matmul in float32

"exact" means every dequantized weight equals the reference's float32 value bit for bit (every product involved
fits in float32's 24-bit significand); the matmul sums in a different order, so results agree to rounding.
Conversion is lazy: per tensor on first use, and for `*_exps` per layer (resident) or per expert (streamed).

Speed on the CPU: MLX runs each CPU stream's ops on one thread with scalar quantized kernels, so large matmuls
and the routed experts are split across one stream per core (bit-identical results). It stays several times
slower than the Numba backend there; on Apple silicon the same graph runs on Metal's kernels.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedQuantType
from ..gguf_file import QTensor
from .numpy_ref import add_shared, topk_softmax
from ..quant.formats import IQ4_KVALUES, _f16, _k_scale_min, _nibbles, _bits_le, get_format

CHUNK = 64  # chunk length of the chunked gated delta rule, as the reference
GROUP = 32  # MLX quantization group used for every GGML type


# ---------------------------------------------------------------------------------------------------------
# The array namespace the model file uses (`be.xp`): mlx.core, with NumPy's argsort signature.
# ---------------------------------------------------------------------------------------------------------

class _Namespace:
    """mlx.core as the model file's `xp`. mlx's argsort is stable (ties keep index order, as NumPy's
    kind="stable") and takes no `kind`; everything else the model file calls has NumPy's signature."""

    def __getattr__(self, name):
        return getattr(mx, name)

    @staticmethod
    def argsort(a, axis=-1, kind=None):
        return mx.argsort(a, axis=axis)

    @staticmethod
    def asarray(a, dtype=None):
        return a if isinstance(a, mx.array) and dtype is None else mx.array(a, dtype=dtype)


xp = _Namespace()


class Held:
    """An MLX array kept in a cache field (cache.py copies states with `.copy()`, slices KV with `[:n]`).
    MLX arrays are immutable values and this backend only replaces them, so a copy can share the array."""

    __slots__ = ("a", "axis")

    def __init__(self, a: mx.array, axis: int = 0):
        self.a, self.axis = a, axis  # axis: the one `[:n]` slices (positions of a KV cache)

    def copy(self) -> "Held":
        return Held(self.a, self.axis)

    def __getitem__(self, index) -> "Held":
        return Held(self.a[(slice(None),) * self.axis + (index,)], self.axis)

    @property
    def nbytes(self) -> int:
        return self.a.nbytes

    @property
    def shape(self):
        return self.a.shape

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.a, dtype=dtype)


def _mx(a) -> mx.array:
    if isinstance(a, Held):
        return a.a
    return a if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------
# GGML blocks -> MLX quantized arrays. Each converter takes blocks (n, type_size) uint8 and returns
# (q (n, block_size) uint8 codes, scales (n, block_size // 32) float32, biases (same) float32).
# ---------------------------------------------------------------------------------------------------------

def _affine32(q, d, bias_mult):
    """32-weight blocks with one scale d (n, 1): bias = bias_mult * d (exact: bias_mult is a power of 2)."""
    return q, d, np.float32(bias_mult) * d


def _q8_0(b):
    return _affine32((b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b, 0), -128)


def _q4_0(b):
    return _affine32(_nibbles(b[:, 2:18]), _f16(b, 0), -8)


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    return _affine32(_nibbles(b[:, 6:22]) | (_bits_le(b[:, 2:6]) << np.uint8(4)), _f16(b, 0), -16)


def _q5_1(b):
    return _nibbles(b[:, 8:24]) | (_bits_le(b[:, 4:8]) << np.uint8(4)), _f16(b, 0), _f16(b, 2)


_IQ4_CODES = (IQ4_KVALUES.astype(np.int16) + 128).astype(np.uint8)  # the codebook as unsigned 8-bit codes


def _iq4_nl(b):
    return _affine32(_IQ4_CODES[_nibbles(b[:, 2:18])], _f16(b, 0), -128)


def _k_scales(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))  # (n, 8) each: as the reference


def _q4_k(b):
    n = b.shape[0]
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)  # sub-block 2c, 2c+1 of chunk c
    return (q.reshape(n, 256), *_k_scales(b))


def _q5_k(b):
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32)
    hi = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    lo = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    return ((lo.reshape(n, 8, 32) | (hi << np.uint8(4))).reshape(n, 256), *_k_scales(b))


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    sh = (b[:, 2].astype(np.uint16) | (b[:, 3].astype(np.uint16) << 8))[:, None] >> (2 * np.arange(8, dtype=np.uint16))
    sl = b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)
    ls = (sl.reshape(n, 8) & np.uint8(0x0F)) | ((sh & np.uint16(3)).astype(np.uint8) << np.uint8(4))
    dl = d * (ls.astype(np.float32) - np.float32(32))  # (n, 8): at most 16 significant bits
    qs = b[:, 8:136].reshape(n, 8, 16)
    q = _IQ4_CODES[np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)]  # (n, 8, 32)
    return q.reshape(n, 256), dl, np.float32(-128) * dl


def _q6_k_codes(b):
    """Q6_K -> q (n, 256) in 0..63 and the 16 sub-block scales d * sc (n, 16), as the reference."""
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    lo = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << np.uint8(4))
    return q.reshape(n, 256), _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)


def _q6_k_int8(b):
    """Each 32-group holds two 16-weight sub-blocks with scales dl0, dl1. The 8-bit grid step is a quarter of
    the larger |dl|, so that sub-block's values 4 * (q - 32) * step lie on the grid and stay exact; the other
    sub-block is rounded to the grid (error <= step / 2 = 1/8 of the larger sub-block's Q6_K step, more only
    where the two sub-blocks' ranges together span over 255 codes and the ends are clipped). The zero code
    `off` is a multiple of 4 below 256, so step * code and the bias -off * step are exact products."""
    n = b.shape[0]
    q, dl = _q6_k_codes(b)
    v = (dl[:, :, None] * (q.reshape(n, 16, 16).astype(np.float32) - np.float32(32))).reshape(n, 8, 32)
    dl = dl.reshape(n, 8, 2)
    step = np.abs(dl).max(axis=-1, keepdims=True) * np.float32(0.25)  # (n, 8, 1)
    k = np.rint(v / np.where(step > 0, step, np.float32(1)))  # grid index of each weight
    off = np.clip(4 * np.ceil(-k.min(axis=-1, keepdims=True) / 4), 0, 252).astype(np.float32)
    codes = np.clip(k + off, 0, 255).astype(np.uint8)
    return codes.reshape(n, 256), step[..., 0], -(off * step)[..., 0]


def _q6_k_exact(b):
    """Each 16-weight sub-block in its own 6-bit 32-group, padded with 16 zeros (code 32, bias -32 * dl)."""
    n = b.shape[0]
    q, dl = _q6_k_codes(b)
    q = np.concatenate([q.reshape(n, 16, 16), np.full((n, 16, 16), 32, np.uint8)], axis=-1)
    return q.reshape(n, 512), dl, np.float32(-32) * dl


@dataclass(frozen=True)
class Mapping:
    """How one GGML type becomes an MLX quantized array: bits per code and a block converter."""
    bits: int
    convert: object  # blocks -> (codes, scales, biases)
    pad16: bool = False  # codes come padded: every 16 weights take a 32-group (x is padded to match)


AFFINE = {
    T.Q4_0: Mapping(4, _q4_0), T.Q4_1: Mapping(4, _q4_1), T.Q5_0: Mapping(5, _q5_0), T.Q5_1: Mapping(5, _q5_1),
    T.Q8_0: Mapping(8, _q8_0), T.IQ4_NL: Mapping(8, _iq4_nl), T.Q4_K: Mapping(4, _q4_k),
    T.Q5_K: Mapping(5, _q5_k), T.IQ4_XS: Mapping(8, _iq4_xs),
}
Q6_K_POLICIES = {"int8": Mapping(8, _q6_k_int8), "exact": Mapping(6, _q6_k_exact, pad16=True)}
FLOATS = {T.F32: mx.float32, T.F16: mx.float16, T.BF16: mx.bfloat16}


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., K) codes < 2**bits -> (..., K * bits / 32) uint32, code i at bits [i*bits, (i+1)*bits) of the row's
    little-endian bit stream (MLX's layout: lowest bits first)."""
    if bits == 8:
        packed = np.ascontiguousarray(q, dtype=np.uint8)
    elif bits == 4:
        packed = (q[..., 0::2] | (q[..., 1::2] << np.uint8(4))).astype(np.uint8)
    else:  # 8 codes -> `bits` whole bytes: accumulate them in a uint64 and keep its low bytes
        *lead, K = q.shape
        q8 = q.reshape(*lead, K // 8, 8)
        acc = np.zeros((*lead, K // 8), np.uint64)
        for i in range(8):
            acc |= q8[..., i].astype(np.uint64) << np.uint64(bits * i)
        packed = acc[..., None].view(np.uint8)[..., :bits].reshape(*lead, K * bits // 8)
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


@dataclass(frozen=True)
class MLXWeight:
    """A weight ready for MLX: float (..., N, K), or quantized codes with per-32 scales and biases."""
    w: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    mode: str = "float"  # "float", "affine" or "mxfp4"
    pad16: bool = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.scales, self.biases) if a is not None)

    def _x(self, x):
        if not self.pad16:
            return x
        *lead, K = x.shape  # every 16 inputs followed by 16 zeros, as the padded codes
        x = x.reshape(*lead, K // 16, 16)
        return mx.concatenate([x, mx.zeros_like(x)], axis=-1).reshape(*lead, 2 * K)

    def rows(self, start: int, stop: int) -> "MLXWeight":
        """Output rows start..stop (views; the last two axes are (N, K))."""
        cut = lambda a: None if a is None else a[..., start:stop, :]
        return MLXWeight(cut(self.w), cut(self.scales), cut(self.biases), self.bits, self.mode, self.pad16)

    def matmul(self, x, streams=()):
        """x (..., K) float32 -> (..., N). With CPU streams, the rows are split across them: MLX runs each CPU
        stream on its own thread, and its CPU matmuls are single-threaded. Every output element is computed
        by the same kernel either way, so the split never changes a bit."""
        N = self.w.shape[-2]
        if len(streams) > 1 and N >= 512 * len(streams):
            cuts = [int(c) for c in np.linspace(0, N, len(streams) + 1)]
            return mx.concatenate([self.rows(a, b)._matmul(x, s) for a, b, s in zip(cuts, cuts[1:], streams)],
                                  axis=-1)
        return self._matmul(x, None)

    def _matmul(self, x, stream):
        if self.mode == "float":
            return mx.matmul(x, self.w.astype(mx.float32, stream=stream).T, stream=stream)
        return mx.quantized_matmul(self._x(x), self.w, self.scales, self.biases, transpose=True,
                                   group_size=GROUP, bits=self.bits, mode=self.mode, stream=stream)

    def gather(self, x, idx, sorted_indices=False):
        """Stacked experts (E, N, K): x (..., 1, K) times expert idx[...] -> (..., 1, N)."""
        if self.mode == "float":
            return mx.gather_mm(x, self.w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx,
                                sorted_indices=sorted_indices)
        return mx.gather_qmm(self._x(x), self.w, self.scales, self.biases, rhs_indices=idx, transpose=True,
                             group_size=GROUP, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)


def _mxfp4(blocks: np.ndarray, shape) -> MLXWeight:
    """MXFP4 is MLX's mxfp4 (E2M1 codes, E8M0 scale per 32): only the nibble order differs."""
    codes = _nibbles(blocks[:, 1:17]).reshape(*shape)
    scales = np.ascontiguousarray(blocks[:, 0]).reshape(*shape[:-1], shape[-1] // 32)
    return MLXWeight(mx.array(pack_codes(codes, 4)), mx.array(scales), None, 4, "mxfp4")


CONVERT_STEP = 1 << 20  # weights converted per step: bounds the NumPy temporaries of a large tensor
_POOL = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="localcoder-mlx-convert")
    return _POOL


def convert(w: QTensor, q6_k: str = "int8") -> MLXWeight:
    """One GGUF tensor (any leading dims, e.g. (E, N, K) experts) as an MLX weight; reads its bytes once."""
    shape, K = w.shape, w.shape[-1]
    if w.ggml_type in FLOATS:
        return MLXWeight(mx.array(w.dequantize()).astype(FLOATS[w.ggml_type]))
    fmt = get_format(w.ggml_type)
    rows = np.asarray(w.data).reshape(-1, w.data.shape[-1])  # (rows, row_bytes), a view of the mmap
    if w.ggml_type == T.MXFP4:
        return _mxfp4(np.ascontiguousarray(rows).reshape(-1, fmt.type_size), shape)
    m = Q6_K_POLICIES[q6_k] if w.ggml_type == T.Q6_K else AFFINE.get(w.ggml_type)
    if m is None:
        raise UnsupportedQuantType(f"the MLX backend has no mapping for {fmt.name} (tensor {w.name}); "
                                   "use --backend numba or numpy")
    Kc = K * (2 if m.pad16 else 1)  # codes per row
    packed = np.empty((rows.shape[0], Kc * m.bits // 32), np.uint32)
    scales = np.empty((rows.shape[0], Kc // GROUP), np.float32)
    biases = np.empty_like(scales)
    step = max(1, CONVERT_STEP // K)

    def part(r):  # NumPy releases the GIL in its loops: row ranges convert in parallel threads
        blocks = np.ascontiguousarray(rows[r:r + step]).reshape(-1, fmt.type_size)
        codes, s, b = m.convert(blocks)
        n = min(step, rows.shape[0] - r)
        packed[r:r + n] = pack_codes(codes.reshape(n, Kc), m.bits)
        scales[r:r + n], biases[r:r + n] = s.reshape(n, -1), b.reshape(n, -1)

    starts = range(0, rows.shape[0], step)
    if len(starts) > 1:
        list(_pool().map(part, starts))
    else:
        part(0)
    lead = shape[:-1]
    return MLXWeight(mx.array(packed.reshape(*lead, -1)), mx.array(scales.reshape(*lead, -1)),
                     mx.array(biases.reshape(*lead, -1)), m.bits, "affine", m.pad16)


def _stack(parts: list[MLXWeight]) -> MLXWeight:
    """Weights of the same mapping stacked on a new leading axis (experts)."""
    p = parts[0]
    stack = lambda name: None if getattr(p, name) is None else mx.stack([getattr(q, name) for q in parts])
    return MLXWeight(stack("w"), stack("scales"), stack("biases"), p.bits, p.mode, p.pad16)


def _concat_rows(a: MLXWeight, b: MLXWeight) -> MLXWeight | None:
    """[a | b] along the output rows (gate and up fused into one matmul) when both map the same way."""
    if (a.mode, a.bits, a.pad16, a.w.dtype) != (b.mode, b.bits, b.pad16, b.w.dtype):
        return None
    cat = lambda x, y: None if x is None else mx.concatenate([x, y], axis=-2)
    return MLXWeight(cat(a.w, b.w), cat(a.scales, b.scales), cat(a.biases, b.biases), a.bits, a.mode, a.pad16)


# ---------------------------------------------------------------------------------------------------------
# Experts: a layer is resident (its whole stack converted on first use; routing stays on the device) while
# the byte budget holds it; later layers stream (per expert on first use into an LRU cache holding the rest
# of the budget; the routed ids come to the host once per MoE layer). Either way the results are the same.
# ---------------------------------------------------------------------------------------------------------

MLX_BYTES_PER_GGUF_BYTE = 1.6  # bound on the growth of a K-quant stack in MLX form (float32 scales and biases)


def default_budget() -> int:
    """70 % of the memory available now (of all memory where the OS does not say)."""
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return int(0.7 * os.sysconf(name) * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            continue
    return 1 << 34


class ExpertStore:
    def __init__(self, budget_bytes: int | None, q6_k: str):
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self.q6_k = q6_k
        self.layers: dict[int, tuple | None] = {}  # layer -> (gate_up | None, gate, up, down) stacked; None: streamed
        self.resident_bytes = 0
        self.cache: OrderedDict[tuple[int, int], tuple] = OrderedDict()  # (layer, e) -> (gate, up, down)
        self.bytes = 0  # held by the cache
        self.hits = self.misses = 0

    def layer(self, experts) -> tuple | None:
        """The layer's resident stacks, converted on first use, or None when the layer streams."""
        if experts.layer not in self.layers:
            need = MLX_BYTES_PER_GGUF_BYTE * experts.expert_nbytes() * experts.n_expert
            self.layers[experts.layer] = None
            if self.resident_bytes + need <= self.budget:
                got = self._convert_layer(experts)
                self.resident_bytes += sum(w.nbytes for w in got if w is not None)
                self.layers[experts.layer] = got
        return self.layers[experts.layer]

    def _convert_layer(self, experts) -> tuple:
        down = convert(experts.down, self.q6_k)
        if experts.gate_up is not None:
            return convert(experts.gate_up, self.q6_k), None, None, down
        gate, up = convert(experts.gate, self.q6_k), convert(experts.up, self.q6_k)
        both = _concat_rows(gate, up)  # one gather_qmm for both when they map alike
        if both is None:
            return None, gate, up, down
        mx.eval(both.w, both.scales, both.biases)  # now, so the separate gate and up arrays are freed
        return both, None, None, down

    def expert(self, experts, e: int) -> tuple:
        key = (experts.layer, e)
        got = self.cache.get(key)
        if got is not None:
            self.hits += 1
            self.cache.move_to_end(key)
            return got
        self.misses += 1
        got = tuple(convert(t, self.q6_k) for t in experts.expert(e))
        self.cache[key] = got
        self.bytes += sum(w.nbytes for w in got)
        while self.bytes > self.budget - self.resident_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.bytes -= sum(w.nbytes for w in old)
        return got


# ---------------------------------------------------------------------------------------------------------
# Gated DeltaNet: the chunked (WY) form for prefill, one fused recurrent step for decode.
# ---------------------------------------------------------------------------------------------------------

def gated_delta_step(q, k, v, g, beta, state):
    """One token. q, k (Hv, Dk); v (Hv, Dv); g, beta (Hv,); state (Hv, Dk, Dv) float32."""
    state = state * mx.exp(g)[:, None, None]
    kv_mem = (k[:, None, :] @ state)[:, 0]  # (Hv, Dv): S^T k
    delta = (v - kv_mem) * beta[:, None]
    state = state + k[:, :, None] * delta[:, None, :]
    return (q[:, None, :] @ state)[:, 0], state


# Fused into one kernel on Metal; on the CPU, mx.compile would JIT C++ through the system compiler for ~10 %
_step = mx.compile(gated_delta_step) if mx.metal.is_available() else gated_delta_step


def gated_delta_recurrent(q, k, v, g, beta, state):
    """Token by token (the oracle for the chunked form; decode runs one step). Shapes as the reference."""
    outs = []
    for t in range(q.shape[0]):
        o, state = _step(q[t], k[t], v[t], g[t], beta[t], state)
        outs.append(o)
    return mx.stack(outs), state


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The recurrence in chunks of `chunk` tokens (the reference's WY form): inside a chunk the delta-rule
    updates are one unit-lower-triangular inverse, applied to all chunks at once; only the state is carried
    from chunk to chunk (a Python loop over T / chunk chunks, never over tokens)."""
    Tn, H, Dk = q.shape
    Dv = v.shape[-1]
    pad = (-Tn) % chunk
    N = (Tn + pad) // chunk

    def chunks(x):  # (T, H, ...) -> (H, N, C, ...), zero-padded: padded steps have g = beta = k = 0
        if pad:
            x = mx.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.swapaxes(0, 1).reshape(H, N, chunk, *x.shape[2:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    decay = mx.cumsum(g, axis=-1)  # (H, N, C)
    lower = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    strict = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), -1)
    pair = mx.where(lower, mx.exp(mx.where(lower, decay[..., :, None] - decay[..., None, :], 0)), 0)
    a = mx.where(strict, (k_beta @ k.swapaxes(-1, -2)) * pair, 0) + mx.eye(chunk, dtype=mx.float32)
    inv = mx.linalg.tri_inv(a, upper=False, stream=mx.cpu)  # linalg runs on the CPU stream (unified memory)
    u = inv @ v_beta  # (H, N, C, Dv)
    w = inv @ (k_beta * mx.exp(decay)[..., None])  # (H, N, C, Dk)
    attn = (q @ k.swapaxes(-1, -2)) * pair
    q_dec = q * mx.exp(decay)[..., None]
    k_dec = (k * mx.exp(decay[..., -1:] - decay)[..., None]).swapaxes(-1, -2)  # (H, N, Dk, C)
    chunk_decay = mx.exp(decay[..., -1])[..., None, None]  # (H, N, 1, 1)
    outs = []
    for n in range(N):
        v_new = u[:, n] - w[:, n] @ state  # (H, C, Dv)
        outs.append(q_dec[:, n] @ state + attn[:, n] @ v_new)
        state = state * chunk_decay[:, n] + k_dec[:, n] @ v_new
    out = mx.stack(outs, axis=1).reshape(H, N * chunk, Dv).swapaxes(0, 1)[:Tn]
    return out, state


# ---------------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------------

def _silu(x):
    return x / (1 + mx.exp(-x))


def _sigmoid(x):
    return 1 / (1 + mx.exp(-x))


class MLXBackend:
    """MLX arrays and quantized matmuls; see the module docstring for the weight mapping.

    q6_k: "int8" (default) or "exact", how Q6_K maps (see above).
    expert_budget: bytes of converted experts to hold (default: 70 % of the available memory). Layers whose
    whole expert stack fits are resident: routing stays on the device, no host round trip. Once the budget
    is spent, later layers stream: experts are converted one by one on first use into an LRU cache holding
    the rest of the budget, and the routed ids come to the host once per such layer.
    """

    name = "mlx"
    xp = xp

    def __init__(self, q6_k: str = "int8", expert_budget: int | None = None, threads: int | None = None):
        if q6_k not in Q6_K_POLICIES:
            raise ValueError(f"q6_k={q6_k!r}; choose one of {', '.join(Q6_K_POLICIES)}")
        self.q6_k = q6_k
        self._weights: dict[tuple, MLXWeight] = {}  # by (file, offset, name): prepared once, kept
        self._vectors: dict[tuple, mx.array] = {}
        self.experts = ExpertStore(expert_budget, q6_k)
        self._rope_freqs: dict[tuple[int, float], mx.array] = {}
        # On the CPU, one stream per core (MLX's CPU ops are single-threaded per stream); Metal needs none.
        if threads is None:
            threads = (os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1
        self.streams = tuple(mx.new_stream(mx.cpu) for _ in range(threads)) if threads > 1 else ()

    # -- elementwise ---------------------------------------------------------------------------------------
    silu = staticmethod(_silu)
    sigmoid = staticmethod(_sigmoid)

    @staticmethod
    def softplus(x):
        return mx.where(x > 20, x, mx.log1p(mx.exp(mx.minimum(x, 20))))

    @staticmethod
    def softmax(x):
        return mx.softmax(x, axis=-1, precise=True)

    def topk_softmax(self, logits, k: int):
        return topk_softmax(self, logits, k)

    # -- weights -------------------------------------------------------------------------------------------
    def prepare(self, w: QTensor) -> MLXWeight:
        key = (w.path, w.file_offset, w.name)
        got = self._weights.get(key)
        if got is None:
            got = self._weights[key] = convert(w, self.q6_k)
        return got

    def matmul(self, x, w: QTensor):
        """x (T, K) float32, w (N, K) -> (T, N)."""
        return self.prepare(w).matmul(x, self.streams)

    def matmuls(self, x, ws: tuple[QTensor, ...]) -> tuple:
        return tuple(self.matmul(x, w) for w in ws)

    def vector(self, w: QTensor):
        key = (w.path, w.file_offset, w.name)
        got = self._vectors.get(key)
        if got is None:
            got = self._vectors[key] = mx.array(w.dequantize().astype(np.float32, copy=False))
        return got

    def embed(self, ids, w: QTensor):
        """Rows dequantized on the host by the reference dequantizers (exact for every type): the token ids
        are an input, so this reads nothing computed and never converts the whole table."""
        ids = np.asarray(ids).astype(np.int64)
        rows = QTensor(w.name + "[rows]", w.ggml_type, (len(ids), w.shape[1]), w.data[ids], -1, w.path)
        return mx.array(rows.dequantize())

    # -- norms and rotary ----------------------------------------------------------------------------------
    @staticmethod
    def rms_norm(x, w, eps: float):
        if w.ndim == 1:
            return mx.fast.rms_norm(x, w, eps)
        return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w

    @staticmethod
    def l2_norm(x, eps: float):
        return x / mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True) + eps)

    def rope(self, x, positions, n_rot: int, theta: float):
        """NeoX rotary embedding (traditional=False) on the first n_rot dims. x (T, H, D)."""
        key = (n_rot, float(theta))
        periods = self._rope_freqs.get(key)
        if periods is None:  # 1 / inv_freq, with inv_freq in float32 exactly as HF computes it
            inv = (1.0 / (theta ** (np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / n_rot)))
            periods = self._rope_freqs[key] = mx.array((1 / inv.astype(np.float32)).astype(np.float32))
        y = mx.fast.rope(x.swapaxes(0, 1), n_rot, traditional=False, base=None, scale=1.0,
                         offset=positions[0], freqs=periods)
        return y.swapaxes(0, 1)

    # -- attention -----------------------------------------------------------------------------------------
    @staticmethod
    def kv_append(kv, k, v):
        """Store T new positions in the layer's cache and return all n + T as (1, Hkv, S, D) arrays.
        The cache keeps MLX arrays (1, Hkv, capacity, D) in Held wrappers, updated functionally."""
        T = k.shape[0]
        K, V = (_kv_buffer(x, kv.n) for x in (kv.k, kv.v))
        need = kv.n + T
        if need > K.shape[2]:
            capacity = max(2 * K.shape[2], need, 256)
            grow = lambda a: mx.concatenate([a, mx.zeros((*a.shape[:2], capacity - a.shape[2], a.shape[3]),
                                                         dtype=a.dtype)], axis=2)
            K, V = grow(K), grow(V)
        start = mx.array([kv.n], dtype=mx.int32)
        K = mx.slice_update(K, k.swapaxes(0, 1)[None].astype(K.dtype), start, axes=(2,))
        V = mx.slice_update(V, v.swapaxes(0, 1)[None].astype(V.dtype), start, axes=(2,))
        kv.k, kv.v, kv.n = Held(K, axis=2), Held(V, axis=2), need
        return K[:, :, :need], V[:, :, :need]

    @staticmethod
    def attention(q, k, v, positions):
        """Causal attention; q (T, Hq, D) holds the last T of the S cached positions; k, v (1, Hkv, S, D)."""
        T, Hq, D = q.shape
        o = mx.fast.scaled_dot_product_attention(q.swapaxes(0, 1)[None], k.astype(q.dtype), v.astype(q.dtype),
                                                 scale=D ** -0.5, mask="causal" if T > 1 else None)
        return o[0].swapaxes(0, 1)  # (T, Hq, D)

    # -- Gated DeltaNet ------------------------------------------------------------------------------------
    @staticmethod
    def conv1d(x, w, conv_state):
        """Causal depthwise conv + SiLU. x (T, C), w (C, K), conv_state (K-1, C)."""
        K = w.shape[1]
        T = x.shape[0]
        full = mx.concatenate([_mx(conv_state), x], axis=0)  # (K-1+T, C)
        out = full[0:T] * w[:, 0]
        for j in range(1, K):
            out = out + full[j:j + T] * w[:, j]
        return _silu(out), Held(full[T:])

    @staticmethod
    def gated_delta(q, k, v, g, beta, state):
        state = _mx(state)
        if q.shape[0] == 1:
            o, state = _step(q[0], k[0], v[0], g[0], beta[0], state)
            return o[None], Held(state)
        o, state = gated_delta_chunked(q, k, v, g, beta, state)
        return o, Held(state)

    # -- feed-forward --------------------------------------------------------------------------------------
    def swiglu(self, x, gate: QTensor, up: QTensor, down: QTensor):
        return self.matmul(_silu(self.matmul(x, gate)) * self.matmul(x, up), down)

    def moe(self, x, experts, expert_ids, expert_weights, shared=None):
        """Routed experts' SwiGLU with gather_qmm, plus the shared expert if given. x (T, D); expert_ids,
        expert_weights (T, k)."""
        Tn, k = expert_ids.shape
        stacks = self.experts.layer(experts)
        if stacks is not None:
            gate_up, gate, up, down = stacks
            idx = expert_ids.astype(mx.uint32)
        else:
            gate_up, gate, up, down, idx = self._streamed(experts, expert_ids)
        F = experts.n_ff
        parts = max(1, len(self.streams))
        if Tn * k >= 64:  # prefill: rows sorted by expert, so each expert's weights are read once
            flat = idx.reshape(-1)
            order = mx.argsort(flat)
            rows, sorted_ids = x[order // k][:, None, :], flat[order]  # (T*k, 1, D)
            cuts = [int(c) for c in np.linspace(0, Tn * k, parts + 1)]  # contiguous runs stay sorted
            h = mx.concatenate([self._swiglu_gathered(rows[a:b], gate_up, gate, up, down, sorted_ids[a:b], F, True, s)
                                for a, b, s in zip(cuts, cuts[1:], self.streams or (None,))], axis=0)[:, 0]
            h = h[mx.argsort(order)].reshape(Tn, k, -1)  # back to token order
        else:  # decode: the k routed slots split across the streams
            cuts = [int(c) for c in np.linspace(0, k, min(parts, k) + 1)]
            h = mx.concatenate([self._swiglu_gathered(x[:, None, None, :], gate_up, gate, up, down, idx[:, a:b], F,
                                                      False, s)
                                for a, b, s in zip(cuts, cuts[1:], self.streams or (None,))], axis=1)[:, :, 0]
        return add_shared(self, (h * expert_weights[..., None]).sum(axis=1), x, shared)

    @staticmethod
    def _swiglu_gathered(x, gate_up, gate, up, down, idx, F, sorted_indices, stream=None):
        with mx.stream(stream or mx.default_stream(mx.default_device())):
            if gate_up is not None:
                gu = gate_up.gather(x, idx, sorted_indices)
                g, u = gu[..., :F], gu[..., F:]
            else:
                g, u = gate.gather(x, idx, sorted_indices), up.gather(x, idx, sorted_indices)
            return down.gather(_silu(g) * u, idx, sorted_indices)

    def _streamed(self, experts, expert_ids):
        """Routed experts of this step from the LRU cache, stacked; ids renumbered into the stack."""
        ids = np.asarray(expert_ids)  # the one host read of this MoE layer
        used, local = np.unique(ids, return_inverse=True)
        parts = [self.experts.expert(experts, int(e)) for e in used]
        gate, up, down = (_stack([p[i] for p in parts]) for i in range(3))
        both = _concat_rows(gate, up)
        if both is not None:
            gate = up = None
        return both, gate, up, down, mx.array(local.reshape(ids.shape).astype(np.uint32))


def _kv_buffer(x, n: int) -> mx.array:
    """A KV cache field as (1, Hkv, capacity, D): a Held array, or make_cache's NumPy (capacity, Hkv, D)."""
    if isinstance(x, Held):
        return x.a
    return mx.array(np.ascontiguousarray(np.asarray(x)[:n].transpose(1, 0, 2))[None].astype(np.float32))
