"""Numba quantizers: float32 rows -> GGML block bytes, bit-exact with ggml's reference quantizers.

Each routine follows one `ggml-quants.c` reference function, the ones `llama-quantize` runs when it has
no importance matrix: `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `quantize_row_q4_K_ref` and
`quantize_row_q5_K_ref` (per 32-weight sub-block `make_qkx2_quants`: a min/scale fit searched over 16-21
trial scales), `quantize_row_q6_K_ref` (per 16-weight sub-block `make_qx_quants`, 19 trial scales).
"Bit-exact" means the same float32 operations in the same order: ggml-base is built without -mfma and
-ffast-math, so every product and sum is rounded to float32 on its own and sums run front to back; Numba
without fastmath does the same (it never contracts a*b+c and never reorders a reduction). Integer
constants are converted to float32 where C converts them, `nearest_int` is ggml's add-1.5*2^23 bit
trick (round half to even, and the same garbage as C if a value is ever out of its range), and
GGML_FP32_TO_FP16 rounds to nearest even.

Two versions of each K-quant:
    *_ref  scalar ports that read like the C: one super-block, one sub-block, one trial scale at a time.
    fast   the same operations with the sub-blocks of several rows side by side ("lanes"): arrays are
           transposed to (weight-in-sub-block, lane) so that every inner loop runs over lanes. Each lane
           still performs its own sub-block's C operation sequence, so results are bit-identical to the
           scalar port, but the loops vectorise (the scalar search is a chain of dependent float adds).
The tests check fast == ref on random and adversarial data and both against llama.cpp's fixture files.

Conventions: x is float32 (rows, K), K a whole number of blocks; the result is uint8 (rows, row_bytes)
in the GGUF block layout (see formats.py). Threads: the compiled loops release the GIL and Python threads
share the rows (numba.get_num_threads() of them unless told): no parallel (parfor) compile, which costs
more compile time than all the kernels together.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit

f32 = np.float32
QK_K = 256
MAGIC = f32(12582912.0)      # 1.5 * 2**23: adding it rounds a float32 to an integer (nearest_int)
GROUP_MAX_EPS = f32(1e-15)
NJ = dict(cache=True, error_model="numpy")  # IEEE division (inf/nan), never a ZeroDivisionError


# ---------------------------------------------------------------------------------------------------------
# Scalar helpers. `tb` is a float32 scratch array and `ib` its int32 view: numba cannot bit-cast a scalar.
# ---------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _nearest(v, tb, ib):
    """ggml's nearest_int(v): round half to even via the float32 add, then read the mantissa bits."""
    tb[0] = v + MAGIC
    return (np.int64(ib[0]) & 0x7FFFFF) - 0x400000


@njit(inline="always")
def _f16_bits(v, tb, ib):
    """float32 -> IEEE half bits, round to nearest even (GGML_FP32_TO_FP16 / F16C's vcvtps2ph)."""
    tb[0] = v
    w = np.int64(ib[0]) & 0xFFFFFFFF
    sign = (w >> 16) & 0x8000
    a = w & 0x7FFFFFFF
    if a > 0x7F800000:                               # NaN -> quiet NaN
        return sign | 0x7E00
    if a >= 0x47800000:                              # >= 65536 (or inf) -> inf
        return sign | 0x7C00
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    if e >= 113:                                     # a normal half: keep 10 of 23 mantissa bits
        q = (a & 0x7FFFFF) >> 13
        r = a & 0x1FFF
        q += (e - 112) << 10
        if r > 0x1000 or (r == 0x1000 and (q & 1)):
            q += 1                                   # a carry into the exponent is right (up to inf)
        return sign | q
    shift = 126 - e                                  # a subnormal half: value / 2**-24, rounded
    if shift > 24:
        return sign
    q = m >> shift
    r = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if r > half or (r == half and (q & 1)):
        q += 1
    return sign | q


