"""`localcoder chat` and `localcoder ask` as real terminal programs (pexpect), and privacy: no sockets."""

import json
import os
import signal
import subprocess
import sys
import time

import pexpect
import pytest

from localcoder.synthetic import PRESETS, write_synthetic


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("demo") / "demo.gguf", PRESETS["demo"], "q8_0")


def spawn_chat(model, tmp_path, *extra):
    env = dict(os.environ, LOCALCODER_HOME=str(tmp_path / "home"), COLUMNS="120", TERM="dumb")
    # Ctrl-C as at a terminal even when pytest itself was started with SIGINT ignored (a shell's background
    # job: the ignored disposition is inherited, and Python then installs no KeyboardInterrupt handler)
    child = pexpect.spawn(sys.executable, ["-m", "localcoder", "chat", "-m", str(model), "--backend", "numpy",
                                           "--temp", "0", *extra], env=env, cwd=str(tmp_path), encoding="utf-8",
                          timeout=120, dimensions=(40, 120),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(">>> ")
    return child


def test_repl_multiline_add_undo_save_load_and_exit(demo_model, tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "main.py").write_text("def main():\n    print('hi')\n")
    (tmp_path / "proj" / "notes.md").write_text("# notes\n")
    child = spawn_chat(demo_model, tmp_path, "-n", "6")
    child.sendline("/add proj")
    child.expect(r"added proj/main.py \((\d+) tokens\)")
    child.expect("context used")
    child.expect(">>> ")
    child.sendline("/files")
    child.expect("proj/notes.md")
    child.expect(">>> ")
    child.sendline('"""')
    child.expect(r"\.\.\. ")
    child.sendline("first line")
    child.expect(r"\.\.\. ")
    child.sendline('second line"""')
    child.expect(r"\[\d+ new \+ 0 cached prompt tokens, \d+ generated")
    child.expect(">>> ")
    child.sendline("continued \\")
    child.expect(r"\.\.\. ")
    child.sendline("question")
    child.expect(r"\[\d+ new \+ (\d+) cached prompt tokens")
    assert int(child.match.group(1)) > 0  # the first turn was reused
    child.expect(">>> ")
    child.sendline("/undo")
    child.expect("removed the last exchange")
    child.expect(">>> ")
    child.sendline("/save t.json")
    child.expect("saved")
    child.expect(">>> ")
    child.sendline("/load t.json")
    child.expect("loaded 2 messages")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert "File: proj/main.py" in saved[0]["content"] and "first line\nsecond line" in saved[0]["content"]
    history = list((tmp_path / "home" / "history").glob("chat-*.json"))
    assert len(history) == 1 and not list((tmp_path / "home" / "history").glob("*.tmp"))


def test_repl_ctrl_c_mid_reply_keeps_partial_then_ctrl_d_exits(demo_model, tmp_path):
    child = spawn_chat(demo_model, tmp_path, "-n", "100000", "--no-history")
    child.sendline("write a very long answer")
    child.expect("write a very long answer")  # the echo
    time.sleep(3)  # the reply is streaming by now (the demo model makes ~50 tokens/s)
    child.sendintr()
    child.expect("interrupted")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("generation: ")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert not (tmp_path / "home" / "history").exists()


def test_repl_ctrl_c_at_empty_prompt_exits(demo_model, tmp_path):
    child = spawn_chat(demo_model, tmp_path, "--no-history")
    # CPython's readline prints the prompt before it waits in select(): a SIGINT in between is only seen at
    # the next key. A person cannot hit that window; a script sending ^C the instant ">>> " appears can
    # (more so while the model's weights are still being read in the background). Press it as a person would.
    time.sleep(0.5)
    child.sendintr()
    child.expect(pexpect.EOF)


NO_NET = """
import socket
def _blocked(*a, **k):
    raise RuntimeError("network access attempted")
socket.socket = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
"""


def test_no_network_in_ask_run_info(demo_model, tmp_path):
    """A session with sockets disabled works: no code path of ask, run or info opens a connection."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NET)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               LOCALCODER_HOME=str(tmp_path / "home"))
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.socket()"], env=env, capture_output=True,
                           text=True)
    assert "network access attempted" in probe.stderr  # the block is in force
    for args in (["ask", "explain", "--json", "-n", "4"], ["run", "-p", "hi", "-n", "4"], ["info", str(demo_model)]):
        if args[0] != "info":
            args += ["-m", str(demo_model), "--backend", "numpy", "--temp", "0"]
        p = subprocess.run([sys.executable, "-m", "localcoder", *args], env=env, capture_output=True, text=True,
                           input="some piped text", timeout=120)
        assert p.returncode == 0, (args, p.stderr)
        assert "network access attempted" not in p.stderr


def test_ask_json_with_stdin(demo_model, tmp_path):
    p = subprocess.run([sys.executable, "-m", "localcoder", "ask", "review this", "--json", "-m", str(demo_model),
                        "--backend", "numpy", "--temp", "0", "-n", "5"], input="diff --git a/x b/x\n",
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["completion_tokens"] <= 5 and out["prompt_tokens"] > 10 and "answer" in out


def test_repl_ctrl_c_on_a_typed_line_or_in_a_block_discards_it(demo_model, tmp_path):
    """Ctrl-C exits at an empty prompt only: with text typed, or inside a \"\"\" block, it drops that text and
    the chat goes on (it used to end the session)."""
    child = spawn_chat(demo_model, tmp_path, "-n", "2", "--no-history")
    child.send("half typed line")
    time.sleep(0.5)
    child.sendintr()
    child.expect(">>> ")
    child.sendline('"""')
    child.expect(r"\.\.\. ")
    child.sendline("inside a block")
    child.expect(r"\.\.\. ")
    time.sleep(0.5)
    child.sendintr()
    child.expect(">>> ")
    child.sendline("/save t.json")
    child.expect("saved")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert json.loads((tmp_path / "t.json").read_text()) == []  # nothing of the discarded text was sent


def _interrupt_mid_answer(args, tmp_path):
    """Start localcoder with a long generation, send Ctrl-C once text is streaming: (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "localcoder", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdout.read(1)  # the first piece of the answer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def test_ctrl_c_during_run_or_ask_exits_130(demo_model, tmp_path):
    """A cut answer exited 0, so a script could not tell it from a complete one."""
    base = ["-m", str(demo_model), "--backend", "numpy", "-n", "100000", "--temp", "0"]
    rc, err = _interrupt_mid_answer(["run", "-p", "write a very long answer", *base], tmp_path)
    assert rc == 130 and "finish: interrupted" in err, err
    rc, err = _interrupt_mid_answer(["ask", "write a very long answer", *base], tmp_path)
    assert rc == 130 and "interrupted: the answer is cut short" in err, err
