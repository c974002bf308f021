"""Chat templates: Jinja2 rendering compatible with HF transformers' ``apply_chat_template``.

A template comes from a downloaded file (GGUF metadata or a user file), so it is untrusted: it is compiled in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` and every failure (syntax error, ``raise_exception``, sandbox
violation, type error in the template) becomes one :class:`~localcoder.errors.LocalcoderError`.

The environment mirrors transformers (``utils/chat_template_utils.py``): ``trim_blocks`` and ``lstrip_blocks``,
the ``loopcontrols`` extension, a ``{% generation %}`` block tag (rendered as its body), ``raise_exception``
and ``strftime_now`` globals, and a ``tojson`` filter = ``json.dumps(x, ensure_ascii=False, indent=..,
separators=.., sort_keys=..)`` (no HTML escaping, unlike Jinja's built-in one).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localcoder.errors import LocalcoderError

__all__ = ["ChatTemplate", "BrokenTemplate", "QWEN3_CODER_TEMPLATE", "template_from_metadata",
           "template_from_file", "load_builtin_template"]

_HINT = "pass --chat-template-file FILE to use another template, or check the messages"


def load_builtin_template() -> str:
    """The built-in Qwen3-Coder template (package data ``localcoder/data/qwen3_coder.jinja``)."""
    return resources.files("localcoder").joinpath("data", "qwen3_coder.jinja").read_text(encoding="utf-8")


QWEN3_CODER_TEMPLATE: str = load_builtin_template()


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().rstrip(".") or type(e).__name__
    if isinstance(e, jinja2.TemplateSyntaxError) and e.lineno:
        msg = f"{msg} (template line {e.lineno})"
    elif not isinstance(e, jinja2.TemplateError):
        msg = f"{type(e).__name__}: {msg}"
    return " ".join(msg.split())


def _error(e: BaseException, hint: str = _HINT) -> LocalcoderError:
    return LocalcoderError(f"chat template error: {_one_line(e)}; {hint}")


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _normalize_messages(messages: list[dict]) -> list[dict]:
    """Copy ``messages``; in assistant ``tool_calls``, parse JSON-string ``function.arguments`` (OpenAI wire
    format) into a dict, as vLLM / llama.cpp do for templates that iterate ``arguments | items``.  Strings that
    are not a JSON object are left alone."""
    out = []
    for msg in messages:
        if not isinstance(msg, Mapping):
            out.append(msg)
            continue
        msg = dict(msg)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            new_calls = []
            for call in calls:
                if isinstance(call, Mapping):
                    call = dict(call)
                    fn = call.get("function")
                    if isinstance(fn, Mapping):
                        call["function"] = _parse_arguments(dict(fn))
                    else:
                        call = _parse_arguments(call)
                new_calls.append(call)
            msg["tool_calls"] = new_calls
        out.append(msg)
    return out


def _parse_arguments(fn: dict) -> dict:
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError:
            return fn
        if isinstance(parsed, dict):
            fn["arguments"] = parsed
    return fn


class ChatTemplate:
    """A compiled chat template."""

    error: str | None = None  # see BrokenTemplate

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", hint: str = _HINT):
        """hint: the fix named by errors (a template from the user's own file names that file)."""
        if not isinstance(source, str):
            raise LocalcoderError(f"chat template error: template is {type(source).__name__}, not text; {hint}")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.hint = hint
        try:
            self._template = _make_env().from_string(source)
        except Exception as e:  # TemplateSyntaxError, or anything odd the parser raises
            raise _error(e, hint) from None

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """Render like ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
        add_generation_prompt=...)``; ``extra`` are passed to the template (e.g. ``enable_thinking=False``)."""
        return self._render(_normalize_messages(list(messages)), tools, add_generation_prompt, extra)

    def _render(self, normalized: list, tools, add_generation_prompt: bool, extra: dict) -> str:
        kwargs: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        kwargs.update(extra)
        try:
            return self._template.render(messages=normalized, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **kwargs)
        except Exception as e:
            raise _error(e, self.hint) from None

    def render_spans(self, messages: list[dict], tools: list[dict] | None = None,
                     add_generation_prompt: bool = True, **extra: Any) -> tuple[str, list[tuple[int, int]]]:
        """render() and where in its text the conversation's own text lies, as sorted (start, end) spans: each
        message's content and each string argument of its tool calls. The caller tokenizes those without
        matching control tokens, so that a file, a paste, a tool result or a call that writes a file holding
        `<|im_end|>` or `<|im_start|>` (any code about chat models does) stays text and cannot end its turn or
        open another. Found by rendering again with a placeholder for each such text (blank ones need none: they
        hold no token); a content the template trims is found trimmed. When the template does anything else to
        them, the arguments go unmarked, then everything (every control token matched, as llama.cpp does), so
        the spans are never wrong."""
        messages = _normalize_messages(list(messages))
        text = self._render(messages, tools, add_generation_prompt, extra)
        # two private-use characters the rendering does not contain bracket a placeholder's number
        cp = next((c for c in range(0xE000, 0xF8FF, 2) if chr(c) not in text and chr(c + 1) not in text), None)
        if cp is None:
            return text, []
        marked_before = -1
        for with_arguments in (True, False):
            texts: list[str] = []
            marked = [_marked(m, texts, chr(cp), chr(cp + 1), with_arguments) for m in messages]
            if not texts or len(texts) == marked_before:  # none, or no argument was marked: nothing new to try
                return text, []
            marked_before = len(texts)
            rendered = self._render(marked, tools, add_generation_prompt, extra)
            pieces = re.split(f"{chr(cp)}(\\d+){chr(cp + 1)}", rendered)
            spans = _align(text, pieces, texts)
            if spans is not None:
                return text, spans
        return text, []

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars)"


