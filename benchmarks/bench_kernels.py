"""GB/s of the Numba matvec kernels per quant type, against the measured read bandwidth.

    python benchmarks/bench_kernels.py [--threads 2] [--types Q4_K,Q6_K]
    python benchmarks/bench_kernels.py --threads 2 --moe      # one decode step's routed experts
    python benchmarks/bench_kernels.py --threads 2 --delta    # DeltaNet kernels by prompt length
    python benchmarks/bench_kernels.py --threads 2 --crossover  # prompt products: 8-bit kernel vs BLAS tiles
    python benchmarks/bench_kernels.py --threads 2 --attention  # one attention layer over a 4K / 32K cache

Shapes: an expert-sized 2048 x 512... matrix (512 rows of 2048: one gate/up projection, 0.6 MB at Q4_K, so
cache-resident: the kernel's compute speed) and the output head, 151936 x 2048 (streamed from memory).
GB/s = bytes of the weight / time per matvec, for float32 activations (matvec) and, where the CPU has
AVX-512 VNNI, 8-bit Q8_K activations (matvec_q8: Q4_K, Q5_K, Q6_K, Q8_0; the decode default). Also the row
dequantization speed (used by prefill tiles).
"""

import argparse
import time

import gguf
import numba
import numpy as np

from localcoder.bench import measure_read_bandwidth
from localcoder.quant import kernels as K

Q = gguf.GGMLQuantizationType


def random_rows(qtype, n_rows, n_cols, rng):
    kern = K.KERNELS[qtype]
    nbytes = n_rows * n_cols // kern.block * kern.size
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8).reshape(n_rows, -1)
    if kern.block == 1:  # float types: finite values
        raw = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        raw = {Q.F32: raw, Q.F16: raw.astype(np.float16), Q.BF16: (raw.view(np.uint32) >> 16).astype(np.uint16)}[qtype]
        return raw.view(np.uint8)
    return raw


def timeit(f, min_time=0.5):
    f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        f()
        n += 1
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--types", default=",".join(t.name for t in K.KERNELS))
    ap.add_argument("--delta", action="store_true", help="gated delta: recurrent vs chunked prompt kernels")
    ap.add_argument("--moe", action="store_true", help="one decode step's routed experts (NumbaBackend.moe)")
    ap.add_argument("--calls", action="store_true", help="many small matvecs, one call each, vs one call for all")
    ap.add_argument("--crossover", action="store_true", help="prompt matmuls: 8-bit kernel vs dequantized tiles + BLAS")
    ap.add_argument("--attention", action="store_true", help="one attention layer over a long KV cache (decode, prompt)")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    if args.delta:
        return bench_delta()
    if args.moe:
        return bench_moe()
    if args.calls:
        return bench_calls()
    if args.crossover:
        return bench_crossover()
    if args.attention:
        return bench_attention()
    nchunks = 4 * args.threads
    rng = np.random.default_rng(0)
    bw = measure_read_bandwidth(threads=args.threads)
    print(f"threads {args.threads}; measured read bandwidth {bw:.1f} GB/s")
    print(f"{'type':8} {'acts':5} {'expert 512x2048 matvec':>24} {'output 151936x2048 matvec':>26} {'dequant rows':>14}")
    for name in args.types.split(","):
        if name.upper() not in Q.__members__:
            raise SystemExit(f"unknown type {name!r}; choose from {', '.join(t.name for t in K.KERNELS)}")
        qtype = Q[name.upper()]
        code = K.KERNELS[qtype].code
        int8 = K.HAVE_VNNI and code in K.Q8_CODES
        rows = {"f32": [], "int8": []}
        for n in (512, 151936):
            w = random_rows(qtype, n, 2048, rng)
            x = rng.standard_normal(2048).astype(np.float32)
            out = np.empty(n, np.float32)
            runs = [("f32", lambda: K.matvec(code, w, x, K.F16_LUT, out, nchunks))]
            if int8:
                runs.append(("int8", lambda: K.matvec_q8(code, w, x, out, nchunks)))
            for acts, f in runs:
                dt = timeit(f)
                rows[acts].append(f"{w.nbytes / dt / 1e9:6.1f} GB/s {dt * 1e3:8.3f} ms")
            del w
        w = random_rows(qtype, 1024, 2048, rng)
        out = np.empty((1024, 2048), np.float32)
        dt = timeit(lambda: K.dequant_rows(code, w, K.F16_LUT, out, nchunks))
        deq = f"{1024 * 2048 / dt / 1e9:5.2f} Gw/s"
        print(f"{name:8} {'f32':5} {rows['f32'][0]:>24} {rows['f32'][1]:>26} {deq:>14}")
        if int8:
            print(f"{name:8} {'int8':5} {rows['int8'][0]:>24} {rows['int8'][1]:>26}")

