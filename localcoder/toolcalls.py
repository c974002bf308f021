"""Qwen3-Coder tool calls: the model's XML call format -> OpenAI ``tool_calls``.

The model calls a tool by writing (the chat template asks for exactly this)::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Parameter values are raw text, not JSON, so a value may hold anything: newlines, ``<``, code, even text that
looks like a closing tag. The parser therefore takes ``</parameter>`` as the end of a value only when what
follows it is the next tag of the call (``<parameter=``, ``</function>``, ``</tool_call>``) or the end of the
reply; any other ``</parameter>`` is part of the value. Values are converted to the types the tool's JSON
schema declares (as vLLM's ``qwen3_coder`` parser does): strings are kept verbatim less the one newline after
the opening tag and the one before the closing tag; integer / number / boolean / object / array / null values
are parsed, and a value that does not parse is kept as its text.

With ``tools`` given, a bare ``<function=NAME>`` whose name is not among them is prose about the syntax, not a
call: its text is given back as content (inside ``<tool_call>`` the model meant a call, and the client hears of
the unknown tool). Tolerated, since models in the wild do all of these: a missing ``<tool_call>`` (a bare ``<function=...>``),
several calls in one reply, text before (and between) calls, a missing ``</parameter>`` or ``</function>`` or
``</tool_call>``, a call cut off by the end of the reply (what is there is parsed), and a JSON call
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the Hermes format older Qwen models use).

:class:`ToolCallParser` is incremental: ``feed(piece)`` returns content text (never a partial ``<tool_call>``
that might still turn into a call) and :class:`ToolCallDelta` items: first a call's id and name, as soon as
``<function=NAME>`` is complete, then its JSON arguments in one piece once the call is complete.
:func:`parse_tool_calls` runs the same parser over a whole reply, so streamed and non-streamed results agree.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

__all__ = ["ToolCall", "ToolCallDelta", "ToolCallParser", "parse_tool_calls", "convert_value",
           "tool_schemas", "new_call_id"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAM_OPEN = "<parameter="
PARAM_CLOSE = "</parameter>"

_CALL_STARTS = (TOOL_CALL_OPEN, FUNCTION_OPEN)  # what turns text into a call
# what may follow a real </parameter>: the next tag of this call, or the start of the next call
_AFTER_PARAM = (PARAM_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FUNCTION_OPEN)
# what may follow a </function> that closes a value whose </parameter> is missing
_AFTER_FUNCTION = (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, FUNCTION_OPEN)
_PARAMS_TAGS = (PARAM_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
_LOOKBACK = 256  # chars re-scanned in a value on each feed: longer than any tag we look for
_MAX_LITERAL = 100_000  # longest value we hand to ast.literal_eval


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A piece of the `index`-th call: its id and name when it opens, then fragments of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        fn = {}
        if self.name is not None:
            fn["name"] = self.name
        if self.arguments is not None:
            fn["arguments"] = self.arguments
        elif self.name is not None:
            fn["arguments"] = ""
        out["function"] = fn
        return out


Delta = Union[str, ToolCallDelta]  # content text, or a piece of a tool call


# -- schema types ------------------------------------------------------------------------------------------
def tool_schemas(tools: Iterable[Mapping] | None) -> dict[str, dict]:
    """Tool name -> its parameters' ``properties`` (name -> JSON schema), from OpenAI ``tools``."""
    out: dict[str, dict] = {}
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        out[fn["name"]] = dict(props) if isinstance(props, Mapping) else {}
    return out


_TYPE_ALIASES = (  # vLLM matches type names by prefix, so `int32`, `float64`, `dict` work too
    (("int", "uint", "long", "short", "unsigned"), "integer"),
    (("num", "float", "double", "decimal"), "number"),
    (("bool", "binary"), "boolean"),
    (("obj", "dict", "map"), "object"),
    (("arr", "list", "tuple"), "array"),
    (("null", "none"), "null"),
    (("str", "text", "char", "varchar", "enum"), "string"),
)


def _canonical(t: str) -> str:
    t = t.strip().lower()
    for prefixes, name in _TYPE_ALIASES:
        if t.startswith(prefixes):
            return name
    return "string"


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    return "string"


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, Mapping):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [_canonical(t)]
    if isinstance(t, list):
        return [_canonical(x) for x in t if isinstance(x, str)]
    out: list[str] = []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or ():
            out += [x for x in _schema_types(sub) if x not in out]
    if not out and isinstance(schema.get("enum"), list):
        out = list(dict.fromkeys(_json_type(v) for v in schema["enum"]))
    if not out and "properties" in schema:
        out = ["object"]
    if not out and "items" in schema:
        out = ["array"]
    return out


