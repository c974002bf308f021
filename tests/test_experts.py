"""Expert streaming: bit-identical results for every cache budget, consistent counters, no stray reads."""

import os
import time

import numpy as np
import pytest

import localcoder
from localcoder.experts import LFUDecay, LRU
from localcoder.model import parse_size

PROMPT = [750, 282, 579, 263, 580, 66, 72, 1000, 13, 2000, 5, 9, 300, 301]


@pytest.fixture(scope="module")
def path(fixtures_dir):
    return fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf"


def run(model, n_new=6):
    cache = model.new_cache()
    logits = [model.forward(PROMPT, cache)]
    for _ in range(n_new):
        tok = int(np.argmax(logits[-1][-1]))
        logits.append(model.forward([tok], cache))
    return np.concatenate(logits)


@pytest.mark.parametrize("policy,backend", [("lru", "numpy"), ("lfu", "numpy"), ("lru", "numba")])
def test_every_budget_gives_identical_logits(path, policy, backend):
    mapped = localcoder.load(path, backend=backend, expert_cache="64G", mmap=True)
    assert mapped.expert_store is None
    expect = run(mapped)
    resident = localcoder.load(path, backend=backend, expert_cache="64G")  # every expert read once into memory
    assert resident.expert_store.resident and not resident.expert_store.mapped
    assert np.array_equal(run(resident), expect)
    resident.expert_store.wait()  # reads of experts the prompt did not need may still be running
    c = resident.expert_store.counters  # every expert queued for reading at load, each read once
    experts = [layer.experts for layer in resident.weights.layers]
    # (an expert needed before its queued read started is read at once instead: a miss, not a prefetch)
    assert c.misses + c.preloaded == sum(es.n_expert for es in experts) and c.prefetches == 0
    assert c.bytes_read == sum(es.n_expert * es.expert_nbytes() for es in experts)
    # every expert in place and nothing in flight: later steps take the fixed slots without bookkeeping
    resident_steps(resident, expect)
    per_layer = max(layer.experts.expert_nbytes() for layer in resident.weights.layers) * resident.config.n_layer
    for n_slots in (1, 2, 3, 7):
        t0 = time.perf_counter()
        m = localcoder.load(path, backend=backend, expert_cache=n_slots * per_layer, expert_policy=policy,
                            expert_prefetch=True)
        assert m.expert_store is not None and m.expert_store.n_slots == n_slots
        got = run(m)
        assert np.array_equal(got, expect), f"{n_slots} slots"
        c = m.expert_store.counters
        sizes = [layer.experts.expert_nbytes() for layer in m.weights.layers]  # Q4_K_M: Q6_K down in some layers
        assert c.misses > 0
        # the time some read was in flight: the union of the reads' spans, never more than the time that passed
        assert 0 < c.io_busy_s <= time.perf_counter() - t0
        assert min(sizes) * (c.misses + c.prefetches) <= c.bytes_read <= max(sizes) * (c.misses + c.prefetches)
        m.expert_store.close()


def resident_steps(model, expect):
    """Run again on a store whose every expert is resident: the same logits, one hit per routed expert of
    each step (counted from the routing trace), no new reads, and each layer's slots fixed once."""
    store = model.expert_store
    store.trace = []
    c = store.counters
    hits, misses, nread = c.hits, c.misses, c.bytes_read
    assert np.array_equal(run(model), expect)
    assert c.hits - hits == sum(len(ids) for _, ids in store.trace)
    assert (c.misses, c.bytes_read) == (misses, nread)
    assert c.prefetch_hits <= c.prefetches
    assert all(ls.all_slots is not None for ls in store.layers.values())
    assert np.array_equal(run(model), expect)  # now on the fixed slots from the first step


@pytest.fixture(scope="module")
def q8_path(fixtures_dir):
    return fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q8_0.gguf"  # every expert the same size


def test_counters_add_up_without_prefetch(q8_path):
    m = localcoder.load(q8_path, backend="numpy", expert_cache=1, expert_trace=True)
    for layer in m.weights.layers:  # disable speculation to check the plain identities
        object.__setattr__(layer.experts, "prefetch", lambda ids: None)
    run(m, n_new=3)
    store = m.expert_store
    routed = sum(len(ids) for _, ids in store.trace)
    c = store.counters
    assert c.hits + c.misses == routed
    assert c.bytes_read == c.misses * m.weights.layers[0].experts.expert_nbytes()
    assert {layer for layer, _ in store.trace} == set(range(m.config.n_layer))


