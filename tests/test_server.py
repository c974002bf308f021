"""`localcoder serve`: the real server (uvicorn on a loopback port) driven by the official openai client.

The tiny fixture model is random, so what it says is noise; tests that need a reply we control (tool calls,
slow generation) plug a scripted generate_fn that sends chosen text through the real tokenizer, stop-string
handling, tool-call parser and streaming code.
"""

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from localcoder.cache import ModelCache  # noqa: E402
from localcoder.generate import TextStream  # noqa: E402
from localcoder.model import load  # noqa: E402
from localcoder.server import PromptCache, create_app  # noqa: E402

NAME = "qwen3next-tiny-Q4_K_M"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SHELL = {"type": "function", "function": {
    "name": "run_shell", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}
CALL_TEXT = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
             "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load(fixtures_dir / "qwen3next-tiny" / "gguf" / f"{NAME}.gguf", backend="numpy")


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn in a background thread, on a free 127.0.0.1 port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


class Script:
    """A generate_fn whose replies are chosen texts, tokenized and streamed token by token."""

    def __init__(self, model, delay=0.0):
        self.model, self.delay = model, delay
        self.replies: list[str] = []
        self.prompts: list[str] = []
        self.produced = 0  # tokens yielded over all requests

    def __call__(self, prompt_ids, max_tokens, sampler, stop, cache, stats, cancel):
        tok = self.model.tokenizer
        self.prompts.append(tok.decode(list(cache.tokens) + list(prompt_ids)))
        text = self.replies.pop(0) if self.replies else "OK."
        stream = TextStream(tok, stop)
        for i, token in enumerate(tok.encode(text, parse_special=True)):
            if i >= max_tokens:
                stats.finish_reason = "length"
                return
            if cancel.wait(self.delay) if self.delay else cancel.is_set():
                return
            self.produced += 1
            piece = stream.add(token)
            yield token, piece
            if stream.stopped:
                stats.finish_reason = "stop"
                return
        tail = stream.flush()
        if tail:
            yield -1, tail
        stats.finish_reason = "stop"


@pytest.fixture(scope="module")
def real(model):
    """A server running the real (random) model."""
    app = create_app(model, cache_bytes=64 << 20)
    with serving(app) as url:
        yield url, app


def model_of(real):
    return real[1].state.server.model


def wait_idle(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()
        if not h["busy"] and not h["queued"]:
            return h
        time.sleep(0.05)
    raise AssertionError("server still busy")


# -- the real model --------------------------------------------------------------------------------------
def test_models_and_health(real):
    url, _ = real
    c = client(url)
    assert [m.id for m in c.models.list().data] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["model"] == NAME


def test_plain_chat(real):
    url, _ = real
    r = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert r.model == NAME and r.object == "chat.completion"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    # the GGUF's general.name is accepted too; max_completion_tokens is max_tokens' new name
    r2 = client(url).chat.completions.create(model="qwen3next-tiny", max_completion_tokens=5, temperature=0,
                                             messages=[{"role": "user", "content": [{"type": "text",
                                                                                     "text": "Say hi."}]}])
    assert r2.choices[0].message.content == choice.message.content


def test_streaming_matches_whole(real):
    url, _ = real
    msgs = [{"role": "system", "content": "Stream test."}, {"role": "user", "content": "Count to three."}]
    whole = client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=7, temperature=0)
    chunks = list(client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=7, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_seed_and_stop(real):
    url, _ = real
    msgs = [{"role": "user", "content": "Seeded sampling."}]
    a, b = (client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=1.0,
                                                seed=1234) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    text = a.choices[0].message.content
    cut = text.strip()[2:4]
    if cut:  # a stop string cuts the reply before it and the reason is "stop"
        r = client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=1.0,
                                                seed=1234, stop=[cut])
        assert r.choices[0].message.content == text[:text.index(cut)]
        assert r.choices[0].finish_reason == "stop"


def test_cached_tokens_on_second_turn(real):
    url, _ = real
    c = client(url)
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r1 = c.chat.completions.create(model=NAME, messages=turn1, max_tokens=4, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    r2 = c.chat.completions.create(model=NAME, messages=turn2, max_tokens=4, temperature=0)
    # the state is kept before the prompt's last token (the reply's state is not a prefix here: the random
    # model's reply is not "Blue.")
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens - 1 > 0
    # so the same request again (a retry) reuses all of it but the last token
    r3 = c.chat.completions.create(model=NAME, messages=turn2, max_tokens=4, temperature=0)
    assert r3.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1
    # a new conversation with the same system prompt reuses the system prompt's state
    other = [turn1[0], {"role": "user", "content": "Something else entirely."}]
    r4 = c.chat.completions.create(model=NAME, messages=other, max_tokens=4, temperature=0)
    system = model_of(real).tokenizer.encode("<|im_start|>system\nYou are terse.<|im_end|>", parse_special=True)
    assert r4.usage.prompt_tokens_details.cached_tokens == len(system)


def test_reused_state_gives_the_same_reply(model):
    """A reply continued from a restored snapshot equals one from a fresh prefill (greedy)."""
    app = create_app(model, cache_bytes=64 << 20)
    msgs = [{"role": "user", "content": "Reuse check."}]
    with serving(app) as url:
        c = client(url)
        fresh = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
        longer = msgs + [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Again."}]
        reused = c.chat.completions.create(model=NAME, messages=longer, max_tokens=6, temperature=0)
        assert reused.usage.prompt_tokens_details.cached_tokens > 0
    with serving(create_app(model, cache_bytes=0)) as url:  # no cache: everything from scratch
        c = client(url)
        again = c.chat.completions.create(model=NAME, messages=longer, max_tokens=6, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == reused.choices[0].message.content
    assert fresh.choices[0].message.content  # (noise, but generated)


def test_completions(real):
    url, _ = real
    c = client(url)
    r = c.completions.create(model=NAME, prompt="def fib(n):", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    chunks = list(c.completions.create(model=NAME, prompt="def fib(n):", max_tokens=4, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    r = c.completions.create(model=NAME, prompt=[[1, 2, 3]], max_tokens=2)  # token ids
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 2


BAD = [  # (path, body, status, code, param)
    ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type",
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "unsupported_content", "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "invalid_type", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400,
     "invalid_value", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, None,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400,
     "invalid_type", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "invalid_type", "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 7}, 400, "invalid_type",
     "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, None, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}, 400,
     "invalid_type", "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "string"}}]}, 400, "invalid_schema",
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, 400, "invalid_schema",
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, None,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, None,
     "tool_choice"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found", "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}]}, 400,
     "context_length_exceeded", "messages"),
    ("/v1/completions", {"prompt": 123}, 400, "invalid_type", "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999999]}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, None, "prompt"),
]


def test_bad_inputs_get_openai_errors_and_the_server_goes_on(real):
    url, _ = real
    for path, body, status, code, param in BAD:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code is not None:
            assert err["code"] == code, (body, err)
        if param is not None:
            assert err["param"] == param, (body, err)
    assert httpx.get(url + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(url + "/v1/chat/completions").status_code == 405
    c = client(url)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a " * 9000}], max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "still there?"}], max_tokens=2)
    assert r.usage.completion_tokens == 2


# -- scripted replies ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted(model):
    script = Script(model)
    with serving(create_app(model, generate_fn=script)) as url:
        yield url, script


def test_tool_call_round_trip(scripted):
    url, script = scripted
    c = client(url)
    script.replies[:] = [CALL_TEXT, "It is 21 °C and clear in Paris."]
    msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    r1 = c.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, SHELL])
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # typed by the schema
    assert "<name>get_weather</name>" in script.prompts[-1] and "<name>run_shell</name>" in script.prompts[-1]

    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "clear"}'}]
    r2 = c.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, SHELL])
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    assert r2.choices[0].message.content == "It is 21 °C and clear in Paris."
    prompt = script.prompts[-1]
    assert ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>") in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21, "sky": "clear"}\n</tool_response>\n<|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tool_calls_stream_as_deltas(scripted):
    url, script = scripted
    second = ("<tool_call>\n<function=run_shell>\n<parameter=command>\nls -la | grep '<x>'\n</parameter>\n"
              "</function>\n</tool_call>")
    script.replies[:] = [CALL_TEXT + "\n" + second]
    stream = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}],
                                                 tools=[WEATHER, SHELL], stream=True,
                                                 stream_options={"include_usage": True})
    content, calls, order, finish, usage = "", {}, [], None, None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
                order.append(("open", tc.index))
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
                order.append(("args", tc.index))
        finish = ch.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert finish == "tool_calls"
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == [
        ("get_weather", {"city": "Paris", "days": 3}), ("run_shell", {"command": "ls -la | grep '<x>'"})]
    assert order == [("open", 0), ("args", 0), ("open", 1), ("args", 1)]
    assert all(s["id"].startswith("call_") for s in calls.values())
    assert usage.completion_tokens > 10


