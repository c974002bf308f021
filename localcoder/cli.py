"""The `localcoder` command. typer + rich live here only; the library yields, this file renders.

Every user error (LocalcoderError) is printed as one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .backends import announce_compiles, check_threads
from .errors import LocalcoderError
from .sampling import DEFAULTS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Local, offline runtime for Qwen3-Coder-Next GGUF models.")

ModelOpt = typer.Option(None, "-m", "--model", help="GGUF model file (default: look in ./models and "
                        "~/.localcoder/models)")
BackendOpt = typer.Option("auto", "--backend", help="auto, numpy, numba or mlx")
CtxOpt = typer.Option(None, "--ctx", help="context size in tokens (default 32768, at most the model's)")
TempOpt = typer.Option(DEFAULTS["temperature"], "--temp", help="temperature; 0 is greedy")
TopKOpt = typer.Option(DEFAULTS["top_k"], "--top-k")
TopPOpt = typer.Option(DEFAULTS["top_p"], "--top-p")
MinPOpt = typer.Option(DEFAULTS["min_p"], "--min-p")
RepeatOpt = typer.Option(DEFAULTS["repeat_penalty"], "--repeat-penalty")
SeedOpt = typer.Option(None, "--seed", help="random seed for sampling; -1 or none: a fresh one each run")
ExpertCacheOpt = typer.Option(None, "--expert-cache", help="memory for routed experts, e.g. 12G; experts that do "
                              "not fit are streamed from disk (default: from available RAM)")
ExpertPolicyOpt = typer.Option("lru", "--expert-policy", help="expert cache policy: lru or lfu")
KvTypeOpt = typer.Option("f32", "--kv-type", help="attention KV cache precision: f32 or f16 (half the memory)")
ExpertPrefetchOpt = typer.Option(False, "--expert-prefetch/--no-expert-prefetch",
                                 help="read the next layer's likely experts ahead (when streaming; off by default: on uniform routing the wrong guesses cost more disk time than they save)")
ExpertStatsOpt = typer.Option(None, "--expert-stats", help="write the per-layer routing trace (JSON lines) here")
ThreadsOpt = typer.Option(None, "-t", "--threads", help="CPU threads for the numba backend (default: every core)")
ChatTemplateFileOpt = typer.Option(None, "--chat-template-file", help="Jinja chat template to use instead of the "
                                   "model's (llama.cpp's option)")


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@app.command()
def info(model: Path = typer.Argument(..., help="GGUF model file")):
    """Architecture, dimensions, quant mix, tokenizer and chat template of a GGUF."""
    from rich.console import Console
    from rich.table import Table

    from .model import load

    m = load(model, backend="numpy")
    c, f = m.config, m.file
    console = Console()
    console.print(f"[bold]{f.path}[/bold]  ({f.file_size / 1e9:.2f} GB in {len(f.paths)} file(s))")
    console.print(f"name: {f.get('general.name', '?')}   architecture: {f.architecture}")
    dims = Table(show_header=False, box=None)
    rows = [
        ("layers", f"{c.n_layer} ({sum(c.recurrent_layers)} Gated DeltaNet, {c.n_attention_layers} gated attention)"),
        *([("MTP layers", f"{c.n_nextn_layer} (multi-token prediction: stored, not run)")] if c.n_nextn_layer else []),
        ("hidden", c.n_embd), ("vocab", c.n_vocab), ("trained context", c.n_ctx_train),
        ("attention", f"{c.n_head} q / {c.n_head_kv} kv heads, head dim {c.head_dim}, RoPE on {c.n_rot} dims, "
                      f"theta {c.rope_theta:g}"),
        ("DeltaNet", f"{c.ssm_n_v_heads} v / {c.ssm_n_k_heads} qk heads, head dims {c.ssm_v_dim}/{c.ssm_k_dim}, "
                     f"conv kernel {c.ssm_d_conv}"),
        ("MoE", f"{c.n_expert} experts, top-{c.n_expert_used}, expert width {c.n_ff_exp}, "
                f"shared expert width {c.n_ff_shexp}"),
    ]
    for k, v in rows:
        dims.add_row(k, str(v))
    console.print(dims)
    mix = Table(title="quant mix")
    for col in ("type", "tensors", "bytes", "share"):
        mix.add_column(col, justify="right" if col != "type" else "left")
    total = sum(b for _, b in f.quant_mix().values())
    for name, (n, b) in f.quant_mix().items():
        mix.add_row(name, str(n), f"{b / 1e6:,.1f} MB", f"{100 * b / total:.1f} %")
    console.print(mix)
    tok = m.tokenizer
    console.print(f"tokenizer: {f.get('tokenizer.ggml.model')} / {f.get('tokenizer.ggml.pre')}, "
                  f"{tok.vocab_size} tokens, {len(f.get('tokenizer.ggml.merges', []))} merges, "
                  f"eos {tok.eos_token_id}")
    src = f.get("tokenizer.chat_template")
    console.print("chat template: " + (f"from the file ({len(src)} chars{', with tools' if 'tools' in src else ''})"
                                       if src else "none in the file; built-in Qwen3-Coder template"), highlight=False)
    if m.chat_template.error:
        console.print(f"warning: {m.chat_template.error}", style="yellow", markup=False, highlight=False,
                      soft_wrap=True)


def _check_gen_tokens(n: int) -> None:
    if n < -1:
        raise LocalcoderError(f"-n/--max-tokens {n}: give a number of tokens, or -1 to generate until the model "
                              "stops or the context is full")


@app.command()
def run(
    prompt: str = typer.Option(..., "-p", "--prompt", help="prompt text"),
    model: Optional[Path] = ModelOpt,
    n: int = typer.Option(256, "-n", "--max-tokens", help="tokens to generate; -1: until the model stops or the "
                          "context is full"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the chat template as a user turn"),
    system: Optional[str] = typer.Option(None, "--system", help="system message (implies --chat)"),
    temp: float = TempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: Optional[int] = SeedOpt,
    stop: List[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    backend: str = BackendOpt,
    ctx: Optional[int] = CtxOpt,
    expert_cache: Optional[str] = ExpertCacheOpt,
    expert_policy: str = ExpertPolicyOpt,
    expert_prefetch: bool = ExpertPrefetchOpt,
    expert_stats: Optional[Path] = ExpertStatsOpt,
    kv_type: str = KvTypeOpt,
    threads: Optional[int] = ThreadsOpt,
    chat_template_file: Optional[Path] = ChatTemplateFileOpt,
):
    """Generate text from a prompt, streamed to stdout; speed goes to stderr. --system and
    --chat-template-file imply --chat (llama.cpp's -sys does too): a plain completion has no use for them."""
    from .generate import GenerationStats
    from .sampling import make_sampler

    _check_gen_tokens(n)
    if "" in stop:
        raise LocalcoderError('--stop "": an empty stop string cannot mark where to stop; give the text to stop '
                              "at, or leave --stop out")
    if expert_stats is not None:
        from .paths import check_output_path

        expert_stats = check_output_path(expert_stats, "routing trace")
    sampler = make_sampler(temp, top_k, top_p, min_p, repeat_penalty, seed=seed)
    m = _load_with_progress(model, backend, ctx, expert_cache, expert_policy, expert_stats, quiet=True,
                            kv_type=kv_type, threads=threads, expert_prefetch=expert_prefetch,
                            chat_template_file=chat_template_file)
    if expert_stats is not None and m.backend.name == "mlx":
        raise LocalcoderError("--expert-stats: the MLX backend routes experts on the device and records no "
                              "routing trace; drop it, or use --backend numba or numpy")
    if chat or system is not None or chat_template_file is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = m.encode_chat(messages)
    else:
        ids = m.tokenizer.encode(prompt)
    stats = GenerationStats()
    steps = m.stream(ids, n, sampler, stop=stop, stats=stats)
    try:
        for piece in steps:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        steps.close()
        stats.finish_reason = "interrupted"
    sys.stdout.write("\n")
    _err(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_s:.1f} tokens/s | "
         f"generation: {stats.generated_tokens} tokens, {stats.generate_tokens_per_s:.1f} tokens/s | "
         f"finish: {stats.finish_reason}")
    _finish_experts(m, expert_stats)
    if stats.finish_reason == "interrupted":
        raise SystemExit(130)  # as any Ctrl-C: a script can tell the text was cut short


