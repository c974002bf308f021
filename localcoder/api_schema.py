"""The OpenAI API's request fields and answer parts for `localcoder serve`: each field checked into our own
types, or an APIError (a 400 naming the field and the fix) that the server sends as OpenAI's error JSON;
the body's size and JSON; log-probabilities, noted while sampling and shaped as the chat and the legacy
completions endpoints give them."""

from __future__ import annotations

import bisect
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from .sampling import DEFAULTS, Sampler, SamplingError, make_sampler

MAX_BODY_BYTES = 16 << 20  # generous: a full 262144-token context is a few MB of JSON
MAX_LOGPROBS = 20  # alternatives per token (top_logprobs, legacy logprobs), OpenAI's limit
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- request fields ----------------------------------------------------------------------------------------
def typed_field(body: dict, key: str, kinds: tuple, what: str, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise bad(f"'{key}' must be {what}, got {json.dumps(v)[:80]}", param=key, code="invalid_type")
    return v


def number(body, key, default=None) -> float | None:
    v = typed_field(body, key, (int, float), "a number", default)
    try:
        return None if v is None else float(v)
    except OverflowError:  # an integer of hundreds of digits
        raise bad(f"'{key}' is out of range ({len(str(v))} digits); give an ordinary number", param=key,
                  code="invalid_value") from None


def integer(body, key, default=None):
    return typed_field(body, key, (int,), "an integer", default)


def parse_max_tokens(body: dict) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        n = integer(body, key)
        if n is not None:
            if n < 1:
                raise bad(f"'{key}' must be at least 1, got {n}", param=key)
            return n
    return None


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise bad("'stop' must be a string or a list of at most 16 strings", param="stop", code="invalid_type")
    return [s for s in stop if s]


def parse_logit_bias(body: dict, n_vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    raw = typed_field(body, "logit_bias", (dict,), "an object of token id -> bias")
    if not raw:
        return None
    out = {}
    for key, bias in raw.items():
        if not (key.isascii() and key.isdecimal() and len(key) < 12 and int(key) < n_vocab):
            raise bad(f"logit_bias key {json.dumps(key)[:40]} is not a token id in 0..{n_vocab - 1}",
                      param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(f"logit_bias of token {key} must be a number in [-100, 100], got {json.dumps(bias)[:40]}",
                      param="logit_bias")
        out[int(key)] = float(bias)
    return out


def parse_sampler(body: dict, n_vocab: int) -> Sampler:
    top_k = integer(body, "top_k", DEFAULTS["top_k"])
    penalty_key = "repetition_penalty" if body.get("repetition_penalty") is not None else "repeat_penalty"
    try:
        return make_sampler(temperature=number(body, "temperature", DEFAULTS["temperature"]),
                            top_k=max(top_k, 0), top_p=number(body, "top_p", DEFAULTS["top_p"]),
                            min_p=number(body, "min_p", DEFAULTS["min_p"]),
                            repeat_penalty=number(body, penalty_key, DEFAULTS["repeat_penalty"]),
                            seed=integer(body, "seed"),
                            frequency_penalty=number(body, "frequency_penalty", DEFAULTS["frequency_penalty"]),
                            presence_penalty=number(body, "presence_penalty", DEFAULTS["presence_penalty"]),
                            logit_bias=parse_logit_bias(body, n_vocab))
    except SamplingError as e:
        raise bad(str(e), param=penalty_key if e.option == "repeat_penalty" else e.option,
                  code="invalid_value") from None


def top_count(body: dict, key: str) -> int | None:
    n = integer(body, key)
    if n is not None and not 0 <= n <= MAX_LOGPROBS:
        raise bad(f"'{key}' must be in 0..{MAX_LOGPROBS} (alternatives per token), got {n}", param=key)
    return n


def chat_logprobs(body: dict) -> int | None:
    """Alternatives per token for `logprobs: true` (`top_logprobs`, default 0); None: no logprobs."""
    wanted = typed_field(body, "logprobs", (bool,), "true or false", False)
    top = top_count(body, "top_logprobs")
    if top and not wanted:
        raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def content_text(content: Any, where: str) -> str | None:
    """Message content as text: a string, null, or a list of text parts (what many clients send)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") and \
                    isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("type"), str):
                raise bad(f"{where}.content[{j}] is a '{part['type']}' part; this model reads text only",
                          param=f"{where}.content", code="unsupported_content")
            else:
                raise bad(f"{where}.content[{j}] must be a text part", param=f"{where}.content",
                          code="invalid_type")
        return "\n".join(texts)
    raise bad(f"{where}.content must be a string, a list of text parts, or null", param=f"{where}.content",
              code="invalid_type")


def check_arguments(args: Any, where: str) -> Any:
    """A past call's arguments: a JSON object, as a string (OpenAI's wire form) or as an object; the chat
    template renders each argument as a parameter, so anything else cannot be shown to the model. Returns
    them parsed (a blank string: none), as the template renders them: parsed once, here."""
    if not isinstance(args, str):
        return args
    if not args.strip():
        return {}
    try:
        parsed = json.loads(args)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise bad(f"{where} must be a JSON object of the call's arguments, got {json.dumps(args)[:80]}; send the "
                  "arguments as the model gave them, or {} for none", param=where)
    return parsed


def parse_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list of messages", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", param=where, code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {sorted(ROLES)}, got {json.dumps(role)}", param=f"{where}.role")
        msg = {k: v for k, v in m.items() if k not in ("role", "content")}
        msg["role"] = "system" if role == "developer" else role
        content = content_text(m.get("content"), where)
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls", code="invalid_type")
            checked = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                        not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise bad(f"{where}.tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": str, \"arguments\": str}}}}", param=f"{where}.tool_calls",
                              code="invalid_type")
                if "arguments" in fn:
                    args = check_arguments(fn["arguments"], f"{where}.tool_calls[{j}].function.arguments")
                    c = {**c, "function": {**fn, "arguments": args}}
                checked.append(c)
            msg["tool_calls"] = checked
            msg["content"] = content  # may be None: the template renders the calls
        else:
            msg.pop("tool_calls", None)
            msg["content"] = content or ""
        out.append(msg)
    return out


def refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields this server cannot honour get a 400 naming them, rather than a reply that quietly ignores
    them (a client can then fall back)."""
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in ("json_object", "json_schema"):
            raise bad(f"response_format {kind} is not supported: this server does not constrain output to JSON; "
                      "drop response_format and ask for JSON in the prompt", param="response_format",
                      code="unsupported_parameter")
        if kind != "text":
            raise bad("response_format must be {\"type\": \"text\"} (json_object and json_schema are not "
                      "supported)", param="response_format", code="invalid_value")
    for key in ("functions", "function_call") if chat else ():
        if body.get(key) is not None:
            raise bad(f"the legacy '{key}' field is not supported; send the functions as 'tools' (and "
                      "'function_call' as 'tool_choice')", param=key, code="unsupported_parameter")
    if not chat and body.get("echo") not in (None, False):
        raise bad("'echo' is not supported; prepend the prompt to the text yourself", param="echo",
                  code="unsupported_parameter")
    if not chat and body.get("best_of") not in (None, 1):
        raise bad("only best_of=1 is supported", param="best_of", code="unsupported_parameter")


def parse_tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad("'tools' must be a list of function tools", param="tools", code="invalid_type")
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise bad(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where,
                      code="invalid_type")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise bad(f"{where}.function.parameters of '{fn['name']}' must be a JSON schema object "
                      f"({{\"type\": \"object\", \"properties\": {{...}}}}), got {json.dumps(params)[:80]}",
                      param=f"{where}.function.parameters", code="invalid_schema")
    return raw or None


def parse_tool_choice(raw: Any, tools: list[dict] | None) -> tuple[bool, str, tuple[str, ...]]:
    """(render and parse tools?, text that opens the reply, the names the model must choose among when that
    text stops at a function name: 'required' with several tools; else empty)."""
    if raw is None or raw == "auto":
        return tools is not None, "", ()
    if raw == "none":
        return False, "", ()
    names = [t["function"]["name"] for t in tools or ()]
    if raw == "required":
        if not names:
            raise bad("tool_choice 'required' needs 'tools'", param="tool_choice")
        if len(names) == 1:
            return True, f"<tool_call>\n<function={names[0]}>\n", ()
        return True, "<tool_call>\n<function=", tuple(names)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if name not in names:
            raise bad(f"tool_choice names function {json.dumps(name)}, which is not in 'tools' ({names})",
                      param="tool_choice")
        return True, f"<tool_call>\n<function={name}>\n", ()
    raise bad("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": "
              "{\"name\": ...}}", param="tool_choice", code="invalid_type")


def too_large() -> APIError:
    return APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB ({MAX_BODY_BYTES} bytes), this "
                         "server's limit; send a shorter prompt (that much text would not fit the context anyway)",
                    code="body_too_large")


async def json_body(request: Request) -> dict:
    """The body as a JSON object, refused (413) past MAX_BODY_BYTES: from its Content-Length before reading
    any of it, or as soon as a chunked body passes the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large()
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large()
    try:  # a body of megabytes parses for a while: off the event loop
        body = json.loads(raw) if len(raw) < (1 << 20) else await anyio.to_thread.run_sync(json.loads, raw)
    except RecursionError:  # json's C parser recurses per level: [[[[... runs out of stack
        raise bad("the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


@dataclass
class Logprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first
    offset: int  # characters of the reply before this token


class LogprobSampler:
    """A sampler that also notes, for each token it picks, the token's log-probability and the `top` most
    likely tokens', from the model's own distribution: the logits before penalties, temperature and
    truncation (what llama.cpp's server reports by default, and vLLM), so they do not depend on sampling
    settings."""

    def __init__(self, sampler: Sampler, top: int):
        self.sampler, self.top = sampler, top
        self.picked: deque[tuple[int, float, list[tuple[int, float]]]] = deque()

    def __call__(self, logits, history: Sequence[int] = ()) -> int:
        token = self.sampler(logits, history)
        x = np.asarray(logits, dtype=np.float64)
        logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        top = np.argsort(-logp, kind="stable") if self.top >= len(logp) else np.argpartition(-logp, self.top)
        top = top[:self.top][np.argsort(-logp[top[:self.top]], kind="stable")]
        self.picked.append((token, float(logp[token]), [(int(i), float(logp[i])) for i in top]))
        return token


class TokenIndex:
    """Every token's bytes, sorted, to find the tokens that continue a given text (built once, ~0.2 s)."""

    def __init__(self, tok):
        pairs = sorted((b, i) for i in range(len(tok)) if not tok.is_special(i) and (b := tok.token_bytes(i)))
        self.keys = [b for b, _ in pairs]
        self.ids = np.array([i for _, i in pairs], dtype=np.int64)
        self.bytes_of = tok.token_bytes

    def continuing(self, rest: bytes) -> np.ndarray:
        """Tokens whose bytes are a prefix of `rest` or begin with all of it."""
        spans = [(lo, bisect.bisect_right(self.keys, rest[:n], lo)) for n in range(1, len(rest) + 1)
                 for lo in [bisect.bisect_left(self.keys, rest[:n])]]
        lo = bisect.bisect_left(self.keys, rest)
        hi = bisect.bisect_left(self.keys, rest + b"\xff" * 64)  # every key that begins with `rest`
        found = [self.ids[a:b] for a, b in spans + [(lo, hi)] if b > a]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


class NameConstraint:
    """tool_choice "required" with several tools: the reply starts right after `<function=`; until a name
    offered in `tools` and its `>` are written, only tokens that keep the reply a prefix of one can be
    picked (llama-server enforces the same with a grammar), so the call names a tool the client has."""

    def __init__(self, sampler, index: TokenIndex, names: Sequence[str]):
        self.sampler, self.index = sampler, index
        self.targets = [n.encode() + b">" for n in names]
        self.text = b""
        self.done = False

    def __call__(self, logits, history: Sequence[int] = ()) -> int:
        if not self.done:  # (some target still starts with the text, else it would be done)
            ids = np.unique(np.concatenate([self.index.continuing(t[len(self.text):]) for t in self.targets
                                            if t.startswith(self.text)]))
            if ids.size:
                masked = np.full(len(logits), -np.inf, dtype=np.float64)
                masked[ids] = np.asarray(logits, dtype=np.float64)[ids]
                logits = masked
        token = self.sampler(logits, history)
        if not self.done:
            self.text += self.index.bytes_of(token)
            self.done = any(self.text.startswith(t) for t in self.targets) or \
                not any(t.startswith(self.text) for t in self.targets)
        return token


def chat_logprob(tok, lp: Logprob) -> dict:
    """OpenAI's chat form: the token as text and as bytes (a token may hold part of a UTF-8 character)."""
    def one(token: int, logprob: float) -> dict:
        return {"token": tok.id_to_piece(token), "logprob": logprob, "bytes": list(tok.token_bytes(token))}

    return {**one(lp.token, lp.logprob), "top_logprobs": [one(t, p) for t, p in lp.top]}


def legacy_logprobs(tok, lps: list[Logprob]) -> dict:
    """OpenAI's completions form; text_offset counts characters from the start of the reply."""
    tops = []
    for lp in lps:
        alternatives: dict[str, float] = {}
        for t, p in lp.top:  # most likely first: tokens with the same text keep the best
            alternatives.setdefault(tok.id_to_piece(t), p)
        tops.append(alternatives)
    return {"tokens": [tok.id_to_piece(lp.token) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": tops, "text_offset": [lp.offset for lp in lps]}
