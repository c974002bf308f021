"""Numba kernels against the NumPy reference on random data.

Every quant type; row counts that are not multiples of the thread count or the chunking; K of 256, 512 and
2048; T = 1 (matvec), 3 (row-decoded matmul) and 64 (tiles + BLAS); 1 and 2 threads. Activations are float32
on every float path, so the bound is 1e-5 relative (max |delta| / max |reference|); the `backend` fixture
runs with int8_activations=False.

The 8-bit activation path (decode matvecs and one-token experts against Q4_K/Q5_K/Q6_K/Q8_0 with AVX-512
VNNI) is tested separately: (1) its integer arithmetic is exact, i.e. it equals W . dequant(Q8_K(x)) to 1e-5
relative; (2) the quantization error obeys llama.cpp's bound, per output row
|W x - W x^| <= sum over 256-blocks b of (max|x_b| / 254) * ||W_b||_1 (round-to-nearest int8 with
d = max|x_b| / 127), and in norm ||W x - W x^|| <= 2e-2 ||W x|| on Gaussian inputs without outliers.
"""

import gguf
import numba
import numpy as np
import pytest
from conftest import delta_inputs

from localcoder.backends import numpy_ref
from localcoder.backends.numba_cpu import NumbaBackend, attention_kernel, gated_delta_chunked
from localcoder.backends.numpy_ref import NumpyBackend
from localcoder.experts import ExpertSet
from localcoder.gguf_file import QTensor
from localcoder.quant import kernels as K
from localcoder.quant.formats import get_format

Q = gguf.GGMLQuantizationType
REL = 1e-5
TYPES = list(K.KERNELS)


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def random_rows(qtype, shape, rng):
    """Raw rows (*shape[:-1], row_bytes) of random blocks with finite, model-like scales."""
    n = int(np.prod(shape))
    if qtype == Q.F32:
        return rng.standard_normal(n).astype(np.float32).view(np.uint8).reshape(*shape[:-1], -1)
    if qtype == Q.F16:
        return rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(*shape[:-1], -1)
    if qtype == Q.BF16:
        bits = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(*shape[:-1], -1)
    kern = K.KERNELS[qtype]
    nb = n // kern.block
    raw = rng.integers(0, 256, (nb, kern.size), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, nb) * 0.01).astype(np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == Q.MXFP4:
        raw[:, 0] = rng.integers(118, 124, nb)
    elif qtype == Q.Q6_K:
        raw[:, 208:210] = d
    else:
        raw[:, 0:2] = d
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q4_1, Q.Q5_1):  # dmin / m: a finite f16 too
            raw[:, 2:4] = d
    return raw.reshape(*shape[:-1], -1)


def qtensor(name, qtype, shape, rng):
    return QTensor(name, qtype, tuple(shape), random_rows(qtype, shape, rng), 0, "test")


def dense(t: QTensor):
    fmt = get_format(t.ggml_type)
    return fmt.dequantize_blocks(np.ascontiguousarray(t.data).reshape(-1, fmt.type_size)).reshape(t.shape)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def backend(request):
    be = NumbaBackend(threads=request.param, int8_activations=False)
    yield be
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_dequant_rows_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    w = qtensor("w", qtype, (37, 512), rng)
    out = np.empty((37, 512), np.float32)
    K.dequant_rows(K.KERNELS[qtype].code, w.data, K.F16_LUT, out, 8)
    np.testing.assert_array_equal(out, dense(w))


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_matmul_all_paths(qtype, backend):
    rng = np.random.default_rng(1 + int(qtype))
    for N, Kd in ((37, 256), (131, 512), (67, 2048)):
        w = qtensor("w", qtype, (N, Kd), rng)
        ref = dense(w).astype(np.float64)
        for T in (1, 3, 64):
            x = rng.standard_normal((T, Kd)).astype(np.float32)
            got = backend.matmul(x, w)
            assert got.shape == (T, N) and got.dtype == np.float32
            err = rel_err(got, x.astype(np.float64) @ ref.T)
            assert err <= REL, f"{qtype.name} N={N} K={Kd} T={T}: {err:.3g}"


