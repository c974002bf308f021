"""How the expert store should read from disk: GB/s and CPU seconds per GB read for expert-sized reads at
random places in a model file, three ways: pread through the page cache (readahead off, pages dropped after
each read, as the store did before), O_DIRECT straight into a buffer that lines up with the file offset (the
store's slots), and O_DIRECT through RawReader's bounce buffer (a destination that does not line up).
CPU time matters because streamed reads overlap decode on the same cores.

    python benchmarks/disk_reads.py MODEL.gguf [--threads 8] [--reads 200] [--size 1179648] [--rounds 2]
    python benchmarks/disk_reads.py MODEL.gguf --bursts 19 [--size 589824] [--gap-ms 2]

--bursts N reads the way decode does: N reads queued at once (a layer's expert misses: ~6 experts x 3
tensors on the 48-layer synthetic file), wait for all, pause --gap-ms (the layer's compute), repeat; it
prints GB/s within the bursts next to as many reads all queued at once (how the disk bandwidth is measured).

Use a file much larger than RAM, or drop the page cache first (echo 3 > /proc/sys/vm/drop_caches), so reads
reach the disk.
"""

import argparse
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from localcoder.gguf_file import ALIGN, RawReader, aligned_empty


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(reader: RawReader, offsets: list[int], size: int, threads: int, line_up: bool) -> tuple[float, float]:
    """(GB/s, CPU s per GB) for reading `size` bytes at each offset on `threads` threads."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(reader.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    dst = [aligned_empty((size,), offsets[0] + (0 if line_up else 16)) for _ in range(threads)]
    for d in dst:  # touched before timing: the store's slots are long-lived
        d[:] = 0

    def read(i: int) -> int:
        return reader.read(dst[i % threads], offsets[i])

    c, t = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(read, range(len(offsets))))
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - c
    return done / seconds / 1e9, cpu / (done / 1e9)


def bursts(reader: RawReader, size_file: int, n: int, size: int, threads: int, gap_s: float, total: int,
           rng) -> None:
    """GB/s over the time spent inside bursts of n reads, with and without a pause between bursts."""
    dst = [aligned_empty((size,), 0) for _ in range(n)]
    for d in dst:
        d[:] = 0
    rounds = max(1, total // n)
    with ThreadPoolExecutor(threads) as pool:
        busy, done = 0.0, 0
        for _ in range(rounds):
            offsets = [int(o) // ALIGN * ALIGN for o in rng.integers(0, size_file - size - ALIGN, n)]
            t = time.perf_counter()
            done += sum(pool.map(lambda i: reader.read(dst[i], offsets[i]), range(n)))
            busy += time.perf_counter() - t
            time.sleep(gap_s)
        print(f"bursts of {n}, {gap_s * 1e3:g} ms apart      {done / busy / 1e9:5.2f} GB/s while reading "
              f"({busy / rounds * 1e3:.1f} ms per burst of {n} x {size / 1e6:.2f} MB)")
        offsets = [int(o) // ALIGN * ALIGN for o in rng.integers(0, size_file - size - ALIGN, rounds * n)]
        t = time.perf_counter()
        done = sum(pool.map(lambda i: reader.read(dst[i % n], offsets[i]), range(rounds * n)))
        print(f"the same reads all queued     {done / (time.perf_counter() - t) / 1e9:5.2f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--size", type=int, default=2 * 589_824, help="bytes per read (default: two Q4_K expert tensors)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bursts", type=int, default=0, help="reads per burst (decode's pattern); 0: the three ways")
    ap.add_argument("--gap-ms", type=float, default=2.0, help="pause between bursts")
    args = ap.parse_args()
    size_file = os.path.getsize(args.model)
    rng = np.random.default_rng(0)
    buffered, direct = RawReader(args.model, direct=False), RawReader(args.model)
    if args.bursts:
        for r in range(args.rounds):
            bursts(direct, size_file, args.bursts, args.size, args.threads, args.gap_ms / 1e3, 800, rng)
        return
    if not direct.direct:
        print("O_DIRECT is not available for this file here; only the page-cache path can be measured")
    ways = [("pread via page cache", buffered, True)]
    if direct.direct:
        ways += [("O_DIRECT in place", direct, True), ("O_DIRECT via bounce buffer", direct, False)]
    print(f"{args.reads} reads of {args.size / 1e6:.2f} MB at random offsets, {args.threads} threads")
    for r in range(args.rounds):
        for name, reader, line_up in ways:  # fresh offsets for every run: no read finds its pages cached
            base = rng.integers(0, size_file - args.size - ALIGN, args.reads)
            offsets = [int(o) // ALIGN * ALIGN + 1344 for o in base]  # a GGUF tensor's offset is rarely aligned
            gbs, cpu = run(reader, offsets, args.size, args.threads, line_up)
            print(f"round {r + 1}  {name:28s} {gbs:5.2f} GB/s  {cpu:.3f} CPU s/GB")
    buffered.close()
    direct.close()


if __name__ == "__main__":
    main()