def bench_delta():
    """ms per layer of the DeltaNet recurrence over T tokens (32 value heads, 128 x 128 state): the decode
    step kernel (state updated in place, as NumbaBackend.gated_delta runs it), the tiled recurrent kernel and
    the chunked (batched BLAS) form."""
    from localcoder.backends.numba_cpu import gated_delta_chunked, gated_delta_recurrent, gated_delta_step
    rng = np.random.default_rng(0)
    H, Dk, Dv = 32, 128, 128
    print(f"{'T':>5} {'step':>12} {'tiled':>12} {'chunked':>12}")
    for T in (1, 16, 64, 128, 512):
        q = (0.05 * rng.standard_normal((T, H, Dk))).astype(np.float32)
        v = rng.standard_normal((T, H, Dv)).astype(np.float32)
        g, beta = np.full((T, H), -0.1, np.float32), np.full((T, H), 0.5, np.float32)
        state = (0.01 * rng.standard_normal((H, Dk, Dv))).astype(np.float32)
        out = np.empty((T, H, Dv), np.float32)
        # in place, as the backend runs it (the state decays with g, so repeated calls stay finite)
        step = timeit(lambda: gated_delta_step(q, q, v, g, beta, state, state, out))
        rec = timeit(lambda: gated_delta_recurrent(q, q, v, g, beta, state, np.empty_like(state), out))
        chk = timeit(lambda: gated_delta_chunked(q, q, v, g, beta, state))
        print(f"{T:5d} {step * 1e3:9.2f} ms {rec * 1e3:9.2f} ms {chk * 1e3:9.2f} ms")


