import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _find_fixtures():
    for cand in [os.environ.get("LOCALCODER_FIXTURES"), REPO / "tests" / "fixtures" / "shared",
                 REPO.parent / "shared" / "fixtures"]:
        if cand and pathlib.Path(cand, "qwen3next-tiny").is_dir():
            return pathlib.Path(cand)
    return None


FIXTURES = _find_fixtures()


@pytest.fixture(scope="session")
def fixtures_dir():
    if FIXTURES is None:
        pytest.skip("shared fixtures not found: set LOCALCODER_FIXTURES or place ../shared/fixtures beside the repo")
    return FIXTURES


def gguf_metadata(path) -> dict:
    """A GGUF's metadata as plain values (localcoder's reader; checked equal to gguf.GGUFReader's in
    tests/test_gguf_file.py)."""
    from localcoder.gguf_file import GGUFFile

    return dict(GGUFFile(path).metadata)