def test_embed(backend):
    rng = np.random.default_rng(3)
    for qtype in (Q.Q4_K, Q.Q6_K, Q.F16):
        w = qtensor("tok", qtype, (50, 256), rng)
        ids = np.array([3, 0, 49, 3])
        np.testing.assert_array_equal(backend.embed(ids, w), NumpyBackend().embed(ids, w))


def _delta_inputs(T, H=4, Dk=16, Dv=8, seed=0):
    return delta_inputs(np.random.default_rng(seed), T, H, Dk, Dv)


@pytest.mark.parametrize("shape", [(1, 2048), (3, 4, 128), (64, 256)])
def test_norms(shape, backend):
    rng = np.random.default_rng(len(shape))
    x = (3 * rng.standard_normal((*shape[:-1], 2 * shape[-1]))).astype(np.float32)[..., ::2]  # strided input
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    ref = NumpyBackend()
    assert rel_err(backend.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)) <= REL
    assert rel_err(backend.l2_norm(x, 1e-6), ref.l2_norm(x, 1e-6)) <= REL


@pytest.mark.parametrize("T", [1, 3, 64, 100])
def test_gated_delta(T, backend):
    q, k, v, g, beta, state = _delta_inputs(T)
    ref_o, ref_s = numpy_ref.gated_delta_recurrent(q, k, v, g, beta, state)
    o, s = backend.gated_delta(q, k, v, g, beta, state.copy())  # (decode updates the state in place)
    assert rel_err(o, ref_o) <= REL and rel_err(s, ref_s) <= REL
    o2, s2 = gated_delta_chunked(q, k, v, g, beta, state)  # chunked vs recurrent at every T
    assert rel_err(o2, ref_o) <= REL and rel_err(s2, ref_s) <= REL


def test_gated_delta_real_head_dims():
    q, k, v, g, beta, state = _delta_inputs(70, H=2, Dk=128, Dv=128, seed=1)
    ref_o, ref_s = numpy_ref.gated_delta_chunked(q, k, v, g, beta, state)
    o, s = NumbaBackend().gated_delta(q[:5], k[:5], v[:5], g[:5], beta[:5], state.copy())
    r5 = numpy_ref.gated_delta_recurrent(q[:5], k[:5], v[:5], g[:5], beta[:5], state)
    assert rel_err(o, r5[0]) <= REL and rel_err(s, r5[1]) <= REL
    o, s = gated_delta_chunked(q, k, v, g, beta, state)
    assert rel_err(o, ref_o) <= REL and rel_err(s, ref_s) <= REL


@pytest.mark.parametrize("T", [1, 3, 64])
def test_conv1d(T, backend):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, 200)).astype(np.float32)
    w = rng.standard_normal((200, 4)).astype(np.float32)
    st = rng.standard_normal((3, 200)).astype(np.float32)
    o, s = backend.conv1d(x, w, st)
    ro, rs = NumpyBackend().conv1d(x, w, st)
    assert rel_err(o, ro) <= REL
    np.testing.assert_array_equal(s, rs)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 300), (3, 40), (64, 0), (17, 100), (1, 1500), (5, 700), (20, 37)])
def test_attention_with_cache(T, past, kv_dtype, backend):
    """Several tiles of keys, blocks of tokens, and (decode over 1500 keys, 2 threads) keys split across tasks."""
    rng = np.random.default_rng(T + past)
    Hq, Hkv, D = 8, 2, 64
    k = rng.standard_normal((past + T, Hkv, D)).astype(kv_dtype)
    v = rng.standard_normal((past + T, Hkv, D)).astype(kv_dtype)
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    pos = np.arange(past, past + T)
    ref = NumpyBackend().attention(q, k.astype(np.float32), v.astype(np.float32), pos)
    assert rel_err(backend.attention(q, k, v, pos), ref) <= REL


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("Hq,Hkv,D", [(16, 2, 256), (6, 2, 32), (3, 1, 16), (4, 4, 8), (10, 2, 40)])
@pytest.mark.parametrize("nsplit", [1, 3])
def test_attention_kernel_groups_and_splits(Hq, Hkv, D, nsplit, kv_dtype):
    """Query heads per kv head that are not a multiple of the kernel's four (the last repeated), keys split into
    nsplit ranges whose partial softmaxes are combined (one range empty: 2 tokens at positions 0 and 70 split
    three ways), an odd count of keys (a tile ends on one key), positions before the end of the cache."""
    rng = np.random.default_rng(Hq * D + nsplit)
    S = 101
    k = rng.standard_normal((S, Hkv, D)).astype(kv_dtype)
    v = rng.standard_normal((S, Hkv, D)).astype(kv_dtype)
    for pos in (np.array([0, 70]), np.array([100]), np.array([8, 9, 10])):
        q = rng.standard_normal((len(pos), Hq, D)).astype(np.float32)
        ref = NumpyBackend().attention(q, k.astype(np.float32), v.astype(np.float32), pos)
        out = np.empty(q.shape, np.float32)
        kb, vb = (k.view(np.uint16), v.view(np.uint16)) if kv_dtype == np.float16 else (k, v)
        attention_kernel(q, kb, vb, pos, np.float32(D ** -0.5), nsplit, out)
        assert rel_err(out, ref) <= REL


