"""A chat session: history, context files, and prompt reuse across turns.

Each turn renders the whole conversation with the chat template, then processes only the tokens the cache
does not already hold: the live cache is reused when it is a prefix of the new prompt, otherwise the
longest checkpoint that is (taken at the end of each prompt and each reply), so /undo, /retry and editing
the last message roll back without reprocessing the history.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .cache import PrefixCache
from .errors import ContextOverflow, LocalcoderError
from .generate import GenerationStats, generate_steps
from .paths import check_output_path, write_text_atomically
from .sampling import Sampler, make_sampler
from .tokenizer import as_text

LANGS = {".py": "python", ".js": "javascript", ".ts": "typescript", ".tsx": "tsx", ".jsx": "jsx", ".rs": "rust",
         ".go": "go", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".java": "java",
         ".rb": "ruby", ".sh": "bash", ".md": "markdown", ".json": "json", ".yaml": "yaml", ".yml": "yaml",
         ".toml": "toml", ".sql": "sql", ".html": "html", ".css": "css", ".kt": "kotlin", ".swift": "swift"}
MAX_FILE_BYTES = 2_000_000


@dataclass
class ContextFile:
    path: str
    text: str
    tokens: int

    def block(self) -> str:
        lang = LANGS.get(Path(self.path).suffix.lower(), "")
        return f"File: {self.path}\n```{lang}\n{self.text}\n```"


@dataclass
class Turn:
    """A user turn: the question and the files attached to it (rendered as fenced blocks before it)."""

    text: str
    files: list[ContextFile] = field(default_factory=list)

    def content(self) -> str:
        blocks = [f.block() for f in self.files]
        return "\n\n".join(blocks + [self.text]) if self.text else "\n\n".join(blocks)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _check_named_file(path: Path, spec: str) -> None:
    """A file named on its own is attached whole or refused with the reason: skipping it, as a directory's
    binary files are skipped, would leave the user believing the model saw it."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LocalcoderError(f"{spec} is {size / 1e6:.1f} MB, over the {MAX_FILE_BYTES / 1e6:.0f} MB limit for "
                              "a context file; attach the part that matters")
    data = path.read_bytes()
    if b"\0" in data:
        raise LocalcoderError(f"{spec} is a binary file (it contains NUL bytes at offset {data.index(0)}); "
                              "attach text files only")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LocalcoderError(f"{spec} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                              "convert it to UTF-8 (e.g. iconv -t utf-8) or attach text files only") from None


def _gitignored(paths: list[Path], root: Path) -> set[Path]:
    """The paths under root that git would ignore (when root is in a git work tree; else those matching
    root/.gitignore). Paths outside root are not matched against its rules."""
    paths = [p for p in paths if p.is_relative_to(root)]
    if not paths:
        return set()
    try:
        proc = subprocess.run(["git", "check-ignore", "--stdin", "-z"], cwd=root, capture_output=True,
                              input=b"\0".join(os.fsencode(p) for p in paths) + b"\0", timeout=30)
        if proc.returncode in (0, 1):
            return {(root / os.fsdecode(p)).resolve() for p in proc.stdout.split(b"\0") if p}
    except (OSError, subprocess.SubprocessError):
        pass
    patterns = []
    gi = root / ".gitignore"
    if gi.is_file():
        patterns = [ln.strip().rstrip("/") for ln in gi.read_text(errors="replace").splitlines()
                    if ln.strip() and not ln.startswith("#")]
    return {p for p in paths if any(fnmatch.fnmatch(part, pat) for pat in patterns
                                    for part in p.relative_to(root).parts)}


def _skip_reason(path: Path) -> str | None:
    """Why a file found in a directory or glob is left out: None to take it, "" for a binary file (skipped
    without a word, as documented), else a note for the user."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return f"{size / 1e6:.1f} MB, over the {MAX_FILE_BYTES / 1e6:.0f} MB limit"
        return "" if _is_binary(path) else None
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"


def expand_paths(specs: list[str], root: Path | None = None,
                 note: Callable[[str], None] | None = None) -> list[Path]:
    """Files named by paths, globs and directories; skips .git, what .gitignore ignores (a directory outside
    root by its own .gitignore), binary and unreadable files in directories and globs, calling note(message)
    for those it skips that are not binary; a file named on its own is taken even if ignored (as `git add`
    takes one when named) and refused with the reason if it is binary, not UTF-8 or too large. A directory or
    glob that yields no file is an error: answering as if the files had been read would mislead."""
    root = (root or Path.cwd()).resolve()
    found: list[tuple[str, Path, Path]] = []  # (spec, the path as found, resolved)
    named: set[Path] = set()
    bases: dict[Path, list[Path]] = {root: []}  # .gitignore roots and their files
    for spec in specs:
        p = Path(os.path.expanduser(spec))
        p = p if p.is_absolute() else root / p
        base = root
        if p.is_dir():
            cands = [q for q in sorted(p.rglob("*")) if q.is_file() and ".git" not in q.relative_to(p).parts]
            if not p.resolve().is_relative_to(root):
                base = p.resolve()
        elif p.is_file():
            _check_named_file(p, spec)
            cands = [p]
            named.add(p.resolve())
        elif p.exists():
            raise LocalcoderError(f"{spec} is not a regular file (a pipe, device or socket); pipe its text on "
                                  'stdin instead, e.g. git diff | localcoder ask "review this"')
        else:
            cands = sorted(q for q in Path(p.anchor).glob(str(p.relative_to(p.anchor))) if q.is_file())
            if not cands:
                raise LocalcoderError(f"no file matches {spec}; check the path or glob")
        found += [(spec, q, q.resolve()) for q in cands]
        bases.setdefault(base, []).extend(q.resolve() for q in cands)
    ignored = set().union(*(_gitignored(files, base) for base, files in bases.items() if files))
    out, seen = [], set()
    for spec, q, r in found:
        if r in seen or (r in ignored and r not in named):
            continue
        reason = None if r in named else _skip_reason(r)
        if reason is not None:
            if reason and note:
                note(f"skipped {as_text(str(q))} ({reason})")
            continue
        seen.add(r)
        out.append(r)
    for spec in specs:
        if not any(r in seen for s, _, r in found if s == spec):
            raise LocalcoderError(f"{spec} has no file to attach (none, or only binary, ignored, unreadable or "
                                  f"over {MAX_FILE_BYTES / 1e6:.0f} MB files); name a file to attach that one")
    return out


def check_max_tokens(n: int) -> None:
    """A reply's token limit (-n, /set max_tokens): at least 1; that many tokens of context stay free for it."""
    if n < 1:
        raise LocalcoderError(f"max tokens {n}: a reply needs at least 1 (the context keeps that many free for it)")


class ChatSession:
    def __init__(self, model, system: str | None = None, max_tokens: int = 2048, sampler: Sampler | None = None,
                 max_checkpoints: int = 8, advice: str = "/clear, /drop files"):
        """advice: what the user can do when the conversation does not fit, besides raising --ctx."""
        self.model = model
        self.advice = advice
        self.system = system
        self.max_tokens = max_tokens  # checked by the property below, as /set max_tokens is
        self.sampler = sampler or make_sampler()
        self.history: list[dict] = []  # OpenAI-format messages (user turns keep their Turn under "turn")
        self.pending: list[ContextFile] = []  # files added since the last user turn
        self.prefix = PrefixCache(model.new_cache(), max_checkpoints)
        self.last = GenerationStats()
        self.total = GenerationStats()

    @property
    def system(self) -> str | None:
        return self._system

    @system.setter
    def system(self, text: str | None) -> None:
        self._system = as_text(text) if text else text  # --system and /system text is saved in the transcript

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    @max_tokens.setter
    def max_tokens(self, n: int) -> None:
        check_max_tokens(n)
        self._max_tokens = n

    # -- the conversation as the model sees it -------------------------------------------------------
    def messages(self, extra_user: Turn | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for m in self.history:
            msgs.append({"role": m["role"], "content": m["turn"].content() if "turn" in m else m["content"]})
        if extra_user is not None:
            msgs.append({"role": "user", "content": extra_user.content()})
        return msgs

    def prompt_ids(self, extra_user: Turn | None = None, add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation as token ids, with each reply spliced in as the ids it was generated as.

        Re-encoding a reply's text does not always give back the sampled ids (BPE has several spellings of
        one string, e.g. runs of newlines), and any difference would defeat prompt reuse from that point."""
        tok = self.model.tokenizer
        text, contents = self.model.chat_template.render_spans(self.messages(extra_user),
                                                               add_generation_prompt=add_generation_prompt)

        def encode(a: int, b: int) -> list[int]:  # text[a:b], control tokens inside contents left as text
            return tok.encode(text[a:b], parse_special=True,
                              plain=[(max(s, a) - a, min(e, b) - a) for s, e in contents if s < b and e > a])

        ids: list[int] = []
        at = 0
        for m in self.history:
            if m["role"] != "assistant" or not m.get("ids") or not m["content"]:
                continue
            head = "<|im_start|>assistant\n" + m["content"]
            start = text.find(head, at)
            if start < 0:
                continue
            body = start + len(head) - len(m["content"])
            ids += encode(at, body) + list(m["ids"])
            at = body + len(m["content"])
        return ids + encode(at, len(text))

    def context_used(self) -> int:
        turn = Turn("", list(self.pending)) if self.pending else None
        return len(self.prompt_ids(turn, add_generation_prompt=False)) if (self.history or turn or self.system) else 0

    # -- files ----------------------------------------------------------------------------------------
    def files(self) -> list[ContextFile]:
        attached = [f for m in self.history if "turn" in m for f in m["turn"].files]
        return attached + self.pending

    def add_files(self, specs: list[str], root: Path | None = None,
                  note: Callable[[str], None] | None = None) -> list[ContextFile]:
        """Attach files for the next question; a file attached before and changed since replaces its old copy
        (note(message) says when one is attached already and unchanged, and what expand_paths skips)."""
        return self.attach_paths(expand_paths(specs, root, note), root, note)

    def attach_paths(self, paths: list[Path], root: Path | None = None,
                     note: Callable[[str], None] | None = None) -> list[ContextFile]:
        """add_files for paths expand_paths already gave."""
        attached = {f.path: f for f in self.files()}
        root = (root or Path.cwd()).resolve()
        new = []
        for p in paths:
            shown = as_text(str(p.relative_to(root)) if p.is_relative_to(root) else str(p))
            text = p.read_text(encoding="utf-8", errors="replace")
            if shown in attached and attached[shown].text == text:
                if note:
                    note(f"{shown} is already attached, unchanged")
                continue
            cf = ContextFile(shown, text, 0)
            cf.tokens = len(self.model.tokenizer.encode(cf.block())) + 2
            new.append(cf)
        before = [(m["turn"], m["turn"].files) for m in self.history if "turn" in m], self.pending
        for f in new:
            self.drop_file(f.path)  # the old copy of a changed file
        used, need = self.context_used(), sum(f.tokens for f in new)
        budget = self.model.n_ctx - self.max_tokens
        if used + need > budget:
            for turn, files in before[0]:
                turn.files = files
            self.pending = before[1]
            raise ContextOverflow(f"adding {len(new)} file(s) needs {need:,} tokens but only {max(budget - used, 0):,} "
                                  f"of {self.model.n_ctx:,} are free ({used:,} used, {self.max_tokens:,} kept for the "
                                  f"reply); {self.advice}, lower -n, or raise --ctx")
        self.pending = self.pending + new
        return new

    def drop_file(self, path: str) -> bool:
        before = len(self.files())
        self.pending = [f for f in self.pending if f.path != path]
        for m in self.history:
            if "turn" in m:
                m["turn"].files = [f for f in m["turn"].files if f.path != path]
        return len(self.files()) < before

    # -- turns ----------------------------------------------------------------------------------------
    def _reply(self, ids: list[int]) -> Iterator[str]:
        reused = self.prefix.resume(ids, self.model.new_cache)
        self.last = GenerationStats(cached_tokens=reused)
        reply: list[str] = []
        tokens: list[int] = []
        msg = {"role": "assistant", "content": ""}
        try:
            for token, piece in generate_steps(self.model, ids[reused:], self.max_tokens, self.sampler,
                                               cache=self.prefix.cache, stats=self.last, on_prefill=self.prefix.save):
                if token >= 0:
                    tokens.append(token)
                reply.append(piece)
                yield piece
        finally:
            msg["content"] = "".join(reply)
            if self._spells(tokens, msg["content"]):
                msg["ids"] = tokens
            if self.last.finish_reason in (None, "interrupted"):
                self.last.finish_reason = "interrupted"
                msg["interrupted"] = True
            self.history.append(msg)
            self.prefix.save()
            for k in ("prompt_tokens", "cached_tokens", "generated_tokens", "prompt_seconds", "generate_seconds"):
                setattr(self.total, k, getattr(self.total, k) + getattr(self.last, k))

    def _check_fits(self, ids: list[int]) -> None:
        if len(ids) >= self.model.n_ctx:
            raise ContextOverflow(f"the conversation needs {len(ids):,} tokens but the context holds "
                                  f"{self.model.n_ctx:,}; {self.advice}, or raise --ctx")

    def send(self, text: str) -> Iterator[str]:
        turn = Turn(text, self.pending)
        ids = self.prompt_ids(turn)
        self._check_fits(ids)
        self.pending = []
        self.history.append({"role": "user", "turn": turn})
        return self._reply(ids)

    def retry(self) -> Iterator[str]:
        """Drop the last reply and generate it again (the reply stays if the conversation no longer fits)."""
        if not self.history or self.history[-1]["role"] != "assistant":
            raise LocalcoderError("nothing to retry: there is no reply yet")
        reply = self.history.pop()
        try:
            ids = self.prompt_ids()
            self._check_fits(ids)
        except BaseException:
            self.history.append(reply)
            raise
        return self._reply(ids)

    def undo(self) -> bool:
        """Remove the last user turn and its reply."""
        while self.history:
            if self.history.pop()["role"] == "user":
                return True
        return False

    def edit_last(self, text: str) -> Iterator[str]:
        """Replace the last user message (keeping the files attached with it) and answer it again; if the
        new message does not fit, the conversation stays as it was."""
        history, pending = list(self.history), list(self.pending)
        last = next((m for m in reversed(self.history) if m["role"] == "user"), None)
        if last is None:
            raise LocalcoderError("nothing to edit: there is no message yet")
        self.undo()
        self.pending = last["turn"].files + self.pending
        try:
            return self.send(text)
        except BaseException:
            self.history, self.pending = history, pending
            raise

    def clear(self) -> None:
        """Forget the conversation and attached files; with a seed, sample again as a new session would."""
        self.history, self.pending = [], []
        reset = getattr(self.sampler, "reset", None)  # a sampler of the caller's may have none
        if reset is not None:
            reset()

    # -- transcripts ----------------------------------------------------------------------------------
    def to_json(self) -> list[dict]:
        out = self.messages()
        for m, h in zip(out[1 if self.system else 0:], self.history):
            if h.get("interrupted"):
                m["interrupted"] = True
            if h.get("ids"):
                m["token_ids"] = list(h["ids"])  # how the reply was generated: /load restores exact prompt reuse
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = check_output_path(path, "transcript", create_folder=True)
        return write_text_atomically(path, as_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1)))

    def load(self, path: str | os.PathLike) -> int:
        """Replace the conversation with a saved transcript; bytes that are not UTF-8 and bad JSON escapes
        become U+FFFD, and token ids that do not spell a reply's text are left out (it is re-encoded)."""
        path = Path(path).expanduser()
        try:
            msgs = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            raise LocalcoderError(f"no transcript at {path}; check the path") from None
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep for json
            raise LocalcoderError(f"{path} is not a JSON transcript ({e}); /save writes one") from None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise LocalcoderError(f"{path}: expected a JSON list of {{role, content}} messages (OpenAI format)")
        self.system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        self.history = []
        for m in msgs:
            content = as_text(m["content"])
            if m["role"] == "user":
                self.history.append({"role": "user", "turn": Turn(content)})
            elif m["role"] == "assistant":
                msg = {"role": "assistant", "content": content}
                if m.get("interrupted"):
                    msg["interrupted"] = True
                if self._spells(m.get("token_ids"), content):
                    msg["ids"] = m["token_ids"]
                self.history.append(msg)
        self.pending = []
        return len(self.history)

    def _spells(self, ids, text: str) -> bool:
        """ids are token ids of this model's vocabulary that decode to text, control tokens left out as the
        reply's text leaves them out (the ids keep them: they are what the model saw). A transcript of another
        model, or edited by hand, may hold any numbers."""
        tok = self.model.tokenizer
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < tok.vocab_size for i in ids):
            return False
        return tok.decode(ids, skip_special=True) == text
