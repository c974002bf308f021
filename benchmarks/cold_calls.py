"""What a small op costs right after a weight stream: why decode's glue between kernels matters.

Decode streams ~600 MB of weights per token (8-layer synthetic file), 5-25 MB per kernel call, and every
stream pushes the interpreter's code and objects, NumPy's and Numba's dispatch paths and the page tables
out of the caches. This times four tiny calls (a Python function, a NumPy add of 16 floats, a serial Numba
call, a parallel Numba call on 2 items) twice in a row after streaming S MB through the cores with the same
threads decode uses: the first call pays for the flushed caches ("cold"), the second does not ("warm").

    python benchmarks/cold_calls.py [--sizes 1 4 16 64 256] [--repeats 60] [--threads 2]

Nothing here is asserted in tests; figures drift with the host (the caches are shared with other VMs).
"""

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from localcoder.bench import _read_sum  # the bench's bandwidth sum: reads at memory speed on every thread


@njit(cache=True)
def serial_tiny(x):
    return x[0] + 1.0


@njit(cache=True, parallel=True)
def parallel_tiny(x, out):
    for i in prange(out.shape[0]):
        out[i] = x[i] + 1.0


def python_tiny(x):
    return x[0] + 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="MB streamed before")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    x, out = np.ones(16, np.float32), np.empty(2, np.float32)
    calls = {
        "Python call": lambda: python_tiny(x),
        "NumPy add (16 floats)": lambda: np.add(x, x),
        "serial Numba call": lambda: serial_tiny(x),
        "parallel Numba call": lambda: parallel_tiny(x, out),
    }
    for fn in calls.values():
        fn()
    print(f"{numba.get_num_threads()} threads; median microseconds per call, right after streaming S MB "
          f"(cold) and repeated at once (warm), {args.repeats} times each")
    print(f"{'call':24s}" + "".join(f"{f'{s} MB':>16s}" for s in args.sizes))
    nchunks = 4 * numba.get_num_threads()
    big = {s: np.ones((s << 12, 64), np.float32) for s in args.sizes}  # S MB as (rows, 64) for _read_sum
    for a in big.values():
        _read_sum(a, nchunks)
    for name, fn in calls.items():
        row = []
        for s in args.sizes:
            cold, warm = [], []
            for _ in range(args.repeats):
                _read_sum(big[s], nchunks)
                t = time.perf_counter()
                fn()
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                fn()
                warm.append(time.perf_counter() - t)
            row.append(f"{np.median(cold) * 1e6:6.1f} / {np.median(warm) * 1e6:4.1f}")
        print(f"{name:24s}" + "".join(f"{r:>16s}" for r in row))
    print("(cold / warm)")


if __name__ == "__main__":
    main()