@app.command()
def demo(
    prompt: str = typer.Option("Write a Python function that reverses a string.", "-p", "--prompt"),
    n: int = typer.Option(48, "-n", "--max-tokens", help="tokens to generate; -1: until the model stops or the "
                          "context is full"),
    seed: int = typer.Option(0, "--seed"),
    backend: str = BackendOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Run a small random-weight qwen3next model with the real Qwen tokenizer (written on first use, no
    download). It exercises the whole runtime; its words are noise because its weights are random."""
    from rich.console import Console

    from .generate import GenerationStats
    from .model import load
    from .sampling import make_sampler
    from .synthetic import demo_model_path, ensure_demo_model

    _check_gen_tokens(n)
    console = Console(stderr=True, soft_wrap=True)  # lines wrap where the terminal does, not at 80 columns
    if not demo_model_path().exists():
        console.print(f"writing the demo model (random weights, real tokenizer) to {demo_model_path()} ...")
    announce_compiles(backend, _err)
    m = load(ensure_demo_model(), backend=backend, threads=threads)
    c = m.config
    console.print(f"[bold]localcoder demo[/bold]: qwen3next, {c.n_layer} layers "
                  f"({sum(c.recurrent_layers)} Gated DeltaNet + {c.n_attention_layers} attention), hidden {c.n_embd}, "
                  f"{c.n_expert} experts top-{c.n_expert_used}, vocab {c.n_vocab}, backend {m.backend.name}")
    console.print("[yellow]random weights: the reply below is noise; it shows tokenizer, chat template, "
                  "forward pass and sampling working end to end.[/yellow]")
    ids = m.encode_chat([{"role": "user", "content": prompt}])
    console.print(f"user> {prompt}   ({len(ids)} prompt tokens with the chat template)")
    stats = GenerationStats()
    for piece in m.stream(ids, n, make_sampler(seed=seed), stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    console.print(f"prompt {stats.prompt_tokens} tokens at {stats.prompt_tokens_per_s:.1f} tokens/s, "
                  f"generated {stats.generated_tokens} at {stats.generate_tokens_per_s:.1f} tokens/s")
    console.print("For the real model: download Qwen3-Coder-Next-Q4_K_M.gguf (48.5 GB) from Hugging Face, put it in "
                  "~/.localcoder/models/, then run `localcoder chat` (or `localcoder run -m FILE -p TEXT`).")


def _finish_experts(m, trace_path: Optional[Path]) -> None:
    """Print the expert-cache counters (when streaming) and write the routing trace."""
    store = m.expert_store
    if store is None:
        return
    c = store.counters
    _err(f"experts: {c.hits} hits, {c.misses} misses, {store.read_ahead()}"
         f"{c.bytes_read / 1e9:.2f} GB read, {c.io_wait_s:.2f} s waiting for I/O, "
         f"cache {store.budget_bytes / 1e9:.2f} GB ({store.n_slots} slots per layer, {store.policy_name})")
    if trace_path is not None and store.trace is not None:
        import json

        from .paths import write_text_atomically

        write_text_atomically(Path(trace_path), "".join(json.dumps({"layer": layer, "experts": ids}) + "\n"
                                                        for layer, ids in store.trace))
        _err(f"routing trace: {len(store.trace)} steps written to {trace_path}")


def _load_with_progress(model: Optional[Path], backend: str, ctx: Optional[int], expert_cache=None,
                        expert_policy: str = "lru", expert_stats: Optional[Path] = None, quiet: bool = False,
                        kv_type: str = "f32", threads: Optional[int] = None, expert_prefetch: bool = False,
                        chat_template_file: Optional[Path] = None, chat: bool = False):
    """Load with a progress bar on stderr; mmap makes this short: only the header is read. chat: the command
    renders conversations, so a chat template that cannot is an error now rather than at every turn."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .gguf_file import GGUFFile
    from .model import Model
    from .paths import resolve_model

    path = resolve_model(model)
    announce_compiles(backend, _err)
    t0 = time.perf_counter()
    console = _stderr_console()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"opening {path.name}", total=2)
        file = GGUFFile(path)
        progress.update(task, advance=1, description="tokenizer, template, weights (memory-mapped)")
        m = Model(file, backend=backend, n_ctx=ctx, expert_cache=expert_cache, expert_policy=expert_policy,
                  expert_trace=expert_stats is not None, expert_prefetch=expert_prefetch, kv_type=kv_type,
                  threads=threads, chat_template_file=chat_template_file)
        progress.update(task, advance=1)
    if chat and m.chat_template.error:
        raise LocalcoderError(m.chat_template.error)
    if not quiet:
        console.print(f"loaded {path.name} ({file.file_size / 1e9:.2f} GB, {m.config.n_layer} layers, "
                      f"backend {m.backend.name}, context {m.n_ctx:,}) in {time.perf_counter() - t0:.2f} s",
                      style="dim", highlight=False)
    return m


