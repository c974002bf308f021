"""Numba kernels over raw GGML blocks: row dequantization, matrix-vector and small matrix-matrix products.

Weights stay as the file stores them (uint8 rows of blocks, (N, row_bytes)); a kernel decodes each block
where it is used and never keeps a dequantized copy. Activations stay float32: on this code generator an
8-bit activation path (Q8_K-style, as llama.cpp) measured no faster than the float one (Numba widens
integer arithmetic to 64 bits and LLVM then cannot form vpdpbusd), so the float path is both exact and
as fast; see benchmarks/bench_kernels.py.

Dispatch: `KERNELS` maps each GGMLQuantizationType to its block geometry and a kernel code. Inside the
compiled drivers the code selects the per-type block routine; Numba cannot cache a driver specialised on
a function argument or a closure, so one cached driver per operation with a static switch is what keeps
compile time and the cache small (4 drivers, each compiled once, instead of 4 x 10).

Per type, block layouts follow ggml-quants.c (dequantize_row_*):
  Q4_0  18 B / 32:  d f16 | 16 B nibbles (low = first 16, high = last 16), w = d * (q - 8)
  Q8_0  34 B / 32:  d f16 | 32 int8, w = d * q
  Q4_K 144 B / 256: d, dmin f16 | 12 B 6-bit scales/mins | 128 B nibbles; w = d*sc*q - dmin*m
  Q5_K 176 B / 256: as Q4_K plus 32 B of fifth bits (qh) before the nibbles
  Q6_K 210 B / 256: 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales | d f16; w = d*sc*(q - 32)
  IQ4_XS 136 B / 256: d f16 | scales_h u16 | scales_l 4 B | 128 B nibbles indexing IQ4_NL values
  MXFP4 17 B / 32:  e8m0 exponent | 16 B nibbles indexing doubled e2m1 values; w = 2^(e-128) * kv
  F16, BF16, F32: one element per "block".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np
from numba import njit, prange

Q = gguf.GGMLQuantizationType
u8, i8, i32, f32 = np.uint8, np.int8, np.int32, np.float32
M4, S4 = np.uint8(15), np.uint8(4)
M3, S2, S6 = np.uint8(3), np.uint8(2), np.uint8(6)

# f16 bit pattern -> float32 (256 KiB, passed to every kernel that reads an f16 field)
F16_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)

# kernel codes (internal to the compiled drivers; Python code dispatches through KERNELS)
_F32, _F16, _BF16, _Q4_0, _Q8_0, _Q4_K, _Q5_K, _Q6_K, _IQ4_XS, _MXFP4 = range(10)


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
}


def kernel_for(ggml_type) -> Kernel:
    k = KERNELS.get(Q(ggml_type))
    if k is None:
        raise NotImplementedError(f"no Numba kernel for GGML type {Q(ggml_type).name}; supported: "
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
    elif code == _Q4_0:
        for b in range(K // 32):
            o = b * 18
            d = _h(row, o, f16)
            for l in range(16):
                q = row[o + 2 + l]
                out[32 * b + l] = d * f32(i32(u8(q & M4)) - 8)
                out[32 * b + 16 + l] = d * f32(i32(u8(q >> S4)) - 8)
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
            sj, mj = _scale_min_k4(sc, j)
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
    xs = x.reshape(-1, 16).sum(axis=1) if K % 16 == 0 else np.zeros(1, np.float32)
    nc, step = _chunks(w.shape[0], nchunks)
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


@njit(cache=True, parallel=True, fastmath=True)
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
                    g = _dot(gbuf, x[tokens[p]], D)
                    u = _dot(ubuf, x[tokens[p]], D)
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
                        out[tokens[p], drow] += weights[p] * _dot(buf, h[p], F)


__all__ = ["KERNELS", "Kernel", "kernel_for", "F16_LUT", "matvec", "matmul_rows", "dequant_rows", "moe_experts"]
