"""Speed figures: memory read bandwidth, prompt and generation tokens/s, bytes of weights read per token.

The roofline of decoding is (read bandwidth) / (weight bytes read per token): every generated token reads
every dense weight, the routed experts' bytes and one embedding row.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
from numba import njit, prange

from .errors import LocalcoderError
from .memory import peak_rss_bytes


@njit(cache=True, parallel=True, fastmath=True)
def _read_sum(a, nchunks):
    """Sum of a (n, 64) float32: 64 independent accumulators per chunk, so the loads run at memory speed
    (one accumulator would make the sum latency-bound: 23 vs 31.5 GB/s on the 2-core machine)."""
    n = a.shape[0]
    step = (n + nchunks - 1) // nchunks
    part = np.zeros((nchunks, 64), np.float32)
    for c in prange(nchunks):
        acc = np.zeros(64, np.float32)
        for r in range(c * step, min(n, (c + 1) * step)):
            for j in range(64):
                acc[j] += a[r, j]
        part[c] = acc
    return part.sum()


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int | None = None) -> float:
    """Read bandwidth in GB/s (1e9 B/s): the best of `repeats` threaded sums over a buffer much larger than
    the caches (1 GiB by default)."""
    import numba
    if threads:
        numba.set_num_threads(threads)
    a = np.ones((nbytes // 256, 64), np.float32)
    nchunks = 4 * numba.get_num_threads()
    _read_sum(a[:16], nchunks)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _read_sum(a, nchunks)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoded token reads: dense weights of every layer and the output head, the
    routed experts (n_expert_used per layer) and one embedding row."""
    w, cfg = model.weights, model.config
    total = w.token_embd.data.shape[-1] + w.output.nbytes + w.output_norm.nbytes
    for layer in w.layers:
        total += sum(t.nbytes for t in layer.tensors.values())
        total += cfg.n_expert_used * layer.experts.expert_nbytes()
    return int(total)