@contextlib.contextmanager
def _bytes_progress():
    """report(done_bytes, total_bytes, name) for convert/quantize: a progress bar on stderr from the first
    report on, so that input checks failing before any writing print their one-line error alone."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=_stderr_console())
    task = None

    def report(done: int, total: int, name: str) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(name[:40], total=total)
        bar.update(task, completed=done, total=total, description=name[:40])

    try:
        yield report
    finally:
        if task is not None:
            bar.stop()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # one line per message: logs are parsed line by line


def _session(model, backend, ctx, system, max_tokens, temp, top_k, top_p, min_p, repeat_penalty, seed,
             expert_cache=None, expert_policy="lru", kv_type="f32", threads=None, expert_prefetch=False,
             chat_template_file=None, advice="/clear, /drop files"):
    from .chat import ChatSession, check_max_tokens
    from .sampling import make_sampler

    check_max_tokens(max_tokens)
    sampler = make_sampler(temp, top_k, top_p, min_p, repeat_penalty, seed=seed)
    m = _load_with_progress(model, backend, ctx, expert_cache, expert_policy, kv_type=kv_type, threads=threads,
                            expert_prefetch=expert_prefetch, chat_template_file=chat_template_file, chat=True)
    return ChatSession(m, system=system, max_tokens=max_tokens, sampler=sampler, advice=advice)


@app.command()
def chat(
    model: Optional[Path] = ModelOpt,
    file: List[str] = typer.Option([], "-f", "--file", help="file, directory or glob to put in the conversation "
                                   "(repeatable; directories and globs skip what .gitignore ignores and binary "
                                   "files; a named binary or non-UTF-8 file is an error)"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    max_tokens: int = typer.Option(2048, "-n", "--max-tokens", help="tokens per reply at most"),
    temp: float = TempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: Optional[int] = SeedOpt,
    backend: str = BackendOpt,
    ctx: Optional[int] = CtxOpt,
    history_dir: Optional[Path] = typer.Option(None, "--history-dir", help="where transcripts are saved on exit "
                                               "(default ~/.localcoder/history)"),
    no_history: bool = typer.Option(False, "--no-history", help="do not save the transcript on exit"),
    expert_cache: Optional[str] = ExpertCacheOpt,
    expert_policy: str = ExpertPolicyOpt,
    expert_prefetch: bool = ExpertPrefetchOpt,
    kv_type: str = KvTypeOpt,
    threads: Optional[int] = ThreadsOpt,
    chat_template_file: Optional[Path] = ChatTemplateFileOpt,
):
    """Interactive, offline code Q&A in the terminal."""
    from .chat import expand_paths
    from .paths import HOME, check_output_dir
    from .repl import Repl, history_file

    hist = None if no_history else history_file(check_output_dir(history_dir or HOME / "history", "--history-dir"))
    paths = expand_paths(file, note=_note)  # a missing, binary or non-UTF-8 -f file fails before the model loads
    session = _session(model, backend, ctx, system, max_tokens, temp, top_k, top_p, min_p, repeat_penalty, seed,
                       expert_cache, expert_policy, kv_type, threads, expert_prefetch, chat_template_file)
    console = _stderr_console()
    if paths:
        for f in session.attach_paths(paths):
            console.print(f"added {f.path} ({f.tokens:,} tokens)", markup=False, highlight=False)
    from rich.console import Console

    Repl(session, Console(), hist).run()


@app.command()
def ask(
    question: str = typer.Argument(..., help="the question; text piped on stdin is attached to it"),
    model: Optional[Path] = ModelOpt,
    file: List[str] = typer.Option([], "-f", "--file", help="file, directory or glob to attach (repeatable)"),
    system: Optional[str] = typer.Option(None, "--system"),
    max_tokens: int = typer.Option(2048, "-n", "--max-tokens"),
    temp: float = TempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: Optional[int] = SeedOpt,
    backend: str = BackendOpt,
    ctx: Optional[int] = CtxOpt,
    as_json: bool = typer.Option(False, "--json", help="print the answer with token counts and timings as JSON"),
    expert_cache: Optional[str] = ExpertCacheOpt,
    expert_policy: str = ExpertPolicyOpt,
    expert_prefetch: bool = ExpertPrefetchOpt,
    kv_type: str = KvTypeOpt,
    threads: Optional[int] = ThreadsOpt,
    chat_template_file: Optional[Path] = ChatTemplateFileOpt,
):
    """One question, one answer, for scripts: `git diff | localcoder ask "review this"`."""
    from .chat import expand_paths
    from .repl import answer_json

    paths = expand_paths(file, note=_note)  # a missing, binary or non-UTF-8 -f file fails before the model loads
    piped = "" if sys.stdin.isatty() else sys.stdin.read()
    if not question.strip() and not piped.strip() and not file:
        raise LocalcoderError('the question is empty; give one, e.g. localcoder ask "what does this do?" -f FILE')
    session = _session(model, backend, ctx, system, max_tokens, temp, top_k, top_p, min_p, repeat_penalty, seed,
                       expert_cache, expert_policy, kv_type, threads, expert_prefetch, chat_template_file,
                       advice="attach less (fewer -f files, less piped text)")
    if paths:
        session.attach_paths(paths)
    if piped.strip():
        question = f"{question}\n\n```\n{piped.rstrip()}\n```"
    text = ""
    pieces = session.send(question)
    try:
        for piece in pieces:
            text += piece
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
    if as_json:
        print(answer_json(session, text))
    else:
        sys.stdout.write("\n")
    if session.last.finish_reason == "interrupted":
        _err("interrupted: the answer is cut short")
        raise SystemExit(130)


def _note(message: str) -> None:
    _err(f"note: {message}")


@app.command()
def convert(
    hf_dir: Path = typer.Argument(..., help="Hugging Face checkpoint folder (config.json, tokenizer, safetensors)"),
    out: Path = typer.Option(..., "-o", "--out", help="output .gguf file"),
    out_type: str = typer.Option("bf16", "--type", help="f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k"),
    keep_mtp: bool = typer.Option(False, "--keep-mtp", help="carry the multi-token-prediction tensors"),
    name: Optional[str] = typer.Option(None, "--name", help="general.name to write (default: the folder's name)"),
):
    """Convert a safetensors checkpoint to a qwen3next GGUF (streaming, bounded memory)."""
    from .quant.convert import convert as run_convert

    with _bytes_progress() as report:
        path = run_convert(hf_dir, out, out_type=out_type, keep_mtp=keep_mtp, progress=report, name=name)
    _stderr_console().print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")


@app.command()
def quantize(
    in_gguf: Path = typer.Argument(..., help="F32, F16 or BF16 qwen3next GGUF"),
    out_gguf: Path = typer.Argument(..., help="output .gguf file"),
    out_type: str = typer.Option("q4_k_m", "--type", help="q4_k_m, q5_k_m, q6_k, q4_0, q8_0, bf16, f16 or f32"),
    threads: Optional[int] = typer.Option(None, "--threads", help="quantizer threads (default: all cores)"),
):
    """Re-quantize a GGUF with llama-quantize's per-tensor mix (streaming, bounded memory)."""
    from .quant.convert import requantize

    check_threads(threads)
    from .backends.numba_cpu import set_threads

    set_threads(threads)  # None: every core
    with _bytes_progress() as report:
        path = requantize(in_gguf, out_gguf, out_type, progress=report)
    _stderr_console().print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)")


