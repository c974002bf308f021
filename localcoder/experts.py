"""Routed experts: residency, streaming from disk, counters.

Each `*_exps` tensor stores one expert as one contiguous byte range, so an expert is a slice of the file.
Files store the gate and up projections either as two tensors (`ffn_gate_exps`, `ffn_up_exps`) or fused
(`ffn_gate_up_exps`, gate rows first); `ExpertSet` hides the difference.

Each layer owns slots (expert-sized buffers in process memory); a routed expert that is not in a slot is read
with pread (readahead off, page cache dropped after the read) into a free slot or a victim chosen by the
policy. When the budget holds every expert, each is read once, on first use, and stays (resident); when it
cannot, experts are streamed. A mapped store (Model(mmap=True)) hands out the memory map itself instead
(zero copy, the OS pages it; kept to count and trace).
Kernels see the same thing in both modes: arrays of expert rows (slots, rows, row_bytes) and, for each
routed expert, the index of its slot. Results are bit-identical for every budget: only residency changes.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

import numpy as np

from .gguf_file import QTensor, RawReader, aligned_empty, readonly
from .threads import background_thread


@dataclass(frozen=True)
class ExpertSet:
    layer: int
    down: QTensor  # (E, D, F)
    gate: QTensor | None = None  # (E, F, D)
    up: QTensor | None = None  # (E, F, D)
    gate_up: QTensor | None = None  # (E, 2F, D): [gate | up]
    store: "ExpertStore | None" = field(default=None, compare=False)

    @property
    def n_expert(self) -> int:
        return self.down.shape[0]

    @property
    def n_ff(self) -> int:
        return self.down.shape[2]

    @property
    def tensors(self) -> list[QTensor]:
        return ([self.gate_up] if self.gate_up is not None else [self.gate, self.up]) + [self.down]

    def expert_nbytes(self) -> int:
        """Bytes one expert occupies across its tensors."""
        return sum(t.nbytes // t.shape[0] for t in self.tensors)

    def fetch(self, ids, early: bool = False):
        """The routed experts `ids` (unique, ascending) as batches (arrays, ids, slots) that fit the cache:
        arrays are (slots, rows, row_bytes) per tensor and ids[i] lives in slots[i]. Consume each batch before
        the next. Batches come in ascending id order; with `early`, the experts already resident may come
        first and the others once read (a subset in any order: the caller must not depend on it)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.store is None:
            return iter([(tuple(t.data for t in self.tensors), ids, ids)])
        return self.store.fetch(self, ids, early)

    @property
    def speculative(self) -> bool:
        """Whether guessed experts are worth reading ahead (streaming with speculative prefetch on)."""
        return self.store is not None and self.store.speculating

    def prefetch(self, ids) -> None:
        """Guesses for a later step, the most probable first (the store reads at most a few of them)."""
        if self.store is not None:
            self.store.prefetch(self, np.asarray(ids, dtype=np.int64))

    def split(self, arrays: tuple[np.ndarray, ...], slot: int) -> tuple[QTensor, QTensor, QTensor]:
        """(gate (F, D), up (F, D), down (D, F)) of the expert in `slot` of `arrays` (from fetch)."""
        tensors = self.tensors
        views = [QTensor(f"{t.name}[slot {slot}]", t.ggml_type, t.shape[1:], a[slot], -1, t.path)
                 for t, a in zip(tensors, arrays)]
        if self.gate_up is not None:
            both, down = views
            return both.rows(0, self.n_ff), both.rows(self.n_ff, 2 * self.n_ff), down
        return views[0], views[1], views[2]

    def expert(self, e: int) -> tuple[QTensor, QTensor, QTensor]:
        """(gate, up, down) of expert e, as views of the file."""
        return self.split(tuple(t.data for t in self.tensors), e)


# ---- replacement policies -------------------------------------------------------------------------------

class LRU:
    """Least recently used, per layer (the baseline of Eliseev & Mazur's expert offloading)."""

    name = "lru"

    def __init__(self):
        self.order: OrderedDict[int, None] = OrderedDict()

    def touch(self, e: int) -> None:
        self.order.pop(e, None)
        self.order[e] = None

    def victim(self, pinned: set[int]) -> int:
        for e in self.order:
            if e not in pinned:
                return e
        raise RuntimeError("every resident expert is pinned")

    def remove(self, e: int) -> None:
        self.order.pop(e, None)