def test_tool_choice(scripted):
    url, script = scripted
    c = client(url)
    msgs = [{"role": "user", "content": "Weather?"}]
    # none: no tools in the prompt, and call-like text is plain content
    script.replies[:] = [CALL_TEXT]
    r = c.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER], tool_choice="none")
    assert "<tools>" not in script.prompts[-1]
    assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls
    # a named function: the reply is opened with the call, the model writes the rest
    rest = "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        script.replies[:] = [rest]
        r = c.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER], tool_choice=choice)
        assert script.prompts[-1].endswith("<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n")
        (call,) = r.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
        assert r.choices[0].finish_reason == "tool_calls"
    # required with several tools: the model names the function
    script.replies[:] = ["run_shell>\n<parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>"]
    r = c.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, SHELL], tool_choice="required",
                                  stream=True)
    parts = [tc for ch in r if ch.choices for tc in ch.choices[0].delta.tool_calls or ()]
    assert parts[0].function.name == "run_shell" and json.loads(parts[1].function.arguments) == {"command": "pwd"}


def test_api_key(model):
    script = Script(model)
    with serving(create_app(model, api_key="s3cret", generate_fn=script)) as url:
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                                    "content": "x"}])
        assert script.prompts == []
        r = client(url, key="s3cret").chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                                     "content": "x"}])
        assert r.choices[0].message.content == "OK."