@app.command()
def serve(
    model: Optional[Path] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback unless told otherwise)"),
    port: int = typer.Option(8080, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require Authorization: Bearer KEY"),
    ctx: Optional[int] = CtxOpt,
    backend: str = BackendOpt,
    max_queue: int = typer.Option(16, "--max-queue", help="requests waiting beyond this get 429"),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", metavar="ORIGIN", help="a web page origin that may call "
                                                    "the API from a browser (repeatable; '*' for any; pages of "
                                                    "localhost always may)"),
    cache: Optional[str] = typer.Option(None, "--prompt-cache", help="memory for reusable prompt states, e.g. 4G"),
    expert_cache: Optional[str] = ExpertCacheOpt,
    expert_policy: str = ExpertPolicyOpt,
    expert_prefetch: bool = ExpertPrefetchOpt,
    kv_type: str = KvTypeOpt,
    threads: Optional[int] = ThreadsOpt,
    chat_template_file: Optional[Path] = ChatTemplateFileOpt,
):
    """OpenAI-compatible HTTP API (chat completions with tool calls, completions, models)."""
    from .model import parse_size
    from .paths import resolve_model
    from .server import serve as run_server

    run_server(resolve_model(model), host=host, port=port, api_key=api_key, n_ctx=ctx, backend=backend,
               max_queue=max_queue, cache_bytes=parse_size(cache) if cache else None, threads=threads,
               expert_cache=expert_cache, expert_policy=expert_policy, expert_prefetch=expert_prefetch,
               kv_type=kv_type, chat_template_file=chat_template_file, cors_origins=cors_origin or ())


