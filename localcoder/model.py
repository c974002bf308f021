"""The Python API: localcoder.load(path) -> Model."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import replace
from typing import Iterator, Sequence

import numpy as np

from . import generate as gen
from .backends import get_backend
from .cache import ModelCache, make_cache
from .chat_template import template_from_file, template_from_metadata
from .config import ModelConfig
from .errors import GGUFError, LocalcoderError
from .experts import ExpertStore
from .threads import background_thread
from .gguf_file import GGUFFile, RawReader, aligned_empty, readonly
from .models import qwen3next
from .tokenizer import Tokenizer

DEFAULT_CTX = 32768
KV_TYPES = {"f32": np.float32, "f16": np.float16}  # f16 halves the attention cache (12 of 48 layers)


class Model:
    """A loaded qwen3next GGUF: config, tokenizer, chat template, weights (read into memory, or the file's
    map with mmap=True) and a backend."""

    def __init__(self, file: GGUFFile, backend="auto", n_ctx: int | None = None, expert_cache=None,
                 expert_policy: str = "lru", expert_trace: bool = False, expert_prefetch: bool = False,
                 kv_type: str = "f32", mmap: bool | None = None, preload: bool = True, threads: int | None = None,
                 chat_template_file: str | os.PathLike | None = None):
        self.file = file
        embd = file.tensors.get("token_embd.weight")
        n_vocab = embd.shape[0] if embd is not None else len(file.get("tokenizer.ggml.tokens", []))
        self.config = ModelConfig.from_gguf(file.metadata, n_vocab, str(file.path))
        self.weights = qwen3next.load_weights(self.config, file.tensors, str(file.path))
        try:
            self.tokenizer = Tokenizer.from_metadata(file.metadata)
        except GGUFError as e:  # its messages name the key; say which file, and what to do
            raise GGUFError(f"{file.path}: {e}; this file's tokenizer cannot be used: re-download it, or re-convert "
                            "it with localcoder convert") from None
        self.chat_template = (template_from_metadata(file.metadata) if chat_template_file is None
                              else template_from_file(chat_template_file, file.metadata))
        budget = None if expert_cache is None else parse_size(expert_cache)
        if isinstance(backend, str):  # MLX converts experts into its own cache: the budget is that cache's
            self.backend = get_backend(backend, threads=threads, expert_budget=budget)
        else:
            self.backend = backend
            if backend.name == "mlx" and budget is not None:
                raise LocalcoderError("expert_cache with a ready-made MLX backend: give the budget to "
                                      "MLXBackend(expert_budget=...) instead")
        if self.backend.name == "mlx":
            _check_mlx_expert_options(expert_policy, expert_prefetch)
        n_ctx = min(DEFAULT_CTX, self.config.n_ctx_train) if n_ctx is None else n_ctx
        if not 0 < n_ctx <= self.config.n_ctx_train:
            raise LocalcoderError(f"context {n_ctx} is outside 1..{self.config.n_ctx_train}, the model's "
                                  "trained context; choose a --ctx in that range")
        self.n_ctx = n_ctx
        if kv_type not in KV_TYPES:
            raise LocalcoderError(f"unknown KV cache type {kv_type!r}; choose f32 or f16")
        self.kv_dtype = KV_TYPES[kv_type]
        self.forward_tokens = 0  # tokens run through the forward pass, for tests and stats
        self._forward_lock = threading.Lock()  # one forward pass at a time (the expert store's slots are shared)
        self._closed = False
        self._dense_copy: threading.Thread | None = None
        self._dense_copy_error: BaseException | None = None
        # Weights in process memory (dense ones copied once, experts read into slots on first use) unless
        # mmap: kernels reading a file mapping pay a TLB miss per 4 KB page; process memory gets huge pages
        # (measured: 151936x2048 Q6_K matvec 17-19 GB/s mapped, 31-32 GB/s copied). The MLX backend
        # converts weights itself, so it keeps the map.
        self.mmap = self.backend.name == "mlx" if mmap is None else bool(mmap)
        self.expert_store = self._expert_store(budget, expert_policy, expert_trace, expert_prefetch, preload)

    def _expert_store(self, budget: int | None, policy: str, trace: bool, prefetch: bool,
                      preload: bool) -> ExpertStore | None:
        """Stream experts when the budget cannot hold them all (default budget: 0.8 x (available RAM less the
        dense weights) less 1 GB). When it can: slots for every expert, preloaded in the background and
        filled on demand first, or with mmap the memory map itself (no store unless tracing)."""
        if self.backend.name == "mlx":
            return None  # the MLX backend converts experts from the map and streams them itself (no trace)
        sets = [layer.experts for layer in self.weights.layers]
        expert_bytes = sum(t.nbytes for es in sets for t in es.tensors)
        dense = sum(t.nbytes for t in self.file.tensors.values()) - expert_bytes
        if budget is None:  # leave a fifth of the rest and 1 GB to the OS, the KV cache and activations
            budget = int(0.8 * (available_memory() - dense)) - int(1e9)
        if policy not in ("lru", "lfu"):
            raise LocalcoderError(f"unknown expert cache policy {policy!r}; choose lru or lfu")
        if budget >= expert_bytes and self.mmap and not trace:
            return None
        store = ExpertStore(sets, max(budget, 0), policy=policy, trace=[] if trace else None, speculate=prefetch,
                            mapped=self.mmap)
        layers = tuple(replace(layer, experts=replace(layer.experts, store=store)) for layer in self.weights.layers)
        self.weights = replace(self.weights, layers=layers)
        if budget < expert_bytes or not self.mmap:
            # every token needs every dense weight: keep them in process memory, where the page cache's LRU
            # (busy with expert reads) cannot evict them. Read in the background so that the prompt is ready at
            # once; the first forward pass waits for it (and raises what the read raised).
            self._dense_copy = threading.Thread(target=self._copy_dense, daemon=True)
            self._dense_copy.start()
        if preload:
            store.preload()  # when the budget holds every expert: all read into memory in the background
        return store

    def _copy_dense(self) -> None:
        background_thread()
        try:
            self._read_dense()
        except BaseException as exc:  # noqa: BLE001 - raised by the forward pass that waits for the copy
            self._dense_copy_error = exc

    def _read_dense(self) -> None:
        tensors = dict(self.file.tensors)

        def runs(name: str) -> bool:  # the MTP layers after the first n_layer blocks never run: not copied
            m = re.match(r"blk\.(\d+)\.", name)
            return m is None or int(m.group(1)) < self.config.n_layer

        copies = {name: aligned_empty(t.data.shape, t.file_offset) for name, t in tensors.items()
                  if "_exps" not in name and runs(name)}
        _pread_all([(tensors[name].path, tensors[name].file_offset, a) for name, a in copies.items()])
        tensors.update({name: replace(tensors[name], data=readonly(a)) for name, a in copies.items()})
        dense = qwen3next.load_weights(self.config, tensors, str(self.file.path))
        layers = tuple(replace(new, experts=old.experts) for new, old in zip(dense.layers, self.weights.layers))
        self.weights = replace(dense, layers=layers)
        self.file.release_pages()

    @property
    def path(self):
        return self.file.path

    def new_cache(self) -> ModelCache:
        return make_cache(self.config, self.kv_dtype)

    def forward(self, ids: Sequence[int], cache: ModelCache, all_logits: bool = True) -> np.ndarray:
        """Process ids after the cache's history; logits (T, V) float32, or (1, V) for the last position."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.n_vocab):
            raise LocalcoderError(f"token id out of range 0..{self.config.n_vocab - 1}")
        if cache.broken:
            raise LocalcoderError("this cache was left half-updated by an interrupted forward pass; restore a "
                                  "snapshot or checkpoint taken before it, or start from model.new_cache()")
        with self._forward_lock:
            if self._closed:
                raise LocalcoderError("this model was closed; load it again to run it")
            if self._dense_copy is not None:
                self._dense_copy.join()
                self._dense_copy = None
                if self._dense_copy_error is not None:
                    raise self._dense_copy_error
            self.forward_tokens += len(ids)
            try:
                out = qwen3next.forward(self.backend, self.config, self.weights, ids, cache, all_logits)
            except BaseException:
                cache.broken = True  # some layers advanced, others not (Ctrl-C mid-step)
                raise
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        """Stop the expert store's I/O threads and free its slots (also done when the model is garbage
        collected); the model cannot run afterwards."""
        with self._forward_lock:
            self._closed = True
            if self.expert_store is not None:
                self.expert_store.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """A fresh prefill from an empty cache: logits for every position, (T, V) float32."""
        return self.forward(token_ids, self.new_cache(), all_logits=True)

    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 256, sampler=None,
                 stop: Sequence[str] = (), cache: ModelCache | None = None, stats=None) -> Iterator[int]:
        return gen.generate(self, prompt_ids, max_tokens, sampler, stop, cache, stats)

    def stream(self, prompt_ids: Sequence[int], max_tokens: int = 256, sampler=None,
               stop: Sequence[str] = (), cache: ModelCache | None = None, stats=None) -> Iterator[str]:
        """Text pieces as they are generated."""
        for _, piece in gen.generate_steps(self, prompt_ids, max_tokens, sampler, stop, cache, stats):
            if piece:
                yield piece

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], tools=None, add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation's ids: the template's control tokens matched, not those written inside a
        message's content (see ChatTemplate.render_spans)."""
        text, contents = self.chat_template.render_spans(messages, tools=tools,
                                                         add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, parse_special=True, plain=contents)


