"""The Numba CPU backend: threaded kernels over raw GGUF blocks.

Weights are never dequantized into a kept copy: matrix-vector products (decode) decode each block inside
the dot product (localcoder.quant.kernels); small matrix-matrix products decode each row once for all
tokens; long prompts decode a tile of rows into a scratch buffer and hand it to BLAS (the tile is
discarded). The routed experts of a step run in one kernel (gate, up, SiLU*mul, down). DeltaNet, the
causal conv and attention over the KV cache are Numba kernels here; the trivial ops are the NumPy
reference's (they are tiny and already vectorised).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ..gguf_file import QTensor, readonly
from ..quant import kernels as K
from ..threads import sigint_blocked
from . import numpy_ref
from .numpy_ref import NumpyBackend

f32 = np.float32
BLAS_MIN_TOKENS = 16  # from this many tokens a matmul dequantizes row tiles and uses BLAS
# Prompts shorter than this go through the 8-bit activation kernel (4 tokens per pass over a weight row, in
# token blocks that keep the activations in L2), longer ones through dequantized tiles and BLAS.
# `python benchmarks/bench_kernels.py --threads 2 --crossover`, 8192x2048 Q5_K, 8-bit vs BLAS ms: on the Zen 5 VM,
# 24.3 vs 48.1 at 256 tokens, 45.0 vs 79.0 at 512 (OpenBLAS's Haswell kernels, as this VM's environment
# forces; its own choice, SkylakeX: 22.3 vs 32.1 and 57.9 vs 52.1 before the token blocks); on the Xeon VM
# (before the token blocks) 38-41 vs 42-51 at 256 and 73-80 vs 66-69 at 512. A prompt chunk (generate's 512
# tokens) takes the 8-bit kernel.
Q8_MATMUL_MAX_TOKENS = 1024
TILE_BYTES = 64 << 20  # float32 scratch per BLAS tile (few, large tiles: OpenBLAS threads spin between calls
# and fight the Numba threads when the two alternate quickly)


@njit(cache=True)
def group_pairs(expert_ids, expert_weights):
    """The (token, expert) pairs of a step grouped by expert: expert_ids (T, k) int64, expert_weights (T, k)
    float32 -> (uniq, starts, tokens, weights): the distinct experts ascending, and the pairs in a stable
    sort by expert, expert uniq[i]'s being starts[i]:starts[i + 1], with their tokens and weights."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    wflat = expert_weights.reshape(-1)
    order = np.argsort(flat, kind="mergesort")
    n = flat.shape[0]
    uniq = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.int64)
    tokens = np.empty(n, np.int64)
    weights = np.empty(n, np.float32)
    m = 0
    for i in range(n):
        p = order[i]
        if m == 0 or flat[p] != uniq[m - 1]:
            uniq[m] = flat[p]
            starts[m] = i
            m += 1
        tokens[i] = p // k
        weights[i] = wflat[p]
    starts[m] = n
    return uniq[:m].copy(), starts[:m + 1].copy(), tokens, weights


@njit(cache=True)
def pair_rows(starts, pos):
    """The pairs of the experts at positions pos of a step's unique experts (group_pairs' starts): their
    own starts (len(pos) + 1) and the step's pair index of each, expert by expert."""
    lstarts = np.zeros(len(pos) + 1, np.int64)
    for i in range(len(pos)):
        lstarts[i + 1] = lstarts[i] + starts[pos[i] + 1] - starts[pos[i]]
    rows = np.empty(lstarts[-1], np.int64)
    for i in range(len(pos)):
        for j in range(starts[pos[i] + 1] - starts[pos[i]]):
            rows[lstarts[i] + j] = starts[pos[i]] + j
    return lstarts, rows


@njit(cache=True)
def topk_softmax_rows(logits, k, ids, weights):
    """NumpyBackend.topk_softmax per row of logits (T, E) float32 into ids (T, k) int64 and weights (T, k):
    probabilities exp(l - max) / sum, the k largest kept in descending order by insertion (a later equal one
    never passes an earlier one: ties keep the lower index, as a stable sort does), then renormalised."""
    T, E = logits.shape
    p = np.empty(E, np.float32)
    for t in range(T):
        row = logits[t]
        m = row.max()
        s = f32(0)
        for i in range(E):
            p[i] = np.exp(row[i] - m)
            s += p[i]
        n = 0
        for i in range(E):
            v = p[i] / s
            p[i] = v
            if n == k and v <= p[ids[t, k - 1]]:
                continue
            j = min(n, k - 1)  # insert v at its place among the kept ones, dropping the smallest when full
            while j > 0 and p[ids[t, j - 1]] < v:
                ids[t, j] = ids[t, j - 1]
                j -= 1
            ids[t, j] = i
            n = min(n + 1, k)
        tot = f32(0)
        for j in range(k):
            weights[t, j] = p[ids[t, j]]
            tot += weights[t, j]
        for j in range(k):
            weights[t, j] /= tot


# ---------------------------------------------------------------------------------------------------------
# DeltaNet

@njit(cache=True, fastmath=True)
def _delta_dots(S, kt, qt, kv, sq):
    """kv = S^T k, sq = S^T q for one head's state S (Dk, Dv), along its rows (one read of S). The state comes
    from memory (a token's weights evict it between steps), so the rows are prefetched a few ahead:
    `benchmarks/profile_ops.py` alternated with the commit before, gated_delta 1.46-1.61 -> 1.32-1.38 ms per
    token over 6 layers."""
    Dk, Dv = S.shape
    for j in range(Dv):
        kv[j] = 0
        sq[j] = 0
    row = Dv * 4  # bytes; prefetch 4 rows ahead, on into the next head's state (heads are consecutive)
    for i in range(Dk):
        for line in range((i + 4) * row, (i + 5) * row, 64):
            K.prefetch(S, line)
        ki, qi = kt[i], qt[i]
        for j in range(Dv):
            kv[j] += S[i, j] * ki
            sq[j] += S[i, j] * qi