def _moe_case(rng, T, fused, D, down_type, up_type, E=8, F=256, k=3):
    """k distinct experts per token out of E: fused gate_up (Q4_K) with Q6_K down, or Q5_K gate, up_type up and
    down_type down; x, routing and weights for T tokens."""
    down = qtensor("down", Q.Q6_K if fused else down_type, (E, D, F), rng)
    if fused:
        experts = ExpertSet(0, down, gate_up=qtensor("gu", Q.Q4_K, (E, 2 * F, D), rng))
    else:
        experts = ExpertSet(0, down, gate=qtensor("g", Q.Q5_K, (E, F, D), rng), up=qtensor("u", up_type, (E, F, D), rng))
    x = (0.1 * rng.standard_normal((T, D))).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    wts = rng.uniform(0.1, 1, (T, k)).astype(np.float32)
    return experts, x, ids, wts


@pytest.mark.parametrize("fused", [False, True], ids=["gate+up", "gate_up"])
@pytest.mark.parametrize("T", [1, 3, 64])
def test_moe(T, fused, backend):
    experts, x, ids, wts = _moe_case(np.random.default_rng(T + 10 * fused), T, fused, 256, Q.Q4_0, Q.Q8_0)
    ref = NumpyBackend().moe(x, experts, ids, wts)
    assert rel_err(backend.moe(x, experts, ids, wts), ref) <= REL


Q8_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0]
INT8_NORM_REL = 2e-2
needs_vnni = pytest.mark.skipif(not K.HAVE_VNNI, reason="8-bit activation kernels need AVX-512 VNNI")


