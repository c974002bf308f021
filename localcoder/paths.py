"""Where models, history and caches live, and how a model is found when no -m is given."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Iterator

from .errors import LocalcoderError

HOME = Path(os.environ.get("LOCALCODER_HOME", Path.home() / ".localcoder"))

# The published GGUFs of Qwen3-Coder-Next (Hugging Face, e.g. unsloth/Qwen3-Coder-Next-GGUF or
# Qwen/Qwen3-Coder-Next-GGUF); sizes are those of the released files.
KNOWN_FILES = (
    ("Qwen3-Coder-Next-Q4_K_M.gguf", "48.5 GB", "recommended: fits a 64 GB Mac, streams experts on less"),
    ("Qwen3-Coder-Next-Q8_0.gguf", "84.8 GB", "near-lossless, needs a 96-128 GB machine"),
)


def model_dirs() -> list[Path]:
    return [Path.cwd() / "models", HOME / "models"]


def find_models() -> list[Path]:
    found = []
    for d in model_dirs():
        if d.is_dir():
            found += sorted(p for p in d.glob("*.gguf") if "-vocab" not in p.name)
    return found


def missing_model_message() -> str:
    files = "; ".join(f"{name} ({size}, {why})" for name, size, why in KNOWN_FILES)
    dirs = " or ".join(str(d) for d in model_dirs())
    return (f"no model given and none found in {dirs}. Download a Qwen3-Coder-Next GGUF from Hugging Face "
            f"(search 'Qwen3-Coder-Next GGUF'): {files}; put it in {HOME / 'models'} or pass -m FILE. "
            "To try localcoder without a download, run `localcoder demo`.")


def gguf_architecture(path: Path) -> str | None:
    """general.architecture of a GGUF; None when the file cannot be read as one."""
    from .gguf_file import GGUFFile

    try:
        return GGUFFile(path).architecture
    except (LocalcoderError, OSError):
        return None


def resolve_model(model) -> Path:
    """The -m path, or the model found in the model folders: among several GGUFs, the first qwen3next one (a
    llama.cpp user keeps other models there too)."""
    if model is not None:
        return Path(model)
    found = find_models()
    if not found:
        raise LocalcoderError(missing_model_message())
    if len(found) == 1:
        return found[0]  # loading it says what is wrong with it, if anything
    from .config import ARCH

    archs = [gguf_architecture(p) for p in found]
    if ARCH in archs:
        return found[archs.index(ARCH)]
    listed = ", ".join(f"{p} ({a or 'no architecture in its header'})" for p, a in zip(found[:5], archs))
    raise LocalcoderError(f"no {ARCH} model among the GGUF files found: {listed}; pass -m FILE with a "
                          "Qwen3-Coder-Next GGUF")


def check_output_file(path: Path, what: str) -> Path:
    """Before any work: `path` can name the file to write (it has a name and is not a folder)."""
    path = Path(path).expanduser()
    if not path.name:
        raise LocalcoderError(f"the {what} path {str(path)!r} has no file name; give one like out.gguf")
    if path.is_dir():
        raise LocalcoderError(f"{path} is a folder; give a file path for the {what} (e.g. {path / 'out'})")
    return path


def check_output_path(path: Path, what: str, create_folder: bool = False) -> Path:
    """Before any work: check_output_file, and the folder it goes in exists (or is created) and takes files,
    so that a long run does not end in an error that loses its output."""
    path = check_output_file(path, what)
    folder = path.parent
    if create_folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LocalcoderError(f"cannot create the folder {folder} for {path} ({e.strerror}); give a {what} "
                                  "path in a writable folder") from None
    if not folder.is_dir():
        raise LocalcoderError(f"the folder {folder} of {path} does not exist; create it or give another {what} path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LocalcoderError(f"{folder} is not writable, so {path} cannot be written; give a {what} path in a "
                              "writable folder")
    return path


def check_output_dir(path: Path, flag: str) -> Path:
    """Before any work: create the folder if needed and check it takes files now, not when the session ends."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocalcoderError(f"cannot create {path} ({e.strerror}); give a writable folder with {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LocalcoderError(f"{path} is not writable; give a writable folder with {flag}")
    return path


_writes = itertools.count()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields PATH.PID.N.tmp to write: renamed to path when the block ends, removed when it raises (Ctrl-C and
    SIGTERM included), so that a reader never sees half a file and nothing half-written is left behind. Its
    own name keeps two writers of one file (two first `localcoder demo` runs) out of each other's way. An
    OSError names path, not the temporary file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{next(_writes)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp), tmp):
            e.filename = str(path)
        raise


def write_text_atomically(path: Path, text: str) -> Path:
    """path's new text, written whole or not at all (replacing)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
