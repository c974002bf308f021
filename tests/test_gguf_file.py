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


@pytest.mark.parametrize("direct", [True, False])
def test_raw_reader_reads_exact_bytes(tmp_path, direct):
    """RawReader (O_DIRECT where the filesystem allows, else pread) returns the file's bytes for any offset,
    length and destination address: aligned in place, through the bounce buffer, and at the end of the file."""
    from localcoder.gguf_file import ALIGN, RawReader, aligned_empty

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 5 * ALIGN * 64 + 777, dtype=np.uint8)
    f = tmp_path / "blob.bin"
    f.write_bytes(data.tobytes())
    reader = RawReader(f, direct=direct)
    try:
        assert reader.direct == (direct and reader.dfd is not None)
        cases = [(0, ALIGN), (ALIGN * 3, ALIGN * 70), (100, 3 * ALIGN), (ALIGN - 1, 2), (5, 1 << 21),
                 (len(data) - 10, 10), (len(data) - 5000, 5000)]
        cases += [(int(o), int(n)) for o, n in zip(rng.integers(0, len(data) - 1, 20), rng.integers(1, 300_000, 20))]
        for off, n in cases:
            n = min(n, len(data) - off)
            for dst in (aligned_empty((n,), off), np.empty(n + 3, np.uint8)[3:]):  # in place / bounce
                assert reader.read(dst, off) == n and np.array_equal(dst, data[off:off + n]), (off, n)
        tail = np.zeros(100, np.uint8)  # past the end: the bytes there are, and how many
        assert reader.read(tail, len(data) - 40) == 40 and np.array_equal(tail[:40], data[-40:])
        with pytest.raises(ValueError):
            reader.read(np.empty((4, 4), np.uint8)[:, :2], 0)
    finally:
        reader.close()
