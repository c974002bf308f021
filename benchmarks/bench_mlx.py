"""MLX backend speed on the synthetic Qwen3-Coder-Next GGUF: pp (prompt tokens/s) and tg (generated tokens/s).

    python benchmarks/bench_mlx.py                       # pp128 / tg32 on the 8-layer Q4_K_M synthetic file
    python benchmarks/bench_mlx.py --layers 4 --pp 32 --tg 8 --q6-k exact

The file (random weights, the real dimensions, llama.cpp's Q4_K_M type mix; ~7.9 GiB at 8 layers) is written
once to ~/.localcoder/synthetic/, the file `localcoder bench --synthetic` uses. Weight conversion to MLX's
layout happens on first use and is timed apart (a warm-up prefill converts every layer's experts when they
are resident); the figures are steady-state. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a qwen3next GGUF (default: the synthetic file, written if absent)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic file (multiple of 4)")
    ap.add_argument("--pp", type=int, default=128, help="prompt tokens")
    ap.add_argument("--tg", type=int, default=32, help="generated tokens")
    ap.add_argument("--q6-k", default="int8", choices=["int8", "exact"], help="Q6_K mapping")
    ap.add_argument("--expert-budget-gib", type=float, default=None,
                    help="bytes of converted experts to hold (default: 70%% of available memory); layers "
                         "past it stream their experts through an LRU cache")
    ap.add_argument("--ops", action="store_true", help="only the device's matrix-vector speed per weight format")
    args = ap.parse_args()

    import mlx.core as mx

    if args.ops:
        return bench_ops(mx)

    import localcoder
    from localcoder.backends.mlx_backend import MLXBackend
    from localcoder.memory import peak_rss_bytes
    from localcoder.synthetic import ensure_synthetic

    path = args.model or ensure_synthetic("qwen3-coder-next", args.layers, "q4_k_m",
                                          announce=lambda msg: print(msg, flush=True))
    budget = None if args.expert_budget_gib is None else int(args.expert_budget_gib * 2 ** 30)
    be = MLXBackend(q6_k=args.q6_k, expert_budget=budget)
    model = localcoder.load(path, backend=be, n_ctx=4096)
    cfg = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.n_vocab, args.pp).tolist()

    t0 = time.perf_counter()
    model.forward(prompt, model.new_cache(), all_logits=False)  # converts the weights it touches
    warm = time.perf_counter() - t0

    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache, all_logits=False)
    pp = time.perf_counter() - t0
    token = int(np.argmax(logits[-1]))
    t0 = time.perf_counter()
    for _ in range(args.tg):
        token = int(np.argmax(model.forward([token], cache, all_logits=False)[-1]))
    tg = time.perf_counter() - t0

    rss = peak_rss_bytes() / 2 ** 20
    s = be.experts
    streamed = sum(v is None for v in s.layers.values())
    mode = f"{len(s.layers) - streamed} layers resident ({s.resident_bytes / 2 ** 30:.1f} GiB), {streamed} streamed"
    print(f"{path.name}: {cfg.n_layer} layers, MLX {mx.__version__} on {mx.default_device()}, q6_k={args.q6_k}, "
          f"experts {mode}")
    print(f"warm-up (weight conversion + first prefill): {warm:.1f} s; peak RSS {rss:.1f} GiB")
    print(f"pp{args.pp}: {args.pp / pp:.2f} tokens/s ({pp:.2f} s)")
    print(f"tg{args.tg}: {args.tg / tg:.2f} tokens/s ({tg / args.tg * 1e3:.0f} ms/token)")
    if streamed:
        print(f"expert cache: {s.hits} hits, {s.misses} misses, {s.bytes / 2 ** 30:.2f} GiB held")


def bench_ops(mx) -> None:
    """GB/s of one-token matrix-vector products on MLX's default device: the ceiling of any MLX decode path."""
    print(f"MLX {mx.__version__} on {mx.default_device()}: (1 x 2048) @ (32768 x 2048)^T")
    x32 = mx.random.normal((1, 2048))
    for label, bits in (("4-bit group 32", 4), ("8-bit group 32", 8), ("float32", None), ("bfloat16", 16)):
        w = mx.random.normal((32768, 2048))
        if bits in (4, 8):
            wq, sc, bi = mx.quantize(w, group_size=32, bits=bits)
            mx.eval(wq, sc, bi)
            nbytes = wq.nbytes + sc.nbytes + bi.nbytes

            def f():
                return mx.quantized_matmul(x32, wq, sc, bi, transpose=True, group_size=32, bits=bits)
        else:
            w = w.astype(mx.bfloat16) if bits == 16 else w
            x = x32.astype(w.dtype)
            mx.eval(w, x)
            nbytes = w.nbytes

            def f():
                return x @ w.T
        mx.eval(f())
        t0 = time.perf_counter()
        for _ in range(5):
            mx.eval(f())
        dt = (time.perf_counter() - t0) / 5
        print(f"  {label:16} {dt * 1e3:8.2f} ms  {nbytes / dt / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    main()
