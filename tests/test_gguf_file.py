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


@pytest.mark.parametrize("key, value, match", [
    ("attention.layer_norm_rms_epsilon", -1e-6, "not a finite number > 0"),
    ("attention.layer_norm_rms_epsilon", float("nan"), "not a finite number > 0"),
    ("attention.layer_norm_rms_epsilon", float("inf"), "not a finite number > 0"),
    ("rope.freq_base", 0.0, "not a finite number > 0"),
    ("embedding_length", "256", "not a whole number >= 1"),
    ("embedding_length", 256.5, "not a whole number >= 1"),
    ("block_count", True, "not a whole number >= 1"),
    ("block_count", 513, r"too large \(at most 512\)"),
    ("attention.head_count_kv", 0, "not a whole number >= 1"),
    ("ssm.group_count", -2, "not a whole number >= 1"),
    ("expert_used_count", [2], "not a whole number >= 1"),
    ("context_length", 2 ** 40, r"too large \(at most 2,147,483,647\)"),
    ("expert_shared_feed_forward_length", -1, "not a whole number >= 0"),
])
def test_hyperparameters_are_checked(fixtures_dir, key, value, match):
    """Every number ModelConfig reads goes through config.hyperparameter: a negative or non-finite epsilon, a
    string or a zero head count is one GGUFError naming the key (they were NaN logits, a ZeroDivisionError or
    a traceback in the sampler)."""
    from localcoder.config import ModelConfig
    from localcoder.errors import GGUFError

    meta = dict(GGUFFile(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf").metadata)
    ModelConfig.from_gguf(meta, 2176, "tiny.gguf")  # the file itself is fine
    meta[f"qwen3next.{key}"] = value
    with pytest.raises(GGUFError, match=f"tiny.gguf: metadata key qwen3next.{key} = .* {match};") as e:
        ModelConfig.from_gguf(meta, 2176, "tiny.gguf")
    assert "\n" not in str(e.value) and "re-download or re-convert" in str(e.value)


def test_recurrent_layers_must_be_a_list(fixtures_dir):
    from localcoder.config import ModelConfig
    from localcoder.errors import GGUFError

    meta = dict(GGUFFile(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf").metadata)
    meta["qwen3next.attention.recurrent_layers"] = 1
    with pytest.raises(GGUFError, match="recurrent_layers = 1 is not a list"):
        ModelConfig.from_gguf(meta, 2176, "tiny.gguf")