def test_burst_gets_429_with_retry_after(model):
    script = Script(model, delay=0.025)  # 40 tokens: about a second a request
    script.replies[:] = ["word " * 20] * 8
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    with serving(create_app(model, max_queue=1, generate_fn=script)) as url:
        def post(_):
            return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, i) for i in range(4)]
            time.sleep(0.3)
            t0 = time.monotonic()
            health = httpx.get(url + "/health", timeout=5).json()  # the event loop still answers at once
            assert time.monotonic() - t0 < 1.0 and health["busy"]
            responses = [f.result() for f in futures]
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 429, 429], codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
        wait_idle(url)
        assert client(url).chat.completions.create(model=NAME, messages=body["messages"]).choices[0].message.content


def test_disconnect_cancels_generation(model):
    script = Script(model, delay=0.01)
    with serving(create_app(model, generate_fn=script)) as url:
        # streaming: close the response after a few chunks
        script.replies[:] = ["tick " * 1000]
        stream = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}],
                                                     stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        wait_idle(url)
        produced = script.produced
        time.sleep(0.3)
        assert script.produced == produced < 500
        # whole answer: the client gives up waiting
        script.replies[:] = ["tock " * 1000]
        before = script.produced
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "go"}]})
        wait_idle(url)
        assert script.produced - before < 500
        # a request that gives up while waiting in the queue leaves it
        script.replies[:] = ["tack " * 100]
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=30,
                                  json={"messages": [{"role": "user", "content": "first"}]})
            time.sleep(0.2)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/chat/completions", timeout=0.3,
                           json={"messages": [{"role": "user", "content": "second"}]})
            deadline = time.monotonic() + 5
            while httpx.get(url + "/health").json()["queued"] and time.monotonic() < deadline:
                time.sleep(0.05)
            health = httpx.get(url + "/health").json()
            assert health["busy"] and health["queued"] == 0
            assert running.result().status_code == 200
        assert script.prompts[-1].count("first") == 1 and "second" not in script.prompts[-1]
        # and the next request is served
        r = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == "OK."