def _check_mlx_expert_options(policy: str, prefetch: bool) -> None:
    """The MLX backend streams experts through its own LRU cache (sized by --expert-cache), with no frequency
    policy and no speculative prefetch: refuse those options rather than ignore them."""
    given = ([f"--expert-policy {policy}"] if policy != "lru" else []) + (["--expert-prefetch"] if prefetch else [])
    if given:
        raise LocalcoderError(f"{', '.join(given)}: the MLX backend streams experts through its own LRU cache "
                              "(--expert-cache sets its size) without this; drop them, or use --backend numba")


def _pread_all(jobs: list[tuple[str, int, np.ndarray]], piece: int = 8 << 20, threads: int = 4) -> None:
    """Fill each array from its file at its offset, in `piece`-byte reads on `threads` threads (disks serve
    parallel reads several times faster than one sequential stream; measured here: 1.3-2 vs 0.5 GB/s),
    past the page cache where the system allows (RawReader)."""
    from concurrent.futures import ThreadPoolExecutor

    readers = {path: RawReader(path) for path in {j[0] for j in jobs}}
    try:
        pieces = []
        for path, offset, a in jobs:
            flat = a.reshape(-1)
            pieces += [(readers[path], offset + o, flat[o:o + piece]) for o in range(0, a.nbytes, piece)]

        def read(job) -> None:
            reader, offset, dst = job
            got = reader.read(dst, offset)
            if got < dst.nbytes:
                raise LocalcoderError(f"the model file ended early at byte {offset + got}; it is truncated: "
                                      "download or convert it again")

        with ThreadPoolExecutor(threads, initializer=background_thread) as pool:
            list(pool.map(read, pieces))
    finally:
        for r in readers.values():
            r.close()