@njit(inline="always")
def _f16_value(h):
    """IEEE half bits -> float32 (exact)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.ldexp(np.float64(m), -24)
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = np.ldexp(np.float64(m + 1024), e - 25)
    return f32(-v if h & 0x8000 else v)


@njit(inline="always")
def _put_f16(row, o, h):
    row[o] = h & 0xFF
    row[o + 1] = (h >> 8) & 0xFF


# ---------------------------------------------------------------------------------------------------------
# Q8_0 and Q4_0: 32-weight blocks with one f16 scale
# ---------------------------------------------------------------------------------------------------------

@njit(**NJ)
def _q8_0_row(x, row, tb, ib):
    for b in range(x.shape[0] // 32):
        xb = x[32 * b:32 * b + 32]
        amax = f32(0.0)
        for j in range(32):
            a = abs(xb[j])
            amax = amax if amax > a else a          # MAX(amax, fabsf(v))
        d = amax / f32(127.0)
        idv = f32(1.0) / d if d != 0 else f32(0.0)
        o = 34 * b
        _put_f16(row, o, _f16_bits(d, tb, ib))
        for j in range(32):
            v = xb[j] * idv
            r = np.floor(np.float64(abs(v)) + 0.5)  # roundf: half away from zero (exact in float64)
            q = np.int64(r) if v >= 0 else -np.int64(r)
            row[o + 2 + j] = q & 0xFF


@njit(**NJ)
def _q4_0_row(x, row, tb, ib):
    for b in range(x.shape[0] // 32):
        xb = x[32 * b:32 * b + 32]
        amax = f32(0.0)
        vmax = f32(0.0)
        for j in range(32):
            if amax < abs(xb[j]):
                amax = abs(xb[j])
                vmax = xb[j]
        d = vmax / f32(-8.0)
        idv = f32(1.0) / d if d != 0 else f32(0.0)
        o = 18 * b
        _put_f16(row, o, _f16_bits(d, tb, ib))
        for j in range(16):
            q0 = min(15, np.int64(xb[j] * idv + f32(8.5)))       # (int8_t) truncates toward zero
            q1 = min(15, np.int64(xb[j + 16] * idv + f32(8.5)))
            row[o + 2 + j] = (q0 & 0xFF) | ((q1 << 4) & 0xFF)


@njit(nogil=True, **NJ)
def _rows_32(code, x, out, r0, r1):
    """Q8_0 (code 0) or Q4_0 (code 1) for rows r0..r1."""
    tb = np.empty(1, f32)
    ib = tb.view(np.int32)
    for r in range(r0, r1):
        if code == 0:
            _q8_0_row(x[r], out[r], tb, ib)
        else:
            _q4_0_row(x[r], out[r], tb, ib)


# ---------------------------------------------------------------------------------------------------------
# make_qkx2_quants and make_qx_quants: scalar ports (the readable versions)
# ---------------------------------------------------------------------------------------------------------

@njit(**NJ)
def make_qkx2_quants_ref(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, tb, ib):
    """-> (scale, the_min). L[:n] gets the levels 0..nmax; weights are the fit's per-weight weights."""
    fnmax = f32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = f32(0.0)
    if mx == mn:
        L[:n] = 0
        return f32(0.0), -mn
    iscale = fnmax / (mx - mn)
    scale = f32(1.0) / iscale
    best_error = f32(0.0)
    for i in range(n):
        l = min(max(_nearest(iscale * (x[i] - mn), tb, ib), 0), nmax)
        L[i] = l
        diff = scale * f32(l) + mn - x[i]
        best_error += weights[i] * (diff * diff)
    for s in range(nstep + 1):
        iscale = (rmin + rdelta * f32(s) + fnmax) / (mx - mn)
        sum_l = f32(0.0)
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            l = min(max(_nearest(iscale * (x[i] - mn), tb, ib), 0), nmax)
            Laux[i] = l
            w = weights[i]
            fl = f32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = f32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0.0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                L[:n] = Laux[:n]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**NJ)
def make_qx_quants_ref(n, nmax, x, L, tb, ib):
    """make_qx_quants with rmse_type 1 and no importance weights (w = x*x). L gets l + nmax."""
    amax = f32(0.0)
    vmax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < GROUP_MAX_EPS:
        L[:n] = 0
        return f32(0.0)
    iscale = f32(-nmax) / vmax
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i], tb, ib)))
        L[i] = l + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * f32(l)
        suml2 += w * f32(l) * f32(l)
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(s)) / vmax
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i], tb, ib)))
            w = x[i] * x[i]
            sumlx += w * x[i] * f32(l)
            suml2 += w * f32(l) * f32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest(iscale * x[i], tb, ib)))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


