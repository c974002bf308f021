"""The interactive `localcoder chat` loop: input with history and multi-line, streamed replies rendered as
Markdown once complete, slash commands. Rendering (rich) lives here and in cli.py only."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape
from rich.text import Text

from .chat import ChatSession
from .errors import LocalcoderError
from .memory import peak_rss_bytes

HELP = """\
/help                 this help
/add PATH...          add files, directories or globs to the conversation (honours .gitignore; quote
                      names with spaces; a changed file replaces its old copy)
/drop PATH            remove a file          /files   list files with their token counts
/clear                forget the conversation (files too)
/undo                 remove the last question and its answer
/retry                answer the last question again
/edit TEXT            replace the last question and answer it again
/system TEXT          set the system message (empty: none)
/save FILE            save the transcript (JSON, OpenAI message format)   /load FILE   load one
/stats                speed, memory and cache figures
/set NAME VALUE       temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens
/exit                 quit (also Ctrl-D, or Ctrl-C at an empty prompt)
Multi-line input: end a line with \\ to continue, or wrap a block in \"\"\" ... \"\"\". Ctrl-C on a typed
line or in a block discards it. To send a message that starts with /, begin it with //."""

SETTABLE = {"temp": ("temperature", float), "temperature": ("temperature", float), "top_k": ("top_k", int),
            "top_p": ("top_p", float), "min_p": ("min_p", float), "repeat_penalty": ("repeat_penalty", float),
            "seed": ("seed", int), "max_tokens": ("max_tokens", int)}


class Discarded(Exception):
    """Ctrl-C with text typed, or inside a multi-line message: that message is dropped and the chat goes on."""


def _typed() -> bool:
    readline = sys.modules.get("readline")
    return bool(readline is not None and readline.get_line_buffer())


def read_message(prompt: str = ">>> ") -> str:
    """One message; raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C at an empty prompt and Discarded
    on Ctrl-C after text was typed."""
    try:
        line = input(prompt)
    except KeyboardInterrupt:
        if _typed():
            raise Discarded from None
        raise
    try:
        return _rest_of_message(line)
    except KeyboardInterrupt:
        raise Discarded from None


