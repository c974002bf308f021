"""Numba kernels over raw GGML blocks: row dequantization, matrix-vector and small matrix-matrix products.

Weights stay as the file stores them (uint8 rows of blocks, (N, row_bytes)); a kernel decodes each block
where it is used and never keeps a dequantized copy. Two activation paths:
  * float32 (matvec, matmul_rows, moe_experts): exact to 1e-5 against the NumPy reference; used for every
    type, for prompt processing, and for decode where the CPU lacks AVX-512 VNNI.
  * 8-bit (matvec_q8, moe_decode_q8; decode of Q4_K/Q5_K/Q6_K/Q8_0 when HAVE_VNNI): the vector is quantized
    once to llama.cpp's Q8_K and each row is one LLVM-IR loop (Numba intrinsics: Numba widens plain integer
    code to 64 bits and LLVM never forms vpdpbusd from it) doing u8 x s8 -> s32 vpdpbusd on 64-byte vectors,
    float vector accumulators and a software prefetch 2 KiB ahead. 2 threads, 151936x2048 head streamed
    from DRAM: Q4_K 30.6, Q5_K 29.8, Q6_K 24.8, Q8_0 32.9 GB/s against 7.8/8.2/7.8/5.5 GB/s for float32;
    see benchmarks/bench_kernels.py.

Dispatch: `KERNELS` maps each GGMLQuantizationType to its block geometry and a kernel code. Inside the
compiled drivers the code selects the per-type block routine; Numba cannot cache a driver specialised on
a function argument or a closure, so one cached driver per operation with a static switch is what keeps
compile time and the cache small (4 drivers, each compiled once, instead of 4 x 14).

Per type, block layouts follow ggml-quants.c (dequantize_row_*):
  Q4_0  18 B / 32:  d f16 | 16 B nibbles (low = first 16, high = last 16), w = d * (q - 8)
  Q8_0  34 B / 32:  d f16 | 32 int8, w = d * q
  Q4_K 144 B / 256: d, dmin f16 | 12 B 6-bit scales/mins | 128 B nibbles; w = d*sc*q - dmin*m
  Q5_K 176 B / 256: as Q4_K plus 32 B of fifth bits (qh) before the nibbles
  Q6_K 210 B / 256: 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales | d f16; w = d*sc*(q - 32)
  IQ4_XS 136 B / 256: d f16 | scales_h u16 | scales_l 4 B | 128 B nibbles indexing IQ4_NL values
  MXFP4 17 B / 32:  e8m0 exponent | 16 B nibbles indexing doubled e2m1 values; w = 2^(e-128) * kv
  Q4_1  20 B / 32:  d, m f16 | 16 B nibbles; w = d * q + m
  Q5_0  22 B / 32:  d f16 | qh u32 (bit j = fifth bit of weight j) | 16 B nibbles; w = d * (q - 16)
  Q5_1  24 B / 32:  d, m f16 | qh u32 | 16 B nibbles; w = d * q + m
  IQ4_NL 18 B / 32: d f16 | 16 B nibbles indexing IQ4_NL values; w = d * kv
  (the last four have no fused dot: _dot_row decodes the row into scratch, then dots it)
  F16, BF16, F32: one element per "block".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np
from numba import njit, prange
from ..errors import UnsupportedQuantType
from ..gguf_file import readonly

# Kernels whose sums run across experts may not reorder them: a batch of resident experts must add the same
# terms in the same order as one call with all experts, so that expert streaming never changes results.
_NO_REASSOC = {"nnan", "ninf", "nsz", "arcp", "afn"}

Q = gguf.GGMLQuantizationType
u8, i8, i32, f32 = np.uint8, np.int8, np.int32, np.float32
M4, S4 = np.uint8(15), np.uint8(4)
M3, S2, S6 = np.uint8(3), np.uint8(2), np.uint8(6)

# f16 bit pattern -> float32 (256 KiB, passed to every kernel that reads an f16 field)
F16_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
Q4_0_VALUES = np.arange(-8, 8, dtype=np.float32)  # Q4_0's 4-bit codes q stand for q - 8
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)

# kernel codes (internal to the compiled drivers; Python code dispatches through KERNELS)
_F32, _F16, _BF16, _Q4_0, _Q8_0, _Q4_K, _Q5_K, _Q6_K, _IQ4_XS, _MXFP4, _Q4_1, _Q5_0, _Q5_1, _IQ4_NL = range(14)


@dataclass(frozen=True)
class Kernel:
    code: int
    block: int  # elements per block
    size: int  # bytes per block


KERNELS = {
    Q.F32: Kernel(_F32, 1, 4), Q.F16: Kernel(_F16, 1, 2), Q.BF16: Kernel(_BF16, 1, 2),
    Q.Q4_0: Kernel(_Q4_0, 32, 18), Q.Q8_0: Kernel(_Q8_0, 32, 34), Q.Q4_K: Kernel(_Q4_K, 256, 144),
    Q.Q5_K: Kernel(_Q5_K, 256, 176), Q.Q6_K: Kernel(_Q6_K, 256, 210), Q.IQ4_XS: Kernel(_IQ4_XS, 256, 136),
    Q.MXFP4: Kernel(_MXFP4, 32, 17),
    # llama-quantize's fallbacks for rows that are not whole 256-blocks (Q5_0/Q5_1), and the other 32-blocks:
    # decoded by _deq_row (no fused dot; such tensors are small)
    Q.Q4_1: Kernel(_Q4_1, 32, 20), Q.Q5_0: Kernel(_Q5_0, 32, 22), Q.Q5_1: Kernel(_Q5_1, 32, 24),
    Q.IQ4_NL: Kernel(_IQ4_NL, 32, 18),
}


def kernel_for(ggml_type) -> Kernel:
    k = KERNELS.get(Q(ggml_type))
    if k is None:
        raise UnsupportedQuantType(f"no Numba kernel for GGML type {Q(ggml_type).name}; supported: "
                                  f"{', '.join(t.name for t in KERNELS)} (use --backend numpy)")
    return k


# ---------------------------------------------------------------------------------------------------------
# block helpers

@njit(inline="always")
def _h(row, o, f16):
    return f16[row[o] | (i32(row[o + 1]) << 8)]


@njit(inline="always")
def _scale_min_k4(sc, j):
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


@njit(inline="always")
def _e8m0_half(e):
    # ggml_e8m0_to_fp32_half: the subnormal branch (e < 2) and the normal one both equal 2^(e - 128)
    return f32(math.ldexp(1.0, i32(e) - 128))


# ---------------------------------------------------------------------------------------------------------
# dequantize one row (K elements) into out[:K]

@njit(cache=True, fastmath=True)
def _deq_row(code, row, out, K, f16):
    if code == _F32:
        out[:K] = row[:4 * K].view(np.float32)
    elif code == _F16:
        for i in range(K):
            out[i] = f16[row[2 * i] | (i32(row[2 * i + 1]) << 8)]
    elif code == _BF16:
        bits = out[:K].view(np.uint32)
        for i in range(K):
            bits[i] = (np.uint32(row[2 * i]) | (np.uint32(row[2 * i + 1]) << 8)) << 16
    elif code == _Q4_0 or code == _IQ4_NL:  # blocks of an f16 scale and 32 4-bit codes into a table of values
        values = IQ4NL_VALUES if code == _IQ4_NL else Q4_0_VALUES
        for b in range(K // 32):
            o = b * 18
            d = _h(row, o, f16)
            for l in range(16):
                q = row[o + 2 + l]
                out[32 * b + l] = d * values[q & M4]
                out[32 * b + 16 + l] = d * values[q >> S4]
    elif code == _Q8_0:
        for b in range(K // 32):
            o = b * 34
            d = _h(row, o, f16)
            for l in range(32):
                out[32 * b + l] = d * f32(i8(row[o + 2 + l]))
    elif code == _Q4_K:
        for b in range(K // 256):
            o = b * 144
            d = _h(row, o, f16)
            dmin = _h(row, o + 2, f16)
            sc = row[o + 4:o + 16]
            for j in range(4):
                s1, m1 = _scale_min_k4(sc, 2 * j)
                s2, m2 = _scale_min_k4(sc, 2 * j + 1)
                d1, c1, d2, c2 = d * f32(s1), dmin * f32(m1), d * f32(s2), dmin * f32(m2)
                qs = row[o + 16 + 32 * j:o + 48 + 32 * j]
                y = out[256 * b + 64 * j:256 * b + 64 * j + 64]
                for l in range(32):
                    y[l] = d1 * f32(u8(qs[l] & M4)) - c1
                    y[32 + l] = d2 * f32(u8(qs[l] >> S4)) - c2
    elif code == _Q5_K:
        for b in range(K // 256):
            o = b * 176
            d = _h(row, o, f16)
            dmin = _h(row, o + 2, f16)
            sc = row[o + 4:o + 16]
            qh = row[o + 16:o + 48]
            for j in range(4):
                s1, m1 = _scale_min_k4(sc, 2 * j)
                s2, m2 = _scale_min_k4(sc, 2 * j + 1)
                d1, c1, d2, c2 = d * f32(s1), dmin * f32(m1), d * f32(s2), dmin * f32(m2)
                qs = row[o + 48 + 32 * j:o + 80 + 32 * j]
                y = out[256 * b + 64 * j:256 * b + 64 * j + 64]
                b1, b2 = u8(2 * j), u8(2 * j + 1)
                for l in range(32):
                    y[l] = d1 * f32(u8(qs[l] & M4) | u8(((qh[l] >> b1) & u8(1)) << S4)) - c1
                    y[32 + l] = d2 * f32(u8(qs[l] >> S4) | u8(((qh[l] >> b2) & u8(1)) << S4)) - c2
    elif code == _Q6_K:
        for b in range(K // 256):
            o = b * 210
            d = _h(row, o + 208, f16)
            for n in range(2):
                ql = row[o + 64 * n:o + 64 * n + 64]
                qh = row[o + 128 + 32 * n:o + 160 + 32 * n]
                sc = o + 192 + 8 * n
                for s in range(2):
                    f0 = d * f32(i8(row[sc + s]))
                    f1 = d * f32(i8(row[sc + s + 2]))
                    f2 = d * f32(i8(row[sc + s + 4]))
                    f3 = d * f32(i8(row[sc + s + 6]))
                    y = out[256 * b + 128 * n:256 * b + 128 * n + 128]
                    for l in range(16 * s, 16 * s + 16):
                        a, c, h = ql[l], ql[32 + l], qh[l]
                        y[l] = f0 * (f32(u8(a & M4) | u8((h & M3) << S4)) - f32(32))
                        y[32 + l] = f1 * (f32(u8(c & M4) | u8(((h >> S2) & M3) << S4)) - f32(32))
                        y[64 + l] = f2 * (f32(u8(a >> S4) | u8(((h >> S4) & M3) << S4)) - f32(32))
                        y[96 + l] = f3 * (f32(u8(c >> S4) | u8(((h >> S6) & M3) << S4)) - f32(32))
    elif code == _IQ4_XS:
        for b in range(K // 256):
            o = b * 136
            d = _h(row, o, f16)
            sh = i32(row[o + 2]) | (i32(row[o + 3]) << 8)
            for ib in range(8):
                ls = ((row[o + 4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
                dl = d * f32(i32(ls) - 32)
                for j in range(16):
                    q = row[o + 8 + 16 * ib + j]
                    out[256 * b + 32 * ib + j] = dl * IQ4NL_VALUES[q & 15]
                    out[256 * b + 32 * ib + 16 + j] = dl * IQ4NL_VALUES[q >> 4]
    elif code == _Q4_1:
        for b in range(K // 32):
            o = b * 20
            d = _h(row, o, f16)
            m = _h(row, o + 2, f16)
            for l in range(16):
                q = row[o + 4 + l]
                out[32 * b + l] = d * f32(u8(q & M4)) + m
                out[32 * b + 16 + l] = d * f32(u8(q >> S4)) + m
    elif code == _Q5_0 or code == _Q5_1:
        one = code == _Q5_1
        bsize = 24 if one else 22
        for b in range(K // 32):
            o = b * bsize
            d = _h(row, o, f16)
            m = _h(row, o + 2, f16) if one else f32(0)
            h0 = o + 4 if one else o + 2
            qh = np.uint32(row[h0]) | (np.uint32(row[h0 + 1]) << 8) | (np.uint32(row[h0 + 2]) << 16) \
                | (np.uint32(row[h0 + 3]) << 24)
            qs = h0 + 4
            for l in range(16):
                q = row[qs + l]
                lo = i32(q & M4) | (i32((qh >> np.uint32(l)) & np.uint32(1)) << 4)
                hi = i32(q >> S4) | (i32((qh >> np.uint32(l + 16)) & np.uint32(1)) << 4)
                if one:
                    out[32 * b + l] = d * f32(lo) + m
                    out[32 * b + 16 + l] = d * f32(hi) + m
                else:
                    out[32 * b + l] = d * f32(lo - 16)
                    out[32 * b + 16 + l] = d * f32(hi - 16)
    elif code == _MXFP4:
        for b in range(K // 32):
            o = b * 17
            d = _e8m0_half(row[o])
            for l in range(16):
                q = row[o + 1 + l]
                out[32 * b + l] = d * MXFP4_VALUES[q & 15]
                out[32 * b + 16 + l] = d * MXFP4_VALUES[q >> 4]


# ---------------------------------------------------------------------------------------------------------
# fused row . x for the hot types (no intermediate row); xs holds the sums of x over each 16-element group

@njit(inline="always")
def _dot_q4k(row, x, xs, f16, five):
    bsize = 176 if five else 144
    acc = f32(0)
    mins = f32(0)
    for b in range(x.shape[0] // 256):
        o = b * bsize
        d = _h(row, o, f16)
        dmin = _h(row, o + 2, f16)
        sc = row[o + 4:o + 16]
        qs = row[o + 48:o + 176] if five else row[o + 16:o + 144]
        xb = x[256 * b:256 * b + 256]
        m = f32(0)
        for j in range(8):
            _, mj = _scale_min_k4(sc, j)
            m += f32(mj) * (xs[16 * b + 2 * j] + xs[16 * b + 2 * j + 1])
        s0, _ = _scale_min_k4(sc, 0)
        s1, _ = _scale_min_k4(sc, 1)
        s2, _ = _scale_min_k4(sc, 2)
        s3, _ = _scale_min_k4(sc, 3)
        s4, _ = _scale_min_k4(sc, 4)
        s5, _ = _scale_min_k4(sc, 5)
        s6, _ = _scale_min_k4(sc, 6)
        s7, _ = _scale_min_k4(sc, 7)
        f0, f1, f2, f3 = d * f32(s0), d * f32(s1), d * f32(s2), d * f32(s3)
        f4, f5, f6, f7 = d * f32(s4), d * f32(s5), d * f32(s6), d * f32(s7)
        if five:
            qh = row[o + 16:o + 48]
            for l in range(32):
                q0, q1, q2, q3 = qs[l], qs[32 + l], qs[64 + l], qs[96 + l]
                h = qh[l]
                acc += (f0 * f32(u8(q0 & M4) | u8((h & 1) << 4)) * xb[l]
                        + f1 * f32(u8(q0 >> S4) | u8(((h >> 1) & 1) << 4)) * xb[32 + l]
                        + f2 * f32(u8(q1 & M4) | u8(((h >> 2) & 1) << 4)) * xb[64 + l]
                        + f3 * f32(u8(q1 >> S4) | u8(((h >> 3) & 1) << 4)) * xb[96 + l]
                        + f4 * f32(u8(q2 & M4) | u8(((h >> 4) & 1) << 4)) * xb[128 + l]
                        + f5 * f32(u8(q2 >> S4) | u8(((h >> 5) & 1) << 4)) * xb[160 + l]
                        + f6 * f32(u8(q3 & M4) | u8(((h >> 6) & 1) << 4)) * xb[192 + l]
                        + f7 * f32(u8(q3 >> S4) | u8(((h >> 7) & 1) << 4)) * xb[224 + l])
        else:
            for l in range(32):
                q0, q1, q2, q3 = qs[l], qs[32 + l], qs[64 + l], qs[96 + l]
                acc += (f0 * f32(u8(q0 & M4)) * xb[l] + f1 * f32(u8(q0 >> S4)) * xb[32 + l]
                        + f2 * f32(u8(q1 & M4)) * xb[64 + l] + f3 * f32(u8(q1 >> S4)) * xb[96 + l]
                        + f4 * f32(u8(q2 & M4)) * xb[128 + l] + f5 * f32(u8(q2 >> S4)) * xb[160 + l]
                        + f6 * f32(u8(q3 & M4)) * xb[192 + l] + f7 * f32(u8(q3 >> S4)) * xb[224 + l])
        mins += dmin * m
    return acc - mins


@njit(inline="always")
def _dot_q6k(row, x, xs16, f16):
    """xs16: sums of x over 16-element groups; the -32 offset is applied once per group through them."""
    acc = f32(0)
    off = f32(0)
    for b in range(x.shape[0] // 256):
        o = b * 210
        d = _h(row, o + 208, f16)
        for n in range(2):
            ql = row[o + 64 * n:o + 64 * n + 64]
            qh = row[o + 128 + 32 * n:o + 160 + 32 * n]
            sc = o + 192 + 8 * n
            xb = x[256 * b + 128 * n:256 * b + 128 * n + 128]
            g = 16 * b + 8 * n
            for s in range(2):
                f0 = d * f32(i8(row[sc + s]))
                f1 = d * f32(i8(row[sc + s + 2]))
                f2 = d * f32(i8(row[sc + s + 4]))
                f3 = d * f32(i8(row[sc + s + 6]))
                off += f0 * xs16[g + s] + f1 * xs16[g + s + 2] + f2 * xs16[g + s + 4] + f3 * xs16[g + s + 6]
                blk = f32(0)
                for l in range(16 * s, 16 * s + 16):
                    a, c, h = ql[l], ql[32 + l], qh[l]
                    blk += (f0 * f32(u8(a & M4) | u8((h & M3) << S4)) * xb[l]
                            + f1 * f32(u8(c & M4) | u8(((h >> S2) & M3) << S4)) * xb[32 + l]
                            + f2 * f32(u8(a >> S4) | u8(((h >> S4) & M3) << S4)) * xb[64 + l]
                            + f3 * f32(u8(c >> S4) | u8(((h >> S6) & M3) << S4)) * xb[96 + l])
                acc += blk
    return acc - f32(32) * off


@njit(inline="always")
def _dot_q8_0(row, x, f16):
    acc = f32(0)
    for b in range(x.shape[0] // 32):
        o = b * 34
        s = f32(0)
        for l in range(32):
            s += f32(i8(row[o + 2 + l])) * x[32 * b + l]
        acc += _h(row, o, f16) * s
    return acc


@njit(inline="always")
def _dot_q4_0(row, x, xs, f16):
    acc = f32(0)
    for b in range(x.shape[0] // 32):
        o = b * 18
        s = f32(0)
        for l in range(16):
            q = row[o + 2 + l]
            s += f32(u8(q & M4)) * x[32 * b + l] + f32(u8(q >> S4)) * x[32 * b + 16 + l]
        acc += _h(row, o, f16) * (s - f32(8) * (xs[2 * b] + xs[2 * b + 1]))
    return acc


@njit(cache=True, fastmath=True)
def _dot_row(code, row, x, xs, buf, f16):
    """row . x for one weight row; buf (>= K floats) is scratch for the types without a fused dot."""
    if code == _Q4_K:
        return _dot_q4k(row, x, xs, f16, False)
    if code == _Q5_K:
        return _dot_q4k(row, x, xs, f16, True)
    if code == _Q6_K:
        return _dot_q6k(row, x, xs, f16)
    if code == _Q8_0:
        return _dot_q8_0(row, x, f16)
    if code == _Q4_0:
        return _dot_q4_0(row, x, xs, f16)
    K = x.shape[0]
    if code == _F32:  # the router: dot the stored floats in place
        if HAVE_VNNI and K % 64 == 0:
            return _rf32(row, x, K // 64)
        return _dot(row[:4 * K].view(np.float32), x, K)
    _deq_row(code, row, buf, K, f16)
    acc = f32(0)
    for i in range(K):
        acc += buf[i] * x[i]
    return acc


@njit(inline="always")
def _dot(a, b, K):
    acc = f32(0)
    for i in range(K):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, fastmath=True)
def _dot_fm(a, b, K):
    """_dot compiled on its own with reassociation (vectorized), for kernels that must not reassociate
    their outer sums: a function's fastmath flags stay with its own instructions."""
    return _dot(a, b, K)