@njit(cache=True, fastmath=True)
def _delta_update(S, N, kt, delta, decay):
    """N = decay S + k (x) delta for one head (N may be S)."""
    Dk, Dv = S.shape
    for i in range(Dk):
        ki = kt[i]
        for j in range(Dv):
            N[i, j] = decay * S[i, j] + ki * delta[j]


@njit(cache=True, parallel=True, fastmath=True)
def gated_delta_step(q, k, v, g, beta, state, new_state, out):
    """gated_delta_recurrent for a token or two (decode): per head and token one pass computing S^T k and
    S^T q along rows of S and one update pass, no transposition (the state streams from memory once). The
    two passes are separate functions, which LLVM vectorises better than the same loops written inline here
    (`benchmarks/bench_kernels.py --threads 2 --delta`, in place, alternated: 0.15 -> 0.12 ms per layer)."""
    T, H, Dk = q.shape
    Dv = v.shape[2]
    for h in prange(H):
        S = state[h]
        kv = np.empty(Dv, np.float32)
        sq = np.empty(Dv, np.float32)
        for t in range(T):
            decay = np.exp(g[t, h])
            kt, qt = k[t, h], q[t, h]
            kq = f32(0)
            for i in range(Dk):
                kq += kt[i] * qt[i]
            _delta_dots(S, kt, qt, kv, sq)
            bt = beta[t, h]
            for j in range(Dv):
                kv[j] = (v[t, h, j] - decay * kv[j]) * bt  # delta
                out[t, h, j] = decay * sq[j] + kv[j] * kq
            _delta_update(S, new_state[h], kt, kv, decay)
            S = new_state[h]  # later tokens update new_state in place


DELTA_TILE = 16  # value columns per job of the recurrent gated delta (one 64-byte line of each state row)
# from this many tokens the tiled kernel (transposition amortised); fewer: gated_delta_step. Measured, 2
# threads, 32 heads, step vs tiled: 1 token 0.08 vs 0.29 ms, 16 tokens 2.2 vs 0.9 ms, 128 tokens 18 vs 5 ms.
DELTA_TILED_MIN_TOKENS = 4


@njit(cache=True, parallel=True, fastmath=True)
def gated_delta_recurrent(q, k, v, g, beta, state, new_state, out):
    """Token by token from state to new_state (Hv, Dk, Dv), which may be state itself (in place).
    q, k (T, Hv, Dk); v, out (T, Hv, Dv); g, beta (T, Hv).
    Per head: S <- S*exp(g); S <- S + k (x) beta (v - S^T k); o = S^T q, i.e. o = exp(g) S^T q + delta (k.q)
    with delta = beta (v - exp(g) S^T k). Value column j of S only ever meets v[j]: a job is a (head, 16
    value columns) tile of S (Dk x 16, 8 KiB, stays in L1) carried through every token, so the state is
    read and written once per call; each column's dots and update run along its Dk values."""
    T, H, Dk = q.shape
    Dv = v.shape[2]
    W = DELTA_TILE
    n_tiles = (Dv + W - 1) // W
    kq = np.empty((T, H), np.float32)
    for t in range(T):
        for h in range(H):
            s = f32(0)
            for i in range(Dk):
                s += k[t, h, i] * q[t, h, i]
            kq[t, h] = s
    n_jobs = H * n_tiles
    nc = min(n_jobs, 64)
    for c in prange(nc):
        cols = np.empty((W, Dk), np.float32)  # the tile transposed: column j of S as a contiguous row
        for job in range(c * n_jobs // nc, (c + 1) * n_jobs // nc):
            h, j0 = job // n_tiles, (job % n_tiles) * W
            w = min(W, Dv - j0)
            for i in range(Dk):
                for jj in range(w):
                    cols[jj, i] = state[h, i, j0 + jj]
            for t in range(T):
                decay, bt, kqt = np.exp(g[t, h]), beta[t, h], kq[t, h]
                kt, qt = k[t, h], q[t, h]
                for jj in range(w):
                    col = cols[jj]
                    sk = f32(0)
                    sqq = f32(0)
                    for i in range(Dk):
                        sk += col[i] * kt[i]
                        sqq += col[i] * qt[i]
                    delta = (v[t, h, j0 + jj] - decay * sk) * bt
                    out[t, h, j0 + jj] = decay * sqq + delta * kqt
                    for i in range(Dk):
                        col[i] = decay * col[i] + kt[i] * delta
            for i in range(Dk):
                for jj in range(w):
                    new_state[h, i, j0 + jj] = cols[jj, i]


@njit(cache=True, parallel=True, fastmath=True)
def _solve_unit_lower(a, b):
    """x with a x = b, a (H, N, C, C) unit lower triangular (the diagonal is not read), b (H, N, C, D)."""
    H, N, C, D = b.shape
    x = np.empty_like(b)
    for hn in prange(H * N):
        h, n = hn // N, hn % N
        for i in range(C):
            row = b[h, n, i].copy()
            for j in range(i):
                aij = a[h, n, i, j]
                for d in range(D):
                    row[d] -= aij * x[h, n, j, d]
            x[h, n, i] = row
    return x


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = numpy_ref.CHUNK):
    """numpy_ref.gated_delta_chunked (batched BLAS matmuls) with the Numba triangular solve."""
    return numpy_ref.gated_delta_chunked(q, k, v, g, beta, state, chunk, solve=_solve_unit_lower)


# ---------------------------------------------------------------------------------------------------------
# norms (decode calls them ~40 times per token on rows of 128-2048: NumPy's per-call cost dominates there)

