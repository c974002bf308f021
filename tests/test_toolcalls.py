"""The Qwen3-Coder XML tool-call parser: a corpus of model outputs (well-formed and broken), parsed whole and
streamed in pieces of every size, must give the same content and calls."""

import json
import random
import re

import pytest

from localcoder.toolcalls import ToolCallDelta, ToolCallParser, convert_value, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "run_shell", "parameters": {"type": "object", "properties": {
        "command": {"type": "string"}, "timeout": {"type": "number"}, "background": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "edit", "parameters": {"type": "object", "properties": {
        "options": {"type": "object"}, "lines": {"type": "array", "items": {"type": "integer"}},
        "limit": {"type": ["integer", "null"]}, "mode": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "note": {"type": "string"}}}}},
    {"name": "bare_tool", "parameters": {"type": "object", "properties": {"n": {"type": "int32"}}}},
]


def call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


PY_CODE = 'def f(a, b):\n    if a < b and b > 0:\n        return "<ok>"\n    return None\n'
HTML = '<div class="x">\n  <p>hi</p>\n</div>'

# (case id, model output, expected content, expected [(name, arguments)])
CORPUS = [
    ("plain_text", "Hello! How can I help?", "Hello! How can I help?", []),
    ("empty", "", "", []),
    ("single", call("get_weather", city="Paris"), None, [("get_weather", {"city": "Paris"})]),
    ("text_before", "Let me check the weather.\n\n" + call("get_weather", city="Paris"),
     "Let me check the weather.", [("get_weather", {"city": "Paris"})]),
    ("no_open_tag", "<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
     None, [("get_weather", {"city": "Rome"})]),
    ("no_open_tag_text_before", "Sure.\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>",
     "Sure.", [("get_weather", {"city": "Oslo"})]),
    ("two_calls", call("get_weather", city="Paris") + "\n" + call("run_shell", command="ls -la"), None,
     [("get_weather", {"city": "Paris"}), ("run_shell", {"command": "ls -la"})]),
    ("three_calls_blank_lines", "\n\n".join(call("get_weather", city=c) for c in ("A", "B", "C")), None,
     [("get_weather", {"city": c}) for c in ("A", "B", "C")]),
    ("value_with_lt", call("run_shell", command="test 1 < 2 && echo '<done>'"), None,
     [("run_shell", {"command": "test 1 < 2 && echo '<done>'"})]),
    ("value_multiline_code", call("write_file", path="f.py", content=PY_CODE), None,
     [("write_file", {"path": "f.py", "content": PY_CODE})]),
    ("value_html", call("write_file", path="a.html", content=HTML), None,
     [("write_file", {"path": "a.html", "content": HTML})]),
    ("value_param_close_lookalike", call("write_file", path="p.txt", content="a</parameter> b\nc"), None,
     [("write_file", {"path": "p.txt", "content": "a</parameter> b\nc"})]),
    ("value_param_close_lookalike_line", call("write_file", path="p.txt",
                                              content="x = '''\n</parameter>\nmore'''"), None,
     [("write_file", {"path": "p.txt", "content": "x = '''\n</parameter>\nmore'''"})]),
    ("value_partial_close_tag", call("write_file", path="q", content="ends with </parameter"), None,
     [("write_file", {"path": "q", "content": "ends with </parameter"})]),
    ("value_inline_param_open", call("write_file", path="r", content="use <parameter=x> like this"), None,
     [("write_file", {"path": "r", "content": "use <parameter=x> like this"})]),
    ("value_function_close_inside", call("write_file", path="s", content="</function> is a tag"), None,
     [("write_file", {"path": "s", "content": "</function> is a tag"})]),
    ("value_tool_call_tags_inside", call("write_file", path="t", content="<tool_call>\n</tool_call>"), None,
     [("write_file", {"path": "t", "content": "<tool_call>\n</tool_call>"})]),
    ("cut_mid_value", "<tool_call>\n<function=write_file>\n<parameter=path>\nx.py\n</parameter>\n"
                      "<parameter=content>\nprint(1)\nprint(2", None,
     [("write_file", {"path": "x.py", "content": "print(1)\nprint(2"})]),
    ("cut_after_param", "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n", None,
     [("get_weather", {"city": "Lima"})]),
    ("cut_after_name", "I'll run it.\n<tool_call>\n<function=run_shell>", "I'll run it.", [("run_shell", {})]),
    ("cut_after_open_tag", "Thinking...\n<tool_call>\n", "Thinking...", []),
    ("missing_tool_call_close", "<tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n</parameter>\n"
                                "</function>", None, [("get_weather", {"city": "Bern"})]),
    ("missing_param_close_before_param", "<tool_call>\n<function=get_weather>\n<parameter=city>\nKyiv\n"
                                         "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "Kyiv", "days": 2})]),
    ("missing_param_close_before_function", "<tool_call>\n<function=get_weather>\n<parameter=city>\nBonn\n"
                                             "</function>\n</tool_call>", None, [("get_weather", {"city": "Bonn"})]),
    ("missing_function_close_two_calls", "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n"
                                         "</tool_call>\n" + call("get_weather", city="B"), None,
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
    ("types_int_number_bool", call("run_shell", command="sleep 1", timeout="2.5", background="True"), None,
     [("run_shell", {"command": "sleep 1", "timeout": 2.5, "background": True})]),
    ("type_integer", call("get_weather", city="Paris", days="7"), None,
     [("get_weather", {"city": "Paris", "days": 7})]),
    ("type_integer_bad_kept_as_text", call("get_weather", city="Paris", days="a week"), None,
     [("get_weather", {"city": "Paris", "days": "a week"})]),
    ("type_object_array", call("edit", options='{"dry_run": true, "depth": 2}', lines="[1, 2, 3]"), None,
     [("edit", {"options": {"dry_run": True, "depth": 2}, "lines": [1, 2, 3]})]),
    ("type_object_python_literal", call("edit", options="{'dry_run': True, 'name': None}"), None,
     [("edit", {"options": {"dry_run": True, "name": None}})]),
    ("type_object_invalid_kept", call("edit", options="{not json"), None, [("edit", {"options": "{not json"})]),
    ("type_nullable", call("edit", limit="null", mode="3"), None, [("edit", {"limit": None, "mode": 3})]),
    ("type_anyof_string_fallback", call("edit", mode="fast"), None, [("edit", {"mode": "fast"})]),
    ("string_null_stays_text", call("edit", note="null"), None, [("edit", {"note": "null"})]),
    ("string_json_stays_text", call("get_weather", city='"Paris"'), None, [("get_weather", {"city": '"Paris"'})]),
    ("string_strips_one_newline", "<tool_call>\n<function=edit>\n<parameter=note>\n\n  indented\n\n</parameter>\n"
                                  "</function>\n</tool_call>", None, [("edit", {"note": "\n  indented\n"})]),
    ("empty_value", call("edit", note=""), None, [("edit", {"note": ""})]),
    ("no_parameters", "<tool_call>\n<function=run_shell>\n</function>\n</tool_call>", None, [("run_shell", {})]),
    ("unknown_param_is_text", call("get_weather", city="Paris", zoom="5"), None,
     [("get_weather", {"city": "Paris", "zoom": "5"})]),
    ("unknown_tool_is_text", call("mystery", n="5"), None, [("mystery", {"n": "5"})]),
    ("type_alias_int32_bare_tool", call("bare_tool", n="12"), None, [("bare_tool", {"n": 12})]),
    ("unicode_value", call("get_weather", city="São Paulo 🌧 東京"), None,
     [("get_weather", {"city": "São Paulo 🌧 東京"})]),
    ("name_with_spaces", "<tool_call>\n<function= get_weather >\n<parameter= city >\nX\n</parameter>\n</function>\n"
                         "</tool_call>", None, [("get_weather", {"city": "X"})]),
    ("hermes_json_call", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>', None,
     [("get_weather", {"city": "Nice"})]),
    ("garbage_tool_call_is_text", "<tool_call>\nnot a call\n</tool_call>", "<tool_call>\nnot a call\n</tool_call>",
     []),
    ("lt_in_text_before", "if a<b then <tool stuff> ok", "if a<b then <tool stuff> ok", []),
    ("bare_function_of_no_tool_is_prose", "In Qwen's format you write <function=NAME> then the parameters.\n"
     "<function=zz>\n<parameter=p>\n1\n</parameter>\n</function>\nDone.",
     "In Qwen's format you write <function=NAME> then the parameters.\n<function=zz>\n<parameter=p>\n1\n"
     "</parameter>\n</function>\nDone.", []),
    ("partial_tag_at_end_no_call", "ends with <tool_", "ends with <tool_", []),
    ("text_after_call", call("get_weather", city="Paris") + "\n\nDone.", "Done.",
     [("get_weather", {"city": "Paris"})]),
    ("stray_text_between_params", "<tool_call>\n<function=get_weather>\nhmm\n<parameter=city>\nAthens\n</parameter>\n"
                                  "</function>\n</tool_call>", None, [("get_weather", {"city": "Athens"})]),
    ("param_name_ends_at_newline", "<tool_call>\n<function=get_weather>\n<parameter=city\nDoha\n</parameter>\n"
                                   "</function>\n</tool_call>", None, [("get_weather", {"city": "Doha"})]),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_corpus_size():
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name,text,content,calls", CORPUS, ids=[c[0] for c in CORPUS])
def test_parse_whole(name, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert _calls(got_calls) == calls
    for c in got_calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", c.id)
    assert len({c.id for c in got_calls}) == len(got_calls)


def _stream(text, sizes):
    parser = ToolCallParser(TOOLS)
    deltas, at, i = [], 0, 0
    while at < len(text):
        n = sizes[i % len(sizes)]
        deltas += parser.feed(text[at:at + n])
        at, i = at + n, i + 1
    deltas += parser.finish()
    return parser, deltas


@pytest.mark.parametrize("name,text,content,calls", CORPUS, ids=[c[0] for c in CORPUS])
def test_parse_streamed(name, text, content, calls):
    rng = random.Random(hash(name) & 0xFFFF)
    for sizes in ([1], [2], [3], [7], [1, 5, 2, 11], [rng.randint(1, 9) for _ in range(17)]):
        parser, deltas = _stream(text, sizes)
        streamed = "".join(d for d in deltas if isinstance(d, str))
        assert streamed == (content or "").strip() or streamed == (content or ""), sizes
        assert _calls(parser.calls) == calls, sizes
        # per call: one delta with id + name first, then the arguments, which join to the final JSON
        for index, c in enumerate(parser.calls):
            mine = [d for d in deltas if isinstance(d, ToolCallDelta) and d.index == index]
            assert mine[0].id == c.id and mine[0].name == c.name and mine[0].arguments is None
            assert all(d.id is None and d.name is None for d in mine[1:])
            assert "".join(d.arguments for d in mine[1:]) == c.arguments


def test_name_streams_before_the_call_completes():
    parser = ToolCallParser(TOOLS)
    out = parser.feed("Checking.\n<tool_call>\n<function=write_file>\n<parameter=content>\nhello")
    assert out[0] == "Checking."
    assert isinstance(out[1], ToolCallDelta) and out[1].name == "write_file" and out[1].arguments is None
    assert len(out) == 2
    out = parser.feed(" world\n</parameter>\n</function>\n</tool_call>")
    assert [json.loads(d.arguments) for d in out] == [{"content": "hello world"}]


def test_partial_open_tag_is_held_back():
    parser = ToolCallParser(TOOLS)
    assert parser.feed("Sure <tool") == ["Sure"]  # neither '<tool' nor the space before it goes out yet
    assert parser.feed("box>") == [" <toolbox>"]
    assert parser.finish() == []


def test_delta_wire_format():
    parser = ToolCallParser(TOOLS)
    deltas = parser.feed(call("get_weather", city="Paris")) + parser.finish()
    first, args = (d.to_openai() for d in deltas)
    assert first == {"index": 0, "id": parser.calls[0].id, "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}
    assert args == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert parser.calls[0].to_openai()["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.mark.parametrize("raw,schema,want", [
    ("42", {"type": "integer"}, 42), ("4.0", {"type": "integer"}, 4), ("-7", {"type": "number"}, -7),
    ("1e3", {"type": "number"}, 1000.0), ("nan", {"type": "number"}, "nan"), ("FALSE", {"type": "boolean"}, False),
    ("maybe", {"type": "boolean"}, "maybe"), ("[1, \"a\"]", {"type": "array"}, [1, "a"]),
    ("{}", {"type": "object"}, {}), ("[1]", {"type": "object"}, "[1]"), ("None", {"type": "null"}, None),
    (" x ", {"type": "string"}, " x "), ("5", None, "5"), ("5", {}, "5"),
    ("3", {"enum": [1, 2, 3]}, 3), ("{\"a\": 1}", {"properties": {"a": {}}}, {"a": 1}),
])
def test_convert_value(raw, schema, want):
    assert convert_value(raw, schema) == want


def test_long_value_streams_in_linear_time():
    body = ("x = '</parameter>' if a < b else 0\n" * 4000)
    text = call("write_file", path="big.py", content=body)
    parser, _ = _stream(text, [3])
    assert json.loads(parser.calls[0].arguments)["content"] == body
