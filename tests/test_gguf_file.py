"""localcoder's fast metadata reader agrees with gguf-py's GGUFReader on every key of the fixture files."""

import gguf
import numpy as np
import pytest

from localcoder.gguf_file import GGUFFile


@pytest.mark.parametrize("rel", ["qwen-tokenizer/qwen3-tokenizer-vocab.gguf",
                                 "qwen3next-tiny/gguf/qwen3next-tiny-Q4_K_M.gguf"])
def test_metadata_and_tensors_equal_gguf_reader(fixtures_dir, rel):
    path = fixtures_dir / rel
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    expect = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expect.keys()
    for k, v in expect.items():
        assert ours.metadata[k] == v, k
    for t in ref.tensors:
        q = ours.tensors[t.name]
        assert q.shape == tuple(reversed(t.shape.tolist())) and q.ggml_type == t.tensor_type
        assert q.file_offset == t.data_offset and q.nbytes == t.n_bytes
        assert np.array_equal(q.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
