"""The OpenAI API's request fields and answer parts for `localcoder serve`: each field checked into our own
types, or an APIError (a 400 naming the field and the fix) that the server sends as OpenAI's error JSON;
the body's size and JSON; log-probabilities, noted while sampling and shaped as the chat and the legacy
completions endpoints give them."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import LocalcoderError
from .sampling import DEFAULTS, Sampler, make_sampler

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


def parse_sampler(body: dict) -> Sampler:
    top_k = integer(body, "top_k", DEFAULTS["top_k"])
    penalty = number(body, "repetition_penalty", number(body, "repeat_penalty", DEFAULTS["repeat_penalty"]))
    try:
        return make_sampler(temperature=number(body, "temperature", DEFAULTS["temperature"]),
                            top_k=max(top_k, 0), top_p=number(body, "top_p", DEFAULTS["top_p"]),
                            min_p=number(body, "min_p", DEFAULTS["min_p"]), repeat_penalty=penalty,
                            seed=integer(body, "seed"),
                            frequency_penalty=number(body, "frequency_penalty", DEFAULTS["frequency_penalty"]),
                            presence_penalty=number(body, "presence_penalty", DEFAULTS["presence_penalty"]))
    except LocalcoderError as e:
        raise bad(str(e), code="invalid_value") from None


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
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                        not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise bad(f"{where}.tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": str, \"arguments\": str}}}}", param=f"{where}.tool_calls",
                              code="invalid_type")
            msg["content"] = content  # may be None: the template renders the calls
        else:
            msg.pop("tool_calls", None)
            msg["content"] = content or ""
        out.append(msg)
    return out


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


def parse_tool_choice(raw: Any, tools: list[dict] | None) -> tuple[bool, str]:
    """(render and parse tools?, text that opens the reply)."""
    if raw is None or raw == "auto":
        return tools is not None, ""
    if raw == "none":
        return False, ""
    names = [t["function"]["name"] for t in tools or ()]
    if raw == "required":
        if not names:
            raise bad("tool_choice 'required' needs 'tools'", param="tool_choice")
        return True, "<tool_call>\n<function=" + (names[0] + ">\n" if len(names) == 1 else "")
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if name not in names:
            raise bad(f"tool_choice names function {json.dumps(name)}, which is not in 'tools' ({names})",
                      param="tool_choice")
        return True, f"<tool_call>\n<function={name}>\n"
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