def test_only_routed_experts_are_read(path):
    """Every byte the store reads belongs to an expert the router chose (or speculatively guessed)."""
    m = localcoder.load(path, backend="numpy", expert_cache=1, expert_trace=True)
    reads = []
    store = m.expert_store
    orig = store._read

    def spy(ls, e, slot, *parts):
        reads.append((ls.es.layer, e))
        return orig(ls, e, slot, *parts)

    store._read = spy
    for layer in m.weights.layers:
        object.__setattr__(layer.experts, "prefetch", lambda ids: None)
    run(m, n_new=2)
    routed = {(layer, e) for layer, ids in store.trace for e in ids}
    assert set(reads) <= routed and reads


def test_policies():
    lru, lfu = LRU(), LFUDecay()
    for e in [1, 2, 1, 1, 3]:
        lru.touch(e)
        lfu.touch(e)
    assert lru.victim(set()) == 2
    assert lfu.victim(set()) == 2 and lfu.victim({2}) == 3


def test_lfu_scores_stay_finite_and_choose_as_exact_ones_do():
    """Scores are kept in units of decay**-clock and rescaled every few thousand touches (decay**-clock
    overflows a float after ~64k): victims are those of scores decayed exactly at every touch."""
    rng = np.random.default_rng(0)
    lfu, exact = LFUDecay(), np.zeros(64)
    for n, e in enumerate(rng.zipf(1.3, 70_000) % 64):
        lfu.touch(int(e))
        exact *= lfu.decay
        exact[e] += 1.0
        if n % 997 == 0:
            pinned = set(int(x) for x in rng.choice(64, 8, replace=False))
            cands = [x for x in lfu.order if x not in pinned]
            assert lfu.victim(pinned) == min(cands, key=lambda x: exact[x])


def test_parse_size():
    assert parse_size("12G") == 12 * 1024 ** 3 and parse_size("512M") == 512 * 1024 ** 2
    assert parse_size("1.5GB") == int(1.5 * 1024 ** 3) and parse_size(1000) == 1000
    assert parse_size(".5G") == 512 * 1024 ** 2
    for bad in ("lots", "1.2.3G", ".", "-1G", "12Q"):
        with pytest.raises(localcoder.errors.LocalcoderError):
            parse_size(bad)


@pytest.mark.parametrize("resident", [False, True])
def test_a_failed_read_leaves_no_half_read_expert(path, resident):
    """A demand read that fails (a disk error) after writing part of its slot: the forward pass raises it,
    and the next one reads that expert again instead of computing on the half-written slot."""
    from localcoder.gguf_file import GGUFFile
    from localcoder.model import Model

    expect = run(localcoder.load(path, backend="numpy", expert_cache="64G", mmap=True))
    layers = localcoder.load(path, backend="numpy").weights.layers
    per_layer = max(layer.experts.expert_nbytes() for layer in layers) * len(layers)
    m = Model(GGUFFile(path), backend="numpy", expert_cache="64G" if resident else 3 * per_layer,
              preload=False)
    store, orig, failed = m.expert_store, m.expert_store._read, []

    def flaky(ls, e, slot, parts=None):
        if parts is not None and not failed:
            failed.append(e)
            for i in parts:
                ls.arrays[i][slot][:] = 0x55
            raise OSError(5, "Input/output error (injected)")
        return orig(ls, e, slot, parts)

    store._read = flaky
    with pytest.raises(OSError, match="injected"):
        run(m)
    assert failed and store.resident == resident
    assert np.array_equal(run(m), expect)
    assert np.array_equal(run(m), expect)