@njit(cache=True, fastmath=True)
def rms_norm_rows(x, w, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows of x (R, D); w (D,), or (0,) for no weight
    (then eps is added to the plain sum of squares: the L2 norm)."""
    R, D = x.shape
    scaled = w.shape[0] > 0
    for r in range(R):
        s = f32(0)
        for i in range(D):
            s += x[r, i] * x[r, i]
        inv = f32(1) / np.sqrt((s / f32(D) if scaled else s) + eps)
        if scaled:
            for i in range(D):
                out[r, i] = x[r, i] * inv * w[i]
        else:
            for i in range(D):
                out[r, i] = x[r, i] * inv


# ---------------------------------------------------------------------------------------------------------
# causal conv, attention

@intrinsic
def _float_bits(typingctx, i):
    """The float32 whose bits are the int32 i."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=True)
def expf(x):
    """exp(x) in float32 from arithmetic alone, so that LLVM vectorises loops calling it (np.exp in a Numba
    kernel is libm's scalar expf: silu_rows on 512x4096, 2 threads, 7.9 ms with it, 0.19 with this).
    Cephes' expf: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 polynomial, 2^n written into the
    exponent bits; x clamped to [-87, 88] (exp(-87) is still a normal float). Within 2 float32 ulps of exp
    (tested)."""
    x = min(max(x, f32(-87.0)), f32(88.0))
    n = np.floor(x * f32(1.4426950408889634) + f32(0.5))
    r = x - n * f32(0.693359375) + n * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    return (p * r * r + r + f32(1)) * _float_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(cache=True, fastmath=True)
def expf_rows(x, out):
    """out = exp(x) through expf (its test's entry point)."""
    for i in range(x.shape[0]):
        out[i] = expf(x[i])


@njit(inline="always", fastmath=True)
def _silu(a):
    return a / (f32(1) + expf(-a))


@njit(cache=True, parallel=True, fastmath=True)
def silu_rows(x, out):
    """out = x * sigmoid(x) for a 2-D float32 x, parallel over rows (a prompt's output gates)."""
    for t in prange(x.shape[0]):
        for c in range(x.shape[1]):
            out[t, c] = _silu(x[t, c])


SILU_KERNEL_MIN = 1 << 16  # elements from which silu runs as silu_rows (smaller: NumPy's, a few microseconds)


@njit(cache=True, parallel=True, fastmath=True)
def conv1d_silu(x, w, conv_state, out):
    """out[t, c] = silu(sum_j full[t + j, c] w[c, j]) with full = [conv_state; x]. x (T, C), w (C, Kc),
    conv_state (Kc-1, C). Parallel over tokens, each row of out summed along whole rows of x: loops over
    range(C) from 0, which LLVM vectorises (parallel over channel ranges instead, with loops from each range's
    start, they stayed scalar: 512 x 8192, 2 threads, 10-12 ms against 1.5)."""
    T, C = x.shape
    Kc = w.shape[1]
    wt = np.ascontiguousarray(w.T)  # (Kc, C)
    for t in prange(T):
        o = out[t]
        for c in range(C):
            o[c] = 0
        for j in range(Kc):
            s = t + j - (Kc - 1)
            src = conv_state[Kc - 1 + s] if s < 0 else x[s]
            wj = wt[j]
            for c in range(C):
                o[c] += src[c] * wj[c]
        for c in range(C):
            o[c] = _silu(o[c])


@njit(cache=True, fastmath=True)
def conv1d_step(x, wt, conv_state, out, new_state):
    """The conv of conv1d_silu for one token (decode), without the SiLU (NumPy's vectorised exp is faster
    on one row), serial, along contiguous channels of the transposed weight wt (Kc, C); also writes the
    shifted state, new_state = [conv_state[1:]; x]."""
    Kc, C = wt.shape
    for c in range(C):
        out[0, c] = 0
    for j in range(Kc - 1):
        for c in range(C):
            out[0, c] += conv_state[j, c] * wt[j, c]
    for c in range(C):
        out[0, c] += x[0, c] * wt[Kc - 1, c]
    for j in range(Kc - 2):
        for c in range(C):
            new_state[j, c] = conv_state[j + 1, c]
    for c in range(C):
        new_state[Kc - 2, c] = x[0, c]


def _load(a, i):
    """a[i] as float32; a float16 cache arrives as its uint16 bit patterns (Numba has no float16 arrays)."""


@intrinsic
def _half_to_float(typingctx, bits):
    """The float16 with these bits, as float32 (exact; LLVM vectorises it to vcvtph2ps where the CPU has F16C)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@overload(_load, inline="always")
def _load_impl(a, i):
    # a float16 cache through the conversion instruction, not a table (a gather per element):
    # `python benchmarks/bench_kernels.py --threads 2 --attention`, one layer over 32K positions, decode 39-44 ->
    # 7.2-9.9 ms, the last 64 tokens of a prompt 2589-2684 -> 495-559 ms (float32 cache: 10-15 and 674-868 ms)
    if a.dtype == types.uint16:
        return lambda a, i: _half_to_float(a[i])
    return lambda a, i: f32(a[i])


ATT_TILE = 32  # keys per tile: a tile's keys and values stay in L1/L2 while a block of tokens reads them
ATT_TOKEN_BLOCK = 8  # tokens that share each tile read from memory
ATT_MIN_SPLIT_KEYS = 256  # keys per task at least, when the keys of a step split across threads
ATT_PREFETCH_KEYS = 16  # software prefetch this many keys ahead of the rows being read (hardware prefetch
# sees a kv head's rows as 1 KB runs 2 KB apart): one layer over 32K keys, decode, 5.2 -> 2.9 ms (float16)


@njit(inline="always")
def _prefetch_rows(cache, s, n, hk):
    """Prefetch the rows of kv head hk at positions s..s+n-1 of a (S, Hkv, D) cache (hints: past the end is
    harmless)."""
    row = cache.shape[2] * cache.itemsize
    for i in range(n):
        start = ((s + i) * cache.shape[1] + hk) * row
        for c in range(0, row, 64):
            K.prefetch(cache, start + c)


@njit(inline="always", fastmath=True)
def _tile_scores(q, t, hk, G, kc, s0, s1, scale, sc):
    """sc[gi, s - s0] = scale * (q[t, hk*G + gi] . k[s, hk]) for s0 <= s < s1: four query heads and two keys
    per pass over D (eight independent sums). Heads past G repeat the last one and an odd count repeats the
    last key: sc has scratch rows up to a multiple of 4 and a scratch column."""
    D = q.shape[2]
    last = hk * G + G - 1
    for g0 in range(0, G, 4):
        h = hk * G + g0
        q0, q1, q2, q3 = q[t, h], q[t, min(h + 1, last)], q[t, min(h + 2, last)], q[t, min(h + 3, last)]
        for s in range(s0, s1, 2):
            if g0 == 0:
                _prefetch_rows(kc, s + ATT_PREFETCH_KEYS, 2, hk)
            k0, k1 = kc[s, hk], kc[min(s + 1, s1 - 1), hk]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = f32(0)
            for d in range(D):
                x, y = _load(k0, d), _load(k1, d)
                a0 += q0[d] * x
                a1 += q1[d] * x
                a2 += q2[d] * x
                a3 += q3[d] * x
                b0 += q0[d] * y
                b1 += q1[d] * y
                b2 += q2[d] * y
                b3 += q3[d] * y
            j = s - s0
            sc[g0, j], sc[g0 + 1, j], sc[g0 + 2, j], sc[g0 + 3, j] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
            sc[g0, j + 1], sc[g0 + 1, j + 1], sc[g0 + 2, j + 1], sc[g0 + 3, j + 1] = (b0 * scale, b1 * scale,
                                                                                      b2 * scale, b3 * scale)


@njit(inline="always", fastmath=True)
def _tile_values(vc, hk, G, s0, s1, p, acc):
    """acc[gi] += sum over s0 <= s < s1 of p[gi, s - s0] v[s, hk], four keys per pass over D (p is zero past
    s1 - s0 up to a multiple of 4; the rows there repeat the last key)."""
    D = vc.shape[2]
    for s in range(s0, s1, 4):
        _prefetch_rows(vc, s + ATT_PREFETCH_KEYS, 4, hk)
        v0, v1, v2, v3 = vc[s, hk], vc[min(s + 1, s1 - 1), hk], vc[min(s + 2, s1 - 1), hk], vc[min(s + 3, s1 - 1), hk]
        j = s - s0
        for gi in range(G):
            p0, p1, p2, p3 = p[gi, j], p[gi, j + 1], p[gi, j + 2], p[gi, j + 3]
            a = acc[gi]
            for d in range(D):
                a[d] += p0 * _load(v0, d) + p1 * _load(v1, d) + p2 * _load(v2, d) + p3 * _load(v3, d)


@njit(cache=True, parallel=True, fastmath=True)
def attention_kernel(q, kc, vc, positions, scale, nsplit, out):
    """Causal softmax attention with GQA, in tiles of keys with a running softmax (as flash attention).
    q (T, Hq, D); kc, vc (S, Hkv, D) float32, or float16 passed as uint16 bit patterns (converted as they are
    read); out (T, Hq, D). One task per (block of ATT_TOKEN_BLOCK tokens, nsplit-th of the keys): it reads
    each tile of keys and values once, for all its tokens and heads, in memory order. With nsplit > 1 (decode:
    one token, a task per thread) the tasks' partial sums are combined at the end with their maxima."""
    T, Hq, D = q.shape
    S, Hkv = kc.shape[0], kc.shape[1]
    G = Hq // Hkv
    nblocks = (T + ATT_TOKEN_BLOCK - 1) // ATT_TOKEN_BLOCK
    parts = nsplit if nsplit > 1 else 0
    pacc = np.empty((parts, T, Hq, D), np.float32)
    pm = np.empty((parts, T, Hq), np.float32)
    pl = np.empty((parts, T, Hq), np.float32)
    for job in prange(nblocks * nsplit):
        b, j = job // nsplit, job % nsplit
        b = b // 2 if b % 2 == 0 else nblocks - 1 - b // 2  # 0, n-1, 1, n-2, ...: threads' causal work balanced
        t0, t1 = b * ATT_TOKEN_BLOCK, min(b * ATT_TOKEN_BLOCK + ATT_TOKEN_BLOCK, T)
        nmax = 0
        for t in range(t0, t1):
            nmax = max(nmax, min(positions[t] + 1, S))
        per = (nmax + nsplit - 1) // nsplit
        lo, hi = j * per, min(j * per + per, nmax)
        acc = np.zeros((t1 - t0, Hq, D), np.float32)
        m = np.full((t1 - t0, Hq), f32(-3e38), np.float32)  # running max (finite: exp(m - m_new) is 0, not nan)
        l = np.zeros((t1 - t0, Hq), np.float32)  # running sum of exp(score - m)
        sc = np.zeros(((G + 3) // 4 * 4, ATT_TILE + 4), np.float32)
        for s0 in range(lo, hi, ATT_TILE):
            for t in range(t0, t1):
                s1 = min(s0 + ATT_TILE, hi, positions[t] + 1)
                if s1 <= s0:
                    continue
                n, tl = s1 - s0, t - t0
                for hk in range(Hkv):
                    _tile_scores(q, t, hk, G, kc, s0, s1, scale, sc)
                    for gi in range(G):
                        h = hk * G + gi
                        mnew = m[tl, h]
                        for c in range(n):
                            mnew = max(mnew, sc[gi, c])
                        tot = f32(0)
                        for c in range(n):
                            e = expf(sc[gi, c] - mnew)
                            sc[gi, c] = e
                            tot += e
                        for c in range(n, n + 4):
                            sc[gi, c] = 0
                        f = expf(m[tl, h] - mnew)
                        l[tl, h] = l[tl, h] * f + tot
                        m[tl, h] = mnew
                        if f != 1:
                            a = acc[tl, h]
                            for d in range(D):
                                a[d] *= f
                    _tile_values(vc, hk, G, s0, s1, sc, acc[tl, hk * G:hk * G + G])
        for t in range(t0, t1):
            tl = t - t0
            if nsplit == 1:
                for h in range(Hq):
                    inv = f32(1) / l[tl, h]
                    for d in range(D):
                        out[t, h, d] = acc[tl, h, d] * inv
            else:
                pacc[j, t], pm[j, t], pl[j, t] = acc[tl], m[tl], l[tl]
    if nsplit > 1:
        for th in prange(T * Hq):
            t, h = th // Hq, th % Hq
            top = pm[0, t, h]
            for j in range(1, nsplit):
                top = max(top, pm[j, t, h])
            o = out[t, h]
            o[:] = 0
            tot = f32(0)
            for j in range(nsplit):
                w = expf(pm[j, t, h] - top)  # a task with no keys has l = 0: it adds nothing
                tot += w * pl[j, t, h]
                pa = pacc[j, t, h]
                for d in range(D):
                    o[d] += w * pa[d]
            inv = f32(1) / tot
            for d in range(D):
                o[d] *= inv


# ---------------------------------------------------------------------------------------------------------

class NumbaBackend(NumpyBackend):
    """Weights read as stored. `threads` sets Numba's thread count.

    int8_activations (default: on where the CPU has AVX-512 VNNI): products with Q4_K, Q5_K, Q6_K and Q8_0
    weights (decode matvecs, prompts shorter than Q8_MATMUL_MAX_TOKENS, and the routed experts of every
    step) quantize the activations to llama.cpp's Q8_K (int8 per 256 values) and run the block dots in
    int32 with vpdpbusd, as llama.cpp does. Off: float32 activations everywhere (exact to 1e-5 against the
    NumPy reference). Longer prompts' dense products use float32 tiles and BLAS."""

    name = "numba"
    xp = np
    # Prompts through the chunked gated delta (batched BLAS) from this many tokens; None: the recurrent
    # kernels at every length. Measured, 2 threads, 32 heads of 128x128: tiled recurrent 5.1 / 31 ms vs
    # chunked 29.5 / 101 ms at T = 128 / 512 (python benchmarks/bench_kernels.py --threads 2 --delta).
    chunked_min_tokens: int | None = None

    def __init__(self, threads: int | None = None, int8_activations: bool | None = None):
        super().__init__()
        self.int8 = K.HAVE_VNNI if int8_activations is None else bool(int8_activations) and K.HAVE_VNNI
        self.threads = set_threads(threads)
        with sigint_blocked():  # the thread pool starts with the first parallel kernel: never takes Ctrl-C
            x = np.zeros((1, 64), np.float32)
            conv1d_silu(x, np.zeros((64, 2), np.float32), np.zeros((1, 64), np.float32), np.empty_like(x))
        self.nchunks = 4 * self.threads
        self._vectors: dict[str, np.ndarray] = {}
        self._kept_values: dict[tuple, tuple] = {}  # see _kept
        self._tile = np.empty(0, np.float32)

    # weights ------------------------------------------------------------------------------------------
    def prepare(self, w: QTensor) -> QTensor:
        """Weights are used as stored; only checks that a kernel exists for the type."""
        K.kernel_for(w.ggml_type)
        return w

    def vector(self, w: QTensor) -> np.ndarray:
        v = self._vectors.get(w.name)
        if v is None:
            v = self._vectors[w.name] = w.dequantize().astype(np.float32, copy=False)
        return v

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """x (T, K) float32, w (N, K) -> (T, N)."""
        kern = K.kernel_for(w.ggml_type)
        x = np.ascontiguousarray(x, dtype=np.float32)
        data = np.ascontiguousarray(w.data)
        T, N = x.shape[0], w.shape[0]
        q8 = self._q8(kern, w)
        if T == 1:
            out = np.empty(N, np.float32)
            if q8:
                K.matvec_q8(kern.code, data, x[0], out, self.nchunks)
                return out[None]
            K.matvec(kern.code, data, x[0], K.F16_LUT, out, self.nchunks)
            return out[None]
        out = np.empty((T, N), np.float32)
        if w.ggml_type == K.Q.F32:  # the router: BLAS on the stored floats, no tile copy
            np.matmul(x, data.view(np.float32).reshape(N, -1).T, out=out)
            return out
        if q8 and T < Q8_MATMUL_MAX_TOKENS:
            K.matmul_q8(kern.code, data, x, out, self.nchunks)
            return out
        if T < BLAS_MIN_TOKENS:
            K.matmul_rows(kern.code, data, x, K.F16_LUT, out, self.nchunks)
            return out
        rows = max(1, min(N, TILE_BYTES // (4 * w.shape[1])))
        tile = self._scratch(rows * w.shape[1]).reshape(rows, w.shape[1])
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            K.dequant_rows(kern.code, data[n0:n1], K.F16_LUT, tile[:n1 - n0], self.nchunks)
            np.matmul(x, tile[:n1 - n0].T, out=out[:, n0:n1])
        return out

    def _q8(self, kern, w: QTensor) -> bool:
        """Whether products with w take 8-bit activations."""
        return self.int8 and kern.code in K.Q8_CODES and w.shape[1] % 256 == 0

    def matmuls(self, x: np.ndarray, ws: tuple[QTensor, ...]) -> tuple[np.ndarray, ...]:
        """One token with 8-bit activations: one kernel call over the rows of every weight (one quantization
        of x, one parallel region, so they stream like one larger matrix; `benchmarks/profile_ops.py`: a
        DeltaNet layer's three input projections 4.98 -> 4.79 ms per token over 6 layers); otherwise one
        matmul per weight. Same bits either way."""
        kerns = [K.kernel_for(w.ggml_type) for w in ws]
        if x.shape[0] != 1 or len(ws) < 2 or not all(self._q8(k, w) for k, w in zip(kerns, ws)):
            return tuple(self.matmul(x, w) for w in ws)
        outs = tuple(np.empty(w.shape[0], np.float32) for w in ws)
        K.matvec_q8_many(np.array([k.code for k in kerns], np.int64), tuple(np.ascontiguousarray(w.data) for w in ws),
                         np.ascontiguousarray(x[0], dtype=np.float32), outs, self.nchunks)
        return tuple(o[None] for o in outs)

    def _scratch(self, n: int) -> np.ndarray:
        """n float32 of scratch kept between calls (a fresh 64 MiB tile per matmul costs its page faults)."""
        if self._tile.size < n:
            self._tile = np.empty(n, np.float32)
        return self._tile[:n]

    def embed(self, ids: np.ndarray, w: QTensor) -> np.ndarray:
        kern = K.kernel_for(w.ggml_type)
        out = np.empty((len(ids), w.shape[1]), np.float32)
        K.dequant_rows(kern.code, np.ascontiguousarray(w.data[np.asarray(ids)]), K.F16_LUT, out, self.nchunks)
        return out

    def topk_softmax(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As the reference's, in one compiled call (five small NumPy ops there, each slow on caches the
        streaming kernels just flushed)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        T, E = logits.shape
        if not 0 < k <= E:
            return super().topk_softmax(logits, k)
        ids = np.empty((T, k), np.int64)
        weights = np.empty((T, k), np.float32)
        topk_softmax_rows(logits, k, ids, weights)
        return ids, weights

    # mixers -------------------------------------------------------------------------------------------
    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        out = np.empty(q.shape, np.float32)
        n = min(int(positions.max()) + 1, k.shape[0])
        # fewer blocks of tokens than threads (decode: one): the keys split as well, each range a task
        blocks = -(-q.shape[0] // ATT_TOKEN_BLOCK)
        nsplit = max(1, min(-(-self.threads // blocks), n // ATT_MIN_SPLIT_KEYS))
        if k.dtype == np.float16:
            k, v = k.view(np.uint16), v.view(np.uint16)
        attention_kernel(np.ascontiguousarray(q, dtype=np.float32), k, v, positions, f32(q.shape[-1] ** -0.5),
                         nsplit, out)
        return out

    def silu(self, x: np.ndarray) -> np.ndarray:
        if x.size < SILU_KERNEL_MIN or x.dtype != np.float32 or not x.flags.c_contiguous:
            return numpy_ref.silu(x)
        out = np.empty_like(x)
        rows = x.shape[0] if x.ndim > 1 else 1  # a prompt's tokens (long rows vectorise best)
        silu_rows(x.reshape(rows, -1), out.reshape(rows, -1))
        return out

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        return self._norm(x, np.asarray(w, np.float32), eps)

    def l2_norm(self, x: np.ndarray, eps: float) -> np.ndarray:
        return self._norm(x, np.empty(0, np.float32), eps)

    @staticmethod
    def _norm(x, w, eps):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        rms_norm_rows(x.reshape(-1, x.shape[-1]), w, f32(eps), out.reshape(-1, x.shape[-1]))
        return out

    def conv1d(self, x: np.ndarray, w: np.ndarray, conv_state: np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        if x.shape[0] == 1 and conv_state.dtype == np.float32 and conv_state.flags.c_contiguous:
            new_state = np.empty_like(conv_state)
            conv1d_step(x, self._transposed(w), conv_state, out, new_state)
            return numpy_ref.silu(out), new_state
        w = np.ascontiguousarray(w, dtype=np.float32)
        conv1d_silu(x, w, conv_state, out)
        Kc = w.shape[1]
        new_state = np.concatenate([conv_state, x], axis=0)[-(Kc - 1):].copy()
        return out, new_state

    def _kept(self, objs: tuple, make):
        """make(), worked out once for the objects objs (weights the model passes every step) and kept: the
        entry holds them, so their ids are not reused while it is cached; at most 1024 entries."""
        key = tuple(map(id, objs))
        entry = self._kept_values.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], objs)):
            if len(self._kept_values) >= 1024:
                self._kept_values.clear()
            entry = self._kept_values[key] = (objs, make())
        return entry[1]

    def _transposed(self, w: np.ndarray) -> np.ndarray:
        """w.T as a contiguous float32 array, kept for the weights the model passes every step (the conv
        weights from vector()): transposing the cold (C, Kc) weight each decode step cost more than the conv
        itself (`benchmarks/profile_ops.py`, conv1d 0.66 -> 0.46-0.52 ms per token over 6 layers)."""
        return self._kept((w,), lambda: np.ascontiguousarray(w.T, dtype=np.float32))

    def gated_delta(self, q, k, v, g, beta, state):
        if self.chunked_min_tokens is not None and q.shape[0] >= self.chunked_min_tokens:
            return gated_delta_chunked(q, k, v, g, beta, state)
        # the state is updated in place (the model replaces its reference with the result anyway and
        # snapshots/checkpoints are copies): one read and one write of the 2 MiB per layer and token
        new_state = state if state.dtype == np.float32 and state.flags.c_contiguous and state.flags.writeable \
            else np.empty(state.shape, np.float32)
        out = np.empty(v.shape, np.float32)
        c = np.ascontiguousarray
        kernel = gated_delta_step if q.shape[0] < DELTA_TILED_MIN_TOKENS else gated_delta_recurrent
        kernel(c(q, dtype=f32), c(k, dtype=f32), c(v, dtype=f32), c(g, dtype=f32), c(beta, dtype=f32),
               c(state, dtype=f32), new_state, out)
        return out, new_state

    # feed-forward -------------------------------------------------------------------------------------
    def swiglu(self, x: np.ndarray, gate: QTensor, up: QTensor, down: QTensor) -> np.ndarray:
        codes = [K.kernel_for(t.ggml_type).code for t in (gate, up, down)]
        F, D = gate.shape[0], gate.shape[1]
        if (x.shape[0] == 1 and self._int8_ok(codes, D, F) and up.shape[0] == F and down.shape == (D, F)):
            # one token: the shared expert as a one-expert MoE (x quantized once, gate+up in one pass)
            out = np.zeros((1, D), np.float32)
            d = [np.ascontiguousarray(t.data)[None] for t in (gate, up, down)]
            zero = np.zeros(1, np.int64)
            K.moe_q8(*codes, d[0], d[1], 0, d[2], F, zero, np.array([0, 1], np.int64), zero,
                     np.ones(1, np.float32), np.ascontiguousarray(x, dtype=np.float32), *K.NO_SHARED, out,
                     self.nchunks)
            return out
        return self.matmul(numpy_ref.silu(self.matmul(x, gate)) * self.matmul(x, up), down)

    def _int8_ok(self, codes, D: int, F: int) -> bool:
        return self.int8 and all(c in K.Q8_CODES for c in codes) and D % 256 == 0 and F % 256 == 0

    def _moe_plan(self, experts, shared) -> tuple:
        """What moe() needs of a layer's weights beyond the step's routing, worked out once per layer (after the
        streaming kernels flush the caches, these lookups cost more than they look): (codes of gate, up,
        down; fused gate_up; 8-bit activations; the shared expert's static moe_q8 arguments or None)."""
        return self._kept((experts,) if shared is None else (experts, shared.gate),
                          lambda: self._make_moe_plan(experts, shared))

    def _make_moe_plan(self, experts, shared) -> tuple:
        fused = experts.gate_up is not None
        gate, up = (experts.gate_up, experts.gate_up) if fused else (experts.gate, experts.up)
        codes = (K.kernel_for(gate.ggml_type).code, K.kernel_for(up.ggml_type).code,
                 K.kernel_for(experts.down.ggml_type).code)
        D = experts.down.shape[1]
        int8 = self._int8_ok(codes, D, experts.n_ff)
        fold = None
        if int8 and shared is not None:
            scodes = [K.kernel_for(t.ggml_type).code for t in (shared.gate, shared.up, shared.down)]
            Fs = shared.gate.shape[0]
            if (self._int8_ok(scodes, D, Fs) and shared.gate.shape == shared.up.shape == (Fs, D)
                    and shared.down.shape == (D, Fs)):
                fold = (np.array(scodes, np.int64), *(np.ascontiguousarray(t.data) for t in shared[:3]))
        return codes, fused, int8, fold

    def moe(self, x: np.ndarray, experts, expert_ids: np.ndarray, expert_weights: np.ndarray,
            shared=None) -> np.ndarray:
        """Routed experts' SwiGLU, plus the shared expert if given. x (T, D); expert_ids, expert_weights
        (T, k). Tokens are grouped by expert so each routed expert's bytes are read once per step; with
        8-bit activations the shared expert runs in the routed experts' kernel calls (the same sums in the
        same order as a separate swiglu added afterwards) unless the prompt is long enough for BLAS."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, D = x.shape
        # one compiled call for the grouping: after the streaming kernels have flushed the caches, each small
        # NumPy op costs ~3x its warm time (argsort, run boundaries, gathers: ~10 ops here)
        uniq, starts, tokens, weights = group_pairs(np.ascontiguousarray(expert_ids, dtype=np.int64),
                                                    np.ascontiguousarray(expert_weights, dtype=np.float32))
        codes, fused, int8, shared_static = self._moe_plan(experts, shared)
        fold = None  # moe_q8's shared-expert arguments, when the shared expert runs inside it
        if shared_static is not None and T < Q8_MATMUL_MAX_TOKENS:
            fold = (*shared_static, np.ascontiguousarray(shared.weight, dtype=np.float32).reshape(-1))
        F = experts.n_ff
        up_off = F if fused else 0
        out = np.zeros((T, D), np.float32)
        if int8 and len(tokens) <= K.MOE_FLAT_MAX_PAIRS:
            # few pairs (decode, short prompts): the store may hand out the resident experts first and the rest
            # once read from disk (early); each pair's output goes to its own row of `part` (the shared
            # expert's, made with the first batch, after them) and add_parts sums the rows in pair order: the
            # same bits for any batching
            part = np.zeros((len(tokens) + (T if fold else 0), D), np.float32)
            shared_args = fold or K.NO_SHARED
            for arrays, ids, slots in experts.fetch(uniq, early=True):
                if len(ids) == len(uniq):  # the whole step at once
                    lstarts, rows, btokens, bweights = starts, np.arange(len(tokens), dtype=np.int64), tokens, weights
                else:
                    lstarts, rows = pair_rows(starts, np.searchsorted(uniq, ids))
                    btokens, bweights = tokens[rows], weights[rows]
                gate_a, up_a, down_a = (arrays[0], arrays[0], arrays[1]) if fused else arrays
                K.moe_q8_parts(*codes, gate_a, up_a, up_off, down_a, F, slots, lstarts, btokens, bweights, rows, x,
                               *shared_args, part, self.nchunks)
                shared_args = K.NO_SHARED
            K.add_parts(out, part, tokens, self.nchunks)
        else:
            # batches in ascending id order: the kernel adds each expert's contribution to `out` in that order,
            # so batching never changes the result
            done = 0
            for arrays, ids, slots in experts.fetch(uniq):
                gate_a, up_a, down_a = (arrays[0], arrays[0], arrays[1]) if fused else arrays
                n = len(ids)
                args = (*codes, gate_a, up_a, up_off, down_a, F, slots, starts[done:done + n + 1], tokens, weights, x)
                done += n
                if int8:
                    K.moe_q8(*args, *(fold if fold and done == len(uniq) else K.NO_SHARED), out, self.nchunks)
                else:
                    K.moe_experts(*args, K.F16_LUT, out, self.nchunks)
        return out if fold else numpy_ref.add_shared(self, out, x, shared)


def set_threads(threads: int | None) -> int:
    """Numba's thread count for the calling thread's parallel kernels: `threads`, capped at the pool Numba
    started with (every core), or left as it is for None; returns the count in effect."""
    if threads:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    return numba.get_num_threads()


_compile_notice = None  # on_first_compile's numba:compile listener (one per process)


def on_first_compile(say) -> None:
    """Call say() once, when this process first compiles a kernel: Numba's on-disk cache lacked it (the first
    run after an install or an upgrade), so the next minute goes to compiling; better said than silent.
    Loading a kernel from the cache is no compile and says nothing. A later call replaces say."""
    global _compile_notice
    from numba.core import event

    if _compile_notice is None:
        class Notice(event.Listener):
            said = False

            def on_start(self, ev):
                if not self.said:
                    self.said = True
                    self.say()

            def on_end(self, ev):
                pass

        _compile_notice = Notice()
        event.register("numba:compile", _compile_notice)
    _compile_notice.say = say


def warmup(progress=None) -> None:
    """Compile (or load from Numba's cache) every kernel signature the backend uses, on tiny inputs (weights
    read-only, as the model hands them over: Numba compiles read-only and writable arrays apart)."""
    be = NumbaBackend()
    rng = np.random.default_rng(0)
    f16 = K.F16_LUT
    for qtype, kern in K.KERNELS.items():
        if progress:
            progress(qtype.name)
        w = readonly(np.zeros((2, 256 // kern.block * kern.size), np.uint8))
        x = rng.standard_normal((3, 256)).astype(np.float32)
        K.matvec(kern.code, w, x[0], f16, np.empty(2, np.float32), be.nchunks)
        K.matmul_rows(kern.code, w, x, f16, np.empty((3, 2), np.float32), be.nchunks)
        for rows in (w, w.copy()):  # weight tiles (read-only) and embedding rows (a gathered copy)
            K.dequant_rows(kern.code, rows, f16, np.empty((2, 256), np.float32), be.nchunks)
        break  # the drivers take the type as a runtime code: one compilation covers every type
    group_pairs(np.zeros((1, 2), np.int64), np.ones((1, 2), np.float32))
    topk_softmax_rows(np.zeros((1, 4), np.float32), 2, np.empty((1, 2), np.int64), np.empty((1, 2), np.float32))
    w3 = readonly(np.zeros((2, 64, 144), np.uint8))
    d3 = readonly(np.zeros((2, 256, 36), np.uint8))
    one = np.ones(1, np.float32)
    K.moe_experts(K.KERNELS[K.Q.Q4_K].code, K.KERNELS[K.Q.Q4_K].code, K.KERNELS[K.Q.Q4_0].code, w3, w3, 0, d3, 64,
                  np.zeros(1, np.int64), np.array([0, 1], np.int64), np.zeros(1, np.int64), one,
                  np.zeros((1, 256), np.float32), f16, np.zeros((1, 256), np.float32), be.nchunks)
    if K.HAVE_VNNI:
        K.matvec_q8(K.KERNELS[K.Q.Q4_K].code, readonly(np.zeros((2, 144), np.uint8)), np.ones(256, np.float32),
                    np.empty(2, np.float32), be.nchunks)
        K.matmul_q8(K.KERNELS[K.Q.Q4_K].code, readonly(np.zeros((2, 144), np.uint8)), np.ones((3, 256), np.float32),
                    np.empty((3, 2), np.float32), be.nchunks)
        for n in (2, 3):  # fused input projections: DeltaNet (ssm_in, ba) or (qkv, gate, ba); attention q, k, v
            be.matmuls(np.ones((1, 256), np.float32),
                       tuple(QTensor("w", K.Q.Q4_K, (2, 256), readonly(np.zeros((2, 144), np.uint8)), 0, "")
                             for _ in range(n)))
        K.moe_q8(K.KERNELS[K.Q.Q4_K].code, K.KERNELS[K.Q.Q4_K].code, K.KERNELS[K.Q.Q6_K].code,
                 readonly(np.zeros((1, 256, 144), np.uint8)), readonly(np.zeros((1, 256, 144), np.uint8)), 0,
                 readonly(np.zeros((1, 256, 210), np.uint8)), 256, np.zeros(1, np.int64), np.array([0, 1], np.int64),
                 np.zeros(1, np.int64), one, np.ones((1, 256), np.float32), *K.NO_SHARED,
                 np.zeros((1, 256), np.float32), be.nchunks)
        # streaming decode: the resident experts' batch, then the read ones' (moe's early batches)
        starts, rows = pair_rows(np.array([0, 1], np.int64), np.zeros(1, np.int64))
        part = np.zeros((1, 256), np.float32)
        K.moe_q8_parts(K.KERNELS[K.Q.Q4_K].code, K.KERNELS[K.Q.Q4_K].code, K.KERNELS[K.Q.Q6_K].code,
                       readonly(np.zeros((1, 256, 144), np.uint8)), readonly(np.zeros((1, 256, 144), np.uint8)), 0,
                       readonly(np.zeros((1, 256, 210), np.uint8)), 256, np.zeros(1, np.int64), starts,
                       np.zeros(1, np.int64), one, rows, np.ones((1, 256), np.float32), *K.NO_SHARED, part,
                       be.nchunks)
        K.add_parts(np.zeros((1, 256), np.float32), part, np.zeros(1, np.int64), be.nchunks)
    for T in (1, DELTA_TILED_MIN_TOKENS):  # decode step and tiled prompt kernels
        q = rng.standard_normal((T, 4, 8)).astype(np.float32)
        be.gated_delta(q, q, q, -np.ones((T, 4), np.float32), np.ones((T, 4), np.float32),
                       np.zeros((4, 8, 8), np.float32))
    x = rng.standard_normal((2, 256)).astype(np.float32)
    for w in (np.ones(256, np.float32), readonly(np.ones(256, np.float32))):  # norm weights: computed or stored
        be.rms_norm(x, w, 1e-6)
    be.l2_norm(x, 1e-6)
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    _solve_unit_lower(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 3), np.float32))
    for T in (1, 2):  # decode step and prompt kernels
        be.conv1d(q.reshape(2, 32)[:T], np.ones((32, 4), np.float32), np.zeros((3, 32), np.float32))
    silu_rows(x, np.empty_like(x))  # a prompt's output gate (as be.silu runs it on SILU_KERNEL_MIN elements and more)
    for dt in (np.float32, np.float16):
        kv = np.zeros((3, 2, 8), dt)
        be.attention(rng.standard_normal((1, 4, 8)).astype(np.float32), kv, kv, np.array([2]))