# ---------------------------------------------------------------------------------------------------------
# drivers: parallel over chunks of output rows (a few chunks per thread, scratch allocated once per chunk)

@njit(inline="always")
def _chunks(n, nchunks):
    c = max(1, min(n, nchunks))
    return c, (n + c - 1) // c


@njit(cache=True, parallel=True, fastmath=True)
def matvec(code, w, x, f16, out, nchunks):
    """out[n] = w[n] . x. w (N, row_bytes) uint8 blocks, x (K,) float32, out (N,) float32."""
    K = x.shape[0]
    nc, step = _chunks(w.shape[0], nchunks)
    if code == _F32 and HAVE_VNNI and K % 64 == 0:
        # the router: its rows dotted by the intrinsic right here; through _dot_row (a call per 8 KB row)
        # a 4 MB router read at 27 instead of 32 GB/s (benchmarks/bench_kernels.py --types F32)
        for c in prange(nc):
            for n in range(c * step, min(w.shape[0], (c + 1) * step)):
                out[n] = _rf32(w[n], x, K // 64)
        return
    xs = x.reshape(-1, 16).sum(axis=1) if K % 16 == 0 else np.zeros(1, np.float32)
    for c in prange(nc):
        buf = np.empty(K, np.float32)
        for n in range(c * step, min(w.shape[0], (c + 1) * step)):
            out[n] = _dot_row(code, w[n], x, xs, buf, f16)


@njit(cache=True, parallel=True, fastmath=True)
def matmul_rows(code, w, x, f16, out, nchunks):
    """out[t, n] = w[n] . x[t] for a few tokens: each row is decoded once into an L1 buffer and reused
    for every token. w (N, row_bytes), x (T, K), out (T, N)."""
    T, K = x.shape
    nc, step = _chunks(w.shape[0], nchunks)
    for c in prange(nc):
        buf = np.empty(K, np.float32)
        for n in range(c * step, min(w.shape[0], (c + 1) * step)):
            _deq_row(code, w[n], buf, K, f16)
            for t in range(T):
                out[t, n] = _dot(buf, x[t], K)


@njit(cache=True, parallel=True)
def dequant_rows(code, w, f16, out, nchunks):
    """out[n, :] = dequantized row n. w (N, row_bytes), out (N, K) float32."""
    K = out.shape[1]
    nc, step = _chunks(w.shape[0], nchunks)
    for c in prange(nc):
        for n in range(c * step, min(w.shape[0], (c + 1) * step)):
            _deq_row(code, w[n], out[n], K, f16)


@njit(cache=True, parallel=True, fastmath=_NO_REASSOC)
def moe_experts(gcode, ucode, dcode, gate, up, up_off, down, F, experts, starts, tokens, weights, x, f16, out, nchunks):
    """Routed SwiGLU experts of one step, accumulated into out (T, D).

    gate, up (E, *, row_bytes): expert e's F gate rows are gate[e, :F], its up rows up[e, up_off:up_off+F]
    (a fused gate_up tensor is passed twice with up_off = F); down (E, D, row_bytes'). experts (n_e,) are
    the routed ids; the (token, weight) pairs starts[i]..starts[i+1] go to experts[i]. Two parallel loops:
    over (expert, ff row) jobs for gate and up (each row decoded once for all of that expert's tokens),
    then over output rows, reading each routed expert's down row once."""
    n_e = experts.shape[0]
    T, D = x.shape
    n_pairs = tokens.shape[0]
    h = np.empty((n_pairs, F), np.float32)
    xs = np.empty((T, D // 16), np.float32)
    for t in range(T):
        xs[t] = x[t].reshape(-1, 16).sum(axis=1)
    nc, step = _chunks(n_e * F, nchunks)
    for c in prange(nc):
        gbuf = np.empty(D, np.float32)
        ubuf = np.empty(D, np.float32)
        for job in range(c * step, min(n_e * F, (c + 1) * step)):
            i, f = job // F, job % F
            e = experts[i]
            p0, p1 = starts[i], starts[i + 1]
            grow, urow = gate[e, f], up[e, up_off + f]
            if p1 - p0 == 1:
                t = tokens[p0]
                g = _dot_row(gcode, grow, x[t], xs[t], gbuf, f16)
                u = _dot_row(ucode, urow, x[t], xs[t], ubuf, f16)
                h[p0, f] = g / (f32(1) + np.exp(-g)) * u
            else:
                _deq_row(gcode, grow, gbuf, D, f16)
                _deq_row(ucode, urow, ubuf, D, f16)
                for p in range(p0, p1):
                    g = _dot_fm(gbuf, x[tokens[p]], D)
                    u = _dot_fm(ubuf, x[tokens[p]], D)
                    h[p, f] = g / (f32(1) + np.exp(-g)) * u
    hs = np.zeros((n_pairs, max(F // 16, 1)), np.float32)
    if F % 16 == 0:
        for p in range(n_pairs):
            hs[p] = h[p].reshape(-1, 16).sum(axis=1)
    nc, step = _chunks(D, nchunks)
    for c in prange(nc):
        buf = np.empty(F, np.float32)
        for drow in range(c * step, min(D, (c + 1) * step)):
            for i in range(n_e):
                e = experts[i]
                p0, p1 = starts[i], starts[i + 1]
                wrow = down[e, drow]
                if p1 - p0 == 1:
                    out[tokens[p0], drow] += weights[p0] * _dot_row(dcode, wrow, h[p0], hs[p0], buf, f16)
                else:
                    _deq_row(dcode, wrow, buf, F, f16)
                    for p in range(p0, p1):
                        out[tokens[p], drow] += weights[p] * _dot_fm(buf, h[p], F)


# ---------------------------------------------------------------------------------------------------------
# 8-bit activations (llama.cpp's Q8_K) and AVX-512 VNNI block dots
#
# quantize_q8k: per 256 values d = max|x| / 127, q = round(x / d) (int8), bs16 = sums of q over 16-value
# groups, bs32 over 32-value groups. A block dot is then sum_i w_i q_i in int32 (vpdpbusd: u8 x s8 -> s32,
# 64 byte pairs per instruction), scaled by d_w * d_x; the Q4_K/Q5_K mins and the Q6_K -32 offset go
# through bs32 / bs16. The block routines below are Numba intrinsics that emit LLVM IR directly (Numba's
# integer code widens to 64 bits and LLVM never forms vpdpbusd from it). They exist only when the host has
# avx512_vnni + avx512bw; elsewhere HAVE_VNNI is False and the backend keeps float32 activations.

def _host_has_vnni() -> bool:
    try:
        import llvmlite.binding as llb
        feats = llb.get_host_cpu_features()
        return bool(feats.get("avx512vnni") and feats.get("avx512bw") and feats.get("avx512f"))
    except Exception:
        return False


HAVE_VNNI = _host_has_vnni()

from llvmlite import ir as _ir  # noqa: E402
from numba import types as _nt  # noqa: E402
from numba.core import cgutils as _cg  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

_I8, _I32 = _ir.IntType(8), _ir.IntType(32)
_V64I8, _V32I8, _V16I32 = _ir.VectorType(_I8, 64), _ir.VectorType(_I8, 32), _ir.VectorType(_I32, 16)
_I16 = _ir.IntType(16)
_V16I8, _V16I16, _V32I16 = _ir.VectorType(_I8, 16), _ir.VectorType(_I16, 16), _ir.VectorType(_I16, 32)
_F32T = _ir.FloatType()


def _vconst(vt, vals):
    return _ir.Constant(vt, [_ir.Constant(vt.element, v) for v in vals])


def _splat8(v, n=64):
    return _vconst(_ir.VectorType(_I8, n), [v] * n)


def _load(builder, p, ty, byte_off=0):
    if byte_off:
        p = builder.gep(p, [_ir.Constant(_ir.IntType(64), byte_off)])
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=1)


def _dpbusd(builder, acc, u, s):
    fnty = _ir.FunctionType(_V16I32, [_V16I32, _V16I32, _V16I32])
    fn = _cg.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, builder.bitcast(u, _V16I32), builder.bitcast(s, _V16I32)])


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, _vconst(_ir.VectorType(_I32, 2 * n), list(range(2 * n))))


def _half(builder, p, byte_off):
    h = _load(builder, p, _ir.HalfType(), byte_off)
    return builder.fpext(h, _F32T)


def _bcast(builder, v, idx):
    """<len(idx) x i32> shuffle of v."""
    return builder.shuffle_vector(v, v, _vconst(_ir.VectorType(_I32, len(idx)), idx))


# Row-level intrinsics: the whole row . x in one loop of IR, float accumulators kept in vector registers
# (one horizontal sum per row instead of two per block; sub-block scales applied in int16, see below; Q8_0
# scales with vcvtdq2ps + vfmadd). x side: xq int8, xd (K/256) float32, bsf float32 sums (bs32 for
# Q4_K/Q5_K, 32*bs16 for Q6_K, 128*bs32 for Q8_0) precomputed once per vector.

_F16V, _F8V = _ir.VectorType(_F32T, 16), _ir.VectorType(_F32T, 8)
_I64 = _ir.IntType(64)


def _fma(builder, a, b, c):
    n = a.type.count
    fn = _cg.get_or_insert_function(builder.module, _ir.FunctionType(a.type, [a.type] * 3), f"llvm.fma.v{n}f32")
    return builder.call(fn, [a, b, c])


def _hsum(builder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, _vconst(_ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, _vconst(_ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, _ir.Constant(_I32, 0))


def _splatf(builder, s, n):
    v = builder.insert_element(_ir.Constant(_ir.VectorType(_F32T, n), None), s, _ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _vconst(_ir.VectorType(_I32, n), [0] * n))


def _fzero(n):
    return _ir.Constant(_ir.VectorType(_F32T, n), [_ir.Constant(_F32T, 0.0)] * n)


PREFETCH_BYTES = 2048  # software prefetch distance ahead of the block being decoded (rows stream from DRAM)


def _prefetch(builder, p, nbytes):
    """Prefetch the cache lines of [p + PREFETCH_BYTES, p + PREFETCH_BYTES + nbytes) (never faults)."""
    if not PREFETCH_BYTES:
        return
    for off in range(0, nbytes, 64):
        _prefetch_line(builder, builder.gep(p, [_ir.Constant(_I64, PREFETCH_BYTES + off)]))


def _prefetch_line(builder, q):
    """Prefetch the cache line at i8* q into L1 for reading (prefetcht0)."""
    fn = _cg.get_or_insert_function(builder.module, _ir.FunctionType(_ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
                                    "llvm.prefetch.p0")
    builder.call(fn, [q, _ir.Constant(_I32, 0), _ir.Constant(_I32, 3), _ir.Constant(_I32, 1)])


@intrinsic
def prefetch(typingctx, arr, byte_off):
    """Prefetch the cache line at byte byte_off of arr's data into L1 (a hint: never faults, even past the end)."""
    def codegen(context, builder, sig, args):
        base = builder.bitcast(context.make_array(sig.args[0])(context, builder, args[0]).data, _I8.as_pointer())
        _prefetch_line(builder, builder.gep(base, [args[1]]))
        return context.get_dummy_value()
    return _nt.void(arr, _nt.int64), codegen


def _row_args(context, builder, sig, args):
    row, xq, xd, bsf, nb = args
    rp = builder.bitcast(context.make_array(sig.args[0])(context, builder, row).data, _I8.as_pointer())
    xp = builder.bitcast(context.make_array(sig.args[1])(context, builder, xq).data, _I8.as_pointer())
    dp = context.make_array(sig.args[2])(context, builder, xd).data
    bp = context.make_array(sig.args[3])(context, builder, bsf).data
    return rp, xp, dp, bp, nb


# The emitters take NT tokens' activations (lists of pointers) and return NT dot products: a block's weights
# are loaded, unpacked and scaled once and dotted with each token (the prompt path, where a routed expert
# sees a few tokens). Q4_K/Q5_K/Q6_K: a block's 4-value integer dots (vpdpbusd) are packed to int16 and
# multiplied by the sub-block scales in integers (vpmaddwd / vpdpwssd: fewer multiply-port operations than
# converting each dot to float), so a token costs one float fma per block, in one chain per token: the
# same float operations whatever the number of tokens per pass.

def _token_block(builder, xp, dp, bp, b, vt):
    """Block b of one token: (its 256 int8 values, its scale d_x, its vt-vector of group sums)."""
    x = builder.gep(xp, [builder.mul(b, _ir.Constant(_I64, 256))])
    xdb = builder.load(builder.gep(dp, [b]))
    bs = builder.load(builder.bitcast(builder.gep(bp, [builder.mul(b, _ir.Constant(_I64, vt.count))]),
                                      vt.as_pointer()), align=4)
    return x, xdb, bs


def _acc_add(builder, ptr, a, b):
    builder.store(_fma(builder, a, b, builder.load(ptr)), ptr)


def _dpwssd(builder, acc, a, b):
    """acc + vpmaddwd(a, b) (<32 x i16> a, b): vpdpwssd, or vpmaddwd for acc None."""
    if acc is None:
        fnty = _ir.FunctionType(_V16I32, [_V32I16, _V32I16])
        return builder.call(_cg.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.pmaddw.d.512"), [a, b])
    fnty = _ir.FunctionType(_V16I32, [_V16I32, _V16I32, _V16I32])
    fn = _cg.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpwssd.512")
    return builder.call(fn, [acc, builder.bitcast(a, _V16I32), builder.bitcast(b, _V16I32)])


def _packssdw(builder, a, b):
    """vpackssdw: per 128-bit lane k, int16 lanes 8k..8k+3 = a[4k..4k+3], 8k+4..8k+7 = b[4k..4k+3]."""
    fnty = _ir.FunctionType(_V32I16, [_V16I32, _V16I32])
    return builder.call(_cg.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.packssdw.512"), [a, b])


def _scaled_pair(builder, acc, qa, xa, qb, xb, scales):
    """acc + the 4-byte dots (vpdpbusd) of u8 qa . s8 xa and qb . xb, packed to int16 (each fits: at most
    4 * 63 * 127) and multiplied by the int16 scales of their lanes (vpmaddwd / vpdpwssd; see _packssdw)."""
    zero = _ir.Constant(_V16I32, [_ir.Constant(_I32, 0)] * 16)
    return _dpwssd(builder, acc, _packssdw(builder, _dpbusd(builder, zero, qa, xa), _dpbusd(builder, zero, qb, xb)),
                   scales)


def _packed_scales(builder, s16, sa, sb):
    """<32 x i16> scales for _scaled_pair: s16[sa[m]] for qa's dot lane m (0-15), s16[sb[m]] for qb's, laid
    out as _packssdw packs the two dots."""
    return _bcast(builder, s16, [(sa if k % 8 < 4 else sb)[4 * (k // 8) + k % 4] for k in range(32)])


def _q4k_scales(builder, p):
    """The 12 packed 6-bit scales and mins at p + 4 of a Q4_K/Q5_K block -> <16 x i16> (sc0..7, mn0..7)."""
    raw = _load(builder, p, _V16I8, 4)  # 12 scale bytes + 4 bytes of what follows (unused)
    a = builder.shuffle_vector(raw, raw, _vconst(_V16I32, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]))
    z = 16  # index of a zero byte (the second shuffle operand)
    b = builder.shuffle_vector(raw, _ir.Constant(_V16I8, [_ir.Constant(_I8, 0)] * 16),
                               _vconst(_V16I32, [z] * 4 + [0, 1, 2, 3] + [z] * 4 + [4, 5, 6, 7]))
    low = builder.and_(a, _vconst(_V16I8, [63] * 4 + [15] * 4 + [63] * 4 + [0] * 4))
    low = builder.or_(low, builder.and_(builder.lshr(a, _splat8(4, 16)), _vconst(_V16I8, [0] * 12 + [15] * 4)))
    s = builder.or_(low, builder.and_(builder.lshr(b, _splat8(2, 16)), _splat8(0x30, 16)))
    return builder.zext(s, _V16I16)


def _token_scales(builder, dd, xdb):
    """d * xd splat to 16 lanes and dmin * xd to 8, from dd = <2 x float> (d, dmin) of the block."""
    v = builder.fmul(dd, _splatf(builder, xdb, 2))
    return [builder.shuffle_vector(v, v, _vconst(_ir.VectorType(_I32, n), [k] * n)) for k, n in ((0, 16), (1, 8))]


def _row_q4k_codegen(five):
    """Q4_K (Q5_K with five): per block and token the sub-blocks' dots are scaled by their 6-bit scales in
    integers (_scaled_pair), then one float fma by d * xd; the mins term dmin * xd * sum(mn * bsum) in an
    8-lane float accumulator. One fma chain per token (the same float ops for any number of tokens)."""
    bsize = 176 if five else 144

    def codegen(builder, rp, xps, dps, bps, nb):
        nt = len(xps)
        accs = [_cg.alloca_once_value(builder, _fzero(16)) for _ in range(nt)]
        mins = [_cg.alloca_once_value(builder, _fzero(8)) for _ in range(nt)]
        with _cg.for_range(builder, nb) as loop:
            b = loop.index
            p = builder.gep(rp, [builder.mul(b, _ir.Constant(_I64, bsize))])
            _prefetch(builder, p, bsize)
            dd = builder.fpext(_load(builder, p, _ir.VectorType(_ir.HalfType(), 2)), _ir.VectorType(_F32T, 2))
            s16 = _q4k_scales(builder, p)
            mnf = builder.uitofp(builder.shuffle_vector(s16, s16, _vconst(_ir.VectorType(_I32, 8), range(8, 16))), _F8V)
            if five:
                qh = _load(builder, p, _V32I8, 16)
                qh64 = _concat(builder, qh, qh)
            sums = [None] * nt
            xs = [_token_block(builder, xps[j], dps[j], bps[j], b, _F8V) for j in range(nt)]
            for h in range(2):
                q = _load(builder, p, _V64I8, (48 if five else 16) + 64 * h)
                lo = builder.and_(q, _splat8(15))
                hi = builder.lshr(q, _splat8(4))
                if five:
                    for which in (0, 1):
                        s0, s1 = 4 * h + which, 4 * h + 2 + which
                        mask = _vconst(_V64I8, [1 << s0] * 32 + [(1 << s1) - (256 if s1 == 7 else 0)] * 32)
                        bit = builder.icmp_unsigned("!=", builder.and_(qh64, mask), _splat8(0))
                        add = builder.select(bit, _splat8(16), _splat8(0))
                        if which == 0:
                            lo = builder.or_(lo, add)
                        else:
                            hi = builder.or_(hi, add)
                # x arrives permuted per 256-block (Q4K_PERM): the 64 values under lo, then those under hi;
                # lo's dot lanes 0-7 are sub-block 4h, 8-15 sub-block 4h + 2 (hi: 4h + 1, 4h + 3)
                sc = _packed_scales(builder, s16, [4 * h] * 8 + [4 * h + 2] * 8, [4 * h + 1] * 8 + [4 * h + 3] * 8)
                for j in range(nt):
                    x = xs[j][0]
                    sums[j] = _scaled_pair(builder, sums[j], lo, _load(builder, x, _V64I8, 128 * h),
                                           hi, _load(builder, x, _V64I8, 128 * h + 64), sc)
            for j in range(nt):
                _, xdb, bs = xs[j]
                dx16, mx8 = _token_scales(builder, dd, xdb)
                _acc_add(builder, accs[j], builder.sitofp(sums[j], _F16V), dx16)
                _acc_add(builder, mins[j], builder.fmul(mnf, mx8), bs)
        return [builder.fsub(_hsum(builder, builder.load(accs[j])), _hsum(builder, builder.load(mins[j])))
                for j in range(nt)]
    return codegen


def _row_q6k_codegen(builder, rp, xps, dps, bps, nb):
    """Q6_K: per block and token the 16 groups' dots are scaled by their int8 scales in integers
    (_scaled_pair), the -32 offset (scale * 32 * bsum16 per group) taken off in float, then one fma by d * xd."""
    nt = len(xps)
    accs = [_cg.alloca_once_value(builder, _fzero(16)) for _ in range(nt)]
    m4, m3 = _splat8(15), _splat8(3, 32)
    with _cg.for_range(builder, nb) as loop:
        b = loop.index
        p = builder.gep(rp, [builder.mul(b, _ir.Constant(_I64, 210))])
        _prefetch(builder, p, 210)
        dw = _half(builder, p, 208)
        sc8 = _load(builder, p, _V16I8, 192)
        s16 = builder.sext(sc8, _V16I16)
        scf = builder.sitofp(sc8, _F16V)
        sums = [None] * nt
        xs = [_token_block(builder, xps[j], dps[j], bps[j], b, _F16V) for j in range(nt)]
        for n in range(2):
            ql = _load(builder, p, _V64I8, 64 * n)
            qh = _load(builder, p, _V32I8, 128 + 32 * n)
            a = builder.and_(qh, m3)
            bb = builder.and_(builder.lshr(qh, _splat8(2, 32)), m3)
            c = builder.and_(builder.lshr(qh, _splat8(4, 32)), m3)
            e = builder.lshr(qh, _splat8(6, 32))
            lo = builder.or_(builder.and_(ql, m4), builder.shl(_concat(builder, a, bb), _splat8(4)))
            hi = builder.or_(builder.lshr(ql, _splat8(4)), builder.shl(_concat(builder, c, e), _splat8(4)))
            g = 8 * n  # lo's dot lanes 4k..4k+3 are scale group g + k, hi's g + 4 + k
            sc = _packed_scales(builder, s16, [g + m // 4 for m in range(16)], [g + 4 + m // 4 for m in range(16)])
            for j in range(nt):
                x = xs[j][0]
                sums[j] = _scaled_pair(builder, sums[j], lo, _load(builder, x, _V64I8, 128 * n),
                                       hi, _load(builder, x, _V64I8, 128 * n + 64), sc)
        for j in range(nt):
            _, xdb, bs = xs[j]
            v = builder.fsub(builder.sitofp(sums[j], _F16V), builder.fmul(scf, bs))
            _acc_add(builder, accs[j], v, _splatf(builder, builder.fmul(dw, xdb), 16))
    return [_hsum(builder, builder.load(accs[j])) for j in range(nt)]


def _row_q8_0_codegen(builder, rp, xps, dps, bps, nb):
    """nb = number of block pairs (K / 64); xd per 256 values (pair i uses xd[i // 4])."""
    nt = len(xps)
    accs = [_cg.alloca_once_value(builder, _fzero(16)) for _ in range(nt)]
    offs = [_cg.alloca_once_value(builder, _fzero(2)) for _ in range(nt)]
    zero = _ir.Constant(_V16I32, [_ir.Constant(_I32, 0)] * 16)
    v2f = _ir.VectorType(_F32T, 2)
    with _cg.for_range(builder, nb) as loop:
        i = loop.index
        p = builder.gep(rp, [builder.mul(i, _ir.Constant(_I64, 68))])
        _prefetch(builder, p, 68)
        d0w, d1w = _half(builder, p, 0), _half(builder, p, 34)
        w = _concat(builder, _load(builder, p, _V32I8, 2), _load(builder, p, _V32I8, 36))
        w = builder.xor(w, _splat8(-128))
        for j in range(nt):
            x = builder.gep(xps[j], [builder.mul(i, _ir.Constant(_I64, 64))])
            xdb = builder.load(builder.gep(dps[j], [builder.lshr(i, _ir.Constant(_I64, 2))]))
            bs = builder.load(builder.bitcast(builder.gep(bps[j], [builder.mul(i, _ir.Constant(_I64, 2))]),
                                              v2f.as_pointer()), align=4)
            dv = builder.insert_element(_ir.Constant(v2f, None), builder.fmul(d0w, xdb), _ir.Constant(_I32, 0))
            dv = builder.insert_element(dv, builder.fmul(d1w, xdb), _ir.Constant(_I32, 1))
            _acc_add(builder, offs[j], dv, bs)
            dot = builder.sitofp(_dpbusd(builder, zero, w, _load(builder, x, _V64I8, 0)), _F16V)
            _acc_add(builder, accs[j], dot, _bcast(builder, dv, [0] * 8 + [1] * 8))
    return [builder.fsub(_hsum(builder, builder.load(accs[j])), _hsum(builder, builder.load(offs[j])))
            for j in range(nt)]


def _row_intrinsic(emit):
    """(row uint8[:], xq int8[:], xd float32[:], bsf float32[:], nb) -> float32: row . x."""
    def typer(typingctx, row, xq, xd, bsf, nb):
        def codegen(context, builder, sig, args):
            rp, xp, dp, bp, nb = _row_args(context, builder, sig, args)
            return emit(builder, rp, [xp], [dp], [bp], nb)[0]
        return _nt.float32(row, xq, xd, bsf, _nt.int64), codegen
    return typer


def _act_arrays(context, builder, sig, args, idxs):
    """(base i8*, row stride, element pointer type) of the 2-D activation arrays xq, xd, bsf."""
    out = []
    for k in idxs:
        arr = context.make_array(sig.args[k])(context, builder, args[k])
        out.append((builder.bitcast(arr.data, _I8.as_pointer()), builder.extract_value(arr.strides, 0),
                    _I8.as_pointer() if k == idxs[0] else _F32T.as_pointer()))
    return out


def _emit_tokens(builder, emit, rp, arrays, p0, nt, nb, use):
    """use(j, row . x[p0 + j]) for j < nt, where nt is 4, 2 or else 1 (three unrolled variants)."""
    def variant(n):
        lists = [[builder.bitcast(builder.gep(base, [builder.mul(builder.add(p0, _ir.Constant(_I64, j)), stride)]),
                                  ty) for j in range(n)] for base, stride, ty in arrays]
        for j, v in enumerate(emit(builder, rp, *lists, nb)):
            use(j, v)

    with builder.if_else(builder.icmp_signed("==", nt, _ir.Constant(_I64, 4))) as (four, fewer):
        with four:
            variant(4)
        with fewer:
            with builder.if_else(builder.icmp_signed("==", nt, _ir.Constant(_I64, 2))) as (two, one):
                with two:
                    variant(2)
                with one:
                    variant(1)


def _tokens_intrinsic(emit):
    """(row uint8[:], xq int8[:, :], xd float32[:, :], bsf float32[:, :], p0, nt, nb, res float32[:]) -> None:
    res[j] = row . x[p0 + j] for j < nt, nt 4, 2 or 1 (rows of the 2-D activation arrays: one token each)."""
    def typer(typingctx, row, xq, xd, bsf, p0, nt, nb, res):
        def codegen(context, builder, sig, args):
            rp = builder.bitcast(context.make_array(sig.args[0])(context, builder, args[0]).data, _I8.as_pointer())
            op = context.make_array(sig.args[7])(context, builder, args[7]).data
            _emit_tokens(builder, emit, rp, _act_arrays(context, builder, sig, args, (1, 2, 3)), args[4], args[5],
                         args[6], lambda j, v: builder.store(v, builder.gep(op, [_ir.Constant(_I64, j)])))
            return context.get_dummy_value()
        return _nt.void(row, xq, xd, bsf, _nt.int64, _nt.int64, _nt.int64, res), codegen
    return typer


def _rows_tokens_intrinsic(emit):
    """(w uint8[:, :], r0, r1, xq, xd, bsf (2-D), p0, nt, nb, out float32[:, :], tokens int64[:],
    weights float32[:]) -> None: out[tokens[p0 + j], r] += weights[p0 + j] * (w[r] . x[p0 + j]) for
    r0 <= r < r1 and j < nt (4, 2 or 1): an expert's down rows against its tokens in one loop of IR (no
    per-row call: the experts' down rows are short, 2-8 blocks). fmul then fadd, as scalar code would."""
    def typer(typingctx, w, r0, r1, xq, xd, bsf, p0, nt, nb, out, tokens, weights):
        def codegen(context, builder, sig, args):
            wa = context.make_array(sig.args[0])(context, builder, args[0])
            base, wstride = builder.bitcast(wa.data, _I8.as_pointer()), builder.extract_value(wa.strides, 0)
            arrays = _act_arrays(context, builder, sig, args, (3, 4, 5))
            oa = context.make_array(sig.args[9])(context, builder, args[9])
            obase, ostride = builder.bitcast(oa.data, _I8.as_pointer()), builder.extract_value(oa.strides, 0)
            tp = context.make_array(sig.args[10])(context, builder, args[10]).data
            wp = context.make_array(sig.args[11])(context, builder, args[11]).data
            p0 = args[6]
            with _cg.for_range(builder, builder.sub(args[2], args[1])) as loop:
                r = builder.add(args[1], loop.index)

                def use(j, v):
                    p = builder.add(p0, _ir.Constant(_I64, j))
                    row_ptr = builder.gep(obase, [builder.mul(builder.load(builder.gep(tp, [p])), ostride)])
                    dst = builder.gep(builder.bitcast(row_ptr, _F32T.as_pointer()), [r])
                    wgt = builder.load(builder.gep(wp, [p]))
                    builder.store(builder.fadd(builder.load(dst), builder.fmul(wgt, v)), dst)

                _emit_tokens(builder, emit, builder.gep(base, [builder.mul(r, wstride)]), arrays, p0, args[7],
                             args[8], use)
            return context.get_dummy_value()
        return _nt.void(w, _nt.int64, _nt.int64, xq, xd, bsf, _nt.int64, _nt.int64, _nt.int64, out, tokens,
                        weights), codegen
    return typer


_rq4k = intrinsic(_row_intrinsic(_row_q4k_codegen(False)))
_rq5k = intrinsic(_row_intrinsic(_row_q4k_codegen(True)))
_rq6k = intrinsic(_row_intrinsic(_row_q6k_codegen))
_rq8_0 = intrinsic(_row_intrinsic(_row_q8_0_codegen))
_tq4k = intrinsic(_tokens_intrinsic(_row_q4k_codegen(False)))
_tq5k = intrinsic(_tokens_intrinsic(_row_q4k_codegen(True)))
_tq6k = intrinsic(_tokens_intrinsic(_row_q6k_codegen))
_tq8_0 = intrinsic(_tokens_intrinsic(_row_q8_0_codegen))
_rtq4k = intrinsic(_rows_tokens_intrinsic(_row_q4k_codegen(False)))
_rtq5k = intrinsic(_rows_tokens_intrinsic(_row_q4k_codegen(True)))
_rtq6k = intrinsic(_rows_tokens_intrinsic(_row_q6k_codegen))
_rtq8_0 = intrinsic(_rows_tokens_intrinsic(_row_q8_0_codegen))


def _row_f32_codegen(context, builder, sig, args):
    """row (uint8 bytes of K float32) . x (K float32), K % 64 == 0: 4 vector accumulators + prefetch."""
    row, x, n64 = args
    rp = builder.bitcast(context.make_array(sig.args[0])(context, builder, row).data, _I8.as_pointer())
    xp = builder.bitcast(context.make_array(sig.args[1])(context, builder, x).data, _I8.as_pointer())
    accs = [_cg.alloca_once_value(builder, _fzero(16)) for _ in range(4)]
    with _cg.for_range(builder, n64) as loop:
        off = builder.mul(loop.index, _ir.Constant(_I64, 256))
        p = builder.gep(rp, [off])
        q = builder.gep(xp, [off])
        _prefetch(builder, p, 256)
        for j in range(4):
            a = _load(builder, p, _F16V, 64 * j)
            b = _load(builder, q, _F16V, 64 * j)
            builder.store(_fma(builder, a, b, builder.load(accs[j])), accs[j])
    tot = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                       builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
    return _hsum(builder, tot)


@intrinsic
def _rf32(typingctx, row, x, n64):
    return _nt.float32(row, x, _nt.int64), _row_f32_codegen


@njit(cache=True, fastmath=True)
def quantize_q8k(x, xq, xd, bs16, bs32):
    """x (K,) float32, K % 256 == 0 -> xq (K,) int8, xd (K/256,) float32, bs16 (K/16,), bs32 (K/32,) int32."""
    for b in range(x.shape[0] // 256):
        xb = x[256 * b:256 * b + 256]
        amax = f32(0)
        for i in range(256):
            amax = max(amax, abs(xb[i]))
        if amax == f32(0):
            xd[b] = f32(0)
            xq[256 * b:256 * b + 256] = 0
        else:
            iscale = f32(127) / amax
            xd[b] = amax / f32(127)
            for i in range(256):
                xq[256 * b + i] = i8(min(max(np.rint(xb[i] * iscale), f32(-127)), f32(127)))
        for g in range(16):
            s = i32(0)
            for i in range(16):
                s += i32(xq[256 * b + 16 * g + i])
            bs16[16 * b + g] = s
        for g in range(8):
            bs32[8 * b + g] = bs16[16 * b + 2 * g] + bs16[16 * b + 2 * g + 1]


Q8_CODES = (_Q4_K, _Q5_K, _Q6_K, _Q8_0)


# per 256-block order of x for the Q4_K/Q5_K row kernels: a 64-byte load of nibbles covers values 0-31 and
# 64-95 (low nibbles), 32-63 and 96-127 (high nibbles), then the same for 128-255
Q4K_PERM = np.concatenate([np.arange(32), np.arange(64, 96), np.arange(32, 64), np.arange(96, 128)])
Q4K_PERM = np.concatenate([Q4K_PERM, Q4K_PERM + 128]).astype(np.int64)


@njit(inline="always")
def _quant_into(x, xq, xqp, xd, bs16, bs32, bf32, bf16, bf128):
    """Q8_K of x plus what the row kernels take: xqp = xq in Q4K_PERM order per block; float sums
    bf32 = bs32, bf16 = 32 * bs16, bf128 = 128 * bs32."""
    quantize_q8k(x, xq, xd, bs16, bs32)
    for b in range(xq.shape[0] // 256):
        for h in range(2):
            for l in range(32):
                o = 256 * b + 128 * h
                xqp[o + l] = xq[o + l]
                xqp[o + 32 + l] = xq[o + 64 + l]
                xqp[o + 64 + l] = xq[o + 32 + l]
                xqp[o + 96 + l] = xq[o + 96 + l]
    for g in range(bs32.shape[0]):
        bf32[g] = f32(bs32[g])
        bf128[g] = f32(128) * f32(bs32[g])
    for g in range(bs16.shape[0]):
        bf16[g] = f32(32) * f32(bs16[g])


@njit(inline="always")
def _vdot_row(code, row, xq, xqp, xd, bf32, bf16, bf128):
    nb = xq.shape[0] // 256
    if code == _Q4_K:
        return _rq4k(row, xqp, xd, bf32, nb)
    if code == _Q5_K:
        return _rq5k(row, xqp, xd, bf32, nb)
    if code == _Q6_K:
        return _rq6k(row, xq, xd, bf16, nb)
    return _rq8_0(row, xq, xd, bf128, 4 * nb)


@njit(inline="always")
def _group(n):
    """Tokens per pass over a weight row when n are left: 4, 2 or 1."""
    return 4 if n >= 4 else (2 if n >= 2 else 1)


@njit(inline="always")
def _vdot_tokens(code, row, xq, xqp, xd, bf32, bf16, bf128, p0, nt, res):
    """res[j] = row . x[p0 + j] for j < nt (4, 2 or 1), x as in _vdot_row but 2-D (one row per token)."""
    nb = xq.shape[1] // 256
    if code == _Q4_K:
        _tq4k(row, xqp, xd, bf32, p0, nt, nb, res)
    elif code == _Q5_K:
        _tq5k(row, xqp, xd, bf32, p0, nt, nb, res)
    elif code == _Q6_K:
        _tq6k(row, xq, xd, bf16, p0, nt, nb, res)
    else:
        _tq8_0(row, xq, xd, bf128, p0, nt, 4 * nb, res)


@njit(inline="always")
def _vdot_rows_tokens(code, w, r0, r1, xq, xqp, xd, bf32, bf16, bf128, p0, nt, out, tokens, weights):
    """out[tokens[p0 + j], r] += weights[p0 + j] * (w[r] . x[p0 + j]), rows r0..r1, j < nt (4, 2 or 1)."""
    nb = xq.shape[1] // 256
    if code == _Q4_K:
        _rtq4k(w, r0, r1, xqp, xd, bf32, p0, nt, nb, out, tokens, weights)
    elif code == _Q5_K:
        _rtq5k(w, r0, r1, xqp, xd, bf32, p0, nt, nb, out, tokens, weights)
    elif code == _Q6_K:
        _rtq6k(w, r0, r1, xq, xd, bf16, p0, nt, nb, out, tokens, weights)
    else:
        _rtq8_0(w, r0, r1, xq, xd, bf128, p0, nt, 4 * nb, out, tokens, weights)


@njit(inline="always")
def _swiglu_tokens(gcode, ucode, grow, urow, q, qp, d, b32, b16, b128, p, p1, h, f, gres, ures):
    """h[t, f] = silu(grow . x[t]) * (urow . x[t]) for tokens p <= t < p1 (rows of the 2-D activation arrays),
    up to 4 tokens per pass over the two rows."""
    while p < p1:
        nt = _group(p1 - p)
        _vdot_tokens(gcode, grow, q, qp, d, b32, b16, b128, p, nt, gres)
        _vdot_tokens(ucode, urow, q, qp, d, b32, b16, b128, p, nt, ures)
        for j in range(nt):
            h[p + j, f] = gres[j] / (f32(1) + np.exp(-gres[j])) * ures[j]
        p += nt


@njit(inline="always")
def _rows_tokens_all(code, w, r0, r1, q, qp, d, b32, b16, b128, p, p1, out, tokens, weights):
    """_vdot_rows_tokens for tokens p <= t < p1, in groups of 4, 2 or 1."""
    while p < p1:
        nt = _group(p1 - p)
        _vdot_rows_tokens(code, w, r0, r1, q, qp, d, b32, b16, b128, p, nt, out, tokens, weights)
        p += nt


@njit(inline="always")
def _q8_vector(x):
    """Q8_K of the vector x and the row kernels' sums (see _quant_into): (xq, xqp, xd, bf32, bf16, bf128)."""
    K = x.shape[0]
    xq = np.empty(K, np.int8)
    xqp = np.empty(K, np.int8)
    xd = np.empty(K // 256, np.float32)
    bs16 = np.empty(K // 16, np.int32)
    bs32 = np.empty(K // 32, np.int32)
    bf16 = np.empty(K // 16, np.float32)
    bf32 = np.empty(K // 32, np.float32)
    bf128 = np.empty(K // 32, np.float32)
    _quant_into(x, xq, xqp, xd, bs16, bs32, bf32, bf16, bf128)
    return xq, xqp, xd, bf32, bf16, bf128


@njit(cache=True, parallel=True, fastmath=True)
def matvec_q8(code, w, x, out, nchunks):
    """out[n] = w[n] . x with x quantized to Q8_K first; code in Q8_CODES, K % 256 == 0, HAVE_VNNI."""
    xq, xqp, xd, bf32, bf16, bf128 = _q8_vector(x)
    nc, step = _chunks(w.shape[0], nchunks)
    for c in prange(nc):
        for n in range(c * step, min(w.shape[0], (c + 1) * step)):
            out[n] = _vdot_row(code, w[n], xq, xqp, xd, bf32, bf16, bf128)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_q8_many(codes, ws, x, outs, nchunks):
    """outs[m][n] = ws[m][n] . x for each matrix m of the tuple ws (codes[m] in Q8_CODES, all with K columns):
    one Q8_K quantization of x and one parallel pass over the rows of all of them, so several projections
    of one input stream like one larger matrix (each row's dot product is the same as matvec_q8's)."""
    xq, xqp, xd, bf32, bf16, bf128 = _q8_vector(x)
    M = len(ws)
    starts = np.zeros(M + 1, np.int64)
    for m in range(M):
        starts[m + 1] = starts[m] + ws[m].shape[0]
    nc, step = _chunks(starts[M], nchunks)
    for c in prange(nc):
        n0, n1 = c * step, min(starts[M], (c + 1) * step)
        for m in range(M):
            w, out, code, s0 = ws[m], outs[m], codes[m], starts[m]
            for n in range(max(n0, s0), min(n1, starts[m + 1])):
                out[n - s0] = _vdot_row(code, w[n - s0], xq, xqp, xd, bf32, bf16, bf128)


@njit(cache=True, parallel=True, fastmath=True)
def quantize_rows_q8(x, xq, xqp, xd, bf16, bf32, bf128):
    """Q8_K of every row of x (T, K) plus the row kernels' sums (see _quant_into), parallel over rows."""
    T, K = x.shape
    for t in prange(T):
        bs16 = np.empty(K // 16, np.int32)
        bs32 = np.empty(K // 32, np.int32)
        _quant_into(x[t], xq[t], xqp[t], xd[t], bs16, bs32, bf32[t], bf16[t], bf128[t])


@njit(inline="always")
def _q8_buffers(T, K):
    return (np.empty((T, K), np.int8), np.empty((T, K), np.int8), np.empty((T, K // 256), np.float32),
            np.empty((T, K // 16), np.float32), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.float32))


Q8_TOKEN_BLOCK_BYTES = 256 << 10  # matmul_q8's token blocks: this many bytes of 8-bit activations


@njit(cache=True, parallel=True, fastmath=True)
def matmul_q8(code, w, x, out, nchunks):
    """out[t, n] = w[n] . x[t] for T tokens with 8-bit activations (x quantized to Q8_K once per token):
    each weight row is unpacked once per group of 4 tokens (_vdot_tokens). w (N, row_bytes), x (T, K)."""
    T, K = x.shape
    N = w.shape[0]
    xq, xqp, xd, xf16, xf32, xf128 = _q8_buffers(T, K)
    quantize_rows_q8(x, xq, xqp, xd, xf16, xf32, xf128)
    # tokens in blocks whose activations stay in L2 next to the rows (a thread's rows are read once per block)
    tb = max(4, Q8_TOKEN_BLOCK_BYTES // K // 4 * 4)
    nc, step = _chunks(N, nchunks)
    for c in prange(nc):
        res = np.empty(4, np.float32)
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            for n in range(c * step, min(N, (c + 1) * step)):
                t = t0
                while t < t1:
                    nt = _group(t1 - t)
                    _vdot_tokens(code, w[n], xq, xqp, xd, xf32, xf16, xf128, t, nt, res)
                    for j in range(nt):
                        out[t + j, n] = res[j]
                    t += nt


@njit(cache=True, parallel=True, fastmath=_NO_REASSOC)
def moe_q8(gcode, ucode, dcode, gate, up, up_off, down, F, experts, starts, tokens, weights, x, scodes, sgate, sup,
           sdown, sweights, out, nchunks):
    """Routed SwiGLU experts of one step with 8-bit activations, plus optionally a shared expert, accumulated
    into out (T, D); routed arguments as moe_experts. Shared expert: rows sgate, sup (Fs, row bytes), sdown
    (D, row bytes), types scodes (gate, up, down), applied to every token t with weight sweights[t]; pass
    sweights of length 0 for none.
    Each token's x is quantized to Q8_K once. Gate/up: a job (expert, ff row) dots that expert's gate and up
    rows with each of its tokens, up to 4 tokens per pass over the row (_vdot_tokens: each block unpacked
    once); each (token, expert) h is quantized once. Down: up to 4 tokens per pass over a row, adding into
    out per element the routed pairs in the order given, then the shared expert (for few pairs through one
    row of partial sums per pair: moe_q8_parts, add_parts).
    The block dots are intrinsics whose float ops carry no fast-math flags, and this kernel does not
    reassociate (_NO_REASSOC): calling it per batch of resident experts (the shared expert with the last)
    equals one call (streaming never changes results), and the shared expert adds exactly as a separate
    call followed by out + sweights * that result would."""
    n_e = experts.shape[0]
    T, D = x.shape
    n_pairs = tokens.shape[0]
    Fs = sgate.shape[0] if sweights.shape[0] > 0 else 0
    if n_pairs <= MOE_FLAT_MAX_PAIRS:
        part = np.zeros((n_pairs + (T if Fs > 0 else 0), D), np.float32)
        moe_q8_parts(gcode, ucode, dcode, gate, up, up_off, down, F, experts, starts, tokens, weights,
                     np.arange(n_pairs), x, scodes, sgate, sup, sdown, sweights, part, nchunks)
        add_parts(out, part, tokens, nchunks)
        return
    hq, hqp, hd, hf16, hf32, hf128, sq, sqp, sd, sf16, sf32, sf128 = _moe_hidden(
        gcode, ucode, gate, up, up_off, F, experts, starts, tokens, x, scodes, sgate, sup, Fs, nchunks)
    # many pairs (prompts): a parallel pass over chunks of output rows, each reading every expert's rows of
    # the chunk and adding straight into out (a per-pair buffer would be n_pairs x D floats)
    own = np.arange(T)
    nc, step = _chunks(D, nchunks)
    for c in prange(nc):
        r0, r1 = c * step, min(D, (c + 1) * step)
        for i in range(n_e):  # all rows of the chunk in one loop of IR per group of tokens
            _rows_tokens_all(dcode, down[experts[i]], r0, r1, hq, hqp, hd, hf32, hf16, hf128, starts[i],
                             starts[i + 1], out, tokens, weights)
        if Fs > 0:
            _rows_tokens_all(scodes[2], sdown, r0, r1, sq, sqp, sd, sf32, sf16, sf128, 0, T, out, own, sweights)


@njit(cache=True, fastmath=_NO_REASSOC)  # its two passes are parallel kernels
def moe_q8_parts(gcode, ucode, dcode, gate, up, up_off, down, F, experts, starts, tokens, weights, rows, x, scodes,
                 sgate, sup, sdown, sweights, part, nchunks):
    """moe_q8 for few pairs, some of a step's experts at a time, in any order: instead of adding into out,
    pair p of this call (arguments as moe_q8's) writes weights[p] * (its expert's output) to part[rows[p]],
    and the shared expert (if given) token t's to part[part.shape[0] - T + t]; add_parts then sums a step's
    rows in its pair order. So the experts already resident can run while the others are read from disk,
    and every order and grouping of calls gives the same bits as one moe_q8 call."""
    Fs = sgate.shape[0] if sweights.shape[0] > 0 else 0
    hq, hqp, hd, hf16, hf32, hf128, sq, sqp, sd, sf16, sf32, sf128 = _moe_hidden(
        gcode, ucode, gate, up, up_off, F, experts, starts, tokens, x, scodes, sgate, sup, Fs, nchunks)
    _down_parts(dcode, down, experts, starts, weights, rows, hq, hqp, hd, hf16, hf32, hf128, scodes, sdown,
                sweights, Fs, sq, sqp, sd, sf16, sf32, sf128, part, nchunks)


@njit(cache=True, parallel=True, fastmath=_NO_REASSOC)
def _moe_hidden(gcode, ucode, gate, up, up_off, F, experts, starts, tokens, x, scodes, sgate, sup, Fs, nchunks):
    """moe_q8's gate/up pass: h[p] = silu(gate . x[tokens[p]]) * (up . x[tokens[p]]) per pair p (and hs[t]
    for the shared expert's Fs rows), each quantized to Q8_K for the down pass: (hq, hqp, hd, hf16, hf32,
    hf128) per pair, then the same per token for the shared expert."""
    n_e = experts.shape[0]
    T, D = x.shape
    n_pairs = tokens.shape[0]
    xq, xqp, xd, xf16, xf32, xf128 = _q8_buffers(T, D)
    quantize_rows_q8(x, xq, xqp, xd, xf16, xf32, xf128)
    # activations in pair order, so that an expert's tokens are consecutive rows (for _vdot_tokens)
    pq, pqp, pd, pf16, pf32, pf128 = xq[tokens], xqp[tokens], xd[tokens], xf16[tokens], xf32[tokens], xf128[tokens]
    h = np.empty((n_pairs, F), np.float32)
    hs = np.empty((T, Fs), np.float32)
    n_jobs = n_e * F + Fs  # the shared expert's rows after the routed ones
    nc, step = _chunks(n_jobs, nchunks)
    for c in prange(nc):
        gres = np.empty(4, np.float32)
        ures = np.empty(4, np.float32)
        for job in range(c * step, min(n_jobs, (c + 1) * step)):
            if job < n_e * F:
                i, f = job // F, job % F
                e = experts[i]
                _swiglu_tokens(gcode, ucode, gate[e, f], up[e, up_off + f], pq, pqp, pd, pf32, pf16, pf128,
                               starts[i], starts[i + 1], h, f, gres, ures)
            else:
                f = job - n_e * F
                _swiglu_tokens(scodes[0], scodes[1], sgate[f], sup[f], xq, xqp, xd, xf32, xf16, xf128, 0, T, hs, f,
                               gres, ures)
    hq, hqp, hd, hf16, hf32, hf128 = _q8_buffers(n_pairs, F)
    quantize_rows_q8(h, hq, hqp, hd, hf16, hf32, hf128)
    sq, sqp, sd, sf16, sf32, sf128 = _q8_buffers(T, Fs)
    if Fs > 0:
        quantize_rows_q8(hs, sq, sqp, sd, sf16, sf32, sf128)
    return hq, hqp, hd, hf16, hf32, hf128, sq, sqp, sd, sf16, sf32, sf128


# moe_q8 with at most this many (token, expert) pairs (decode, short prompts) cuts the down pass over the
# (expert, row) space (_down_parts); more pairs: over output rows. Both add in the same order.
MOE_FLAT_MAX_PAIRS = 256


@njit(cache=True, parallel=True, fastmath=_NO_REASSOC)
def _down_parts(dcode, down, experts, starts, weights, rows, hq, hqp, hd, hf16, hf32, hf128, scodes, sdown,
                sweights, Fs, sq, sqp, sd, sf16, sf32, sf128, part, nchunks):
    """The down pass for few pairs: part[rows[p]] = weights[p] * (down . h[p]) per pair (and the shared
    expert's sweights[t] * (sdown . hs[t]) in the last T rows of part), with the (expert, output row) space
    cut into equal contiguous runs, so each thread streams whole experts' down rows (long sequential reads;
    cutting the rows instead gives every expert a short run per chunk; benchmarks/bench_kernels.py --moe).
    part starts at zero, so each of its elements is exactly the product."""
    n_e = experts.shape[0]
    D = part.shape[1]
    T = sweights.shape[0]
    own = np.arange(part.shape[0] - T, part.shape[0])
    n_runs = n_e + (1 if Fs > 0 else 0)
    total = n_runs * D
    nc, step = _chunks(total, nchunks)
    for c in prange(nc):
        j0, j1 = c * step, min(total, (c + 1) * step)
        i = j0 // D
        while i < n_runs and i * D < j1:
            r0, r1 = max(j0, i * D) - i * D, min(j1, (i + 1) * D) - i * D
            if i < n_e:
                _rows_tokens_all(dcode, down[experts[i]], r0, r1, hq, hqp, hd, hf32, hf16, hf128, starts[i],
                                 starts[i + 1], part, rows, weights)
            else:
                _rows_tokens_all(scodes[2], sdown, r0, r1, sq, sqp, sd, sf32, sf16, sf128, 0, T, part, own, sweights)
            i += 1


@njit(cache=True, parallel=True, fastmath=_NO_REASSOC)
def add_parts(out, part, tokens, nchunks):
    """out[tokens[p]] += part[p] for the pairs p in order, then out[t] += part[n_pairs + t] for the shared
    expert's rows if part has them: moe_q8's sums, in its order, whatever order the parts were made in."""
    n_pairs = tokens.shape[0]
    D = out.shape[1]
    nc, step = _chunks(D, nchunks)
    for c in prange(nc):
        r0, r1 = c * step, min(D, (c + 1) * step)
        for p in range(part.shape[0]):
            o, q = out[tokens[p] if p < n_pairs else p - n_pairs], part[p]
            for r in range(r0, r1):
                o[r] += q[r]


# moe_q8's shared-expert arguments for none (weights read-only, as the model's are: one compiled signature)
NO_SHARED = (np.zeros(3, np.int64), *(readonly(np.zeros((0, 1), np.uint8)) for _ in range(3)), np.zeros(0, np.float32))


__all__ = ["KERNELS", "Kernel", "kernel_for", "F16_LUT", "matvec", "matmul_rows", "dequant_rows", "moe_experts", "HAVE_VNNI", "Q8_CODES", "quantize_q8k", "matvec_q8", "matvec_q8_many",
           "moe_q8", "moe_q8_parts", "add_parts", "NO_SHARED", "quantize_rows_q8", "matmul_q8"]