def test_prompt_cache_lru(model):
    ids = model.tokenizer.encode("one two three four five six seven eight")
    cache = model.new_cache()
    model.forward(ids[:4], cache)
    pc = PromptCache(budget_bytes=10 << 20)
    pc.store(cache)  # a copy
    model.forward(ids[4:], cache)
    pc.store(cache, copy=False)
    assert len(pc.entries) == 2
    got, n = pc.take(ids + [5])
    assert n == len(ids) and got is not pc.entries[tuple(ids)][0]
    got, n = pc.take(ids)  # the whole prompt is stored, but one id must remain: the shorter prefix
    assert n == 4 and got.tokens == ids[:4]
    model.forward(ids[4:], got)  # continuing a taken copy leaves the stored one as it was
    assert pc.entries[tuple(ids[:4])][0].pos == 4
    a = np.asarray(model.forward([7], got, all_logits=False))
    b = np.asarray(model.forward([7], pc.take(ids + [7])[0], all_logits=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert pc.take([999, 1])[1] == 0
    probe = PromptCache(budget_bytes=10 << 20)
    probe.store(pc.entries[tuple(ids)][0])
    small = PromptCache(budget_bytes=probe.bytes + 1)  # room for the long entry only
    small.store(pc.entries[tuple(ids[:4])][0])
    small.store(pc.entries[tuple(ids)][0])
    assert list(small.entries) == [tuple(ids)] and small.bytes <= small.budget
    broken = ModelCache(cache.layers, cache.pos, list(cache.tokens), broken=True)
    small.store(broken)
    assert len(small.entries) == 1


# -- soak ------------------------------------------------------------------------------------------------
def _rss_bytes():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _soak(model, n_requests, warmup=6):
    """n_requests over 2 concurrent clients, mixing whole / streamed chat, completions and tool calls;
    returns the RSS growth after warm-up (None off Linux)."""
    app = create_app(model, cache_bytes=4 << 20)
    errors = []
    with serving(app) as url:
        c = client(url)

        def one(i):
            msgs = [{"role": "system", "content": f"Session {i % 5}."}, {"role": "user", "content": f"Q{i % 7}?"}]
            try:
                kind = i % 4
                if kind == 0:
                    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0.7, seed=i)
                    assert r.usage.completion_tokens <= 3
                elif kind == 1:
                    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, stream=True,
                                                            stream_options={"include_usage": True}))
                    assert chunks[-1].usage.completion_tokens <= 3
                elif kind == 2:
                    r = c.completions.create(model=NAME, prompt=f"x = {i} +", max_tokens=2)
                    assert r.choices[0].finish_reason in ("length", "stop")
                else:
                    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, tools=[WEATHER])
                    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
            except Exception as e:  # collected: every request must succeed
                errors.append(f"request {i}: {type(e).__name__}: {e}")

        for i in range(warmup):
            one(i)
        rss0 = _rss_bytes()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, range(n_requests)))
        wait_idle(url)
        rss1 = _rss_bytes()
        h = httpx.get(url + "/health").json()
        assert h["prompt_cache"]["bytes"] <= 4 << 20
    assert not errors, errors[:5]
    return None if rss0 is None else rss1 - rss0


def test_soak_small(model):
    growth = _soak(model, 30)
    if growth is not None:
        assert growth < 50 << 20, f"RSS grew {growth >> 20} MB"


@pytest.mark.slow
def test_soak_500(model):
    growth = _soak(model, 500)
    if growth is not None:
        assert growth < 50 << 20, f"RSS grew {growth >> 20} MB"


def test_serve_takes_the_load_options(fixtures_dir, monkeypatch):
    """`localcoder serve --expert-cache 1K --kv-type f16 ...`: the served model streams its experts with the
    smallest budget and keeps an f16 KV cache (the options reach localcoder.load)."""
    from localcoder import server
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    path = fixtures_dir / "qwen3next-tiny" / "gguf" / f"{NAME}.gguf"
    seen = {}

    def spy(*a, **kw):
        seen["model"] = load(*a, **kw)
        return seen["model"]

    monkeypatch.setattr("localcoder.model.load", spy)
    server.serve(path, port=0, backend="numpy", expert_cache="1K", kv_type="f16", expert_policy="lfu")
    m = seen["model"]
    assert served["app"] is not None and m.expert_store.n_slots == 1 and m.expert_store.policy_name == "lfu"
    assert m.new_cache().layers[3].k.dtype == np.float16
