"""Where the time goes: milliseconds per backend op (matmuls by weight type and shape) for decode steps or one
prefill, on a GGUF (default: the 8-layer synthetic Qwen3-Coder-Next written by `localcoder bench --synthetic`).

    python benchmarks/profile_ops.py                      # 32 decode steps after a 16-token prompt
    python benchmarks/profile_ops.py --prefill 128        # one 128-token prefill
    python benchmarks/profile_ops.py -m model.gguf --backend numba --threads 2

Each op is timed by wrapping the backend's method (the wrappers add a few microseconds per call); the line
"other" is the model's Python between ops. Nothing here is asserted in tests.
"""

import localcoder  # noqa: F401  (first: sets the OpenBLAS environment before numpy loads)

import argparse
import collections
import time

import numpy as np

from localcoder.backends import get_backend
from localcoder.generate import prefill
from localcoder.synthetic import ensure_synthetic

OPS = ["matmul", "matmuls", "moe", "topk_softmax", "swiglu", "gated_delta", "conv1d", "attention", "embed", "rms_norm", "l2_norm", "silu",
       "sigmoid", "softplus", "softmax", "rope"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF (default: the 8-layer synthetic file)")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    ap.add_argument("--steps", type=int, default=32, help="decode steps")
    args = ap.parse_args()
    path = args.model or ensure_synthetic("qwen3-coder-next", layers=8, quant="q4_k_m")
    be = get_backend(args.backend, threads=args.threads)
    model = localcoder.load(path, backend=be)
    ids = list(range(1000, 1000 + max(args.prefill, 16)))
    cache = model.new_cache()
    prefill(model, ids, cache)  # warm-up: kernels compiled or loaded, weights in memory
    model.forward([5], cache, all_logits=False)  # and the decode step's kernels (one-token signatures)
    if model.expert_store is not None:
        model.expert_store.wait()

    stats = collections.defaultdict(lambda: [0, 0.0])
    depth, outer = [0], [0.0]  # op nesting; seconds in outermost ops
    for name in OPS:
        f = getattr(be, name, None)
        if f is None:
            continue

        def wrapped(*a, _f=f, _n=name, **k):
            t = time.perf_counter()
            depth[0] += 1
            try:
                r = _f(*a, **k)
            finally:
                depth[0] -= 1
            key = _n
            if _n == "matmul":
                key = f"matmul T={a[0].shape[0]} {a[1].ggml_type.name} {a[1].shape}"
            elif _n == "matmuls":
                key = f"matmuls T={a[0].shape[0]} " + " + ".join(f"{w.ggml_type.name} {w.shape}" for w in a[1])
            if depth[0]:  # inside another op (matmuls falling back to matmul): listed, not added to the total
                key = f"  (inside) {key}"
            else:
                outer[0] += time.perf_counter() - t
            stats[key][0] += 1
            stats[key][1] += time.perf_counter() - t
            return r
        setattr(be, name, wrapped)

    t = time.perf_counter()
    if args.prefill:
        prefill(model, ids[:args.prefill], model.new_cache())
        n, unit = 1, "prefill"
    else:
        for i in range(args.steps):
            model.forward([7 + i], cache, all_logits=False)
        n, unit = args.steps, "token"
    total = time.perf_counter() - t
    print(f"{total / n * 1e3:.2f} ms per {unit}" + ("" if args.prefill else f" ({n / total:.1f} tokens/s)"))
    for key, (calls, secs) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"{secs / n * 1e3:9.2f} ms {calls // n:5d} calls  {key}")
    print(f"{(total - outer[0]) / n * 1e3:9.2f} ms        other (Python between ops)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