_INT = re.compile(r"[+-]?\d+")


def _as_integer(text: str):
    if _INT.fullmatch(text):
        return True, int(text)
    try:
        f = float(text)
    except ValueError:
        return False, None
    return (True, int(f)) if math.isfinite(f) and f.is_integer() else (False, None)


def _as_number(text: str):
    if _INT.fullmatch(text):
        return True, int(text)
    try:
        f = float(text)
    except ValueError:
        return False, None
    return (True, f) if math.isfinite(f) else (False, None)


def _as_boolean(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return True, low == "true"
    if low in ("1", "0"):
        return True, low == "1"
    return False, None


def _as_null(text: str):
    return (True, None) if text.lower() in ("null", "none") else (False, None)


def _as_container(kind: type):
    def convert(text: str):
        try:
            v = json.loads(text)
        except ValueError:
            # Python literals ({'a': True}) are a common slip; accept them when they are plain JSON data
            if len(text) > _MAX_LITERAL:
                return False, None
            try:
                v = ast.literal_eval(text)
                json.dumps(v)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return False, None
        return (True, v) if isinstance(v, kind) else (False, None)
    return convert


_CONVERTERS = {"integer": _as_integer, "number": _as_number, "boolean": _as_boolean, "null": _as_null,
               "object": _as_container(dict), "array": _as_container(list)}


def convert_value(raw: str, schema: Any) -> Any:
    """A parameter's text as the type its JSON schema declares; the text itself when the parameter is not in
    the schema, is a string, or does not parse as any declared type."""
    types = _schema_types(schema)
    text = raw.strip()
    for t in types:
        if t != "string":
            ok, value = _CONVERTERS[t](text)
            if ok:
                return value
    return raw


def convert_arguments(name: str, params: Mapping[str, str], schemas: Mapping[str, dict]) -> dict:
    props = schemas.get(name) or {}
    return {key: convert_value(value, props.get(key)) for key, value in params.items()}


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def _starts_partial(text: str, tags: tuple[str, ...]) -> bool:
    """`text` (non-empty) is a proper prefix of one of `tags`: more input may complete it."""
    return any(len(text) < len(tag) and tag.startswith(text) for tag in tags)


# -- the incremental parser --------------------------------------------------------------------------------
_TEXT, _CALL_OPEN, _RAW, _NAME, _PARAMS, _VALUE, _FUNC_CLOSE = range(7)
_VALUE_END = re.compile(r"</parameter>|\n<parameter=|\n</function>")
# fallbacks at the end of the reply, for a value whose </parameter> never came
_VALUE_END_FALLBACK = re.compile(r"\n<parameter=|</function>|</tool_call>|<tool_call>")


class ToolCallParser:
    """Feed it the reply's text pieces; it returns content text and :class:`ToolCallDelta` items.

    ``calls`` holds the completed calls. Call ``finish()`` at the end of the reply: it parses a call that was
    cut off and releases any text held back.
    """

    def __init__(self, tools: Iterable[Mapping] | None = None):
        self.schemas = tool_schemas(tools)
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._state = _TEXT
        self._after_call = False  # text right after a call: whitespace there is dropped
        self._open: ToolCall | None = None  # the call whose name was sent and arguments were not
        self._opened = ""  # the bare <function= that opened the call being read (see _text), else empty
        self._params: dict[str, str] = {}
        self._param = ""
        self._scan = 0  # in a value: where the search for its end resumes
        self._final = False

    # -- public -------------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        if self._final:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._run()

    def finish(self) -> list[Delta]:
        if self._final:
            return []
        self._final = True
        return self._run()

    @property
    def has_calls(self) -> bool:
        return bool(self.calls) or self._open is not None

    # -- machinery ----------------------------------------------------------------------------------------
    def _run(self) -> list[Delta]:
        out: list[Delta] = []
        step = (self._text, self._call_open, self._raw, self._name, self._params_step, self._value,
                self._func_close)
        while step[self._state](out):
            pass
        return [d for d in out if not isinstance(d, str) or d]

    def _eat(self, n: int) -> None:
        self._buf = self._buf[n:]

    def _lstrip(self) -> None:
        self._buf = self._buf.lstrip()

    def _text(self, out: list) -> bool:
        buf = self._buf
        at = [(i, tag) for tag in _CALL_STARTS if (i := buf.find(tag)) >= 0]
        if at:
            i, tag = min(at)
            content = buf[:i].rstrip()  # the blank lines before a call belong to no one
            out.append(content.lstrip() if self._after_call else content)
            # a bare <function= (whitespace included), given back as text if the name it opens is unknown
            self._opened = buf[len(content):i] + tag if tag == FUNCTION_OPEN else ""
            self._eat(i + len(tag))
            if tag == TOOL_CALL_OPEN:
                self._state = _CALL_OPEN
            else:
                self._begin_function()
            return True
        if self._final:
            out.append(buf.strip() if self._after_call else buf)
            self._buf = ""
            return False
        hold = _partial_suffix(buf, _CALL_STARTS)
        ready = buf[:len(buf) - hold]
        # trailing whitespace waits: it is dropped if a call follows
        keep = len(ready.rstrip())
        if self._after_call:
            start = len(ready) - len(ready.lstrip())
            if start == len(ready):
                return False
            out.append(ready[start:keep])
            self._after_call = False
        else:
            out.append(ready[:keep])
        self._buf = buf[keep:]
        return False

    def _call_open(self, out: list) -> bool:
        buf = self._buf.lstrip()
        ws = len(self._buf) - len(buf)  # kept for _raw, which may give the text back as content
        if buf.startswith(FUNCTION_OPEN):
            self._eat(ws + len(FUNCTION_OPEN))
            self._begin_function()
            return True
        if buf.startswith(TOOL_CALL_CLOSE):  # an empty call
            self._eat(ws + len(TOOL_CALL_CLOSE))
            self._state, self._after_call = _TEXT, True
            return True
        if not self._final and (not buf or _starts_partial(buf, (FUNCTION_OPEN, TOOL_CALL_CLOSE))):
            return False
        self._state = _RAW
        return True

    def _raw(self, out: list) -> bool:
        """<tool_call> followed by something other than <function=: a JSON call, or text."""
        i = self._buf.find(TOOL_CALL_CLOSE)
        if i < 0 and not self._final:
            return False
        body = self._buf if i < 0 else self._buf[:i]
        self._eat(len(self._buf) if i < 0 else i + len(TOOL_CALL_CLOSE))
        call = self._json_call(body)
        if call is None and not body.strip():
            pass  # <tool_call></tool_call>, or a reply cut off right after <tool_call>
        elif call is None:
            out.append(TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if i >= 0 else ""))
        else:
            name, args = call
            index = len(self.calls)
            self.calls.append(ToolCall(new_call_id(), name, args))
            out.append(ToolCallDelta(index, id=self.calls[-1].id, name=name))
            out.append(ToolCallDelta(index, arguments=args))
        self._state, self._after_call = _TEXT, True
        return True

    def _json_call(self, body: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return obj["name"], json.dumps(args, ensure_ascii=False)

    def _begin_function(self) -> None:
        self._state, self._params = _NAME, {}

    def _name(self, out: list) -> bool:
        buf = self._buf
        ends = [i for i in (buf.find(">"), buf.find("\n")) if i >= 0]
        if not ends and not self._final:
            return False
        i = min(ends) if ends else len(buf)
        name = buf[:i].strip()
        if self.schemas and name not in self.schemas and self._opened:  # prose about the syntax, not a call
            out.append(self._opened + buf[:i])
            self._eat(i)
            self._state, self._after_call = _TEXT, False
            return True
        self._eat(i + 1 if ends else i)
        self._open = ToolCall(new_call_id(), name, "")
        out.append(ToolCallDelta(len(self.calls), id=self._open.id, name=name))
        self._state = _PARAMS
        return True

    def _params_step(self, out: list) -> bool:
        self._lstrip()
        buf = self._buf
        if buf.startswith(PARAM_OPEN):
            i = buf.find(">")
            nl = buf.find("\n")
            if i < 0 or 0 <= nl < i:  # the name runs to '>' (or, if that is missing, to the line's end)
                if nl < 0:
                    if not self._final:
                        return False
                    nl = len(buf)
                self._param = buf[len(PARAM_OPEN):nl].strip()
                self._eat(nl)
            else:
                self._param = buf[len(PARAM_OPEN):i].strip()
                self._eat(i + 1)
            self._state, self._scan = _VALUE, 0
            return True
        if buf.startswith(FUNCTION_CLOSE):
            self._eat(len(FUNCTION_CLOSE))
            self._state = _FUNC_CLOSE
            return True
        if buf.startswith(TOOL_CALL_CLOSE):  # </function> is missing
            self._eat(len(TOOL_CALL_CLOSE))
            self._end_call(out)
            return True
        if buf.startswith(_CALL_STARTS):  # the next call begins, this one never closed
            self._end_call(out)
            return True
        if not buf or _starts_partial(buf, _PARAMS_TAGS + _CALL_STARTS):
            if self._final:
                self._buf = ""
                self._end_call(out)
            return False
        # stray text between parameters: skip to the next tag
        nxt = buf.find("<", 1)
        self._eat(nxt if nxt > 0 else len(buf))
        return True

    def _value(self, out: list) -> bool:
        buf = self._buf
        for m in _VALUE_END.finditer(buf, self._scan):
            verdict = self._judge_end(buf, m)
            if verdict is None:  # undecided until more text comes
                self._scan = m.start()
                return False
            if verdict:
                self._end_value(buf[:m.start()], m.end() if m.group() == PARAM_CLOSE else m.start())
                return True
            # a look-alike inside the value: keep looking
        if not self._final:
            self._scan = max(self._scan, len(buf) - _LOOKBACK)
            return False
        m = _VALUE_END_FALLBACK.search(buf)
        end = m.start() if m else len(buf)
        self._end_value(buf[:end], end)
        return True

    def _judge_end(self, buf: str, m: re.Match) -> bool | None:
        """Is the tag at `m` the end of the value (True), part of it (False), or is it too soon to say (None)?"""
        tag = m.group()
        if tag == PARAM_CLOSE:
            rest = buf[m.end():].lstrip()
            if rest.startswith(_AFTER_PARAM) or (self._final and (not rest or _starts_partial(rest, _AFTER_PARAM))):
                return True
            return None if not rest or _starts_partial(rest, _AFTER_PARAM) else False
        if tag == "\n" + FUNCTION_CLOSE:  # </parameter> missing: the call closes right after
            rest = buf[m.end():].lstrip()
            if rest.startswith(TOOL_CALL_CLOSE) or (self._final and (not rest or _starts_partial(rest, (TOOL_CALL_CLOSE,)))):
                return True
            return None if not rest or _starts_partial(rest, (TOOL_CALL_CLOSE,)) else False
        # "\n<parameter=NAME>" with </parameter> missing: only for a parameter this tool declares and that has
        # not been given yet, since a value (a file being written) may well contain such a line
        close = buf.find(">", m.end())
        nl = buf.find("\n", m.end())
        if close < 0 or 0 <= nl < close:
            return None if nl < 0 and not self._final and len(buf) - m.end() < 128 else False
        name = buf[m.end():close].strip()
        props = self.schemas.get(self._open.name) or {}
        return name in props and name not in self._params and name != self._param

    def _end_value(self, value: str, eat: int) -> None:
        self._params[self._param] = _strip_one_newline(value)
        self._eat(eat)
        self._state = _PARAMS

    def _func_close(self, out: list) -> bool:
        self._lstrip()
        buf = self._buf
        if buf.startswith(TOOL_CALL_CLOSE):
            self._eat(len(TOOL_CALL_CLOSE))
        elif not self._final and (not buf or _starts_partial(buf, (TOOL_CALL_CLOSE,))):
            return False
        self._end_call(out)
        return True

    def _end_call(self, out: list) -> None:
        call, self._open = self._open, None
        call.arguments = json.dumps(convert_arguments(call.name, self._params, self.schemas), ensure_ascii=False)
        self.calls.append(call)
        out.append(ToolCallDelta(len(self.calls) - 1, arguments=call.arguments))
        self._params = {}
        self._state, self._after_call = _TEXT, True


def parse_tool_calls(text: str, tools: Iterable[Mapping] | None = None) -> tuple[str | None, list[ToolCall]]:
    """A whole reply -> (content, calls). Content is None when the reply is only calls."""
    parser = ToolCallParser(tools)
    deltas = parser.feed(text) + parser.finish()
    content = "".join(d for d in deltas if isinstance(d, str))
    if parser.calls and not content.strip():
        return None, parser.calls
    return content, parser.calls