def q8k_dequant(x):
    """x (..., K) -> (dequantized Q8_K values, per-256-block bound factor max|x_b| / 254)."""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    deq = np.empty_like(flat, dtype=np.float64)
    half = np.empty((flat.shape[0], flat.shape[1] // 256))
    for r in range(flat.shape[0]):
        n = flat.shape[1]
        xq, xd = np.empty(n, np.int8), np.empty(n // 256, np.float32)
        K.quantize_q8k(flat[r], xq, xd, np.empty(n // 16, np.int32), np.empty(n // 32, np.int32))
        deq[r] = (xq.reshape(-1, 256) * xd[:, None].astype(np.float64)).reshape(-1)
        half[r] = np.abs(flat[r].reshape(-1, 256)).max(axis=1) / 254
    return deq.reshape(x.shape), half.reshape(*x.shape[:-1], -1)


def check_int8(got, w_dense, x, norm_check=True):
    """got = w_dense @ x through Q8_K activations: exact integer path and the quantization bound."""
    deq, half = q8k_dequant(x)
    assert rel_err(got, w_dense @ deq) <= REL
    exact = w_dense @ x.astype(np.float64)
    l1 = np.abs(w_dense).reshape(w_dense.shape[0], -1, 256).sum(axis=2)  # (N, blocks)
    bound = l1 @ half + 1e-5 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)
    if norm_check:
        assert np.linalg.norm(got - exact) <= INT8_NORM_REL * np.linalg.norm(exact)


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=[t.name for t in Q8_TYPES])
def test_matvec_int8_activations(qtype, threads):
    be = NumbaBackend(threads=threads)
    try:
        assert be.int8
        rng = np.random.default_rng(100 + int(qtype))
        for N, Kd in ((37, 256), (131, 512), (67, 2048)):
            w = qtensor("w", qtype, (N, Kd), rng)
            x = rng.standard_normal((1, Kd)).astype(np.float32)
            outlier = Kd == 512
            if outlier:
                x[0, :7] *= 30  # one block with outliers: its int8 step is 30x coarser; the per-row bound holds
            got = be.matmul(x, w)[0]
            check_int8(got, dense(w).astype(np.float64), x[0], norm_check=not outlier)
            exact = NumbaBackend(threads=threads, int8_activations=False).matmul(x, w)[0]
            assert rel_err(exact, dense(w).astype(np.float64) @ x[0]) <= REL  # the float path stays exact
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_vnni
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=[t.name for t in Q8_TYPES])
def test_matvec_int8_extreme_values(qtype):
    """Every quant at the top of its range (Q6_K 63, Q5_K 31, Q4_K 15), every scale at its largest and x at
    +-127 after quantization: the kernels' 4-value integer dots (packed to int16 before the scales are
    applied) are at their largest and must not saturate."""
    fmt = get_format(qtype)
    N, Kd = 8, 512
    raw = np.full((N, Kd // fmt.block_size * fmt.type_size), 0xFF, np.uint8).reshape(N, -1, fmt.type_size)
    d = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == Q.Q6_K:
        raw[:, :, 192:208] = np.uint8(127)  # int8 scales +127 (0x80 would be -128)
        raw[:, :, 208:210] = d
    elif qtype == Q.Q8_0:
        raw[:, :, 2:] = np.uint8(127)
        raw[:, :, 0:2] = d
    else:
        raw[:, :, 0:4] = np.tile(d, 2)  # d, dmin; 6-bit scales and mins all 63
    w = QTensor("w", qtype, (N, Kd), raw.reshape(N, -1), 0, "test")
    be = NumbaBackend(threads=1)
    try:
        x = np.where(np.arange(Kd) < 256, 1.0, -0.5).astype(np.float32)[None]  # quantized: +127, -127
        check_int8(be.matmul(x, w)[0], dense(w).astype(np.float64), x[0])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T", [1, 3])
def test_matmuls_several_weights_one_input(threads, T):
    """matmuls(x, ws): with 8-bit activations and one token, one kernel pass over every weight's rows (mixed
    types and row counts, as a layer's input projections), bit-identical to one matmul per weight; else (a
    float type among them, T > 1) one matmul each. Either way each output matches the NumPy reference."""
    rng = np.random.default_rng(7 + T)
    mixes = [(Q.Q5_K, Q.Q4_K, Q.Q4_K), (Q.Q4_K, Q.Q6_K), (Q.Q4_K, Q.F32, Q.Q8_0)]
    for int8 in (True, False):
        be = NumbaBackend(threads=threads, int8_activations=int8)
        try:
            for mix in mixes:
                ws = tuple(qtensor(f"w{i}", qt, (n, 512), rng) for i, (qt, n) in enumerate(zip(mix, (97, 33, 5))))
                x = rng.standard_normal((T, 512)).astype(np.float32)
                got = be.matmuls(x, ws)
                assert len(got) == len(ws)
                for g, w in zip(got, ws):
                    assert g.shape == (T, w.shape[0])
                    assert np.array_equal(g, be.matmul(x, w))
                    if be.int8 and w.ggml_type in Q8_TYPES:
                        for t in range(T):
                            check_int8(g[t], dense(w).astype(np.float64), x[t])
                    else:
                        assert rel_err(g, NumpyBackend().matmul(x, w)) <= REL
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_vnni
@pytest.mark.parametrize("T", [2, 7])
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=[t.name for t in Q8_TYPES])
def test_matmul_int8_activations(qtype, T):
    """Short prompts: each row unpacked once per group of 4 tokens (groups of 4, then 2, then 1)."""
    be = NumbaBackend(threads=2)
    try:
        rng = np.random.default_rng(200 + int(qtype) + T)
        w = qtensor("w", qtype, (45, 512), rng)
        x = rng.standard_normal((T, 512)).astype(np.float32)
        got = be.matmul(x, w)
        for t in range(T):
            check_int8(got[t], dense(w).astype(np.float64), x[t])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_vnni
@pytest.mark.parametrize("qtype", [Q.Q5_K, Q.Q6_K], ids=["Q5_K", "Q6_K"])
def test_matmul_int8_token_blocks(qtype):
    """A prompt longer than one token block (K = 2048: 128 tokens a block) is every token's product, and the
    blocks split the tokens where separate calls would: the same bits as a call per block."""
    from localcoder.quant.kernels import Q8_TOKEN_BLOCK_BYTES
    tb = Q8_TOKEN_BLOCK_BYTES // 2048
    assert tb == 128
    be = NumbaBackend(threads=2)
    try:
        rng = np.random.default_rng(300 + int(qtype))
        w = qtensor("w", qtype, (45, 2048), rng)
        x = rng.standard_normal((tb + 2, 2048)).astype(np.float32)
        got = be.matmul(x, w)
        np.testing.assert_array_equal(got, np.concatenate([be.matmul(x[:tb], w), be.matmul(x[tb:], w)]))
        for t in (0, tb - 1, tb, tb + 1):
            check_int8(got[t], dense(w).astype(np.float64), x[t])
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_moe_one_token_repeated_expert(backend):
    """An id listed twice for one token (not what routing gives, but a valid call) adds both pairs, as the
    reference does: the grouping of pairs by expert gives that expert one run of two pairs."""
    experts, x, _, _ = _moe_case(np.random.default_rng(3), 1, False, 256, Q.Q4_0, Q.Q8_0)
    ids = np.array([[5, 2, 5]])
    wts = np.array([[0.5, 0.3, 0.2]], np.float32)
    ref = NumpyBackend().moe(x, experts, ids, wts)
    assert rel_err(backend.moe(x, experts, ids, wts), ref) <= REL
    assert rel_err(backend.moe(x, experts, np.array([[5, 2]]), np.array([[0.7, 0.3]], np.float32)), ref) <= REL


@pytest.mark.parametrize("T,E,k", [(1, 512, 10), (5, 64, 8), (3, 8, 8), (2, 7, 1)])
def test_topk_softmax(T, E, k, backend):
    """The router's top-k: the same experts in the same order as the reference's stable sort (ties to the
    lower index, checked on rows of repeated values), weights within float32 rounding, summing to 1."""
    rng = np.random.default_rng(T * E + k)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    logits[-1] = np.round(logits[-1])  # many equal logits: ties decide
    ref_ids, ref_w = NumpyBackend().topk_softmax(logits, k)
    ids, w = backend.topk_softmax(logits, k)
    assert ids.dtype == np.int64 and w.dtype == np.float32 and ids.shape == w.shape == (T, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(w.sum(axis=-1), 1, rtol=1e-6)


def test_group_pairs_matches_a_stable_sort():
    """The MoE's grouping kernel gives what NumPy's stable argsort gives: experts ascending, each expert's
    pairs in token order, repeated ids kept (T = 1, several tokens, and one token naming an expert twice)."""
    from localcoder.backends.numba_cpu import group_pairs
    rng = np.random.default_rng(5)
    cases = [rng.permutation(64)[:10][None], rng.integers(0, 16, (7, 4)), np.array([[5, 2, 5]])]
    for ids in cases:
        ids = ids.astype(np.int64)
        wts = rng.random(ids.shape).astype(np.float32)
        uniq, starts, tokens, weights = group_pairs(ids, wts)
        order = np.argsort(ids.reshape(-1), kind="stable")
        ref_uniq, first = np.unique(ids.reshape(-1)[order], return_index=True)
        np.testing.assert_array_equal(uniq, ref_uniq)
        np.testing.assert_array_equal(starts, np.append(first, ids.size))
        np.testing.assert_array_equal(tokens, order // ids.shape[1])
        np.testing.assert_array_equal(weights, wts.reshape(-1)[order])


@needs_vnni
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("fused", [False, True], ids=["gate+up", "gate_up"])
def test_moe_int8_activations(fused, T):
    """k distinct experts per token, T tokens: gate/up/down through Q8_K activations (h re-quantized per
    token and expert)."""
    experts, x, ids, wts = _moe_case(np.random.default_rng(7 + fused + 10 * T), T, fused, 512, Q.Q8_0, Q.Q4_K)
    got = NumbaBackend(int8_activations=True).moe(x, experts, ids, wts)
    ref = NumpyBackend().moe(x, experts, ids, wts)
    for t in range(T):
        assert np.linalg.norm(got[t] - ref[t]) <= 2 * INT8_NORM_REL * np.linalg.norm(ref[t])
    assert rel_err(NumbaBackend(int8_activations=False).moe(x, experts, ids, wts), ref) <= REL


@needs_vnni
def test_swiglu_int8_activations():
    """The one-token shared expert goes through the fused 8-bit path; the float path stays exact."""
    rng = np.random.default_rng(11)
    D, F = 512, 256
    gate, up = qtensor("g", Q.Q4_K, (F, D), rng), qtensor("u", Q.Q4_K, (F, D), rng)
    down = qtensor("d", Q.Q6_K, (D, F), rng)
    x = (0.1 * rng.standard_normal((1, D))).astype(np.float32)
    ref = NumpyBackend().swiglu(x, gate, up, down)
    got = NumbaBackend(int8_activations=True).swiglu(x, gate, up, down)
    assert got.shape == (1, D)
    assert np.linalg.norm(got - ref) <= 2 * INT8_NORM_REL * np.linalg.norm(ref)
    assert rel_err(NumbaBackend(int8_activations=False).swiglu(x, gate, up, down), ref) <= REL


class _Batches:
    """An expert set whose fetch() hands out n resident experts at a time (as a streaming store may); with
    `shuffled`, when the caller accepts early batches, subsets in any order (as a store handing out the
    resident experts first, then those read from disk, may)."""

    def __init__(self, experts, n, shuffled=False):
        self._experts, self._n, self._shuffled = experts, n, shuffled

    def __getattr__(self, name):
        return getattr(self._experts, name)

    def fetch(self, ids, early=False):
        ids = np.asarray(ids)
        order = np.random.default_rng(len(ids)).permutation(len(ids)) if early and self._shuffled else np.arange(len(ids))
        for i in range(0, len(ids), self._n):
            yield from self._experts.fetch(np.sort(ids[order[i:i + self._n]]))


@needs_vnni
@pytest.mark.parametrize("T", [1, 6, 100])
def test_moe_with_shared_expert(T):
    """The shared expert runs inside the MoE kernel (with the last batch of resident experts): one token
    gives exactly moe() + weight * swiglu(), as two calls would; any number of tokens stays within the 8-bit
    bound of the NumPy reference; a store handing out 2 experts at a time gives the same bits (at 100 tokens
    the whole step has 300 (token, expert) pairs and takes the row-chunked down pass, each batch of 2 experts
    the run-cut one: the two add in the same order), and so do batches of any experts in any order where the
    kernel takes them (moe_q8_parts: up to MOE_FLAT_MAX_PAIRS pairs a step)."""
    from localcoder.backends import SharedExpert
    rng = np.random.default_rng(21 + T)
    experts, x, ids, wts = _moe_case(rng, T, False, 512, Q.Q6_K, Q.Q4_K)
    shared = SharedExpert(qtensor("sg", Q.Q4_K, (256, 512), rng), qtensor("su", Q.Q5_K, (256, 512), rng),
                          qtensor("sd", Q.Q6_K, (512, 256), rng), rng.uniform(0, 1, (T, 1)).astype(np.float32))
    be = NumbaBackend(int8_activations=True)
    got = be.moe(x, experts, ids, wts, shared)
    ref = NumpyBackend().moe(x, experts, ids, wts, shared)
    assert np.linalg.norm(got - ref) <= 2 * INT8_NORM_REL * np.linalg.norm(ref)
    for t in range(min(T, 6)):  # per token too (over 100 random tokens the worst one reaches the bound, with or
        assert np.linalg.norm(got[t] - ref[t]) <= 2 * INT8_NORM_REL * np.linalg.norm(ref[t])  # without shared)
    assert (T * ids.shape[1] > K.MOE_FLAT_MAX_PAIRS) == (T == 100)
    assert np.array_equal(be.moe(x, _Batches(experts, 2), ids, wts, shared), got)
    # early batches (decode and short prompts): subsets of the step's experts in any order, the same bits
    assert np.array_equal(be.moe(x, _Batches(experts, 2, shuffled=True), ids, wts, shared), got)
    assert np.array_equal(be.moe(x, _Batches(experts, 1, shuffled=True), ids, wts, shared), got)
    if T == 1:
        apart = be.moe(x, experts, ids, wts) + shared.weight * be.swiglu(x, *shared[:3])
        assert np.array_equal(got, apart)


def test_model_with_32_block_fallback_types_runs_on_numba(fixtures_dir, tmp_path):
    """llama-quantize's K-quant mix writes Q5_0/Q5_1 for rows that are not whole 256-blocks (and other tools
    Q4_1/IQ4_NL); the numba backend refused them ('no Numba kernel for GGML type Q5_0'). A fixture model with
    dense, expert and shared-expert weights in those types gives the NumPy reference's logits."""
    import localcoder
    from gguf_edit import rewrite

    src = fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf"
    changes = {"blk.0.attn_gate.weight": Q.Q5_0, "blk.0.ssm_out.weight": Q.Q5_1, "blk.1.attn_qkv.weight": Q.Q4_1,
               "blk.3.attn_output.weight": Q.IQ4_NL, "blk.2.ffn_down_exps.weight": Q.Q5_0,
               "blk.2.ffn_up_exps.weight": Q.Q5_1, "blk.1.ffn_up_shexp.weight": Q.Q4_1}

    def transform(ts):
        for name, qtype in changes.items():
            old, raw = ts[name]
            w = dense(QTensor(name, old, (*raw.shape[:-1], raw.shape[-1] // K.KERNELS[old].size * K.KERNELS[old].block),
                              raw, 0, "x"))
            if qtype == Q.IQ4_NL:  # gguf-py cannot quantize IQ4_NL: Q4_0's blocks have its layout (d | 16 nibbles)
                q = gguf.quants.quantize(w.reshape(-1, w.shape[-1]), Q.Q4_0)
            else:
                q = gguf.quants.quantize(w.reshape(-1, w.shape[-1]), qtype)
            ts[name] = (qtype, q.reshape(*w.shape[:-1], -1))
        return ts

    (path,) = rewrite(src, [tmp_path / "mixed.gguf"], transform)
    ids = [750, 282, 579, 263, 580, 66, 72, 1000, 13, 2000] * 2
    ref = localcoder.load(path, backend="numpy")
    assert {ref.file.tensors[n].ggml_type for n in changes} == set(changes.values())
    model = localcoder.load(path, backend="numba")
    model.backend.int8 = False
    for n in (1, 3, len(ids)):  # matvec, row-decoded matmul, BLAS tiles; the experts for one and many tokens
        expect = ref.logits(ids[:n])
        assert rel_err(model.logits(ids[:n]), expect) <= REL


def test_expf_within_two_ulps():
    """The vectorisable exp behind the SiLU of prompts (numba_cpu.expf) against float64 exp over its whole
    range, within 2 float32 ulps; below the clamp it gives exp(-87) (about 1.6e-38), above it exp(88)."""
    from localcoder.backends.numba_cpu import expf_rows
    x = np.concatenate([np.linspace(-87, 88, 200_001), np.random.default_rng(0).standard_normal(10_000) * 5,
                        [0.0, -0.0, 1e-30, -1e-30, 88.0, -87.0]]).astype(np.float32)
    got = np.empty_like(x)
    expf_rows(x, got)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - want) / ulp).max() <= 2
    far = np.array([-200, -88, 89, 200], np.float32)
    out = np.empty_like(far)
    expf_rows(far, out)
    np.testing.assert_allclose(out, np.exp(np.float64([-87, -87, 88, 88])), rtol=3e-7)


@pytest.mark.parametrize("shape", [(300, 2048), (1, 70_000), (7, 128)])
def test_silu_kernel(shape):
    """be.silu on a prompt's gate (the parallel kernel from SILU_KERNEL_MIN elements on; NumPy's below) within
    float32 rounding of the reference, including large |x|."""
    x = (np.random.default_rng(shape[0]).standard_normal(shape) * 8).astype(np.float32)
    x.flat[:4] = [60.0, -60.0, 100.0, -100.0]
    with np.errstate(over="ignore"):  # NumPy's float32 exp(100) is inf (and silu(-100) then -0, as it should)
        got = NumbaBackend().silu(x)
    want = numpy_ref.silu(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
