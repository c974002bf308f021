"""Quantizer speed: M weights/s per core for Q8_0, Q4_0, Q4_K, Q5_K and Q6_K, on 1 and 2 threads, against
the reference implementations (gguf-py's NumPy Q8_0/Q4_0; our line-by-line scalar ports of ggml's C for the
K-quants, which is what a straightforward port runs at).

    python benchmarks/quantize_speed.py                    # 1024 x 2048 weights, N(0, 0.02) rounded to bf16
    python benchmarks/quantize_speed.py --rows 4096 --reps 5

"1 thread" is wall-clock and the thread's CPU time (the latter is robust to other load on the machine);
"2 threads" is wall-clock, total and per core. The last lines estimate the time to quantize
Qwen3-Coder-Next (79.7B weights: 48 layers, 512 experts) to Q4_K_M on 2 cores from these figures and
llama-quantize's type mix for that model (disk reads and bf16 decoding excluded). The issue's target is
Q4_K at >= 50 M weights/s per core (the 80B model in under 15 minutes on 2 cores).
Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np

from localcoder.quant import quantizers as Qz
from localcoder.quant.convert import OUT_TYPES, llama_order, mix_types

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def timed(fn, reps: int) -> tuple[float, float]:
    """Best (wall, thread CPU) seconds of reps calls."""
    wall = cpu = float("inf")
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.thread_time() - c0)
    return wall, cpu


def qwen3_coder_next_tensors() -> list[tuple[str, tuple[int, ...]]]:
    D, V, E, F = 2048, 151936, 512, 512
    shapes = {"output.weight": (V, D), "token_embd.weight": (V, D)}
    for i in range(48):
        b = f"blk.{i}."
        shapes.update({b + "ffn_gate_exps.weight": (E, F, D), b + "ffn_up_exps.weight": (E, F, D),
                       b + "ffn_down_exps.weight": (E, D, F), b + "ffn_gate_shexp.weight": (F, D),
                       b + "ffn_up_shexp.weight": (F, D), b + "ffn_down_shexp.weight": (D, F),
                       b + "ffn_gate_inp.weight": (E, D), b + "ffn_gate_inp_shexp.weight": (1, D)})
        if i % 4 == 3:
            shapes.update({b + "attn_q.weight": (8192, D), b + "attn_k.weight": (512, D),
                           b + "attn_v.weight": (512, D), b + "attn_output.weight": (D, 4096)})
        else:
            shapes.update({b + "attn_qkv.weight": (8192, D), b + "attn_gate.weight": (4096, D),
                           b + "ssm_ba.weight": (64, D), b + "ssm_out.weight": (D, 4096),
                           b + "ssm_conv1d.weight": (8192, 4)})
    return sorted(shapes.items(), key=lambda t: llama_order(t[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ref-rows", type=int, default=64, help="rows for the (slow) reference implementations")
    args = ap.parse_args()

    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols), np.float32) * np.float32(0.02))
    x = ((x.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)
    xr = np.ascontiguousarray(x[:args.ref_rows])
    per_core: dict[Q, float] = {}   # from the 2-thread wall time
    cpu_rate: dict[Q, float] = {}   # from one thread's CPU time
    print(f"{args.rows} x {args.cols} weights; M weights/s")
    print(f"{'type':6} {'1 thread wall':>14} {'1 thread cpu':>13} {'2 threads total':>16} {'per core':>9} "
          f"{'reference':>10} {'speed-up':>9}")
    for t in TYPES:
        for threads in (1, 2):
            Qz.quantize(x[:64], t, threads=threads)  # compile / load the cache
        w1, c1 = timed(lambda: Qz.quantize(x, t, threads=1), args.reps)
        w2, _ = timed(lambda: Qz.quantize(x, t, threads=2), args.reps)
        ref = (lambda: gguf.quants.quantize(xr, t)) if t in (Q.Q8_0, Q.Q4_0) else (lambda: Qz.quantize_ref(xr, t))
        ref()
        wr, _ = timed(ref, 1)
        m = x.size / 1e6
        per_core[t] = m / w2 / 2
        cpu_rate[t] = m / c1
        print(f"{t.name:6} {m / w1:14.1f} {m / c1:13.1f} {m / w2:16.1f} {m / w2 / 2:9.1f} "
              f"{xr.size / 1e6 / wr:10.2f} {(x.size / w1) / (xr.size / wr):9.1f}x")

    tensors = qwen3_coder_next_tensors()
    weights: dict[Q, int] = {}
    for (name, shape), t in zip(tensors, mix_types(tensors, OUT_TYPES["q4_k_m"], 512, 48)):
        if t is not None:
            weights[t] = weights.get(t, 0) + int(np.prod(shape))
    mix = ", ".join(f"{t.name} {n / 1e9:.1f}B" for t, n in sorted(weights.items(), key=lambda kv: -kv[1]))
    print(f"Qwen3-Coder-Next Q4_K_M mix: {mix}")
    for what, rate in (("measured 2-thread wall time", per_core), ("1-thread CPU time x 2 cores", cpu_rate)):
        seconds = sum(n / (rate[t] * 2e6) for t, n in weights.items())
        print(f"estimated time on 2 cores from the {what}: {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