def test_early_batches_hand_out_resident_experts_first(path):
    """fetch(early=True): the experts that need no read come first, while the others are read, then those;
    a caller that stops after the early batch (Ctrl-C in its kernel) leaves the unfinished reads' experts
    not resident, so the next fetch reads them again."""
    layers = localcoder.load(path, backend="numpy").weights.layers
    per_layer = max(layer.experts.expert_nbytes() for layer in layers) * len(layers)
    m = localcoder.load(path, backend="numpy", expert_cache=4 * per_layer)
    es = m.weights.layers[0].experts
    store = m.expert_store
    assert [b[1].tolist() for b in es.fetch([1, 5])] == [[1, 5]]  # both read: one batch
    batches = [(ids.tolist(), slots.tolist()) for _, ids, slots in es.fetch([0, 1, 2, 5], early=True)]
    slot_of = store.layers[0].slot_of
    assert batches == [([1, 5], [slot_of[1], slot_of[5]]), ([0, 2], [slot_of[0], slot_of[2]])]
    assert [b[1].tolist() for b in es.fetch([0, 3, 5])] == [[0, 3, 5]]  # not early: ascending, one batch
    assert (store.counters.hits, store.counters.misses) == (2 + 2, 2 + 2 + 1)

    batches = es.fetch([3, 6], early=True)
    arrays, ids, slots = next(batches)
    assert ids.tolist() == [3]
    batches.close()  # as when the caller's kernel raised
    assert 6 not in store.layers[0].slot_of and 3 in store.layers[0].slot_of
    # and the next fetch reads expert 6 again, into the right bytes
    arrays, ids, slots = next(es.fetch([6]))
    want = es.expert(6)
    got = es.split(arrays, int(slots[0]))
    assert all(np.array_equal(np.asarray(g.data), np.asarray(w.data)) for g, w in zip(got, want))
    m.close()


def test_prefetch_reads_only_the_most_probable_guesses(path):
    """A speculative prefetch reads at most PREFETCH_MAX of the guesses, the first ones (the most probable)
    that are not resident, once the next fetch has queued its demand reads."""
    from localcoder.experts import PREFETCH_MAX

    layers = localcoder.load(path, backend="numpy").weights.layers
    per_layer = max(layer.experts.expert_nbytes() for layer in layers) * len(layers)
    m = localcoder.load(path, backend="numpy", expert_cache=7 * per_layer, expert_prefetch=True)
    es0, es1 = m.weights.layers[0].experts, m.weights.layers[1].experts
    assert es1.speculative and PREFETCH_MAX == 2
    list(es1.fetch([5]))
    es1.prefetch([5, 6, 1, 7])  # 5 is resident: 6 and 1 are read
    assert not m.expert_store.layers[1].prefetched
    list(es0.fetch([0]))
    m.expert_store.wait()
    assert m.expert_store.layers[1].prefetched == {6, 1} and m.expert_store.counters.prefetches == 2
    assert [b[1].tolist() for b in es1.fetch([1, 6, 7])] == [[1, 6, 7]]
    assert m.expert_store.counters.prefetch_hits == 2
    m.close()


def test_a_dropped_or_closed_model_ends_its_io_threads(path):
    import gc
    import threading
    import weakref

    def io_threads():
        return {t for t in threading.enumerate() if t.name.startswith("expert-")}

    before = io_threads()
    m = localcoder.load(path, backend="numpy", expert_cache=1)
    run(m, n_new=1)
    store = weakref.ref(m.expert_store)
    del m
    gc.collect()
    assert store() is None  # an idle I/O thread does not keep its last read's store alive
    with localcoder.load(path, backend="numpy", expert_cache=1) as m:
        run(m, n_new=1)
    with pytest.raises(localcoder.errors.LocalcoderError, match="closed"):
        run(m, n_new=1)
    for t in io_threads() - before:
        t.join(timeout=30)
    assert not [t for t in io_threads() - before if t.is_alive()]