class LFUDecay(LRU):
    """Frequency-aware: evict the lowest exponentially decayed use count (ties: least recent).
    A half-life of ~64 uses keeps popular experts while letting the working set drift."""

    name = "lfu"

    def __init__(self, decay: float = 0.989):
        super().__init__()
        self.decay = decay
        self.score: dict[int, float] = {}
        self.clock = 0

    RESCALE = 4096  # touches between rescalings (decay**-clock would overflow a float after ~64k)

    def touch(self, e: int) -> None:
        super().touch(e)
        self.clock += 1
        if self.clock >= self.RESCALE:  # back to units of decay**0: every score times the same factor
            f = self.decay ** self.clock
            self.score = {k: v * f for k, v in self.score.items()}
            self.clock = 0
        # scores are kept in units of decay**-clock so that old scores need no update
        self.score[e] = self.score.get(e, 0.0) + self.decay ** -self.clock

    def victim(self, pinned: set[int]) -> int:
        cands = [e for e in self.order if e not in pinned]
        if not cands:
            raise RuntimeError("every resident expert is pinned")
        return min(cands, key=lambda e: self.score.get(e, 0.0))

    def remove(self, e: int) -> None:
        super().remove(e)


POLICIES = {"lru": LRU, "lfu": LFUDecay}


# ---- the store ------------------------------------------------------------------------------------------

# speculative reads per layer and step: the most probable guesses not resident. On the 48-layer synthetic
# file (tg128, alternated): reading every guess (~6 a layer, 37 % wrong) 1.68-1.69 tokens/s against 1.84-2.14
# without prefetch; the top 4: 1.80-1.94; the top 2 (81 % right): 1.98-2.10 against 1.74-2.10.
PREFETCH_MAX = 2
IO_THREADS = 8  # concurrent expert reads (the disk here gives about the same at 4-32 readers of 0.25-2 MB, 1.4-2.2 GB/s)


class _DaemonPool:
    """Daemon threads running submitted calls, lowest priority number first (in order within a priority),
    with futures that can be cancelled until they start. Unlike ThreadPoolExecutor (which finishes every
    queued call before the interpreter exits), a process that is done does not wait for a background
    preload of the rest of the model."""

    def __init__(self, n: int, name: str):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        background_thread()
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    fut.set_exception(exc)
            # an idle thread must not keep its last call's arguments (a store and its slots) alive
            del item, fut, fn, args

    def submit(self, fn, *args, priority: int = 0) -> Future:
        fut: Future = Future()
        self._queue.put((priority, next(self._seq), (fut, fn, args)))
        return fut

    def shutdown(self, wait: bool = False) -> None:
        """Cancel what has not started; the threads end when they reach the end of the queue (`wait`: join
        them, i.e. let the calls already running finish)."""
        while True:
            try:
                item = self._queue.get_nowait()[2]
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put((float("inf"), next(self._seq), None))
        if wait:
            for t in self._threads:
                t.join()


@dataclass
class ExpertCounters:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # hits on experts that a speculative prefetch brought in
    prefetches: int = 0  # experts read speculatively
    preloaded: int = 0  # experts read in the background because every one fits (not on demand)
    bytes_read: int = 0
    io_wait_s: float = 0.0
    io_cpu_s: float = 0.0  # CPU time the I/O threads spent in reads (it shares the cores with decode)
    io_busy_s: float = 0.0  # wall time with at least one read in flight (bytes_read / io_busy_s: the disk's pace)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _LayerSlots:
    def __init__(self, es: ExpertSet, n_slots: int, policy):
        self.es = es
        self.n_slots = n_slots
        # each slot lines up with its tensor's experts in the file (when an expert's size is a multiple of the
        # O_DIRECT alignment), so a read lands in place instead of through a bounce buffer
        self.arrays = tuple(aligned_empty((n_slots, *t.data.shape[1:]), t.file_offset) for t in es.tensors)
        # what kernels get: read-only views, the same array type as a memory map's (one compilation each)
        self.views = tuple(readonly(a.view()) for a in self.arrays)
        self.slot_of: dict[int, int] = {}
        self.free = list(range(n_slots - 1, -1, -1))
        self.policy = policy
        self.pending: dict[int, object] = {}  # expert -> future of a prefetch read
        self.all_slots: np.ndarray | None = None  # slot of every expert, once all are resident
        self.prefetched: set[int] = set()
        self.lock = threading.Lock()