def parse_size(size) -> int:
    """Bytes from an int or a string like 12G, 512M, 1.5GB."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(size))
    if not m:
        raise LocalcoderError(f"cannot read size {size!r}; write it like 12G or 512M")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def load(path: str | os.PathLike, backend="auto", n_ctx: int | None = None, expert_cache=None,
         expert_policy: str = "lru", expert_trace: bool = False, expert_prefetch: bool = False,
         kv_type: str = "f32", mmap: bool | None = None, threads: int | None = None,
         chat_template_file: str | os.PathLike | None = None) -> Model:
    """Open and validate a qwen3next GGUF (nothing but its header is read here).

    expert_cache: byte budget for routed experts (int or "12G"); when it cannot hold them all, experts are
    streamed from disk (see localcoder.experts). Default: from available RAM. mmap: compute on the file
    mapping instead of process memory (default: only for the MLX backend). threads: CPU threads of the numba
    backend (default: every core; more than the machine has are capped at its count). chat_template_file: a
    Jinja chat template to use instead of the GGUF's (checked by rendering a message at load)."""
    return Model(GGUFFile(path), backend=backend, n_ctx=n_ctx, expert_cache=expert_cache,
                 expert_policy=expert_policy, expert_trace=expert_trace, expert_prefetch=expert_prefetch,
                 kv_type=kv_type, mmap=mmap, threads=threads, chat_template_file=chat_template_file)
