"""Read bandwidth by read size: the same threaded sum `localcoder bench` uses for the roofline (1 GiB), over
buffers the size of the decode step's weight matrices, each read once in turn (about 800 MB of buffers, so
no read finds its buffer in the caches). Shows what one matrix-vector product could reach at best on this
machine; compare with the per-op GB/s of benchmarks/profile_ops.py.

    python benchmarks/read_bandwidth.py [--threads 2]
"""

import localcoder  # noqa: F401  (first: sets the OpenBLAS environment before numpy loads)

import argparse
import time

import numba
import numpy as np

from localcoder.bench import _read_sum

# (label, bytes) at the 8-layer synthetic Qwen3-Coder-Next's Q4_K_M mix
SIZES = [("router F32 512x2048 / ssm_out Q4_K", 4_194_304), ("one layer's 10 routed experts", 18_000_000),
         ("attn_qkv Q5_K 8192x2048", 11_534_336), ("64 MB", 64 << 20), ("output Q6_K 151936x2048", 255_295_488),
         ("1 GiB (the roofline's figure)", 1 << 30)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    nchunks = 4 * args.threads
    print(f"threads {args.threads}")
    for label, nbytes in SIZES:
        rows = nbytes // 256
        bufs = [np.ones((rows, 64), np.float32) for _ in range(max(1, (800 << 20) // nbytes))]
        _read_sum(bufs[0][:16], nchunks)
        reps = max(8, 2 * len(bufs))
        t = time.perf_counter()
        for i in range(reps):
            _read_sum(bufs[i % len(bufs)], nchunks)
        dt = (time.perf_counter() - t) / reps
        print(f"{label:38s} {nbytes / 1e6:8.1f} MB {dt * 1e3:8.3f} ms {rows * 256 / dt / 1e9:6.1f} GB/s")
        del bufs


if __name__ == "__main__":
    main()
