"""OpenAI-compatible HTTP API (`localcoder serve`), for coding agents: Starlette + uvicorn.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (streamed as server-sent
events, or whole), ``POST /v1/completions``, ``GET /health``. With an API key every endpoint but ``/health``
wants ``Authorization: Bearer KEY``.

One model, one generation at a time: requests wait in arrival order (at most ``max_queue`` of them; past that
the answer is 429 with ``Retry-After``). Model work runs in one worker thread, so the event loop keeps
answering ``/health``, queueing and disconnects; a client that goes away cancels its generation (checked
between prompt chunks and between tokens), and its place in the queue.

Prompt reuse: a byte-budgeted LRU keeps model states keyed by the token ids they hold: after the system
prompt, before a prompt's last token, and after a reply. A request restores a copy of the longest stored
prefix of its prompt and runs only the rest, so an agent's next turn (or a retry, or a new conversation with
the same system prompt and tools) processes only new tokens; ``cached_tokens`` says how many were reused.
The DeltaNet state cannot be rewound, so only an exact stored prefix can be reused.

Tool calls: the model's Qwen3-Coder XML calls are parsed by :mod:`localcoder.toolcalls` into ``tool_calls``
and streamed as ``delta.tool_calls`` (a call's id and name as soon as they are written, its arguments when
the call is complete). ``tool_choice``: ``none`` renders no tools; ``required`` and a named function prefill
the reply with ``<tool_call>\\n<function=`` (and the name) so the model has to call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api_schema import (APIError, Logprob, LogprobSampler, NameConstraint, TokenIndex, bad, chat_logprob,
                         chat_logprobs, integer, json_body, legacy_logprobs, parse_max_tokens, parse_messages,
                         parse_sampler, parse_stop, parse_tool_choice, parse_tools, refuse_unsupported, top_count,
                         typed_field)
from .cache import KVCache, ModelCache
from .errors import LocalcoderError
from .generate import PREFILL_CHUNK, GenerationStats, generate_steps
from .sampling import Sampler
from .toolcalls import TOOL_CALL_CLOSE, ToolCallDelta, ToolCallParser, parse_tool_calls

__all__ = ["serve", "create_app", "PromptCache", "model_generate", "GenerateFn"]

log = logging.getLogger("localcoder.server")

POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there

# generate_fn(prompt_ids, max_tokens, sampler, stop, cache, stats, cancel) -> (token id, text piece), ...
# `cache` holds the whole prompt but `prompt_ids` (its last token: the server runs the rest itself, so it can
# keep the state before it); a piece not from one token (a flushed tail) has id -1; `stats.finish_reason` is
# "stop" or "length" at the end; `cancel` is a threading.Event the function may check between steps (the
# server checks it after each token too).
GenerateFn = Callable[..., Iterator[tuple[int, str]]]


def model_generate(model) -> GenerateFn:
    """The real generation."""

    def generate(prompt_ids, max_tokens, sampler, stop, cache, stats, cancel):
        return generate_steps(model, prompt_ids, max_tokens, sampler, stop, cache, stats)

    return generate


class _ClientGone(Exception):
    pass


# -- prompt reuse ------------------------------------------------------------------------------------------
def _footprint(cache: ModelCache) -> int:
    n = 40 * len(cache.tokens)
    for layer in cache.layers:
        n += layer.k.nbytes + layer.v.nbytes if isinstance(layer, KVCache) else layer.nbytes
    return n


def default_cache_bytes() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return int(min(4 << 30, ram // 8))


class PromptCache:
    """Model states after known token sequences, least recently used first out, within a byte budget.
    Used from the model thread only."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple, tuple[ModelCache, int]] = OrderedDict()
        self.bytes = 0

    def take(self, ids: Sequence[int]) -> tuple[ModelCache | None, int]:
        """A copy of the longest stored prefix of `ids` that leaves at least one id to process."""
        limit = len(ids) - 1
        best = None
        for key in self.entries:
            n = len(key)
            if n <= limit and (best is None or n > len(best)) and tuple(ids[:n]) == key:
                best = key
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best][0].snapshot(), len(best)

    def store(self, cache: ModelCache, copy: bool = True) -> None:
        """Keep `cache`'s state (a copy, unless the caller is done with it)."""
        if cache.broken or cache.pos == 0 or cache.pos != len(cache.tokens):
            return
        key = tuple(cache.tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        snap = cache.snapshot() if copy else cache
        size = _footprint(snap)
        if size > self.budget:
            return
        self.entries[key] = (snap, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, freed) = self.entries.popitem(last=False)
            self.bytes -= freed


# -- one generation ----------------------------------------------------------------------------------------
@dataclass
class _Work:
    ids: list[int]
    max_tokens: int
    sampler: Sampler
    stop: list[str]
    stream: bool
    include_usage: bool
    tools: list[dict] | None = None  # parse tool calls against these (None: no parsing)
    prefill: str = ""  # text the reply starts with (tool_choice), part of the prompt
    keep_at: tuple[int, ...] = ()  # prompt lengths whose states are worth keeping too (the system prompt)
    logprobs: int | None = None  # alternatives per token to report (None: no logprobs)
    names: tuple[str, ...] = ()  # the reply starts inside <function=: it must name one of these


@dataclass(eq=False)
class _Job:
    work: _Work
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    completion_tokens: int = 0
    cached_tokens: int = 0
    future: asyncio.Future | None = None
    closed: bool = False

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancel.set()


class _Gate:
    """One generation at a time; the others wait in arrival order, at most `max_queue` of them.
    Used from the event loop only."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.busy = False
        self.waiters: deque[asyncio.Future] = deque()
        self.mean_seconds = 5.0  # of a generation, for Retry-After

    async def enter(self, request: Request) -> None:
        if not self.busy:
            self.busy = True
            return
        if len(self.waiters) >= self.max_queue:
            wait = max(1, min(600, math.ceil(self.mean_seconds * (len(self.waiters) + 1))))
            raise APIError(429, f"the server is busy: {len(self.waiters)} requests are already waiting for the "
                                f"model; retry in {wait} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(wait)})
        turn = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        try:
            while not turn.done():
                await asyncio.wait({turn}, timeout=POLL_SECONDS)
                if not turn.done() and await request.is_disconnected():
                    raise _ClientGone()
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # it was our turn already: pass it on
            else:
                turn.cancel()
                self.waiters.remove(turn)
            raise

    def leave(self) -> None:
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # stays busy: the turn passes to the next in line
                return
        self.busy = False


class _Server:
    def __init__(self, model, api_key, max_queue, cache_bytes, generate_fn):
        self.model = model
        self.api_key = api_key
        self.name = Path(model.path).stem
        general = model.file.get("general.name")
        aliases = {self.name, Path(model.path).name}
        if isinstance(general, str) and general:
            aliases.add(general)
        self.aliases = {a.lower() for a in aliases}
        self.created = int(os.path.getmtime(model.path)) if os.path.exists(model.path) else int(time.time())
        self.gate = _Gate(max_queue)
        self.prompts = PromptCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
        self.generate_fn = generate_fn or model_generate(model)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localcoder-model")
        self.jobs: set[_Job] = set()
        self.token_index: TokenIndex | None = None  # for tool_choice "required" (built on first use)
        self.closing = False  # shutting down: running generations are stopped, waiting ones refused

    # -- checks ---------------------------------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise bad("'model' must be a string", param="model", code="invalid_type")
        if name.lower() not in self.aliases:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def check_context(self, ids: list[int], param: str) -> int:
        """Room left for the reply; the prompt must leave at least one token."""
        room = self.model.n_ctx - len(ids)
        if room < 1:
            raise bad(f"the prompt is {len(ids)} tokens but the context holds {self.model.n_ctx}; shorten the "
                      f"conversation or restart the server with a larger --ctx (the model allows "
                      f"{self.model.config.n_ctx_train})", param=param, code="context_length_exceeded")
        return room

    def chat_work(self, body: dict) -> _Work:
        """Validate a chat request and render it to token ids (runs in a worker thread: rendering and
        tokenizing a long conversation takes a while)."""
        refuse_unsupported(body, chat=True)
        messages = parse_messages(body.get("messages"))
        tools = parse_tools(body.get("tools"))
        use_tools, prefill, names = parse_tool_choice(body.get("tool_choice"), tools)
        sampler, stop, max_tokens, stream, usage = self._common(body)
        if use_tools and typed_field(body, "parallel_tool_calls", (bool,), "true or false", True) is False:
            stop = stop + [TOOL_CALL_CLOSE]  # the reply ends with its first call
        logprobs = chat_logprobs(body)
        try:
            text, contents = self.model.chat_template.render_spans(messages, tools if use_tools else None,
                                                                   add_generation_prompt=True)
        except LocalcoderError as e:
            raise bad(str(e), param="messages", code="template_error") from None
        ids = self.model.tokenizer.encode(text + prefill, parse_special=True, plain=contents)
        room = self.check_context(ids, "messages")
        return _Work(ids, min(max_tokens or room, room), sampler, stop, stream, usage,
                     tools if use_tools else None, prefill, self._system_end(messages, ids), logprobs, names)

    def _system_end(self, messages: list[dict], ids: list[int]) -> tuple[int, ...]:
        """Where the system message (and the tools, rendered into it) ends: a new conversation of an agent
        starts with the same one, so its state is kept for reuse."""
        end = self.model.tokenizer.token_to_id("<|im_end|>")
        if messages[0]["role"] != "system" or end is None or end not in ids:
            return ()
        return (ids.index(end) + 1,)

    def completion_work(self, body: dict) -> _Work:
        """Validate a completion request and tokenize its prompt, a fill-in-the-middle one with a `suffix`
        (runs in a worker thread, as chat_work)."""
        refuse_unsupported(body, chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        suffix = typed_field(body, "suffix", (str,), "a string")
        sampler, stop, max_tokens, stream, usage = self._common(body)
        logprobs = top_count(body, "logprobs")
        if suffix is not None:
            ids = self._fim(prompt, suffix)
        elif isinstance(prompt, str):
            ids = self.model.tokenizer.encode(prompt, parse_special=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
            outside = [t for t in ids if not 0 <= t < self.model.config.n_vocab]
            if outside:
                raise bad(f"token id {outside[0]} is outside 0..{self.model.config.n_vocab - 1}", param="prompt")
        else:
            raise bad("'prompt' must be a string, a list with one string, or a list of token ids",
                      param="prompt", code="invalid_type")
        if not ids:
            raise bad("'prompt' is empty", param="prompt")
        room = self.check_context(ids, "prompt")
        return _Work(ids, min(max_tokens or 16, room), sampler, stop, stream, usage, logprobs=logprobs)

    def _fim(self, prefix: Any, suffix: str) -> list[int]:
        """Qwen-Coder's fill-in-the-middle prompt, <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>,
        with the user's text tokenized without matching control tokens (code may well contain them)."""
        if not isinstance(prefix, str):
            raise bad("with 'suffix' (fill-in-the-middle), 'prompt' must be the text before the gap, not token "
                      "ids", param="prompt", code="invalid_type")
        tok = self.model.tokenizer
        if tok.fim_ids is None:
            raise bad("'suffix' asks for fill-in-the-middle, but this model's vocabulary has no <|fim_prefix|>, "
                      "<|fim_suffix|> and <|fim_middle|> tokens; send the prompt without 'suffix'",
                      param="suffix", code="fim_unsupported")
        pre, suf, mid = tok.fim_ids
        return [pre, *tok.encode(prefix), suf, *tok.encode(suffix), mid]

    def _common(self, body: dict):
        n = integer(body, "n", 1)
        if n != 1:
            raise bad("only n=1 is supported", param="n", code="unsupported_parameter")
        stream = typed_field(body, "stream", (bool,), "true or false", False)
        options = typed_field(body, "stream_options", (dict,), "an object", {})
        usage = typed_field(options, "include_usage", (bool,), "true or false", False)
        return (parse_sampler(body, self.model.config.n_vocab), parse_stop(body), parse_max_tokens(body), stream,
                usage)

    # -- running ------------------------------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        """The model thread: restore the longest cached prefix, run the rest of the prompt, generate, and keep
        the states before the prompt's last token and after the reply."""
        work, t0 = job.work, time.perf_counter()
        try:
            cache, reused = self.prompts.take(work.ids)
            cache = cache if cache is not None else self.model.new_cache()
            job.cached_tokens = job.stats.cached_tokens = reused
            self._prefill(work.ids[:-1], cache, job, work.keep_at)
            if not job.cancel.is_set():
                # stored before the last token, so that the same prompt again (a retry) reuses all of it
                self.prompts.store(cache, copy=True)
                sampler = work.sampler
                if work.names:
                    if self.token_index is None:
                        self.token_index = TokenIndex(self.model.tokenizer)
                    sampler = NameConstraint(sampler, self.token_index, work.names)
                if work.logprobs is not None:
                    sampler = LogprobSampler(sampler, work.logprobs)
                steps = self.generate_fn(work.ids[-1:], work.max_tokens, sampler, work.stop, cache,
                                         job.stats, job.cancel)
                logprobs, decoder, offset = [], self.model.tokenizer.stream_decoder(skip_special=True), 0
                try:
                    for token, piece in steps:
                        if token >= 0:
                            job.completion_tokens += 1
                            if work.logprobs is not None and sampler.picked and sampler.picked[0][0] == token:
                                logprobs.append(Logprob(*sampler.picked.popleft(), offset))
                                offset += len(decoder.add(token))
                        if piece:  # the logprobs of the tokens since the last piece go with it
                            job.emit(("text", piece, logprobs))
                            logprobs = []
                        if job.cancel.is_set():
                            break
                    if logprobs:  # tokens at the end that showed no text (a control token) have theirs too
                        job.emit(("text", "", logprobs))
                finally:
                    steps.close()
            self.prompts.store(cache, copy=False)
            job.emit(("done", None))
        except Exception as e:  # reported to the client; the server goes on
            log.exception("generation failed")
            job.emit(("error", e))
        finally:
            seconds = time.perf_counter() - t0
            self.gate.mean_seconds = 0.8 * self.gate.mean_seconds + 0.2 * seconds

    def _prefill(self, ids: list[int], cache: ModelCache, job: _Job, keep_at: tuple[int, ...]) -> None:
        """The part of `ids` the cache lacks, in chunks (a cancelled job stops between them), keeping the
        states at the lengths in `keep_at`."""
        job.stats.prompt_tokens += len(ids) - cache.pos
        stops = sorted({n for n in keep_at if cache.pos < n < len(ids)} | {len(ids)})
        for stop in stops:
            for start in range(cache.pos, stop, PREFILL_CHUNK):
                if job.cancel.is_set():
                    return
                self.model.forward(ids[start:min(start + PREFILL_CHUNK, stop)], cache, all_logits=False)
            if stop < len(ids):
                self.prompts.store(cache, copy=True)

    def stop_all(self) -> None:
        """Shutting down: stop the running generations; requests still waiting are refused when their turn
        comes."""
        self.closing = True
        for job in list(self.jobs):
            job.cancel.set()

    async def start(self, request: Request, work: _Work) -> _Job:
        await self.gate.enter(request)
        if self.closing:  # its turn came after Ctrl-C: a clear answer now, not a reply cut off at exit
            self.gate.leave()
            raise APIError(503, "the server is shutting down; send the request again once it is back",
                           type="server_error", code="shutting_down")
        job = _Job(work, asyncio.get_running_loop())
        self.jobs.add(job)
        job.future = job.loop.run_in_executor(self.executor, self._run, job)
        return job

    async def close(self, job: _Job) -> None:
        """Stop the job (if it still runs), wait for the model thread to let go, pass the turn on."""
        if job.closed:
            return
        job.closed = True
        job.cancel.set()
        try:
            with anyio.CancelScope(shield=True):
                await asyncio.wait({job.future})
        finally:
            self.jobs.discard(job)
            self.gate.leave()

    async def events(self, request: Request, job: _Job, check_each: bool):
        """The job's events; stops (cancelling the job) when the client disconnects, which is checked after
        each event (`check_each`, for streams) or every POLL_SECONDS."""
        pending, checked = None, time.monotonic()
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({pending}, timeout=POLL_SECONDS)
                if check_each or time.monotonic() - checked >= POLL_SECONDS:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel.set()
                        raise _ClientGone()
                if not done:
                    continue
                event, pending = pending.result(), None
                yield event
                if event[0] != "text":
                    return
        finally:
            if pending is not None:
                pending.cancel()


    async def collect(self, request: Request, job: _Job) -> tuple[str, list[Logprob]]:
        """The whole reply and its tokens' logprobs (for a request that is not streamed)."""
        pieces, logprobs = [], []
        try:
            async for event in self.events(request, job, check_each=False):
                if event[0] == "text":
                    pieces.append(event[1])
                    logprobs += event[2]
                elif event[0] == "error":
                    raise event[1]
        finally:
            await self.close(job)
        return "".join(pieces), logprobs

    async def stream(self, request: Request, job: _Job, head, on_text, tail):
        """Server-sent events: head(), on_text(piece, its tokens' logprobs) per piece, tail(), then [DONE];
        each gives a list of encoded events. An error after the start is sent as an error event."""
        try:
            for b in head():
                yield b
            async for event in self.events(request, job, check_each=True):
                if event[0] == "text":
                    for b in on_text(event[1], event[2]):
                        yield b
                elif event[0] == "error":
                    yield _sse(APIError(500, f"generation failed: {event[1]}", type="server_error").body())
                    yield b"data: [DONE]\n\n"
                    return
            for b in tail():
                yield b
            yield b"data: [DONE]\n\n"
        except _ClientGone:
            return
        finally:
            with anyio.CancelScope(shield=True):
                await self.close(job)


def _finish(job: _Job, has_calls: bool) -> str:
    reason = job.stats.finish_reason or "stop"
    if reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def _usage(job: _Job) -> dict:
    prompt = len(job.work.ids)
    return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _JobStream(StreamingResponse):
    """An SSE response that always lets go of its job, even when the body is never iterated."""

    def __init__(self, server: _Server, job: _Job, body):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.server, self.job = server, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.server.close(self.job)


# -- the app -----------------------------------------------------------------------------------------------
def _check_api_key(api_key: str | None) -> None:
    """An empty key would turn authentication off without a word."""
    if api_key is None:
        return
    if not api_key.strip():
        raise LocalcoderError("--api-key is empty, which would serve without authentication; give a key (e.g. "
                              "--api-key \"$(openssl rand -hex 16)\"), or leave the option out to serve without one")
    if api_key != api_key.strip():
        raise LocalcoderError("--api-key starts or ends with whitespace, which HTTP clients drop from the "
                              "Authorization header, so no request could match it; remove the spaces")


def create_app(model, api_key: str | None = None, max_queue: int = 16, cache_bytes: int | None = None,
               generate_fn: GenerateFn | None = None, cors_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app serving `model`. `generate_fn` replaces the model's generation (tests script the
    model's output with it; see GenerateFn). Browsers may call it from pages of this machine (any
    http(s)://localhost, 127.0.0.1 or [::1] origin, as Ollama allows by default) and from `cors_origins`
    ("*": any page)."""
    _check_api_key(api_key)
    srv = _Server(model, api_key, max_queue, cache_bytes, generate_fn)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": srv.name, "busy": srv.gate.busy,
                             "queued": len(srv.gate.waiters), "prompt_cache": {
                                 "entries": len(srv.prompts.entries), "bytes": srv.prompts.bytes}})

    def model_card() -> dict:
        return {"id": srv.name, "object": "model", "created": srv.created, "owned_by": "localcoder",
                "context_length": srv.model.n_ctx}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request):
        srv.check_model({"model": request.path_params["name"]})
        return JSONResponse(model_card())

    async def chat(request: Request):
        body = await json_body(request)
        srv.check_model(body)
        work = await anyio.to_thread.run_sync(srv.chat_work, body)
        job = await srv.start(request, work)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if work.stream:
            return _JobStream(srv, job, chat_stream(request, job, rid, created))
        text, lps = await srv.collect(request, job)

        def reply() -> JSONResponse:  # off the event loop: a long reply's logprobs take a while to shape
            logprobs = None if work.logprobs is None else {
                "content": [chat_logprob(srv.model.tokenizer, lp) for lp in lps]}
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = []
            if work.tools is not None:
                message["content"], calls = parse_tool_calls(work.prefill + text, work.tools)
                if calls:
                    message["tool_calls"] = [c.to_openai() for c in calls]
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": srv.name,
                                 "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                                              "finish_reason": _finish(job, bool(calls))}],
                                 "usage": _usage(job)})

        return await anyio.to_thread.run_sync(reply)

    def chat_stream(request: Request, job: _Job, rid: str, created: int):
        usage = job.work.include_usage
        parser = ToolCallParser(job.work.tools) if job.work.tools is not None else None
        held: list[Logprob] = []  # logprobs not sent yet, for the next chunk (the tool-call parser holds text)

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            logprobs = None
            if held:
                logprobs = {"content": [chat_logprob(srv.model.tokenizer, lp) for lp in held]}
                held.clear()
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if usage:
                out["usage"] = None
            return _sse(out)

        def deltas(items) -> list[bytes]:
            return [chunk({"tool_calls": [d.to_openai()]}) if isinstance(d, ToolCallDelta) else
                    chunk({"content": d}) for d in items]

        def head() -> list[bytes]:
            prefill = parser.feed(job.work.prefill) if parser is not None and job.work.prefill else []
            return [chunk({"role": "assistant", "content": ""})] + deltas(prefill)

        def on_text(text: str, logprobs: list[Logprob]) -> list[bytes]:
            held.extend(logprobs)
            return deltas(parser.feed(text) if parser is not None else [text])

        def tail() -> list[bytes]:
            out = deltas(parser.finish()) if parser is not None else []
            out.append(chunk({}, _finish(job, parser is not None and bool(parser.calls))))
            if usage:
                out.append(_sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                 "model": srv.name, "choices": [], "usage": _usage(job)}))
            return out

        return srv.stream(request, job, head, on_text, tail)

    async def completions(request: Request):
        body = await json_body(request)
        srv.check_model(body)
        work = await anyio.to_thread.run_sync(srv.completion_work, body)
        job = await srv.start(request, work)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def choice(text: str, finish: str | None, lps: list[Logprob]) -> dict:
            logprobs = None if work.logprobs is None else legacy_logprobs(srv.model.tokenizer, lps)
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        if work.stream:
            def piece(text: str, lps: list[Logprob], finish: str | None = None) -> list[bytes]:
                return [_sse({"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                              "choices": [choice(text, finish, lps)]})]

            def tail() -> list[bytes]:
                out = piece("", [], _finish(job, False))
                if work.include_usage:
                    out.append(_sse({"id": rid, "object": "text_completion", "created": created,
                                     "model": srv.name, "choices": [], "usage": _usage(job)}))
                return out

            return _JobStream(srv, job, srv.stream(request, job, list, piece, tail))
        text, lps = await srv.collect(request, job)
        return await anyio.to_thread.run_sync(lambda: JSONResponse(  # off the event loop, as for chat
            {"id": rid, "object": "text_completion", "created": created, "model": srv.name,
             "choices": [choice(text, _finish(job, False), lps)], "usage": _usage(job)}))

    async def on_api_error(request: Request, exc: APIError):
        return exc.response()

    async def on_http_error(request: Request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                        headers=exc.headers).response()

    async def on_client_gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)

    async def on_error(request: Request, exc: Exception):
        log.error("request failed: %s", exc, exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        srv.stop_all()
        srv.executor.shutdown(wait=False, cancel_futures=True)

    # each endpoint also without /v1, as llama-server serves them (a base URL copied from its docs works)
    routes = [Route("/health", health)] + [
        route for base in ("/v1", "") for route in (
            Route(f"{base}/models", models), Route(f"{base}/models/{{name:path}}", one_model),
            Route(f"{base}/chat/completions", chat, methods=["POST"]),
            Route(f"{base}/completions", completions, methods=["POST"]))]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: on_api_error, HTTPException: on_http_error, _ClientGone: on_client_gone, Exception: on_error})
    app.add_middleware(_BearerAuth, api_key=api_key)
    # outside the key check: a browser's preflight carries no Authorization header
    app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_origin_regex=_LOCAL_ORIGIN,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"], max_age=600)
    app.state.server = srv
    return app


class _BearerAuth:
    """Every path but /health wants `Authorization: Bearer KEY` when a key is set: the scheme in any case
    (RFC 7235), the key compared in constant time."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is not None and scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, given = dict(scope.get("headers") or ()).get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the "
                                    "server was started with (--api-key)", type="invalid_request_error",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_LOCAL_ORIGIN = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?"


def _check_listen(host: str, port: int) -> None:
    """One-line errors for a port out of range, an unknown host or an address already in use."""
    import socket

    if not 0 <= port <= 65535:
        raise LocalcoderError(f"--port {port} is not a TCP port; choose one in 0..65535 (0: any free port; default 8080)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LocalcoderError(f"--host {host!r} cannot be resolved ({e.strerror}); use an address such as "
                              "127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as e:
            raise LocalcoderError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or "
                                  "stop the program using it") from None


def serve(model_path, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          n_ctx: int | None = None, backend: str = "auto", max_queue: int = 16, cache_bytes: int | None = None,
          log_level: str = "info", threads: int | None = None, expert_cache=None, expert_policy: str = "lru",
          expert_prefetch: bool = False, kv_type: str = "f32", chat_template_file=None,
          cors_origins: Sequence[str] = ()) -> None:
    """Load the model (threads, expert_cache, expert_policy, expert_prefetch, kv_type and chat_template_file
    as for localcoder.load) and serve it until interrupted; cors_origins as for create_app."""

    from .backends import announce_compiles
    from .model import load

    _check_api_key(api_key)  # before the model loads, as the port
    _check_listen(host, port)  # before the model loads: a busy port should not cost a load
    announce_compiles(backend, log.warning)
    model = load(model_path, backend=backend, n_ctx=n_ctx, threads=threads, expert_cache=expert_cache,
                 expert_policy=expert_policy, expert_prefetch=expert_prefetch, kv_type=kv_type,
                 chat_template_file=chat_template_file)
    app = create_app(model, api_key=api_key, max_queue=max_queue, cache_bytes=cache_bytes, cors_origins=cors_origins)
    if model.chat_template.error:  # completions still work; every chat request will be a 400 saying this
        log.warning("%s (until then /v1/chat/completions answers 400; /v1/completions works)",
                    model.chat_template.error)
    if host not in _LOOPBACK and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    run_uvicorn(app, host, port, log_level)


def run_uvicorn(app, host: str, port: int, log_level: str) -> None:
    uvicorn_server(app, host=host, port=port, log_level=log_level).run()


def uvicorn_server(app, **config):
    """uvicorn, where Ctrl-C or SIGTERM first stops the running generations: their clients get a proper end
    (the finish reason and [DONE]) at once, instead of the connection cut after the graceful timeout."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.server.stop_all()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))