def _rest_of_message(line: str) -> str:
    """The message that starts with line: a \"\"\" block, or lines ending in \\ joined with the next."""
    if line.strip().startswith('"""'):
        first = line.strip()[3:]
        if first.endswith('"""') and len(first) >= 3:
            return first[:-3]
        lines = [first] if first else []
        while True:
            nxt = input("... ")
            if nxt.rstrip().endswith('"""'):
                lines.append(nxt.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(nxt)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input("... ")
    lines.append(line)
    return "\n".join(lines)


class Repl:
    def __init__(self, session: ChatSession, console: Console, history_path: Path | None):
        self.s = session
        self.console = console
        self.history_path = history_path
        self.tty = sys.stdout.isatty()
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def status(self) -> str:
        st, m = self.s.last, self.s.model
        used = self.s.prefix.cache.pos
        return (f"[{st.prompt_tokens} new + {st.cached_tokens} cached prompt tokens, {st.generated_tokens} generated"
                f" | {st.prompt_tokens_per_s:.1f} / {st.generate_tokens_per_s:.1f} tokens/s"
                f" | context {used:,}/{m.n_ctx:,}" + (" | interrupted" if st.finish_reason == "interrupted" else "")
                + "]")

    def stream(self, pieces) -> None:
        text = ""
        try:
            if self.tty:
                with Live(Text(""), console=self.console, refresh_per_second=12, vertical_overflow="visible") as live:
                    for piece in pieces:
                        text += piece
                        live.update(Text(text))
                    live.update(Markdown(text, code_theme="monokai"))
            else:
                for piece in pieces:
                    text += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        except KeyboardInterrupt:
            pieces.close()
            if not self.tty:
                sys.stdout.write("\n")
            self.console.print("[interrupted: the partial reply is kept]", style="yellow", markup=False)
        self.console.print(self.status(), style="dim", highlight=False, soft_wrap=True)

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        s, c = self.s, self.console
        if name in ("exit", "quit"):
            return False
        if name == "help":
            c.print(HELP, highlight=False)
        elif name == "add":
            if not arg:
                raise LocalcoderError("usage: /add PATH... (files, directories or globs; quote names with spaces)")
            known = {f.path for f in s.files()}
            specs = [arg.strip()] if Path(arg.strip()).exists() else _split(arg)  # a name as it is, first
            for f in s.add_files(specs, note=lambda m: c.print(f"note: {m}", highlight=False)):
                verb = "updated" if f.path in known else "added"
                c.print(f"{verb} {f.path} ({f.tokens:,} tokens)", highlight=False)
            self.files_total()
        elif name == "drop":
            if not arg:
                raise LocalcoderError("usage: /drop PATH (as /files lists it)")
            path = arg.strip()
            if path not in {f.path for f in s.files()}:  # as /files lists it; else quoted or escaped
                names = _split(arg)
                path = names[0] if len(names) == 1 else path
            c.print(f"dropped {path}" if s.drop_file(path) else f"{path} is not in the conversation (see /files)",
                    highlight=False)
        elif name == "files":
            for f in s.files():
                c.print(f"{f.tokens:>8,}  {f.path}", highlight=False)
            self.files_total()
        elif name == "clear":
            s.clear()
            c.print("conversation cleared")
        elif name == "undo":
            c.print("removed the last exchange" if s.undo() else "nothing to undo")
        elif name == "retry":
            self.stream(s.retry())
        elif name == "edit":
            if not arg:
                raise LocalcoderError("usage: /edit TEXT (the new text of the last question)")
            self.stream(s.edit_last(arg))
        elif name == "system":
            s.system = arg or None
            c.print("system message " + ("set" if arg else "cleared"))
        elif name == "save":
            c.print(f"saved {s.save(arg or 'chat.json')}")
        elif name == "load":
            if not arg:
                raise LocalcoderError("usage: /load FILE (a transcript written by /save)")
            c.print(f"loaded {s.load(arg)} messages from {arg}")
        elif name == "stats":
            self.stats()
        elif name == "set":
            key, _, value = arg.partition(" ")
            if key not in SETTABLE:
                raise LocalcoderError(f"/set: unknown option {key!r}; one of {', '.join(SETTABLE)}")
            attr, kind = SETTABLE[key]
            value = value.strip()
            if not value:
                raise LocalcoderError(f"usage: /set {key} VALUE")
            try:
                v = kind(value)
            except ValueError:
                what, example = ("a whole number", 42) if kind is int else ("a number", 0.7)
                raise LocalcoderError(f"/set {key}: {value!r} is not {what}; e.g. /set {key} {example}") from None
            if attr == "max_tokens":
                s.max_tokens = v
            else:
                from .sampling import make_sampler
                opts = {k: getattr(s.sampler, k) for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                           "seed")}
                opts[attr] = v
                s.sampler = make_sampler(**opts)
            c.print(f"{key} = {v}")
        else:
            c.print(f"unknown command /{name}; /help lists them (to send a message that starts with /, type "
                    "// for the first /)", highlight=False)
        return True

    def files_total(self) -> None:
        total = sum(f.tokens for f in self.s.files())
        self.console.print(f"files: {total:,} tokens; context used {self.s.context_used():,} of "
                           f"{self.s.model.n_ctx:,}", style="dim", soft_wrap=True)

    def stats(self) -> None:
        t, m = self.s.total, self.s.model
        rss = peak_rss_bytes()
        self.console.print(
            f"prompt: {t.prompt_tokens:,} tokens processed, {t.cached_tokens:,} reused, {t.prompt_tokens_per_s:.1f} tokens/s\n"
            f"generation: {t.generated_tokens:,} tokens, {t.generate_tokens_per_s:.1f} tokens/s\n"
            f"context: {self.s.prefix.cache.pos:,}/{m.n_ctx:,} tokens, cache {self.s.prefix.cache.nbytes / 1e6:.1f} MB, "
            f"{len(self.s.prefix.checkpoints)} checkpoints\n"
            f"memory: peak RSS {rss / 1e9:.2f} GB; model file {m.file.file_size / 1e9:.2f} GB "
            f"({'memory-mapped' if m.mmap else 'read into memory as used'})\n"
            f"backend: {m.backend.name}", highlight=False, soft_wrap=True)
        store = m.expert_store
        if store is not None:
            e = store.counters
            self.console.print(f"experts: {e.hits:,} hits, {e.misses:,} misses, {store.read_ahead()}"
                               f"{e.bytes_read / 1e9:.2f} GB read from disk, {e.io_wait_s:.1f} s I/O wait; cache "
                               f"{store.budget_bytes / 1e9:.2f} GB ({store.n_slots} slots per layer)", highlight=False,
                               soft_wrap=True)
        else:
            self.console.print("experts: all resident (memory-mapped)", highlight=False)

    def save_history(self) -> None:
        if self.history_path is None or not self.s.history:
            return
        try:
            self.s.save(self.history_path)
        except OSError as e:
            raise LocalcoderError(f"the transcript was not saved to {self.history_path} ({e.strerror or e}); free "
                                  "disk space, or give a writable --history-dir next time") from None
        self.console.print(f"transcript saved to {self.history_path}", style="dim")

    def run(self) -> None:
        c = self.console
        c.print("Type a question; /help for commands; Ctrl-D to quit.", style="dim")
        try:
            while True:
                try:
                    line = read_message()
                except Discarded:
                    c.print()
                    continue
                except (EOFError, KeyboardInterrupt):
                    c.print()
                    break
                if not line.strip():
                    continue
                try:
                    if line.startswith("//"):  # a message that starts with /
                        self.stream(self.s.send(line[1:]))
                    elif line.startswith("/"):
                        if not self.command(line.strip()):
                            break
                    else:
                        self.stream(self.s.send(line))
                except LocalcoderError as e:
                    c.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
                except OSError as e:
                    where = f" ({e.filename})" if e.filename else ""
                    c.print(f"[red]error:[/red] {escape(str(e.strerror or e) + where)}; check the path, permissions "
                            "and free disk space", highlight=False, soft_wrap=True)
                except KeyboardInterrupt:
                    c.print("[interrupted]", style="yellow", markup=False)
        finally:
            self.save_history()


def history_file(directory: Path) -> Path:
    """The transcript file of a session started now; the pid keeps two sessions started in the same second
    apart."""
    return directory / time.strftime(f"chat-%Y%m%d-%H%M%S-{os.getpid()}.json")


def _split(arg: str) -> list[str]:
    """/add and /drop arguments: separated by spaces; quotes or a backslash keep a name with spaces whole."""
    try:
        return shlex.split(arg)
    except ValueError as e:
        raise LocalcoderError(f"cannot read {arg!r} ({e}); close the quote, or put a backslash before a lone "
                              "one") from None


def answer_json(session: ChatSession, text: str) -> str:
    st = session.last
    return json.dumps({"answer": text, "prompt_tokens": st.prompt_tokens + st.cached_tokens,
                       "completion_tokens": st.generated_tokens, "prompt_seconds": round(st.prompt_seconds, 4),
                       "generation_seconds": round(st.generate_seconds, 4),
                       "prompt_tokens_per_s": round(st.prompt_tokens_per_s, 2),
                       "generation_tokens_per_s": round(st.generate_tokens_per_s, 2),
                       "finish_reason": st.finish_reason}, ensure_ascii=False)