def process_start_time() -> float:
    """Wall-clock time (time.time()) at which this process started (Linux /proc; else now)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


def disk_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes), or -1."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration):
        return -1


def measure_disk_bandwidth(path, nbytes: int = 1 << 30, chunk: int = 768 << 10, threads: int | None = None) -> float:
    """Read bandwidth of the file's storage in GB/s, read the way the expert store reads: `threads` threads of
    `chunk`-byte reads (one expert tensor's size), `nbytes` in all at places drawn afresh each call from the
    whole file (as routed experts are; a fixed range read by every run came back from the host's cache at up
    to 3.5 GB/s on a VM whose expert reads ran at 2-3), through RawReader (past the page cache where the
    system allows; else readahead off, after dropping those pages from the page cache), so it measures the
    disk, not RAM."""
    from concurrent.futures import ThreadPoolExecutor

    from .experts import IO_THREADS
    from .gguf_file import ALIGN, RawReader, aligned_empty
    from .threads import background_thread

    threads = threads or IO_THREADS
    reader = RawReader(path)
    try:
        size = os.fstat(reader.fd).st_size
        slots = max(size // chunk, 1)
        count = max(1, min(nbytes, size) // chunk)
        start = max((size - slots * chunk) // 2 // ALIGN * ALIGN, 0)  # chunk boundaries: start + k * chunk
        drawn = np.random.default_rng().choice(slots, min(count, slots), replace=False)
        offsets = [start + int(k) * chunk for k in drawn]
        if hasattr(os, "posix_fadvise"):
            for off in offsets:
                os.posix_fadvise(reader.fd, off, chunk, os.POSIX_FADV_DONTNEED)

        local = threading.local()  # one buffer per thread, lined up with the offsets (all start + k * chunk)

        def read(off: int) -> int:
            if not hasattr(local, "buf"):
                local.buf = aligned_empty((chunk,), start)
            return reader.read(local.buf, off)

        t = time.perf_counter()
        with ThreadPoolExecutor(threads, initializer=background_thread) as pool:
            done = sum(pool.map(read, offsets))
        return done / (time.perf_counter() - t) / 1e9
    finally:
        reader.close()


PP_REPEATS = 3


def run_bench(model_path, backend: str = "auto", prompt_tokens: int = 512, gen_tokens: int = 128,
              threads: int | None = None, seed: int = 0, expert_cache=None, expert_policy: str = "lru",
              expert_prefetch: bool = False, depth: int = 0, kv_type: str = "f32", announce=None) -> dict:
    """Prompt processing (the median of PP_REPEATS prefills of `prompt_tokens` random ids) and generation
    (`gen_tokens` greedy single-token steps after it) on the model at model_path; returns the figures as a dict.
    With depth > 0 (llama-bench's -d) the context first holds `depth` random tokens, prefilled once (and
    announced: minutes at 32K); each timed prefill starts from that point and generation continues after it.

    With expert streaming (an expert cache smaller than the experts) it also reports the cache counters,
    bytes read from disk per token, the disk bandwidth and the limit they imply."""
    import localcoder
    from .generate import prefill

    started = process_start_time()
    model = localcoder.load(model_path, backend=backend, threads=threads, expert_cache=expert_cache,
                            expert_policy=expert_policy, expert_trace=True, expert_prefetch=expert_prefetch,
                            kv_type=kv_type)
    store = model.expert_store
    n_threads = getattr(model.backend, "threads", threads or 1)
    needed = depth + prompt_tokens + gen_tokens
    if needed > model.config.n_ctx_train:
        raise LocalcoderError(f"depth {depth:,} + {prompt_tokens:,} prompt + {gen_tokens:,} generated tokens need "
                              f"{needed:,} positions, more than the model's trained context "
                              f"({model.config.n_ctx_train:,}): lower -d/--depth, -p or -n")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(model.config.n_vocab, 150000), prompt_tokens).tolist()
    depth_ids = rng.integers(0, min(model.config.n_vocab, 150000), depth).tolist()
    # first token from a cold start (process start -> logits of a one-token prompt): imports, kernels from
    # Numba's cache, the header, the dense weights and one token's experts read from disk
    cache = model.new_cache()
    prefill(model, ids[:1], cache)
    first_token_s = time.time() - started
    if prompt_tokens > 1:
        prefill(model, ids[1:min(16, prompt_tokens)], cache)  # warm-up: every kernel shape prefill uses
    model.forward([ids[0]], cache, all_logits=False)
    if store is not None:
        store.wait()  # a model that fits is read into memory in the background: measure the steady state

    depth_fill_s = 0.0
    if depth:
        if announce:
            announce(f"filling the context with {depth:,} tokens (-d/--depth; not timed in the figures)...")
        cache = model.new_cache()
        t = time.perf_counter()
        prefill(model, depth_ids, cache)
        depth_fill_s = time.perf_counter() - t
        at_depth = cache.checkpoint()
    pp_runs = []
    for _ in range(PP_REPEATS):  # the median of a few prefills from the same point (the machine is noisy)
        if depth:
            cache.rollback(at_depth)
        else:
            cache = model.new_cache()
        t = time.perf_counter()
        logits = prefill(model, ids, cache)
        pp_runs.append(time.perf_counter() - t)
    pp_s = float(np.median(pp_runs))
    tok = int(np.argmax(logits))
    counters0 = dict(store.counters.as_dict()) if store else {}
    trace0 = len(store.trace) if store else 0
    disk0 = disk_read_bytes()
    t = time.perf_counter()
    for _ in range(gen_tokens):
        tok = int(np.argmax(model.forward([tok], cache, all_logits=False)[-1]))
    tg_s = time.perf_counter() - t
    disk = disk_read_bytes() - disk0 if disk0 >= 0 else -1

    per_token = weight_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(threads=n_threads)
    tg = gen_tokens / tg_s
    out = {
        "backend": model.backend.name,
        "threads": int(n_threads),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "depth": depth,
        "depth_fill_s": depth_fill_s,
        "kv_type": kv_type,
        "pp_tokens_per_s": prompt_tokens / pp_s,
        "pp_runs_tokens_per_s": [prompt_tokens / t for t in pp_runs],
        "tg_tokens_per_s": tg,
        "weight_bytes_per_token": per_token,
        "achieved_gbs": tg * per_token / 1e9,
        "read_bandwidth_gbs": bandwidth,
        "roofline_tokens_per_s": bandwidth * 1e9 / per_token,
        "roofline_fraction": tg * per_token / (bandwidth * 1e9),
        "peak_rss_bytes": peak_rss_bytes(),
        "first_token_s": first_token_s,
        "model_file_bytes": model.file.file_size,
        "disk_bytes_per_token": disk / gen_tokens if disk >= 0 else None,
    }
    if store is None:
        out.update(expert_cache_bytes=None, expert_hits=None, expert_misses=None)
        return out
    c = {k: v - counters0.get(k, 0) for k, v in store.counters.as_dict().items()}
    steps = store.trace[trace0:]
    layers = sorted({layer for layer, _ in steps})
    distinct = [len({e for layer, ids_ in steps if layer == li for e in ids_}) for li in layers]
    expert_bytes = sum(layer.experts.expert_nbytes() for layer in model.weights.layers) / model.config.n_layer
    miss_bytes = c["misses"] * expert_bytes / gen_tokens
    resident = per_token - model.config.n_expert_used * expert_bytes * model.config.n_layer * c["misses"] / max(
        c["hits"] + c["misses"], 1)
    disk_bw = measure_disk_bandwidth(model.file.path)
    limit = 1.0 / (miss_bytes / (disk_bw * 1e9) + resident / (bandwidth * 1e9))
    out.update(
        expert_cache_bytes=store.budget_bytes,
        expert_slots_per_layer=store.n_slots,
        expert_policy=store.policy_name,
        expert_hits=c["hits"], expert_misses=c["misses"], expert_prefetch_hits=c["prefetch_hits"],
        expert_prefetches=c["prefetches"], expert_preloaded=c["preloaded"],
        expert_hit_rate=c["hits"] / max(c["hits"] + c["misses"], 1),
        expert_bytes_read_per_token=c["bytes_read"] / gen_tokens,
        expert_miss_bytes_per_token=miss_bytes,
        io_wait_s_per_token=c["io_wait_s"] / gen_tokens,
        io_cpu_s_per_gb=c["io_cpu_s"] / max(c["bytes_read"] / 1e9, 1e-9),
        # the disk as the run used it: busy (a read in flight) this share of the generation, at this pace
        io_busy_fraction=min(c["io_busy_s"] / tg_s, 1.0),
        io_busy_gbs=c["bytes_read"] / 1e9 / c["io_busy_s"] if c["io_busy_s"] > 0 else 0.0,
        disk_bandwidth_gbs=disk_bw,
        streaming_limit_tokens_per_s=limit,
        streaming_limit_fraction=tg / limit,
        distinct_experts_per_layer=float(np.mean(distinct)) if distinct else 0.0,
    )
    return out