class BrokenTemplate:
    """A GGUF's own template that does not compile or drops the messages. The model still loads: `info` and
    plain completions never render it. Rendering raises the error, which names --chat-template-file."""

    def __init__(self, source: str, error: str):
        self.source = source
        self.error = error

    def render(self, *args, **kwargs):
        raise LocalcoderError(self.error)

    render_spans = render

    def __repr__(self) -> str:
        return f"BrokenTemplate({len(self.source)} chars)"


def _drops_the_message(template: ChatTemplate) -> bool:
    """A user message renders without its text (a template that does not loop over `messages`)."""
    probe = "Hello from localcoder"
    try:
        return probe not in template.render([{"role": "user", "content": probe}], add_generation_prompt=True)
    except LocalcoderError:
        return False  # a template may insist on more than one message; real turns will show what it wants


def _marked(msg, texts: list[str], open_: str, close: str, with_arguments: bool):
    """msg (normalized) with its content and, with_arguments, its tool calls' string arguments replaced by
    placeholders open_ N close; each replaced text is appended to texts (N is its index)."""
    if not isinstance(msg, Mapping):
        return msg

    def mark(value):
        if isinstance(value, str) and value.strip():
            texts.append(value)
            return f"{open_}{len(texts) - 1}{close}"
        return value

    msg = {**msg, "content": mark(msg.get("content"))} if "content" in msg else dict(msg)
    calls = msg.get("tool_calls")
    if with_arguments and isinstance(calls, list):
        new_calls = []
        for call in calls:
            fn = call.get("function") if isinstance(call, Mapping) else None
            target = fn if isinstance(fn, Mapping) else call
            if isinstance(target, Mapping) and isinstance(target.get("arguments"), Mapping):
                target = {**target, "arguments": {k: mark(v) for k, v in target["arguments"].items()}}
                call = {**call, "function": target} if isinstance(fn, Mapping) else target
            new_calls.append(call)
        msg["tool_calls"] = new_calls
    return msg


def _align(text: str, pieces: list[str], texts: list[str]) -> list[tuple[int, int]] | None:
    """Spans of texts in text, from the placeholder rendering split into pieces (template text, a placeholder's
    number, template text, ...); a text may appear trimmed. None when the two renderings do not line up."""
    spans, pos = [], 0
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if not text.startswith(piece, pos):
                return None
            pos += len(piece)
            continue
        own = texts[int(piece)]
        for found in (own, own.strip()):
            if text.startswith(found, pos) and text.startswith(pieces[k + 1], pos + len(found)):
                break
        else:
            return None
        spans.append((pos, pos + len(found)))
        pos += len(found)
    return spans if pos == len(text) else None


def _token_text(meta: Mapping[str, Any], key: str) -> str:
    tokens = meta.get("tokenizer.ggml.tokens")
    i = meta.get(key)
    if tokens is None or i is None:
        return ""
    try:
        return str(tokens[int(i)])
    except (IndexError, TypeError, ValueError):
        return ""


def template_from_metadata(meta: Mapping[str, Any]) -> ChatTemplate:
    """The GGUF's ``tokenizer.chat_template`` (the built-in Qwen3-Coder one when absent or empty); bos/eos token
    texts come from the GGUF's token ids, as llama.cpp does. A template that does not compile, or renders a user
    message without its text, comes back as a BrokenTemplate: only rendering a conversation fails."""
    source = meta.get("tokenizer.chat_template")
    if isinstance(source, (bytes, bytearray)):
        source = bytes(source).decode("utf-8", errors="replace")
    if not source:
        source = QWEN3_CODER_TEMPLATE
    try:
        template = ChatTemplate(source, bos_token=_token_text(meta, "tokenizer.ggml.bos_token_id"),
                                eos_token=_token_text(meta, "tokenizer.ggml.eos_token_id"))
    except LocalcoderError as e:
        return BrokenTemplate(source, str(e))
    if _drops_the_message(template):
        return BrokenTemplate(source, "chat template error: the model's template renders a user message without "
                                      "its text (it does not loop over `messages`); pass --chat-template-file FILE "
                                      "to use another template")
    return template


def template_from_file(path: str | os.PathLike, meta: Mapping[str, Any]) -> ChatTemplate:
    """A Jinja template from the user's file (`--chat-template-file`, llama.cpp's option), used instead of the
    GGUF's; bos/eos texts from the GGUF as for its own template. It renders a one-message conversation here, so
    that a broken file fails when the model loads rather than at the first turn."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LocalcoderError(f"chat template file not found: {path}; check the --chat-template-file path") from None
    except IsADirectoryError:
        raise LocalcoderError(f"chat template file {path} is a folder; pass the .jinja file itself") from None
    except OSError as e:
        raise LocalcoderError(f"cannot read chat template file {path}: {e.strerror}; check the path and "
                              "permissions") from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LocalcoderError(f"chat template file {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                              f"{e.start}); pass a Jinja template saved as UTF-8") from None
    hint = f"fix {path} or pass another --chat-template-file"
    template = ChatTemplate(source, bos_token=_token_text(meta, "tokenizer.ggml.bos_token_id"),
                            eos_token=_token_text(meta, "tokenizer.ggml.eos_token_id"), hint=hint)
    probe = "Hello from localcoder"
    if probe not in template.render([{"role": "user", "content": probe}], add_generation_prompt=True):
        raise LocalcoderError(f"chat template error: {path} renders a user message without its text (does it "
                              f"loop over `messages`?); {hint}")
    return template