def test_close_waits_for_running_reads_and_a_waiting_forward_is_refused(path, monkeypatch):
    """close() returns once no read of the store runs (a preload read left running would write into freed
    slots through closed files); a forward pass that was waiting for the lock when close() ran is refused
    instead of queueing reads to I/O threads that are gone."""
    import threading
    import time

    from localcoder.gguf_file import RawReader

    running, orig = [0], RawReader.read

    def slow(self, dst, offset):
        if threading.current_thread().name.startswith("expert-preload"):
            running[0] += 1
            time.sleep(0.05)
            try:
                return orig(self, dst, offset)
            finally:
                running[0] -= 1
        return orig(self, dst, offset)

    monkeypatch.setattr(RawReader, "read", slow)
    m = localcoder.load(path, backend="numpy", expert_cache="64G")
    run(m, n_new=0)
    errors = []

    def forward():
        try:
            m.forward(PROMPT, m.new_cache())
        except localcoder.errors.LocalcoderError as e:
            errors.append(str(e))

    with m._forward_lock:  # a forward pass runs; another waits for it, past the closed check
        waiting = threading.Thread(target=forward)
        waiting.start()
        time.sleep(0.2)
        m._closed = True  # as close() does once it holds the lock
        m.expert_store.close()
        assert running[0] == 0
    waiting.join(30)
    assert not waiting.is_alive() and errors and "closed" in errors[0]


def test_one_model_used_from_two_threads(path):
    """Forward passes from several threads take turns (their experts share the store's slots)."""
    from concurrent.futures import ThreadPoolExecutor

    expect = run(localcoder.load(path, backend="numpy", expert_cache="64G", mmap=True), n_new=2)
    m = localcoder.load(path, backend="numpy", expert_cache=1)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: run(m, n_new=2), range(6)))
    assert all(np.array_equal(r, expect) for r in results)


def test_trace_without_streaming_uses_the_map(path):
    m = localcoder.load(path, backend="numpy", expert_cache="64G", expert_trace=True, mmap=True)
    assert m.expert_store is not None and m.expert_store.mapped
    expect = run(localcoder.load(path, backend="numpy", expert_cache="64G"))
    assert np.array_equal(run(m), expect)
    c = m.expert_store.counters
    assert c.misses == 0 and c.bytes_read == 0 and c.hits == sum(len(ids) for _, ids in m.expert_store.trace)


def test_background_reads_never_delay_exit():
    """Preload reads run on daemon threads, and what has not started is cancelled by shutdown: a process that
    is done does not wait for the rest of the model to be read."""
    import threading

    from localcoder.experts import _DaemonPool
    pool = _DaemonPool(1, "test-pool")
    gate = threading.Event()
    first = pool.submit(gate.wait, 5)
    queued = [pool.submit(lambda i=i: i) for i in range(3)]
    for _ in range(500):  # until the worker has taken the first call
        if first.running():
            break
        gate.wait(0.01)
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-pool"))
    pool.shutdown()
    gate.set()
    assert first.result(timeout=5) is True
    assert all(f.cancelled() for f in queued)
    f = _DaemonPool(2, "test-pool-2").submit(lambda: 41 + 1)
    assert f.result(timeout=5) == 42


def test_dense_copy_of_a_file_truncated_after_opening_is_a_one_line_error(q8_path, tmp_path):
    """The dense weights are read in a background thread; what it raises reaches the first forward pass."""
    import shutil

    from localcoder.errors import LocalcoderError
    from localcoder.gguf_file import GGUFFile
    from localcoder.model import Model
    path = tmp_path / "m.gguf"
    shutil.copy(q8_path, path)
    file = GGUFFile(path)
    os.truncate(path, path.stat().st_size // 2)
    model = Model(file, backend="numpy", preload=False)
    with pytest.raises(LocalcoderError, match="truncated"):
        model.forward([1], model.new_cache())


def test_io_pool_runs_demand_reads_before_speculative_ones():
    """The I/O pool takes the lowest priority number first (demand reads 0, speculative 1), in submission order
    within a priority, and a queued call can be cancelled until it starts."""
    import threading

    from localcoder.experts import _DaemonPool

    pool, gate, order = _DaemonPool(1, "test-io"), threading.Event(), []
    try:
        first = pool.submit(gate.wait)  # occupies the only thread while the rest queue up
        spec = [pool.submit(order.append, f"spec{i}", priority=1) for i in range(2)]
        dropped = pool.submit(order.append, "wrong guess", priority=1)
        demand = [pool.submit(order.append, f"demand{i}") for i in range(2)]
        assert dropped.cancel()
        gate.set()
        for fut in [first, *spec, *demand]:
            fut.result(timeout=10)
        assert order == ["demand0", "demand1", "spec0", "spec1"]
    finally:
        pool.shutdown(wait=True)