@app.command()
def bench(
    model: Optional[Path] = typer.Option(None, "-m", "--model", help="GGUF to measure"),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="measure a random-weight model with real "
                                            "dimensions instead: qwen3-coder-next (written once to the cache)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="with --synthetic: layers (multiple of 4)"),
    quant: str = typer.Option("q4_k_m", "--quant", help="with --synthetic: q4_k_m, q8_0 or q4_0"),
    prompt_tokens: int = typer.Option(512, "-p", "--prompt-tokens"),
    gen_tokens: int = typer.Option(128, "-n", "--gen-tokens"),
    depth: int = typer.Option(0, "-d", "--depth", help="tokens already in the context when prompt and generation "
                              "are timed (llama-bench's -d; prefilled once, untimed)"),
    threads: Optional[int] = ThreadsOpt,
    backend: str = BackendOpt,
    kv_type: str = KvTypeOpt,
    expert_cache: Optional[str] = ExpertCacheOpt,
    expert_policy: str = ExpertPolicyOpt,
    expert_prefetch: bool = ExpertPrefetchOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Prompt and generation tokens/s, bytes read per token, achieved GB/s against the measured bandwidth."""
    import json

    from .bench import run_bench

    if (model is None) == (synthetic is None):
        raise LocalcoderError("give either -m MODEL.gguf or --synthetic qwen3-coder-next")
    for flag, value in (("-p/--prompt-tokens", prompt_tokens), ("-n/--gen-tokens", gen_tokens)):
        if value < 1:
            raise LocalcoderError(f"{flag} {value}: the bench measures at least 1 token")
    if depth < 0:
        raise LocalcoderError(f"-d/--depth {depth}: give the number of tokens already in the context, 0 or more")
    check_threads(threads)
    if synthetic is not None:
        from .synthetic import ensure_synthetic

        model = ensure_synthetic(synthetic, layers, quant, announce=_err)
    res = run_bench(model, backend, prompt_tokens, gen_tokens, threads, expert_cache=expert_cache,
                    expert_policy=expert_policy, expert_prefetch=expert_prefetch, depth=depth, kv_type=kv_type,
                    announce=_err)
    res["model"] = str(model)
    if as_json:
        print(json.dumps(res))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"localcoder bench: {Path(model).name}", show_header=False)
    gb = 1e9
    at = f" @ d{depth}" if depth else ""
    rows = [
        ("backend / threads", f"{res['backend']} / {res['threads']}"),
        (f"prompt (pp{prompt_tokens}{at})", f"{res['pp_tokens_per_s']:.1f} tokens/s"),
        (f"generation (tg{gen_tokens}{at})", f"{res['tg_tokens_per_s']:.2f} tokens/s"),
        ("KV cache", f"{res['kv_type']}" + (f", {depth:,} tokens deep (filled in {res['depth_fill_s']:.0f} s)"
                                           if depth else "")),
        ("weights read per token", f"{res['weight_bytes_per_token'] / 1e6:,.0f} MB"),
        ("achieved", f"{res['achieved_gbs']:.1f} GB/s"),
        ("measured read bandwidth", f"{res['read_bandwidth_gbs']:.1f} GB/s"),
        ("roofline", f"{res['roofline_tokens_per_s']:.1f} tokens/s; reached {100 * res['roofline_fraction']:.0f} %"),
        ("first token from process start", f"{res['first_token_s']:.2f} s"),
        ("peak RSS", f"{res['peak_rss_bytes'] / gb:.2f} GB (model file {res['model_file_bytes'] / gb:.1f} GB)"),
    ]
    if res.get("expert_cache_bytes"):
        rows += [
            ("expert cache", f"{res['expert_cache_bytes'] / gb:.2f} GB ({res['expert_slots_per_layer']} slots per "
                             f"layer, {res['expert_policy']})"),
            ("expert hits / misses", f"{res['expert_hits']:,} / {res['expert_misses']:,} "
                                     f"({100 * res['expert_hit_rate']:.1f} % hits; {res['expert_prefetch_hits']:,} "
                                     f"from {res['expert_prefetches']:,} prefetches; "
                                     f"{res['expert_preloaded']:,} preloaded)"),
            ("disk read per token", f"{(res['disk_bytes_per_token'] or 0) / 1e6:,.1f} MB (misses: "
                                    f"{res['expert_miss_bytes_per_token'] / 1e6:,.1f} MB)"),
            ("disk bandwidth", f"{res['disk_bandwidth_gbs']:.2f} GB/s measured after the run; during it, busy "
                               f"{100 * res['io_busy_fraction']:.0f} % of the time at {res['io_busy_gbs']:.2f} GB/s"),
            ("waiting for reads", f"{1e3 * res['io_wait_s_per_token']:.0f} ms per token; the reads took "
                                  f"{res['io_cpu_s_per_gb']:.2f} CPU s per GB"),
            ("streaming limit", f"{res['streaming_limit_tokens_per_s']:.2f} tokens/s; reached "
                                f"{100 * res['streaming_limit_fraction']:.0f} %"),
            ("distinct experts per layer", f"{res['distinct_experts_per_layer']:.0f} over {gen_tokens} tokens"),
        ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


@app.command()
def warmup():
    """Compile the Numba kernels ahead of time (cached on disk; later starts take about a second)."""
    from .backends.numba_cpu import warmup as compile_all

    t0 = time.perf_counter()
    compile_all()
    _err(f"kernels compiled and cached in {time.perf_counter() - t0:.1f} s")


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary output files are removed on the way


def _parser_exceptions():
    try:
        from typer._click import exceptions  # newer typer carries its own copy of click
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    import signal

    parser = _parser_exceptions()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False, prog_name="localcoder")  # parser errors come back here, as one line
        if isinstance(code, int) and code:
            sys.exit(code)
    except getattr(parser, "NoArgsIsHelpError", ()):  # click >= 8.2; older ones print the help themselves
        app(["--help"], prog_name="localcoder")  # exits 0
    except parser.UsageError as e:
        where = e.ctx.command_path if e.ctx else "localcoder"
        _err(f"error: {' '.join(e.format_message().split()).rstrip('.')}; see {where} --help")
        sys.exit(2)
    except typer.Abort:
        _err("aborted")
        sys.exit(1)
    except LocalcoderError as e:
        _err(f"error: {e}")
        sys.exit(2)
    except OSError as e:  # a path the user gave cannot be read or written
        where = f" ({e.filename})" if e.filename else ""
        _err(f"error: {e.strerror or e}{where}; check the path, permissions and free disk space")
        sys.exit(2)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
