"""paths.replacing: whole files or nothing, with errors that name the user's file."""

import errno

import pytest

from localcoder.errors import LocalcoderError
from localcoder.paths import check_output_path, replacing, write_text_atomically


def test_two_writers_of_one_file_do_not_share_a_temporary_file(tmp_path):
    """Two first `localcoder demo` runs both wrote demo.gguf.tmp; the second found its file renamed away."""
    out = tmp_path / "demo.gguf"
    with replacing(out) as a, replacing(out) as b:
        assert a != b and a.name.endswith(".tmp") and b.name.endswith(".tmp")
        a.write_text("first")
        b.write_text("second")
    assert out.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["demo.gguf"]


def test_a_failed_write_names_the_file_not_the_temporary_one(tmp_path, monkeypatch):
    """ENOSPC has no file name (the message said `(None)`); a failed rename named PATH.tmp."""
    from pathlib import Path

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "x.json"
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        write_text_atomically(out, "{}")
    assert e.value.filename == str(out) and not list(tmp_path.iterdir())
    monkeypatch.undo()
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError) as e:
        write_text_atomically(tmp_path / "dir", "{}")  # the rename onto a folder fails
    assert e.value.filename == str(tmp_path / "dir") and [p.name for p in tmp_path.iterdir()] == ["dir"]


def test_output_path_folder_is_checked_or_created(tmp_path):
    with pytest.raises(LocalcoderError, match="the folder .*missing of .*t.jsonl does not exist; create it"):
        check_output_path(tmp_path / "missing" / "t.jsonl", "routing trace")
    assert check_output_path(tmp_path / "new" / "t.json", "transcript", create_folder=True).parent.is_dir()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(LocalcoderError, match="cannot create the folder"):
        check_output_path(blocked / "sub" / "t.json", "transcript", create_folder=True)
