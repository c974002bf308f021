"""Speed figures: memory read bandwidth, prompt and generation tokens/s, bytes of weights read per token.

The roofline of decoding is (read bandwidth) / (weight bytes read per token): every generated token reads
every dense weight, the routed experts' bytes and one embedding row.
"""

from __future__ import annotations

import resource
import time

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True)
def _read_sum(a, nchunks):
    step = (a.shape[0] + nchunks - 1) // nchunks
    part = np.zeros(nchunks, np.float32)
    for c in prange(nchunks):
        s = np.float32(0)
        for i in range(c * step, min(a.shape[0], (c + 1) * step)):
            s += a[i]
        part[c] = s
    return part.sum()


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int | None = None) -> float:
    """Read bandwidth in GB/s (1e9 B/s): the best of `repeats` threaded sums over a buffer much larger than
    the caches (1 GiB by default)."""
    import numba
    if threads:
        numba.set_num_threads(threads)
    a = np.ones(nbytes // 4, np.float32)
    nchunks = 4 * numba.get_num_threads()
    _read_sum(a[:1024], nchunks)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _read_sum(a, nchunks)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def weight_bytes_per_token(model, expert_ids_per_layer=None) -> int:
    """Bytes of weights one decoded token reads: dense weights of every layer and the output head, the
    routed experts (n_expert_used per layer) and one embedding row."""
    w, cfg = model.weights, model.config
    total = w.token_embd.data.shape[-1] + w.output.nbytes + w.output_norm.nbytes
    for layer in w.layers:
        total += sum(t.nbytes for t in layer.tensors.values())
        total += cfg.n_expert_used * layer.experts.expert_nbytes()
    return int(total)


def run_bench(model_path, backend: str = "auto", prompt_tokens: int = 512, gen_tokens: int = 128,
              threads: int | None = None, seed: int = 0) -> dict:
    """Prompt processing (one prefill of `prompt_tokens` random ids) and generation (`gen_tokens` greedy
    single-token steps after it) on the model at model_path; returns the figures as a dict."""
    import localcoder
    from .backends import get_backend
    from .generate import prefill

    be = get_backend(backend, threads=threads) if isinstance(backend, str) else backend
    model = localcoder.load(model_path, backend=be)
    n_threads = getattr(model.backend, "threads", threads or 1)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(model.config.n_vocab, 150000), prompt_tokens).tolist()
    # warm-up: compile, fault in the dense weights and a spread of experts
    cache = model.new_cache()
    prefill(model, ids[:min(16, prompt_tokens)], cache)
    model.forward([ids[0]], cache, all_logits=False)

    cache = model.new_cache()
    t = time.perf_counter()
    logits = prefill(model, ids, cache)
    pp_s = time.perf_counter() - t
    tok = int(np.argmax(logits))
    t = time.perf_counter()
    for _ in range(gen_tokens):
        tok = int(np.argmax(model.forward([tok], cache, all_logits=False)[-1]))
    tg_s = time.perf_counter() - t

    per_token = weight_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(threads=n_threads)
    tg = gen_tokens / tg_s
    return {
        "backend": model.backend.name,
        "threads": int(n_threads),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "pp_tokens_per_s": prompt_tokens / pp_s,
        "tg_tokens_per_s": tg,
        "weight_bytes_per_token": per_token,
        "achieved_gbs": tg * per_token / 1e9,
        "read_bandwidth_gbs": bandwidth,
        "roofline_tokens_per_s": bandwidth * 1e9 / per_token,
        "roofline_fraction": tg * per_token / (bandwidth * 1e9),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