# ---------------------------------------------------------------------------------------------------------
# Block packing shared by both versions
# ---------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _pack_scales_k4(row, o, ls, lm):
    """Q4_K/Q5_K: eight 6-bit scales and mins into 12 bytes at row[o:o+12]."""
    for j in range(8):
        if j < 4:
            row[o + j] = ls[j]
            row[o + j + 4] = lm[j]
        else:
            row[o + j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            row[o + j - 4] |= (ls[j] >> 4) << 6
            row[o + j] |= (lm[j] >> 4) << 6


@njit(inline="always")
def _pack_q4k(row, o, L):
    for g in range(4):
        for l in range(32):
            row[o + 16 + 32 * g + l] = L[64 * g + l] | (L[64 * g + l + 32] << 4)


@njit(inline="always")
def _pack_q5k(row, o, L):
    for j in range(32):
        row[o + 16 + j] = 0
    m1, m2 = 1, 2
    for g in range(4):
        for j in range(32):
            l1 = L[64 * g + j]
            if l1 > 15:
                l1 -= 16
                row[o + 16 + j] |= m1
            l2 = L[64 * g + j + 32]
            if l2 > 15:
                l2 -= 16
                row[o + 16 + j] |= m2
            row[o + 48 + 32 * g + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2


@njit(inline="always")
def _pack_q6k(row, o, L):
    for h in range(2):
        j = 128 * h
        for l in range(32):
            a, b, c, e = L[j + l], L[j + l + 32], L[j + l + 64], L[j + l + 96]
            row[o + 64 * h + l] = (a & 0xF) | ((c & 0xF) << 4)
            row[o + 64 * h + l + 32] = (b & 0xF) | ((e & 0xF) << 4)
            row[o + 128 + 32 * h + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


@njit(inline="always")
def _k4_block_scales(scales, mins, ls, lm, tb, ib):
    """The super-block part of Q4_K/Q5_K: 6-bit sub-scales against the largest -> (d bits, dmin bits)."""
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
    inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
    for j in range(8):
        ls[j] = min(63, _nearest(inv_scale * scales[j], tb, ib) & 0xFF)   # uint8_t, then MIN(63, .)
        lm[j] = min(63, _nearest(inv_min * mins[j], tb, ib) & 0xFF)
    return _f16_bits(max_scale / f32(63.0), tb, ib), _f16_bits(max_min / f32(63.0), tb, ib)


# ---------------------------------------------------------------------------------------------------------
# Q4_K / Q5_K / Q6_K: scalar ports, one row at a time
# ---------------------------------------------------------------------------------------------------------

@njit(**NJ)
def _qk45_row_ref(x, row, five, tb, ib):
    nmax = 31 if five else 15
    rmin, rdelta, nstep = (f32(-0.5), f32(0.1), 15) if five else (f32(-1.0), f32(0.1), 20)
    bs = 176 if five else 144
    L = np.zeros(QK_K, np.int64)
    Laux = np.zeros(32, np.int64)
    weights = np.empty(32, f32)
    scales = np.empty(8, f32)
    mins = np.empty(8, f32)
    ls = np.empty(8, np.int64)
    lm = np.empty(8, np.int64)
    for b in range(x.shape[0] // QK_K):
        xb = x[QK_K * b:QK_K * (b + 1)]
        o = bs * b
        for j in range(8):
            xs = xb[32 * j:32 * j + 32]
            sum_x2 = f32(0.0)
            for l in range(32):
                sum_x2 += xs[l] * xs[l]
            av_x = np.sqrt(sum_x2 / f32(32.0))
            for l in range(32):
                weights[l] = av_x + abs(xs[l])
            scales[j], mins[j] = make_qkx2_quants_ref(32, nmax, xs, weights, L[32 * j:], Laux, rmin, rdelta,
                                                      nstep, tb, ib)
        dh, dmh = _k4_block_scales(scales, mins, ls, lm, tb, ib)
        _put_f16(row, o, dh)
        _put_f16(row, o + 2, dmh)
        _pack_scales_k4(row, o + 4, ls, lm)
        for j in range(8):
            d = _f16_value(dh) * f32(ls[j])
            if d == 0:
                continue
            dm = _f16_value(dmh) * f32(lm[j])
            for ii in range(32):
                L[32 * j + ii] = min(max(_nearest((xb[32 * j + ii] + dm) / d, tb, ib), 0), nmax)
        if five:
            _pack_q5k(row, o, L)
        else:
            _pack_q4k(row, o, L)


@njit(**NJ)
def _q6k_block_tail(xb, row, o, scales, L, bisc, zero, tb, ib):
    """Q6_K after the sub-block fits: int8 sub-scales, requantize, pack. Where a sub-scale rounds to 0
    the sub-block keeps make_qx_quants' levels: L as given if bisc is empty (the scalar port), else
    recomputed from the lanes' best iscale (0 for an all-zero sub-block)."""
    max_scale = f32(0.0)
    max_abs_scale = f32(0.0)
    for s in range(16):
        if abs(scales[s]) > max_abs_scale:
            max_abs_scale = abs(scales[s])
            max_scale = scales[s]
    if max_abs_scale < GROUP_MAX_EPS:
        row[o:o + 210] = 0
        return
    iscale = f32(-128.0) / max_scale
    dh = _f16_bits(f32(1.0) / iscale, tb, ib)
    _put_f16(row, o + 208, dh)
    dv = _f16_value(dh)
    for s in range(16):
        sc = min(127, _nearest(iscale * scales[s], tb, ib)) & 0xFF
        row[o + 192 + s] = sc
        d = dv * f32(sc - 256 if sc >= 128 else sc)
        if d == 0:
            if bisc.shape[0]:
                for ii in range(16):
                    q = max(-32, min(31, _nearest(bisc[s] * xb[16 * s + ii], tb, ib))) + 32
                    L[16 * s + ii] = 0 if zero[s] else q
            continue
        for ii in range(16):
            L[16 * s + ii] = max(-32, min(31, _nearest(xb[16 * s + ii] / d, tb, ib))) + 32
    _pack_q6k(row, o, L)


@njit(**NJ)
def _q6k_row_ref(x, row, tb, ib):
    L = np.zeros(QK_K, np.int64)
    scales = np.empty(16, f32)
    for b in range(x.shape[0] // QK_K):
        xb = x[QK_K * b:QK_K * (b + 1)]
        for s in range(16):
            scales[s] = make_qx_quants_ref(16, 32, xb[16 * s:16 * s + 16], L[16 * s:], tb, ib)
        _q6k_block_tail(xb, row, 210 * b, scales, L, scales[:0], np.zeros(0, np.bool_), tb, ib)


@njit(**NJ)
def _rows_ref(code, x, out):
    tb = np.empty(1, f32)
    ib = tb.view(np.int32)
    for r in range(x.shape[0]):
        if code == 0:
            _q8_0_row(x[r], out[r], tb, ib)
        elif code == 1:
            _q4_0_row(x[r], out[r], tb, ib)
        elif code == 2:
            _qk45_row_ref(x[r], out[r], False, tb, ib)
        elif code == 3:
            _qk45_row_ref(x[r], out[r], True, tb, ib)
        else:
            _q6k_row_ref(x[r], out[r], tb, ib)


# ---------------------------------------------------------------------------------------------------------
# Fast K-quants: sub-blocks of a task's rows as lanes. xt[i, k] = weight i of sub-block k.
# ---------------------------------------------------------------------------------------------------------

LIMIT = 4.0e6  # |v| below 2**22: nearest_int's float add is exact there, so round-and-subtract equals it


@njit(inline="always")
def _lvl(v, lo, hi):
    """clamp(nearest_int(v), lo, hi) as a float32, for |v| < LIMIT: (v + MAGIC) - MAGIC is v rounded to
    an integer, half to even, which is exactly what nearest_int's bit trick reads out in that range."""
    r = (v + MAGIC) - MAGIC
    r = r if r > lo else lo
    return r if r < hi else hi


@njit(**NJ)
def _levels_exact(xt, isc, mn, lo, hi, la):
    """la[i, k] = clamp(nearest_int(isc[k] * (xt[i, k] - mn[k])), lo, hi) with ggml's bit trick, whatever
    the values (the slow path, taken only when some lane is out of _lvl's range or not finite)."""
    n = xt.shape[1]
    tb = np.empty(n, f32)
    ib = tb.view(np.int32)
    for i in range(xt.shape[0]):
        xi = xt[i]
        li = la[i]
        for k in range(n):
            tb[k] = isc[k] * (xi[k] - mn[k]) + MAGIC
        for k in range(n):
            li[k] = f32(min(max((np.int64(ib[k]) & 0x7FFFFF) - 0x400000, lo), hi))


@njit(**NJ)
def _in_range(isc, mn, hi, lo, skip):
    """True if |isc * (x - mn)| < LIMIT for every x in [lo, hi] of every lane not skipped."""
    for k in range(isc.shape[0]):
        if skip[k]:
            continue
        span = max(abs(np.float64(hi[k]) - np.float64(mn[k])), abs(np.float64(lo[k]) - np.float64(mn[k])))
        if not abs(np.float64(isc[k])) * span < LIMIT:
            return False
    return True


# make_qkx2_quants lanes: weights are av + |x| (Q4_K/Q5_K), so they are recomputed rather than loaded.

@njit(inline="always")
def _x2_acc(xv, s, m, a, fn, p, q, u):
    r = _lvl(s * (xv - m), f32(0.0), fn)
    wl = (a + abs(xv)) * r
    return p + wl, q + wl * r, u + wl * xv


@njit(inline="always")
def _x2_err(xv, s, m, a, fn, t, tmin, c):
    r = _lvl(s * (xv - m), f32(0.0), fn)
    d = t * r + tmin - xv
    return c + (a + abs(xv)) * (d * d)


@njit(**NJ)
def _x2_sums(xt, av, isc, mn, fn, sl, sl2, sxl, exact, la):
    """Per lane: sum_l, sum_l2, sum_xl of make_qkx2_quants' trial with iscale isc (4 weights per pass)."""
    n = xt.shape[1]
    sl[:] = 0
    sl2[:] = 0
    sxl[:] = 0
    if exact:
        _levels_exact(xt, isc, mn, 0, np.int64(fn), la)
        for i in range(32):
            xi = xt[i]
            li = la[i]
            for k in range(n):
                wl = (av[k] + abs(xi[k])) * li[k]
                sl[k] += wl
                sl2[k] += wl * li[k]
                sxl[k] += wl * xi[k]
        return
    for i in range(0, 32, 4):
        xa, xb, xc, xd = xt[i], xt[i + 1], xt[i + 2], xt[i + 3]
        for k in range(n):
            s, m, a = isc[k], mn[k], av[k]
            p, q, u = _x2_acc(xa[k], s, m, a, fn, sl[k], sl2[k], sxl[k])
            p, q, u = _x2_acc(xb[k], s, m, a, fn, p, q, u)
            p, q, u = _x2_acc(xc[k], s, m, a, fn, p, q, u)
            p, q, u = _x2_acc(xd[k], s, m, a, fn, p, q, u)
            sl[k], sl2[k], sxl[k] = p, q, u


@njit(**NJ)
def _x2_error(xt, av, isc, mn, fn, ts, tmin, cur, exact, la):
    """Per lane: the weighted squared error of levels (from isc, mn) against scale ts and min tmin."""
    n = xt.shape[1]
    cur[:] = 0
    if exact:
        _levels_exact(xt, isc, mn, 0, np.int64(fn), la)
        for i in range(32):
            xi = xt[i]
            li = la[i]
            for k in range(n):
                d = ts[k] * li[k] + tmin[k] - xi[k]
                cur[k] += (av[k] + abs(xi[k])) * (d * d)
        return
    for i in range(0, 32, 4):
        xa, xb, xc, xd = xt[i], xt[i + 1], xt[i + 2], xt[i + 3]
        for k in range(n):
            s, m, a, t, tm = isc[k], mn[k], av[k], ts[k], tmin[k]
            c = _x2_err(xa[k], s, m, a, fn, t, tm, cur[k])
            c = _x2_err(xb[k], s, m, a, fn, t, tm, c)
            c = _x2_err(xc[k], s, m, a, fn, t, tm, c)
            cur[k] = _x2_err(xd[k], s, m, a, fn, t, tm, c)


@njit(**NJ)
def _qkx2_lanes(xt, av, nmax, rmin, rdelta, nstep, finite, scale, the_min, best_isc, best_mn):
    """make_qkx2_quants(32, nmax, x, av + |x|, ...) for every lane k of xt (32, n) at once.

    Per lane: scale, the_min, and (best_isc, best_mn) with which make_qkx2_quants' final levels are
    clamp(nearest_int(best_isc * (x - best_mn)), 0, nmax). The trial loop runs for all lanes; a lane whose
    C code would have returned early (all weights equal) is overwritten at the end."""
    n = xt.shape[1]
    fn = f32(nmax)
    mn = np.empty(n, f32)
    mx = np.empty(n, f32)
    sum_w = np.empty(n, f32)
    sum_x = np.empty(n, f32)
    x0 = xt[0]
    for k in range(n):
        w = av[k] + abs(x0[k])
        mn[k] = mx[k] = x0[k]
        sum_w[k] = w
        sum_x[k] = w * x0[k]
    for i in range(1, 32):
        xi = xt[i]
        for k in range(n):
            v = xi[k]
            w = av[k] + abs(v)
            mn[k] = v if v < mn[k] else mn[k]
            mx[k] = v if v > mx[k] else mx[k]
            sum_w[k] += w
            sum_x[k] += w * v
    xlo = mn.copy()
    flat = np.empty(n, np.bool_)
    isc = np.empty(n, f32)
    for k in range(n):
        mn[k] = f32(0.0) if mn[k] > 0 else mn[k]
        flat[k] = mx[k] == mn[k]
        isc[k] = fn / (mx[k] - mn[k])
        scale[k] = f32(1.0) / isc[k]
    mn0 = mn.copy()
    best_isc[:] = isc
    best_mn[:] = mn
    la = np.empty((32, n), f32)
    best = np.empty(n, f32)
    _x2_error(xt, av, isc, mn, fn, scale, mn, best, not (finite and _in_range(isc, mn, mx, xlo, flat)), la)
    sl = np.empty(n, f32)
    sl2 = np.empty(n, f32)
    sxl = np.empty(n, f32)
    ts = np.empty(n, f32)
    tm = np.empty(n, f32)
    ok = np.empty(n, np.bool_)
    cur = np.empty(n, f32)
    for s in range(nstep + 1):
        f = rmin + rdelta * f32(s) + fn
        for k in range(n):
            isc[k] = f / (mx[k] - mn[k])
        exact = not (finite and _in_range(isc, mn, mx, xlo, flat))
        _x2_sums(xt, av, isc, mn, fn, sl, sl2, sxl, exact, la)
        for k in range(n):
            D = sum_w[k] * sl2[k] - sl[k] * sl[k]
            a = (sum_w[k] * sxl[k] - sum_x[k] * sl[k]) / D
            b = (sl2[k] * sum_x[k] - sl[k] * sxl[k]) / D
            pos = b > 0
            ts[k] = sxl[k] / sl2[k] if pos else a
            tm[k] = f32(0.0) if pos else b
            ok[k] = D > 0
        _x2_error(xt, av, isc, mn, fn, ts, tm, cur, exact, la)
        for k in range(n):
            if ok[k] and cur[k] < best[k]:
                best[k] = cur[k]
                scale[k] = ts[k]
                best_isc[k] = isc[k]
                best_mn[k] = mn[k]
                mn[k] = tm[k]
    for k in range(n):
        if flat[k]:
            scale[k] = f32(0.0)
            best_isc[k] = f32(0.0)
            mn[k] = mn0[k]
        the_min[k] = -mn[k]


# make_qx_quants lanes (Q6_K: n = 16, nmax = 32, rmse_type 1, weights x * x)

@njit(inline="always")
def _qx_acc(xv, s, p, q):
    r = _lvl(s * xv, f32(-32.0), f32(31.0))
    w = xv * xv
    return p + w * xv * r, q + w * r * r


@njit(**NJ)
def _qx_sums(xt, isc, sumlx, suml2, exact, la):
    n = xt.shape[1]
    sumlx[:] = 0
    suml2[:] = 0
    if exact:
        _levels_exact(xt, isc, np.zeros(n, f32), -32, 31, la)
        for i in range(16):
            xi = xt[i]
            li = la[i]
            for k in range(n):
                w = xi[k] * xi[k]
                sumlx[k] += w * xi[k] * li[k]
                suml2[k] += w * li[k] * li[k]
        return
    for i in range(0, 16, 4):
        xa, xb, xc, xd = xt[i], xt[i + 1], xt[i + 2], xt[i + 3]
        for k in range(n):
            s = isc[k]
            p, q = _qx_acc(xa[k], s, sumlx[k], suml2[k])
            p, q = _qx_acc(xb[k], s, p, q)
            p, q = _qx_acc(xc[k], s, p, q)
            sumlx[k], suml2[k] = _qx_acc(xd[k], s, p, q)


@njit(**NJ)
def _qx_lanes(xt, finite, scale, best_isc, zero):
    """make_qx_quants(16, 32, x, L, 1, NULL) for every lane of xt (16, n). The final levels are
    32 + clamp(nearest_int(best_isc * x), -32, 31), or 0 where zero[k] (an all-zero sub-block)."""
    n = xt.shape[1]
    amax = np.zeros(n, f32)
    vmax = np.zeros(n, f32)
    for i in range(16):
        xi = xt[i]
        for k in range(n):
            ax = abs(xi[k])
            up = ax > amax[k]
            amax[k] = ax if up else amax[k]
            vmax[k] = xi[k] if up else vmax[k]
    isc = np.empty(n, f32)
    for k in range(n):
        zero[k] = amax[k] < GROUP_MAX_EPS
        isc[k] = f32(-32.0) / vmax[k]
    zeros = np.zeros(n, f32)
    neg = -amax
    la = np.empty((16, n), f32)
    sumlx = np.empty(n, f32)
    suml2 = np.empty(n, f32)
    _qx_sums(xt, isc, sumlx, suml2, not (finite and _in_range(isc, zeros, amax, neg, zero)), la)
    best = np.empty(n, f32)
    for k in range(n):
        scale[k] = sumlx[k] / suml2[k] if suml2[k] != 0 else f32(0.0)
        best[k] = scale[k] * sumlx[k]
        best_isc[k] = isc[k]
    for s in range(-9, 10):
        if s == 0:
            continue
        f = -(f32(32.0) + f32(0.1) * f32(s))
        for k in range(n):
            isc[k] = f / vmax[k]
        _qx_sums(xt, isc, sumlx, suml2, not (finite and _in_range(isc, zeros, amax, neg, zero)), la)
        for k in range(n):
            if suml2[k] > 0 and sumlx[k] * sumlx[k] > best[k] * suml2[k]:
                best_isc[k] = isc[k]
                scale[k] = sumlx[k] / suml2[k]
                best[k] = scale[k] * sumlx[k]
    for k in range(n):
        if zero[k]:
            scale[k] = f32(0.0)


@njit(**NJ)
def _transpose(x, r0, r1, m):
    """Rows r0..r1 of x as (m, n): column k = the k-th m-weight sub-block of those rows."""
    xf = x.reshape(-1)[r0 * x.shape[1]:r1 * x.shape[1]]
    n = xf.shape[0] // m
    xt = np.empty((m, n), f32)
    for k in range(n):
        for i in range(m):
            xt[i, k] = xf[m * k + i]
    return xt


@njit(**NJ)
def _qk45_task(x, out, r0, r1, five):
    nmax = 31 if five else 15
    rmin, rdelta, nstep = (f32(-0.5), f32(0.1), 15) if five else (f32(-1.0), f32(0.1), 20)
    bs = 176 if five else 144
    finite = np.isfinite(x[r0:r1]).all()
    xt = _transpose(x, r0, r1, 32)
    n = xt.shape[1]
    av = np.zeros(n, f32)
    for i in range(32):
        xi = xt[i]
        for k in range(n):
            av[k] += xi[k] * xi[k]
    for k in range(n):
        av[k] = np.sqrt(av[k] / f32(32.0))
    scale = np.empty(n, f32)
    the_min = np.empty(n, f32)
    bisc = np.empty(n, f32)
    bmn = np.empty(n, f32)
    _qkx2_lanes(xt, av, nmax, rmin, rdelta, nstep, finite, scale, the_min, bisc, bmn)

    tb = np.empty(QK_K, f32)
    ib = tb.view(np.int32)
    L = np.zeros(QK_K, np.int64)
    ls = np.empty(8, np.int64)
    lm = np.empty(8, np.int64)
    per_row = x.shape[1] // 32
    for r in range(r0, r1):
        xr = x[r]
        row = out[r]
        for b in range(x.shape[1] // QK_K):
            k0 = (r - r0) * per_row + 8 * b
            o = bs * b
            xb = xr[QK_K * b:QK_K * (b + 1)]
            dh, dmh = _k4_block_scales(scale[k0:k0 + 8], the_min[k0:k0 + 8], ls, lm, tb, ib)
            _put_f16(row, o, dh)
            _put_f16(row, o + 2, dmh)
            _pack_scales_k4(row, o + 4, ls, lm)
            for j in range(8):
                d = _f16_value(dh) * f32(ls[j])
                dm = _f16_value(dmh) * f32(lm[j])
                s, m = bisc[k0 + j], bmn[k0 + j]
                for ii in range(32 * j, 32 * j + 32):  # d == 0: make_qkx2_quants' levels stay
                    tb[ii] = (s * (xb[ii] - m) if d == 0 else (xb[ii] + dm) / d) + MAGIC
            for ii in range(QK_K):
                L[ii] = min(max((np.int64(ib[ii]) & 0x7FFFFF) - 0x400000, 0), nmax)
            if five:
                _pack_q5k(row, o, L)
            else:
                _pack_q4k(row, o, L)


@njit(**NJ)
def _q6k_task(x, out, r0, r1):
    xt = _transpose(x, r0, r1, 16)
    n = xt.shape[1]
    scale = np.empty(n, f32)
    bisc = np.empty(n, f32)
    zero = np.empty(n, np.bool_)
    _qx_lanes(xt, np.isfinite(x[r0:r1]).all(), scale, bisc, zero)
    tb = np.empty(1, f32)
    ib = tb.view(np.int32)
    L = np.zeros(QK_K, np.int64)
    per_row = x.shape[1] // 16
    for r in range(r0, r1):
        xr = x[r]
        for b in range(x.shape[1] // QK_K):
            xb = xr[QK_K * b:QK_K * (b + 1)]
            k0 = (r - r0) * per_row + 16 * b
            _q6k_block_tail(xb, out[r], 210 * b, scale[k0:k0 + 16], L, bisc[k0:k0 + 16], zero[k0:k0 + 16], tb, ib)


@njit(nogil=True, **NJ)
def _rows_k(code, x, out, r0, r1, rows_per_task):
    """Q4_K (code 2), Q5_K (3) or Q6_K (4) for rows r0..r1, rows_per_task rows side by side at a time."""
    for t0 in range(r0, r1, rows_per_task):
        t1 = min(r1, t0 + rows_per_task)
        if code == 4:
            _q6k_task(x, out, t0, t1)
        else:
            _qk45_task(x, out, t0, t1, code == 3)


# ---------------------------------------------------------------------------------------------------------
# Python entry points
# ---------------------------------------------------------------------------------------------------------

# type -> (kernel code, weights per block, bytes per block)
TYPES: dict[QT, tuple[int, int, int]] = {
    QT.Q8_0: (0, 32, 34), QT.Q4_0: (1, 32, 18), QT.Q4_K: (2, QK_K, 144), QT.Q5_K: (3, QK_K, 176),
    QT.Q6_K: (4, QK_K, 210),
}
TASK_WEIGHTS = 1 << 14  # weights per parallel task of the K-quants (lanes = this / sub-block size)


def _prepare(x: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, int]:
    code, block, size = TYPES[QT(qtype)]
    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    if x.shape[1] % block:
        raise ValueError(f"{QT(qtype).name} needs rows of a multiple of {block} weights, got {x.shape[1]}")
    return x, np.empty((x.shape[0], x.shape[1] // block * size), np.uint8), code


_pool: list = [None, 0]  # a ThreadPoolExecutor and its size, made on first use


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def quantize(x: np.ndarray, qtype, threads: int | None = None) -> np.ndarray:
    """float32 (..., K) -> uint8 (rows, K / block * type_size) in qtype (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K).

    threads: worker threads (default numba.get_num_threads()); the compiled loops release the GIL, so
    plain Python threads each take a share of the rows.
    """
    x, out, code = _prepare(x, qtype)
    rows, K = x.shape
    threads = max(1, min(threads or _threads(), rows, x.size // (1 << 15) or 1))
    per_task = max(1, TASK_WEIGHTS // K)

    def part(r0: int, r1: int) -> None:
        if code < 2:
            _rows_32(code, x, out, r0, r1)
        else:
            _rows_k(code, x, out, r0, r1, per_task)

    if threads == 1:
        part(0, rows)
        return out
    if _pool[1] != threads:
        from concurrent.futures import ThreadPoolExecutor

        if _pool[0] is not None:
            _pool[0].shutdown()
        _pool[:] = [ThreadPoolExecutor(threads, thread_name_prefix="quantize"), threads]
    bounds = np.linspace(0, rows, min(rows, 4 * threads) + 1).astype(int)
    for f in [_pool[0].submit(part, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()
    return out


def quantize_ref(x: np.ndarray, qtype) -> np.ndarray:
    """The scalar ports (one thread, slow): the readable version `quantize` is tested against."""
    x, out, code = _prepare(x, qtype)
    _rows_ref(code, x, out)
    return out


QUANTIZERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    t: (lambda x, t=t: quantize(x, t)) for t in TYPES
}
