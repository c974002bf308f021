"""localcoder's fast metadata reader agrees with gguf-py's GGUFReader on every key of the fixture files."""

import struct

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


# ---- corrupt and truncated files: one GGUFError naming the problem (ggml's gguf.cpp checks) ------------

Q4KM = "qwen3next-tiny/gguf/qwen3next-tiny-Q4_K_M.gguf"
EXPS = "blk.0.ffn_up_exps.weight"


def _open_error(path, match):
    from localcoder.errors import GGUFError

    with pytest.raises(GGUFError, match=match) as e:
        GGUFFile(path)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("change", [{"offset_delta": 1}, {"offset": 0}, {"offset_delta": 32}])
def test_tensor_data_offsets_are_checked(fixtures_dir, tmp_path, change):
    """Misaligned (+1), overlapping (0: token_embd's bytes) or gapped (+32) data was read as garbage with rc 0."""
    from gguf_edit import patched

    bad = patched(fixtures_dir / Q4KM, tmp_path / "bad.gguf", EXPS, **change)
    msg = _open_error(bad, rf"tensor {EXPS} in bad\.gguf has data offset [\d,]+, expected [\d,]+ \(tensor data "
                           r"follows in order, each aligned to 32 bytes\); the file is corrupt")
    assert msg.endswith("re-download or re-convert it")


def test_shape_overflow_is_corrupt_not_a_traceback(fixtures_dir, tmp_path):
    """dims [256, 2^32, 2^32]: np.prod in int64 wrapped to 0, the size check passed and reshape raised."""
    from gguf_edit import patched

    bad = patched(fixtures_dir / Q4KM, tmp_path / "bad.gguf", EXPS, dims=[256, 2 ** 32, 2 ** 32])
    _open_error(bad, r"shape \[256, 4294967296, 4294967296\], too large .*overflows 64 bits\); the file is corrupt")


def test_more_than_four_dims_is_corrupt(fixtures_dir, tmp_path):
    from gguf_edit import patched

    bad = patched(fixtures_dir / Q4KM, tmp_path / "bad.gguf", "output_norm.weight", n_dims=5)
    _open_error(bad, r"is corrupt: it has tensor output_norm\.weight with 5 dimensions \(GGUF allows at most 4\)")


@pytest.mark.parametrize("keep", [10, 23, 5000, 72000, -1000, -1])
def test_truncated_files_say_where(fixtures_dir, tmp_path, keep):
    """Cut in the fixed header, the metadata, the tensor infos or the data: 'truncated at byte N of M'."""
    data = (fixtures_dir / Q4KM).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    n = len(data[:keep])
    if keep > 0:
        _open_error(cut, rf"cut\.gguf is truncated at byte {n:,} of at least [\d,]+ \(its GGUF header goes on past "
                         r"the end of the file\); re-download or re-convert it$")
    else:
        _open_error(cut, rf"cut\.gguf is truncated at byte {n:,} of {len(data):,} \(its tensor data is incomplete\); "
                         r"re-download or re-convert it$")


def _with_header(src, dst, fmt, at, value):
    b = bytearray(src.read_bytes())
    struct.pack_into(fmt, b, at, value)
    dst.write_bytes(b)
    return dst


def test_big_endian_and_versions(fixtures_dir, tmp_path):
    src = fixtures_dir / Q4KM
    _open_error(_with_header(src, tmp_path / "be.gguf", ">I", 4, 3), "is a big-endian GGUF; localcoder reads "
                                                                      "little-endian GGUFs .*gguf-convert-endian")
    _open_error(_with_header(src, tmp_path / "v1.gguf", "<I", 4, 1), "is GGUF version 1; localcoder reads GGUF "
                                                                      "versions 2, 3")
    _open_error(_with_header(src, tmp_path / "v4.gguf", "<I", 4, 4), "is GGUF version 4")


@pytest.mark.parametrize("at", [8, 16])
def test_impossible_counts_are_corrupt(fixtures_dir, tmp_path, at):
    bad = _with_header(fixtures_dir / Q4KM, tmp_path / "n.gguf", "<Q", at, 2 ** 40)
    _open_error(bad, r"is corrupt: it has a header that claims .*1,099,511,627,776 .* more than its [\d,]+ bytes "
                     "can hold")


def test_bad_alignment_is_corrupt(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "qwen3next")
    w.add_uint32("general.alignment", 48)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _open_error(tmp_path / "a.gguf", r"general\.alignment = 48 \(a uint32 power of two is needed\)")