def bench_calls(shapes=((512, 2048), (2048, 512), (4096, 2048)), total=256 << 20):
    """GB/s of 8-bit matvecs over many distinct small matrices (`total` bytes, so they come from memory), one
    kernel call per matrix, against one call over all their rows at once: the cost of starting a call on
    memory that is not in the caches (the model's router, ssm_out and shared-expert products are such calls)."""
    rng = np.random.default_rng(0)
    nchunks = 4 * numba.get_num_threads()
    print(f"threads {numba.get_num_threads()}; {total >> 20} MB of matrices per pass")
    for qtype in (Q.Q4_K, Q.Q6_K):
        kern = K.KERNELS[qtype]
        code = kern.code
        for n, k in shapes:
            count = max(2, total // (n * k // kern.block * kern.size))
            stack = random_rows(qtype, n * count, k, rng)
            mats = [stack[i * n:(i + 1) * n] for i in range(count)]
            x = rng.standard_normal(k).astype(np.float32)
            out, big = np.empty(n, np.float32), np.empty(n * count, np.float32)
            K.matvec_q8(code, mats[0], x, out, nchunks)
            each = timeit(lambda: [K.matvec_q8(code, m, x, out, nchunks) for m in mats])
            whole = timeit(lambda: K.matvec_q8(code, stack, x, big, nchunks))
            print(f"{qtype.name:5} {n:5d}x{k:<5d} one call each {stack.nbytes / each / 1e9:5.1f} GB/s "
                  f"({each / count * 1e6:5.1f} us per call), one call for all {stack.nbytes / whole / 1e9:5.1f} GB/s")


def bench_crossover(shapes=((Q.Q5_K, 8192, 2048), (Q.Q4_K, 4096, 2048), (Q.Q6_K, 2048, 512)),
                    lengths=(64, 128, 192, 256, 384, 512)):
    """ms per prompt product through NumbaBackend.matmul, T tokens: the 8-bit activation kernel (4 tokens per
    pass over a weight row) against dequantized row tiles + BLAS; numba_cpu.Q8_MATMUL_MAX_TOKENS picks between
    them by prompt length (the DeltaNet input projection, an output projection, an expert-sized down matrix)."""
    from localcoder.backends import numba_cpu
    from localcoder.backends.numba_cpu import NumbaBackend
    from localcoder.gguf_file import QTensor, readonly
    np.seterr(invalid="ignore", over="ignore")  # random bytes: some blocks' scales are inf or nan
    rng = np.random.default_rng(0)
    be = NumbaBackend()
    threshold = numba_cpu.Q8_MATMUL_MAX_TOKENS
    print(f"threads {numba.get_num_threads()}; now 8-bit below {threshold} tokens")
    print(f"{'weight':22} " + " ".join(f"{f'T={T}':>15}" for T in lengths) + "   (8-bit / BLAS ms)")
    try:
        for qtype, n, k in shapes:
            w = QTensor("w", qtype, (n, k), readonly(random_rows(qtype, n, k, rng)), 0, "bench")
            cells = []
            for T in lengths:
                x = rng.standard_normal((T, k)).astype(np.float32)
                numba_cpu.Q8_MATMUL_MAX_TOKENS = 1 << 30
                q8 = timeit(lambda: be.matmul(x, w), 0.3)
                numba_cpu.Q8_MATMUL_MAX_TOKENS = 0
                blas = timeit(lambda: be.matmul(x, w), 0.3)
                cells.append(f"{q8 * 1e3:6.1f} / {blas * 1e3:6.1f}")
            print(f"{qtype.name} {n}x{k}".ljust(22) + " " + " ".join(f"{c:>15}" for c in cells))
    finally:
        numba_cpu.Q8_MATMUL_MAX_TOKENS = threshold


def bench_attention(contexts=(4096, 32768), kv_dtypes=(np.float32, np.float16)):
    """ms per attention layer of Qwen3-Coder-Next (16 q / 2 kv heads, head dim 256) through NumbaBackend.attention
    over a cache of S positions: one decoded token, and the last 64 tokens of a prompt of S. For decode, also
    the time the cache's bytes take at the measured read bandwidth (the floor a decode step could reach)."""
    from localcoder.backends.numba_cpu import NumbaBackend
    rng = np.random.default_rng(0)
    be = NumbaBackend()
    Hq, Hkv, D = 16, 2, 256
    bw = measure_read_bandwidth(threads=numba.get_num_threads())
    print(f"threads {numba.get_num_threads()}; measured read bandwidth {bw:.1f} GB/s; ms per layer "
          "(decode: 1 token; prompt: its last 64 tokens)")
    for dt in kv_dtypes:
        for S in contexts:
            k = rng.standard_normal((S, Hkv, D)).astype(dt)
            v = rng.standard_normal((S, Hkv, D)).astype(dt)
            cells = []
            for T in (1, 64):
                q = rng.standard_normal((T, Hq, D)).astype(np.float32)
                pos = np.arange(S - T, S)
                ms = timeit(lambda: be.attention(q, k, v, pos)) * 1e3
                cells.append(f"{'decode' if T == 1 else 'prompt'} {ms:8.2f}")
            floor = 2 * k.nbytes / (bw * 1e9) * 1e3
            print(f"{np.dtype(dt).name} cache, S={S:6d}: " + "   ".join(cells) +
                  f"   (decode reads {2 * k.nbytes / 1e6:.0f} MB: {floor:.2f} ms at {bw:.0f} GB/s)")


def bench_moe(sets=8, n_expert=64, k=10, steps=400):
    """GB/s of one decode token's routed experts through NumbaBackend.moe: k of n_expert Q4_K gate/up + Q6_K
    down experts (2048 x 512, the Qwen3-Coder-Next shape), drawn afresh each step from `sets` layers' worth
    (1 GB in all), so the experts come from memory, not the caches."""
    from localcoder.backends.numba_cpu import NumbaBackend
    from localcoder.experts import ExpertSet
    from localcoder.gguf_file import QTensor, readonly
    rng = np.random.default_rng(0)
    D, F = 2048, 512

    def tensor(name, qtype, shape):
        rows = random_rows(qtype, int(np.prod(shape[:-1])), shape[-1], rng).reshape(*shape[:-1], -1)
        return QTensor(name, qtype, shape, readonly(rows), 0, "bench")  # read-only, as the model's weights

    layers = [ExpertSet(i, tensor("down", Q.Q6_K, (n_expert, D, F)), gate=tensor("gate", Q.Q4_K, (n_expert, F, D)),
                        up=tensor("up", Q.Q4_K, (n_expert, F, D))) for i in range(sets)]
    be = NumbaBackend()
    x = (0.1 * rng.standard_normal((1, D))).astype(np.float32)
    picks = [np.sort(rng.choice(n_expert, k, replace=False))[None] for _ in range(64)]
    w = np.full((1, k), 1 / k, np.float32)
    be.moe(x, layers[0], picks[0], w)
    t0 = time.perf_counter()
    for i in range(steps):
        be.moe(x, layers[i % sets], picks[i % 64], w)
    dt = (time.perf_counter() - t0) / steps
    nbytes = k * sum(t.data[0].nbytes for t in (layers[0].gate, layers[0].up, layers[0].down))
    print(f"threads {numba.get_num_threads()}; {k} routed experts of {n_expert}, one token: "
          f"{dt * 1e3:.3f} ms, {nbytes / 1e6:.1f} MB, {nbytes / dt / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