class ExpertStore:
    """Routed experts in a byte budget, streamed from the file on a miss (see the module docstring)."""

    def __init__(self, expert_sets: list[ExpertSet], budget_bytes: int, policy: str = "lru",
                 io_threads: int = IO_THREADS,
                 trace: list | None = None, speculate: bool = True, mapped: bool = False):
        self.sets = expert_sets
        per_expert = max(es.expert_nbytes() for es in expert_sets)
        n_layers = len(expert_sets)
        slots = max(int(budget_bytes // (per_expert * n_layers)), 1)
        self.n_slots = min(slots, max(es.n_expert for es in expert_sets))
        self.resident = self.n_slots >= max(es.n_expert for es in expert_sets)
        self.mapped = mapped and self.resident  # the memory map, not slots
        self.speculate = speculate  # speculative prefetch of the next layer's experts
        self.budget_bytes = self.n_slots * per_expert * n_layers
        self.policy_name = policy
        self.layers: dict[int, _LayerSlots] = {}
        self.counters = ExpertCounters()
        self.trace = trace  # when a list: (layer, expert ids) per fetch, for --expert-stats
        self._readers: dict[str, RawReader] = {}
        self._pool = _DaemonPool(io_threads, "expert-io")  # demand reads first (priority 0), then speculative (1)
        self._deferred: tuple | None = None  # a speculative prefetch waiting for the next demand reads to queue
        self._background = _DaemonPool(2, "expert-preload")  # behind demand reads; never delays exit
        self._mutex = threading.Lock()
        self._in_flight = 0  # reads running now, and since when one has been (io_busy_s)
        self._busy_since = 0.0
        # a store nobody uses any more (a dropped Model) ends its threads and closes its files; while a read
        # runs or waits in a queue, its call holds the store, so this never runs under a read
        self._finalizer = weakref.finalize(self, _release, self._pool, self._background, self._readers)

    def _reader(self, path: str) -> RawReader:
        with self._mutex:
            r = self._readers.get(path)
            if r is None:
                r = self._readers[path] = RawReader(path)
            return r

    def _slots(self, es: ExpertSet) -> _LayerSlots:
        ls = self.layers.get(es.layer)
        if ls is None:
            ls = self.layers[es.layer] = _LayerSlots(es, self.n_slots, POLICIES[self.policy_name]())
        return ls

    def _read(self, ls: _LayerSlots, e: int, slot: int, parts=None) -> int:
        """Read expert e's bytes (its tensors `parts`, default all) into `slot`; returns bytes read."""
        cpu0 = time.thread_time()
        with self._mutex:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        total = 0
        try:
            for i in range(len(ls.arrays)) if parts is None else parts:
                t, arr = ls.es.tensors[i], ls.arrays[i]
                n = arr[slot].nbytes
                offset = t.file_offset + e * n
                if self._reader(t.path).read(arr[slot], offset) < n:
                    raise OSError(f"short read of expert {e} in {t.name}")
                total += n
        finally:
            with self._mutex:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self.counters.io_busy_s += time.perf_counter() - self._busy_since
                self.counters.bytes_read += total
                self.counters.io_cpu_s += time.thread_time() - cpu0
        return total

    def _read_now(self, ls: _LayerSlots, e: int, slot: int) -> list[Future]:
        """A demand miss: one read per tensor, all queued at once, so a layer's few misses keep every I/O
        thread busy (one job per expert left threads idle while each read its three tensors in turn)."""
        return [self._pool.submit(self._read, ls, e, slot, (i,)) for i in range(len(ls.arrays))]

    @staticmethod
    def _unslot(ls: _LayerSlots, e: int) -> None:
        """Give back the slot of a read that failed or was cancelled: e is no longer resident."""
        ls.free.append(ls.slot_of.pop(e))
        ls.policy.remove(e)
        ls.prefetched.discard(e)

    def _reap(self, ls: _LayerSlots) -> None:
        """Forget finished prefetch reads (their experts stay resident and marked as prefetched)."""
        for e in [e for e, fut in ls.pending.items() if fut.done()]:
            if ls.pending.pop(e).exception() is not None:  # a failed speculative read
                self._unslot(ls, e)

    def _claim(self, ls: _LayerSlots, e: int, pinned: set[int], wait: bool = True) -> int:
        """A slot for e: a free one, or the policy's victim (not pinned, not being read into). With a tiny
        budget every candidate may still be a speculative read in flight: `wait` for those to land, else
        (a guess, which must never stall decode) raise RuntimeError."""
        if ls.free:
            slot = ls.free.pop()
        else:
            if wait and ls.pending and all(x in pinned or x in ls.pending for x in ls.slot_of):
                for fut in list(ls.pending.values()):
                    fut.exception()
                self._reap(ls)
            victim = ls.policy.victim(pinned | set(ls.pending))
            slot = ls.slot_of.pop(victim)
            ls.policy.remove(victim)
            ls.prefetched.discard(victim)
        ls.slot_of[e] = slot
        return slot

    def fetch(self, es: ExpertSet, ids: np.ndarray, early: bool = False):
        """Yields (arrays, ids, slots) batches of at most n_slots experts. Lazy: a batch's slots may be reused
        by the next batch, so each must be consumed before asking for the next. With `early`, a batch's
        experts that need no read are yielded first, while its reads run (so their compute overlaps the
        disk), then the others."""
        if self.trace is not None:
            self.trace.append((es.layer, ids.tolist()))
        if self.mapped:  # everything fits: the memory map itself (kept only to count and trace)
            self.counters.hits += len(ids)
            yield tuple(t.data for t in es.tensors), ids, ids
            return
        ls = self._slots(es)
        if ls.all_slots is None and self.resident and not ls.pending and len(ls.slot_of) == es.n_expert:
            # every expert read and nothing in flight: with every expert resident nothing is evicted again,
            # so the slots are fixed and the policy's order no longer matters (each step's bookkeeping after
            # the streaming kernels flushed the caches cost ~30 us a layer)
            ls.all_slots = np.array([ls.slot_of[e] for e in range(es.n_expert)], dtype=np.int64)
        if ls.all_slots is not None:
            self.counters.hits += len(ids)
            if ls.prefetched:
                used = ls.prefetched.intersection(ids.tolist())
                self.counters.prefetch_hits += len(used)
                ls.prefetched -= used
            yield ls.views, ids, ls.all_slots[ids]
            return
        if not self.resident:  # streaming: this layer's speculative reads that guessed wrong and have not
            with ls.lock:      # started are dropped (they would only delay the next layer's guesses)
                wanted = set(int(e) for e in ids)
                for e in [e for e in ls.pending if e not in wanted]:
                    if ls.pending[e].cancel():
                        del ls.pending[e]
                        self._unslot(ls, e)
                        self.counters.prefetches -= 1
        for start in range(0, len(ids), ls.n_slots):
            chunk = ids[start:start + ls.n_slots]
            pinned = set(int(e) for e in chunk)
            jobs = []
            demand = []  # experts read into their slots by this batch's jobs
            waited = set()  # experts with a read to wait for (this batch's or a prefetch's)
            with ls.lock:
                self._reap(ls)
                for e in pinned:
                    fut = ls.pending.get(e)
                    if fut is not None:  # preloading: jump the queue if its read has not started, else wait
                        if fut.cancel():
                            del ls.pending[e]
                            if e in ls.prefetched:
                                ls.prefetched.discard(e)
                                self.counters.prefetches -= 1
                            else:
                                self.counters.preloaded -= 1
                            self.counters.misses += 1
                            ls.policy.touch(e)
                            jobs.extend(self._read_now(ls, e, ls.slot_of[e]))
                            demand.append(e)
                            waited.add(e)
                            continue
                        jobs.append(fut)
                        waited.add(e)
                    if e in ls.slot_of:
                        self.counters.hits += 1
                        if e in ls.prefetched:
                            self.counters.prefetch_hits += 1
                            ls.prefetched.discard(e)
                    else:
                        self.counters.misses += 1
                        slot = self._claim(ls, e, pinned)
                        jobs.extend(self._read_now(ls, e, slot))
                        demand.append(e)
                        waited.add(e)
                    ls.policy.touch(e)
            if self._deferred is not None:  # the guesses for a later layer queue behind these demand reads
                self._prefetch(*self._deferred)
                self._deferred = None
            if early and 0 < len(waited) < len(chunk):
                ready = np.array([e for e in chunk if int(e) not in waited], dtype=np.int64)
                try:
                    yield ls.views, ready, np.array([ls.slot_of[int(e)] for e in ready], dtype=np.int64)
                except BaseException:  # the caller stopped (Ctrl-C in its kernel): as a failed wait below
                    self._drop_reads(ls, jobs, demand)
                    raise
                chunk = np.array([e for e in chunk if int(e) in waited], dtype=np.int64)
            t0 = time.perf_counter()
            try:
                for job in jobs:
                    job.result()
            except BaseException:  # a failed read, or Ctrl-C while waiting: no half-read expert stays resident
                self._drop_reads(ls, jobs, demand)
                raise
            self.counters.io_wait_s += time.perf_counter() - t0
            slots = np.array([ls.slot_of[int(e)] for e in chunk], dtype=np.int64)
            yield ls.views, chunk, slots

    def _drop_reads(self, ls: _LayerSlots, jobs: list[Future], demand: list[int]) -> None:
        """After a batch's wait failed: cancel its reads that have not started, let the running ones finish
        (so nothing writes into a slot after it is given back), and give back the slots of its demand reads;
        a failed speculative read is given back by _reap as usual."""
        for job in jobs:
            job.cancel()
        futures_wait([job for job in jobs if not job.cancelled()])
        with ls.lock:
            for e in demand:
                if e in ls.slot_of:
                    self._unslot(ls, e)
            self._reap(ls)

    def prefetch(self, es: ExpertSet, ids: np.ndarray) -> None:
        """Read experts a later layer will probably need (a wrong guess costs bandwidth only), at low priority
        and once the next fetch has queued its demand reads (the current layer's misses go first)."""
        if self.speculating:
            self._deferred = (es, ids)

    def _prefetch(self, es: ExpertSet, ids: np.ndarray) -> None:
        ls = self._slots(es)
        with ls.lock:
            self._reap(ls)
            guessed = set(int(e) for e in ids)
            want = [int(e) for e in ids if int(e) not in ls.slot_of and int(e) not in ls.pending]
            for e in want[: min(PREFETCH_MAX, max(ls.n_slots - len(ls.pending) - 1, 0))]:
                try:
                    slot = self._claim(ls, e, guessed, wait=False)
                except RuntimeError:
                    break
                self.counters.prefetches += 1
                ls.prefetched.add(e)
                ls.policy.touch(e)
                ls.pending[e] = self._pool.submit(self._read, ls, e, slot, priority=1)

    @property
    def speculating(self) -> bool:
        """Speculative prefetch on and worth it: when every expert is resident nothing is ever evicted, so
        no guess is worth a read."""
        return self.speculate and not self.resident

    def preload(self) -> None:
        """When every expert has a slot: queue reads of all of them, layer by layer, on the I/O threads (a
        forward pass waits only for its layer's queued reads). The steady state of a model that fits."""
        if not self.resident or self.mapped:
            return
        for es in self.sets:
            ls = self._slots(es)
            with ls.lock:
                for e in range(es.n_expert):
                    if e not in ls.slot_of and e not in ls.pending:
                        slot = self._claim(ls, e, set())
                        self.counters.preloaded += 1
                        ls.policy.touch(e)
                        ls.pending[e] = self._background.submit(self._read, ls, e, slot)

    def wait(self) -> None:
        """Block until every queued read (preload or prefetch) has finished."""
        for ls in list(self.layers.values()):
            for fut in list(ls.pending.values()):
                fut.exception()

    def read_ahead(self) -> str:
        """The counters of reads not made on demand, for the stats lines: speculative prefetch (when on) and
        the background preload (when every expert fits)."""
        c = self.counters
        return ((f"{c.prefetch_hits:,} prefetch hits ({c.prefetches:,} prefetched), " if self.speculate else "")
                + (f"{c.preloaded:,} preloaded, " if c.preloaded else ""))

    def resident_bytes(self) -> int:
        return sum(sum(a.nbytes for a in ls.arrays) for ls in self.layers.values())

    def close(self) -> None:
        """Cancel queued reads, wait for running ones, end the I/O threads, close the files."""
        self._background.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self._finalizer()


def _release(pool: _DaemonPool, background: _DaemonPool, readers: dict) -> None:
    pool.shutdown()
    background.shutdown()
    for r in readers.values():
        r.close()
    readers.clear()
