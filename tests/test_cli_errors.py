"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, no partial output."""

import os
import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest

from localcoder.synthetic import PRESETS, write_synthetic

TINY = PRESETS["demo"]


def run_cli(*args, env=None, cwd=None, input=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "localcoder", *args], capture_output=True, text=True,
                          timeout=120, env=e, cwd=cwd, input=input)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A valid random-weight qwen3next file: the demo dimensions with the real tokenizer."""
    return write_synthetic(tmp_path_factory.mktemp("m") / "small.gguf", TINY, "q8_0")


def test_missing_file(tmp_path):
    p = run_cli("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert_one_line_error(p, "model file not found", "nope.gguf")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("this is not a model")
    assert_one_line_error(run_cli("info", str(f)), "not a GGUF file")


def test_directory_instead_of_file(tmp_path):
    assert_one_line_error(run_cli("info", str(tmp_path)), "is a directory")


def test_truncated(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(run_cli("info", str(cut)), "truncated", "re-download")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:5000])  # cut inside the metadata
    assert_one_line_error(run_cli("info", str(head)), "re-download")


def _write(path, arch, tensors, kv=()):
    w = gguf.GGUFWriter(path, arch)
    for k, v in kv:
        w.add_uint32(k, v)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_wrong_architecture(tmp_path):
    f = _write(tmp_path / "llama.gguf", "llama", [("token_embd.weight", np.zeros((4, 8), np.float32), None)])
    assert_one_line_error(run_cli("info", str(f)), "expected arch qwen3next", "llama")


def test_unknown_quant_type(tmp_path):
    raw = np.zeros((2, 66), np.uint8)  # 2 rows of one IQ2_XXS block (256 weights, 66 bytes)
    f = _write(tmp_path / "iq2.gguf", "qwen3next", [("token_embd.weight", raw, gguf.GGMLQuantizationType.IQ2_XXS)])
    assert_one_line_error(run_cli("info", str(f)), "IQ2_XXS")


def test_inconsistent_metadata(tmp_path):
    bad = replace(TINY, n_head=3)  # 3 query heads cannot share 2 kv heads
    f = write_synthetic(tmp_path / "bad.gguf", bad, "q8_0")
    assert_one_line_error(run_cli("info", str(f)), "inconsistent metadata", "head_count")


def test_prompt_longer_than_context(small_gguf):
    p = run_cli("run", "-m", str(small_gguf), "-p", "word " * 300, "--ctx", "64", "-n", "4", "--backend", "numpy")
    assert_one_line_error(p, "context", "--ctx")


def test_bad_sampling_option(small_gguf):
    p = run_cli("run", "-m", str(small_gguf), "-p", "hi", "--top-p", "1.5", "--backend", "numpy")
    assert_one_line_error(p, "top_p")


def test_no_model_found_says_how_to_get_one(tmp_path):
    p = run_cli("run", "-p", "hi", env={"LOCALCODER_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert_one_line_error(p, "Qwen3-Coder-Next-Q4_K_M.gguf", "localcoder demo")


def test_no_partial_output_when_synthetic_write_fails(tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(Exception):
        write_synthetic(out, TINY, "no-such-mix")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_run_streams_text_and_reports_speed(small_gguf):
    p = run_cli("run", "-m", str(small_gguf), "-p", "def reverse(s):", "-n", "8", "--temp", "0", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    assert "tokens/s" in p.stderr and p.stdout.strip()


def test_info(small_gguf):
    p = run_cli("info", str(small_gguf))
    assert p.returncode == 0, p.stderr
    for needle in ("qwen3next", "Q8_0", "F32", "151936", "Gated DeltaNet", "chat template"):
        assert needle in p.stdout


@pytest.mark.parametrize("args, needles", [
    (["bench", "-p", "0", "-n", "2"], ("-p/--prompt-tokens 0", "at least 1")),
    (["bench", "-p", "2", "-n", "0"], ("-n/--gen-tokens 0",)),
    (["bench", "-p", "2", "-n", "2", "--threads", "0"], ("--threads 0", "at least 1")),
    (["bench", "-p", "2", "-n", "2", "-d", "-1"], ("-d/--depth -1", "0 or more")),
    (["bench", "-p", "2", "-n", "2", "-d", "1000000"], ("1,000,004 positions", "trained context", "lower -d")),
    (["bench", "-p", "2", "-n", "2", "--kv-type", "q8"], ("'q8'", "f32 or f16")),
    (["run", "-p", "hi", "-t", "-1"], ("--threads -1",)),
    (["run", "-p", "hi", "-n", "-2"], ("-n/--max-tokens -2", "-1 to generate until")),
    (["ask", "hi", "-n", "0"], ("max tokens 0", "at least 1")),
])
def test_bad_counts_are_one_line_errors(small_gguf, args, needles):
    assert_one_line_error(run_cli(*args, "-m", str(small_gguf), "--backend", "numpy"), *needles)


def test_run_until_the_context_is_full(small_gguf):
    """-n -1, as in llama.cpp: generate until a stop token or the full context (here 24 tokens)."""
    p = run_cli("run", "-m", str(small_gguf), "-p", "def reverse(s):", "-n", "-1", "--ctx", "24", "--temp", "0",
                "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    prompt = int(p.stderr.split("prompt: ")[1].split()[0])
    generated = int(p.stderr.split("generation: ")[1].split()[0])
    assert "finish: length" in p.stderr and prompt + generated == 24, p.stderr


def test_convert_never_writes_over_its_checkpoint(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    p = run_cli("convert", str(hf), "-o", str(hf / "config.json"))
    assert_one_line_error(p, "file of the checkpoint")
    assert (hf / "config.json").read_text() == "{}"
    assert_one_line_error(run_cli("convert", str(hf), "-o", str(tmp_path)), "is a folder")
    assert_one_line_error(run_cli("convert", str(hf), "-o", ""), "no file name")
    assert_one_line_error(run_cli("quantize", str(hf), str(tmp_path / "x.gguf")), "is a folder")


def test_sampling_values_llama_cpp_users_type(small_gguf):
    """--seed -1 is llama.cpp's "random seed"; NaN is not a temperature."""
    p = run_cli("run", "-m", str(small_gguf), "-p", "hi", "-n", "2", "--seed", "-1", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    for opt in ("--temp", "--repeat-penalty"):
        p = run_cli("run", "-m", str(small_gguf), "-p", "hi", "-n", "2", opt, "nan", "--backend", "numpy")
        assert_one_line_error(p, "not a finite number")


def test_prompt_bytes_that_are_not_utf8(small_gguf):
    """A terminal or pipe can hand over bytes that are not UTF-8: they become U+FFFD, not a crash."""
    p = run_cli("run", "-m", str(small_gguf), "-p", os.fsdecode(b"\xff\xfe abc"), "-n", "2", "--backend", "numpy")
    assert p.returncode == 0, p.stderr


def test_output_folders_are_checked_before_the_work(small_gguf, tmp_path):
    p = run_cli("run", "-m", str(small_gguf), "-p", "hi", "-n", "2", "--expert-stats", str(tmp_path),
                "--backend", "numpy")
    assert_one_line_error(p, "is a folder", "routing trace")
    assert not list(tmp_path.parent.glob("*.tmp"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    p = run_cli("chat", "-m", str(small_gguf), "--history-dir", str(blocked / "sub"), "--backend", "numpy")
    assert_one_line_error(p, "--history-dir")


def test_serve_address_problems_before_loading(small_gguf):
    import socket
    assert_one_line_error(run_cli("serve", "-m", str(small_gguf), "--port", "70000"), "not a TCP port")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run_cli("serve", "-m", str(small_gguf), "--port", str(port)), "cannot listen",
                              "--port")


def test_stop_must_not_be_empty(small_gguf):
    """An empty stop string cannot mark where to stop; it used to be dropped without a word."""
    p = run_cli("run", "-m", str(small_gguf), "-p", "hi", "-n", "2", "--stop", "", "--backend", "numpy")
    assert_one_line_error(p, '--stop ""', "give the text to stop at")


def _prompt_tokens(proc):
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.split("prompt: ")[1].split()[0])


def test_run_system_implies_chat(small_gguf):
    """--system applies the chat template as llama.cpp's -sys does, instead of being ignored without --chat."""
    base = ("run", "-m", str(small_gguf), "-p", "hi", "-n", "1", "--temp", "0", "--backend", "numpy")
    plain = _prompt_tokens(run_cli(*base))
    with_chat = _prompt_tokens(run_cli(*base, "--chat", "--system", "be brief"))
    assert _prompt_tokens(run_cli(*base, "--system", "be brief")) == with_chat > plain + 4


def _patch_metadata_float(src, dst, key, value):
    """A copy of a GGUF with one FLOAT32 metadata value overwritten in place."""
    import struct

    data = bytearray(src.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == gguf.GGUFValueType.FLOAT32
    struct.pack_into("<f", data, at + 4, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf")])
def test_rms_epsilon_must_be_positive_and_finite(small_gguf, tmp_path, eps):
    """A negative or non-finite epsilon made NaN logits and a traceback in the sampler at the first token."""
    f = _patch_metadata_float(small_gguf, tmp_path / "eps.gguf", "qwen3next.attention.layer_norm_rms_epsilon", eps)
    p = run_cli("run", "-m", str(f), "-p", "hi", "-n", "2", "--backend", "numpy")
    assert_one_line_error(p, "qwen3next.attention.layer_norm_rms_epsilon", "not a finite number > 0", "re-download")


def test_convert_config_with_a_non_numeric_size(tmp_path):
    """config.json's numbers are checked before anything is written: a string where an integer belongs is a
    one-line error naming the key (it was a ValueError traceback)."""
    import json

    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"architectures": ["Qwen3NextForCausalLM"], "vocab_size": 2176, "num_hidden_layers": 4,
              "hidden_size": "two thousand"}
    (hf / "config.json").write_text(json.dumps(config))
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (hf / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    p = run_cli("convert", str(hf), "-o", str(tmp_path / "out.gguf"))
    assert_one_line_error(p, "hidden_size = 'two thousand'", "not a whole number", "config.json")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hf"]


def test_chat_template_file(small_gguf, tmp_path):
    """--chat-template-file (llama.cpp's option) replaces the model's template on run, chat, ask and serve;
    a missing, non-UTF-8 or broken file is a one-line error at load."""
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    base = ("-m", str(small_gguf), "-n", "1", "--temp", "0", "--backend", "numpy")
    raw = _prompt_tokens(run_cli("run", "-p", "hello world", *base))
    assert _prompt_tokens(run_cli("run", "-p", "hello world", "--chat", *base)) > raw + 4
    # the file's template is used (and, like --system, implies --chat): the prompt renders as the bare text
    assert _prompt_tokens(run_cli("run", "-p", "hello world", "--chat-template-file", str(plain), *base)) == raw
    bad_utf8 = tmp_path / "latin1.jinja"
    bad_utf8.write_bytes(b"{{ messages[0].content }} caf\xe9")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    static = tmp_path / "static.jinja"
    static.write_text("no messages here")
    for f, needles in ((tmp_path / "nope.jinja", ("chat template file not found", "nope.jinja")),
                       (tmp_path, ("is a folder",)),
                       (bad_utf8, ("not UTF-8", "latin1.jinja")),
                       (broken, ("chat template error", "fix", "broken.jinja")),
                       (static, ("without its text", "static.jinja"))):
        assert_one_line_error(run_cli("run", "-p", "hi", "--chat-template-file", str(f), *base), *needles)
    for cmd in (("ask", "hi"), ("chat",), ("serve", "--port", "0")):
        p = run_cli(*cmd, "-m", str(small_gguf), "--backend", "numpy", "--chat-template-file", str(broken))
        assert_one_line_error(p, "chat template error", "broken.jinja")


def test_named_binary_or_non_utf8_file_is_an_error(small_gguf, tmp_path):
    """-f FILE with a binary or non-UTF-8 file says so (it used to be skipped without a word); a binary file
    inside a directory is still skipped, as documented."""
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    for cmd in (("ask", "what is this?"), ("chat", "--no-history")):
        p = run_cli(*cmd, "-m", str(small_gguf), "-f", "blob.bin", "--backend", "numpy", cwd=tmp_path)
        assert_one_line_error(p, "blob.bin is a binary file", "NUL")
    p = run_cli("ask", "hi", "-m", str(small_gguf), "-f", "latin1.txt", "--backend", "numpy", cwd=tmp_path)
    assert_one_line_error(p, "latin1.txt is not UTF-8 text", "0xe9")


mlx_missing = pytest.mark.skipif(__import__("importlib").util.find_spec("mlx") is None,
                                 reason="MLX is not installed: pip install -e '.[mlx]'")


@mlx_missing
def test_expert_streaming_options_with_mlx_are_errors(small_gguf, tmp_path):
    """The MLX backend keeps its own LRU expert cache (--expert-cache sizes it): the other streaming options
    would be silently ignored."""
    base = ("run", "-m", str(small_gguf), "-p", "hi", "-n", "1", "--backend", "mlx")
    p = run_cli(*base, "--expert-cache", "1G", "--expert-policy", "lfu", "--expert-prefetch")
    assert_one_line_error(p, "--expert-policy lfu, --expert-prefetch", "MLX backend", "--backend numba")
    p = run_cli(*base, "--expert-stats", str(tmp_path / "trace.jsonl"))
    assert_one_line_error(p, "--expert-stats", "MLX backend")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_gguf(fixtures_dir):
    return fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf"


def test_expert_stats_folder_is_checked_before_the_run(tiny_gguf, tmp_path):
    """A missing folder failed only after the whole generation, naming the internal .tmp file."""
    trace = tmp_path / "missing" / "t.jsonl"
    p = run_cli("run", "-m", str(tiny_gguf), "-p", "hi", "-n", "2", "--expert-stats", str(trace), "--backend", "numpy")
    assert_one_line_error(p, f"the folder {trace.parent} of {trace} does not exist", "routing trace")
    assert ".tmp" not in p.stderr and not trace.parent.exists()


def test_without_m_the_qwen3next_model_is_chosen_among_others(tiny_gguf, tmp_path):
    """A llama.cpp user keeps other GGUFs in ./models: the first file in alphabetical order was taken, whatever
    its architecture."""
    models = tmp_path / "models"
    models.mkdir()
    _write(models / "Llama-3-8B.gguf", "llama", [("token_embd.weight", np.zeros((4, 8), np.float32), None)])
    (models / "broken.gguf").write_text("not a model")
    env = {"LOCALCODER_HOME": str(tmp_path / "home")}
    p = run_cli("run", "-p", "hi", "-n", "1", "--backend", "numpy", env=env, cwd=tmp_path)
    assert_one_line_error(p, "no qwen3next model among", "Llama-3-8B.gguf (llama)", "broken.gguf", "pass -m FILE")
    (models / "Qwen3-Coder-Next-tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    p = run_cli("run", "-p", "hi", "-n", "1", "--backend", "numpy", env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr


def _with_template(src, dst, template):
    """A copy of a GGUF whose chat template is `template`, padded with spaces to the original's length."""
    import struct

    data = bytearray(src.read_bytes())
    key = b"tokenizer.chat_template"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == gguf.GGUFValueType.STRING
    n = struct.unpack_from("<Q", data, at + 4)[0]
    data[at + 12:at + 12 + n] = template.encode().ljust(n)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("template, needle", [("{% if %}", "template line 1"),
                                              ("hello", "renders a user message without its text")])
def test_broken_template_in_the_gguf(tiny_gguf, tmp_path, template, needle):
    """info and plain run never render the template: they work and info reports it broken; run --chat, chat and
    ask stop with one line naming --chat-template-file (a template that drops the prompt was taken silently)."""
    f = _with_template(tiny_gguf, tmp_path / "t.gguf", template)
    p = run_cli("info", str(f))
    assert p.returncode == 0 and needle in p.stdout, p.stderr
    base = ("-m", str(f), "-n", "1", "--backend", "numpy")
    assert run_cli("run", "-p", "hi", *base).returncode == 0
    for args in (("run", "-p", "hi", "--chat"), ("ask", "hi"), ("chat", "--no-history")):
        assert_one_line_error(run_cli(*args, *base, input=""), needle, "--chat-template-file FILE")


def test_ask_needs_a_question(tiny_gguf):
    """`ask ""` with nothing piped sent an empty question, where `run -p ""` refuses."""
    p = run_cli("ask", "", "-m", str(tiny_gguf), "--backend", "numpy", input="")
    assert_one_line_error(p, "the question is empty")
    p = run_cli("ask", "", "-m", str(tiny_gguf), "--backend", "numpy", "-n", "1", input="x = 1\n")
    assert p.returncode == 0, p.stderr


def test_ask_overflow_gives_advice_for_ask(tiny_gguf):
    p = run_cli("ask", "q", "-m", str(tiny_gguf), "--backend", "numpy", input="word " * 3000)
    assert p.returncode == 2 and p.stdout == "", p.stderr
    last = p.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "context holds 4,096" in last and "attach less" in last, p.stderr
    assert "/clear" not in p.stderr


def test_files_ask_cannot_attach(tiny_gguf, tmp_path):
    """A folder with nothing to attach, a pipe or device, and a file outside a folder with a .gitignore."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / ".gitignore").write_text("*.log\n")
    (tmp_path / "onlybin").mkdir()
    (tmp_path / "onlybin" / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "outside.py").write_text("x = 1\n")
    base = ("ask", "q", "-m", str(tiny_gguf), "--backend", "numpy", "-n", "1")
    p = run_cli(*base, "-f", str(tmp_path / "onlybin"), input="", cwd=tmp_path / "cwd")
    assert_one_line_error(p, "onlybin has no file to attach")
    assert_one_line_error(run_cli(*base, "-f", os.devnull, input=""), "is not a regular file", "stdin")
    p = run_cli(*base, "-f", str(tmp_path / "outside.py"), "--json", input="", cwd=tmp_path / "cwd")
    assert p.returncode == 0, p.stderr


def test_parser_errors_are_one_line(tiny_gguf):
    """typer's boxed Usage/Try/Error messages become `error: ...; see localcoder CMD --help`."""
    for args, needle in ((("--seed", "abc"), "--seed"), (("-n", "abc"), "--max-tokens"), (("--bogus",), "--bogus"),
                         ((), "'--prompt'")):
        if needle != "'--prompt'":
            args = ("-p", "hi", *args)
        p = run_cli("run", "-m", str(tiny_gguf), *args)
        assert_one_line_error(p, needle, "see localcoder run --help")


def test_messages_are_single_lines_without_a_blank_line_first(tiny_gguf, tmp_path):
    """The transient progress bar left an empty line before an error, and Rich wrapped status lines at 80
    columns where stderr is not a terminal."""
    p = run_cli("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert p.stderr.startswith("error: model file not found")
    deep = tmp_path / ("a-long-folder-name-" * 4)
    deep.mkdir()
    model = deep / "qwen3next-tiny-with-a-long-name-Q4_K_M.gguf"
    model.symlink_to(tiny_gguf)
    p = run_cli("ask", "hi", "-m", str(model), "--backend", "numpy", "-n", "1", input="")
    [loaded] = [line for line in p.stderr.splitlines() if line.startswith("loaded ")]
    assert loaded.endswith(" s") and "context 4,096" in loaded, p.stderr


def test_errors_stay_one_line_with_a_click_that_lacks_no_args_is_help(monkeypatch, capsys):
    """click < 8.2 has no NoArgsIsHelpError: naming it in an except clause turned every error into an
    AttributeError traceback."""
    import types

    from localcoder import cli

    real = cli._parser_exceptions()
    monkeypatch.setattr(cli, "_parser_exceptions", lambda: types.SimpleNamespace(UsageError=real.UsageError))
    monkeypatch.setattr(sys, "argv", ["localcoder", "info", "/nonexistent/model.gguf"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1


def test_demo_writes_its_model_and_answers(tmp_path):
    """`localcoder demo` on a fresh HOME: the model is written, the reply generated, each message one line
    (not cut at 80 columns when stderr is not a terminal)."""
    p = run_cli("demo", env={"HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert (tmp_path / ".localcoder" / "demo" / "localcoder-demo-random-Q8_0.gguf").is_file()
    lines = p.stderr.splitlines()
    assert any(line.startswith("random weights: the reply below is noise") and line.endswith("end to end.")
               for line in lines), p.stderr
    assert any(line.startswith("prompt ") and " generated " in line for line in lines), p.stderr
