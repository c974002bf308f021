"""safetensors -> GGUF conversion against llama.cpp's own GGUFs of the tiny fixture (../shared/fixtures).

llama.cpp converted `qwen3next-tiny/hf` to BF16 and Q8_0 (see its README); our converter must give the same
tensors (names, types, shapes, bytes, order) and the same metadata, general.name aside. Variants of the
checkpoint (sharded, fused experts, an MTP head) are written here from the fixture's raw bf16 bytes.
"""

import json
import math
import shutil

import gguf
import numpy as np
import pytest

from localcoder.errors import LocalcoderError
from localcoder.quant.convert import choose_type, convert, read_safetensors_header

IGNORED_KEYS = {"general.name"}  # provenance: the name is the user's choice
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    fixtures_dir / "qwen3next-tiny" / "hf" / "model.safetensors"  # the checkpoint (not in the in-repo subset)
    return fixtures_dir / "qwen3next-tiny"


def _fields(path):
    r = gguf.GGUFReader(path)
    fields = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            fields[key] = (tuple(f.types), [f.contents(i) for i in range(len(f.data))])
        else:
            fields[key] = (tuple(f.types), f.contents())
    return r, fields


def _assert_same_gguf(ours, theirs):
    r1, f1 = _fields(ours)
    r2, f2 = _fields(theirs)
    assert list(f1) == list(f2), "metadata keys differ (or their order)"
    for key in f2:
        if key not in IGNORED_KEYS:
            assert f1[key] == f2[key], f"metadata {key} differs"
    assert [t.name for t in r1.tensors] == [t.name for t in r2.tensors]
    for a, b in zip(r1.tensors, r2.tensors):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


@pytest.mark.parametrize("out_type, fixture", [("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_matches_llamacpp(tiny, tmp_path, out_type, fixture):
    out = convert(tiny / "hf", tmp_path / "out.gguf", out_type)
    assert out == tmp_path / "out.gguf" and not list(tmp_path.glob("*.tmp"))
    _assert_same_gguf(out, tiny / "gguf" / f"qwen3next-tiny-{fixture}.gguf")


def test_byte_identical_with_same_name(tiny, tmp_path):
    out = convert(tiny / "hf", tmp_path / "out.gguf", "q8_0", name="qwen3next-tiny")
    assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf").read_bytes()


def test_cli_name_option(tiny, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out.gguf"
    subprocess.run([sys.executable, "-m", "localcoder", "convert", str(tiny / "hf"), "-o", str(out), "--type", "q8_0",
                    "--name", "qwen3next-tiny"], check=True, capture_output=True, timeout=300)
    assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf").read_bytes()


def test_small_chunks_give_the_same_file(tiny, tmp_path, monkeypatch):
    """Big tensors are streamed in row chunks; force many chunks per tensor here."""
    import localcoder.quant.convert as conv

    monkeypatch.setattr(conv, "CHUNK_BYTES", 3000)
    out = convert(tiny / "hf", tmp_path / "out.gguf", "q8_0", name="qwen3next-tiny")
    assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf").read_bytes()


@pytest.mark.parametrize("out_type, fixture", [("f32", "F32"), ("f16", "F16")])
def test_f32_f16_values(tiny, tmp_path, out_type, fixture):
    """F32/F16 GGUFs are not shipped: types must match llama.cpp's table and values the BF16 file's."""
    types = json.loads((tiny / "ref" / "gguf_tensor_types.json").read_text())[fixture]
    ours = gguf.GGUFReader(convert(tiny / "hf", tmp_path / "out.gguf", out_type))
    ref = {t.name: t for t in gguf.GGUFReader(tiny / "gguf" / "qwen3next-tiny-BF16.gguf").tensors}
    assert {t.name: t.tensor_type.name for t in ours.tensors} == types
    assert ours.fields["general.file_type"].contents() == {"f32": 0, "f16": 1}[out_type]
    for t in ours.tensors:
        want = gguf.quants.dequantize(np.asarray(ref[t.name].data), ref[t.name].tensor_type)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            want = want.astype(np.float16).astype(np.float32)
        assert got.shape == want.shape and np.array_equal(got, want), t.name


def test_progress_reports_every_byte(tiny, tmp_path):
    calls = []
    convert(tiny / "hf", tmp_path / "out.gguf", "bf16", progress=lambda done, total, name: calls.append((done, total)))
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1] > 18_000_000


def test_choose_type_rules():
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    assert choose_type("blk.0.ffn_up_exps.weight", (8, 256, 256), F.MOSTLY_Q8_0) == Q.Q8_0
    assert choose_type("blk.0.ffn_gate_inp.weight", (8, 256), F.MOSTLY_Q8_0) == Q.F32
    assert choose_type("blk.0.ffn_gate_inp_shexp.weight", (1, 256), F.MOSTLY_BF16) == Q.F32
    assert choose_type("blk.0.ssm_conv1d.weight", (512, 4), F.MOSTLY_Q8_0) == Q.F32
    assert choose_type("blk.0.ssm_a", (4,), F.MOSTLY_Q8_0) == Q.F32
    assert choose_type("blk.0.ssm_dt.bias", (4,), F.MOSTLY_BF16) == Q.F32
    assert choose_type("blk.3.attn_q_norm.weight", (64,), F.MOSTLY_BF16) == Q.F32
    assert choose_type("blk.0.ssm_out.weight", (256, 48), F.MOSTLY_Q8_0) == Q.F16  # rows not whole Q8_0 blocks


# ---- checkpoint variants, written from the fixture's raw bytes ------------------------------------------

def _raw(tiny):
    """name -> (dtype, shape, bytes) of the fixture checkpoint."""
    out = {}
    for name, src in read_safetensors_header(tiny / "hf" / "model.safetensors").items():
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            out[name] = (src.dtype, list(src.shape), f.read(math.prod(src.shape) * 2))
    return out


def _write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for _, _, data in tensors.values():
            f.write(data)


def _checkpoint(tiny, root, shards, config=None):
    root.mkdir()
    for f in TOKENIZER_FILES:
        shutil.copy(tiny / "hf" / f, root / f)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(root / fname, tensors)
        weight_map.update({n: fname for n in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def _fused(raw, n_layer=4, n_expert=8):
    """Per-expert matrices -> transformers 5's fused experts.gate_up_proj (E, 2F, D) / experts.down_proj."""
    out = {n: v for n, v in raw.items() if ".mlp.experts." not in n}
    for i in range(n_layer):
        p = f"model.layers.{i}.mlp.experts."
        part = lambda e, w: raw[f"{p}{e}.{w}.weight"]
        F, D = part(0, "gate_proj")[1]
        gate_up = b"".join(part(e, "gate_proj")[2] + part(e, "up_proj")[2] for e in range(n_expert))
        out[p + "gate_up_proj"] = ("BF16", [n_expert, 2 * F, D], gate_up)
        out[p + "down_proj"] = ("BF16", [n_expert, D, F], b"".join(part(e, "down_proj")[2] for e in range(n_expert)))
    return out


def _mtp(raw):
    """An MTP head shaped like Qwen3-Next's: fc (D, 2D), three norms and one full-attention MoE layer."""
    D = 256
    rng = np.random.default_rng(0)
    bf16 = lambda *shape: ("BF16", list(shape), (rng.standard_normal(shape, np.float32).view(np.uint32) >> 16)
                           .astype(np.uint16).tobytes())
    out = {"mtp.fc.weight": bf16(D, 2 * D), "mtp.norm.weight": bf16(D),
           "mtp.pre_fc_norm_embedding.weight": bf16(D), "mtp.pre_fc_norm_hidden.weight": bf16(D)}
    out.update({n.replace("model.layers.3.", "mtp.layers.0."): v for n, v in raw.items()
                if n.startswith("model.layers.3.")})
    return out


def test_sharded_fused_experts_and_dropped_mtp(tiny, tmp_path):
    raw = _raw(tiny)
    fused = _fused(raw)
    names = sorted(fused)
    root = _checkpoint(tiny, tmp_path / "hf", [{n: fused[n] for n in names[:40]}, {n: fused[n] for n in names[40:]},
                                               _mtp(raw)])
    out = convert(root, tmp_path / "out.gguf", "bf16", name="qwen3next-tiny")
    assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-BF16.gguf").read_bytes()


def test_keep_mtp(tiny, tmp_path):
    raw = _raw(tiny)
    mtp = _mtp(raw)
    root = _checkpoint(tiny, tmp_path / "hf", [raw, mtp])
    r, fields = _fields(convert(root, tmp_path / "out.gguf", "bf16", keep_mtp=True))
    assert fields["qwen3next.block_count"][1] == 5 and fields["qwen3next.nextn_predict_layers"][1] == 1
    assert fields["qwen3next.attention.recurrent_layers"][1] == [True, True, True, False, False]
    tensors = {t.name: t for t in r.tensors}
    for name in ("attn_q.weight", "attn_k_norm.weight", "ffn_up_exps.weight", "ffn_gate_inp_shexp.weight"):
        assert np.array_equal(np.asarray(tensors["blk.4." + name].data), np.asarray(tensors["blk.3." + name].data))
    assert tensors["blk.4.nextn.eh_proj.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    norm = tensors["blk.4.nextn.enorm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    w = (np.frombuffer(mtp["mtp.pre_fc_norm_embedding.weight"][2], np.uint16).astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(np.asarray(norm.data), w + 1)
    assert {"blk.4.nextn.hnorm.weight", "blk.4.nextn.shared_head_norm.weight"} <= set(tensors)


# ---- bad input: one-line LocalcoderError, no output, no temp file left ----------------------------------

def _expect_error(hf, tmp_path, match, **kw):
    out = tmp_path / "out.gguf"
    with pytest.raises(LocalcoderError, match=match) as e:
        convert(hf, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("out.gguf*.tmp"))


def _copy_hf(tiny, root):
    shutil.copytree(tiny / "hf", root)
    return root


def test_missing_config(tiny, tmp_path):
    root = _copy_hf(tiny, tmp_path / "hf")
    (root / "config.json").unlink()
    _expect_error(root, tmp_path, "no config.json")


def test_unsupported_architecture(tiny, tmp_path):
    root = _copy_hf(tiny, tmp_path / "hf")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    _expect_error(root, tmp_path, "architecture LlamaForCausalLM is not supported")


def test_missing_shard(tiny, tmp_path):
    raw = _raw(tiny)
    names = sorted(raw)
    root = _checkpoint(tiny, tmp_path / "hf", [{n: raw[n] for n in names[:10]}, {n: raw[n] for n in names[10:]}])
    (root / "model-00002-of-00002.safetensors").unlink()
    _expect_error(root, tmp_path, "missing 1 of 2 shards")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "short"])
def test_corrupt_safetensors(tiny, tmp_path, damage):
    root = tmp_path / "hf"
    root.mkdir()
    for f in TOKENIZER_FILES:
        shutil.copy(tiny / "hf" / f, root / f)
    data = (tiny / "hf" / "model.safetensors").read_bytes()
    data = {"truncated": data[:len(data) // 2], "garbage": data[:8] + b"{not json" + data[17:],
            "short": b"\x01\x02"}[damage]
    (root / "model.safetensors").write_bytes(data)
    _expect_error(root, tmp_path, "is truncated" if damage == "truncated" else "corrupt safetensors header")


def test_unknown_out_type(tiny, tmp_path):
    _expect_error(tiny / "hf", tmp_path, "unknown output type 'q3_x'", out_type="q3_x")


def test_temp_file_removed_on_error_mid_write(tiny, tmp_path):
    def boom(done, total, name):
        assert len(list(tmp_path.glob("out.gguf.*.tmp"))) == 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny / "hf", tmp_path / "out.gguf", "bf16", progress=boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key, value, match", [
    # a layer past num_hidden_layers was written but never run (block_count stopped short)
    ("num_hidden_layers", 3, r"tensors of layer 3 \(model\.layers\.3\..*num_hidden_layers = 3 .*correct "
                             r"num_hidden_layers in config\.json"),
    # an expert id past num_experts was reported as a missing shard ("has 1 of 7 experts")
    ("num_experts", 7, r"the checkpoint has expert 7 \(model\.layers\.0\.mlp\.experts\.7\..*num_experts = 7 "
                       r"\(experts 0\.\.6\); correct num_experts in config\.json"),
])
def test_tensors_beyond_the_config(tiny, tmp_path, key, value, match):
    root = _copy_hf(tiny, tmp_path / "hf")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, key: value}))
    _expect_error(root, tmp_path, match)


@pytest.mark.parametrize("content, match", [(b'\xff\xfe{"bos_token": null}', "tokenizer_config.json is not UTF-8"),
                                            (b"[1, 2]", "tokenizer_config.json is not a JSON object")])
def test_unreadable_tokenizer_config(tiny, tmp_path, content, match):
    """gguf-py reads tokenizer_config.json with a bare open(): checked first, so a bad one is a one-line error."""
    root = _copy_hf(tiny, tmp_path / "hf")
    (root / "tokenizer_config.json").write_bytes(content)
    _expect_error(root, tmp_path, match)


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", "2048", "hidden_size = '2048' is not a whole number >= 1"),
    ("hidden_size", 256.5, "hidden_size = 256.5 is not a whole number"),
    ("num_hidden_layers", True, "num_hidden_layers = True is not a whole number"),
    ("num_hidden_layers", 100000, "num_hidden_layers = 100000 is too large"),
    ("num_experts", 0, "num_experts = 0 is not a whole number >= 1"),
    ("vocab_size", -5, "vocab_size = -5 is not a whole number >= 1"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps = -1e-06 is not a finite number > 0"),
    ("rope_theta", "1e7", "rope_theta = '1e7' is not a finite number > 0"),
    ("partial_rotary_factor", 2, "partial_rotary_factor = 2 is too large"),
    ("layer_types", "linear_attention", "layer_types = 'linear_attention' is not a list"),
    ("rope_parameters", [1e7], "rope_parameters = [10000000.0] is not an object"),
    ("rope_scaling", "yarn", "rope_scaling = 'yarn' is not an object"),
])
def test_config_numbers_are_checked(fixtures_dir, tmp_path, key, value, match):
    """Every number of config.json goes through the one check GGUF metadata does (config.hyperparameter); a
    string, bool, fraction or out-of-range value is a one-line error naming the key, before anything is read
    or written (no safetensors needed)."""
    root = tmp_path / "hf"
    root.mkdir()
    config = json.loads((fixtures_dir / "qwen3next-tiny" / "hf" / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, key: value}))
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (root / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    _expect_error(root, tmp_path, match.replace("(", r"\(").replace("[", r"\["))


# ---- the checkpoint must match its config.json: refused before anything is written --------------------

def _with_config(tiny, root, **changes):
    root = _copy_hf(tiny, root)
    config = json.loads((root / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_shapes_are_checked_against_config(tiny, tmp_path):
    """k_proj cut to 64 rows was written and only the loader refused it ('re-convert it', which gave the same
    file); so was a config.json whose head_dim (32) did not fit the weights (64)."""
    raw = _raw(tiny)
    name = "model.layers.3.self_attn.k_proj.weight"
    dtype, (rows, cols), data = raw[name]
    raw[name] = (dtype, [rows // 2, cols], data[:len(data) // 2])
    root = _checkpoint(tiny, tmp_path / "hf", [raw])
    _expect_error(root, tmp_path, rf"{name} in model-00001-of-00001.safetensors has shape \[64, 256\] \(as GGUF "
                                  r"blk.3.attn_k.weight\), but config.json implies \[128, 256\] \(from "
                                  r"num_key_value_heads x head_dim, hidden_size\); the checkpoint does not match")
    root = _with_config(tiny, tmp_path / "hf2", head_dim=32)
    _expect_error(root, tmp_path, r"model.layers.3.self_attn.*has shape .* but config.json implies .*head_dim")


def test_qkvz_shape_is_checked_before_writing(tiny, tmp_path):
    """Was refused only when its data was read, halfway through writing the file."""
    def no_write(done, total, name):
        raise AssertionError(f"wrote {name} before refusing")

    root = _with_config(tiny, tmp_path / "hf", linear_value_head_dim=32)
    _expect_error(root, tmp_path, r"model.layers.0.linear_attn.in_proj_qkvz.weight in model.safetensors has shape "
                                  r"\[768, 256\], but config.json implies \[512, 256\] \(from linear_num_key_heads",
                  progress=no_write)


@pytest.mark.parametrize("vocab_size", [2100, 2304])
def test_vocab_size_must_equal_embedding_rows(tiny, tmp_path, vocab_size):
    """vocab_size 2100 with 2176 embedding rows was converted (2100 tokens) and crashed at run time; llama.cpp
    refuses such a GGUF (token_embd must be {n_embd, n_vocab})."""
    root = _with_config(tiny, tmp_path / "hf", vocab_size=vocab_size)
    _expect_error(root, tmp_path, rf"has shape \[2176, 256\] \(as GGUF (output|token_embd).weight\), but config.json "
                                  rf"implies \[{vocab_size}, 256\] \(from vocab_size, hidden_size\)")


def test_missing_lm_head_needs_tied_embeddings(tiny, tmp_path):
    """Without lm_head.weight the GGUF ran tied: a silently different model when tie_word_embeddings is false."""
    raw = _raw(tiny)
    del raw["lm_head.weight"]
    root = _checkpoint(tiny, tmp_path / "hf", [raw])
    _expect_error(root, tmp_path, "has no lm_head.weight but config.json has tie_word_embeddings = false; a shard is "
                                  "missing")
    config = json.loads((root / "config.json").read_text())
    del config["tie_word_embeddings"]  # Qwen3NextConfig's default is false too
    (root / "config.json").write_text(json.dumps(config))
    _expect_error(root, tmp_path, "tie_word_embeddings = null")
    (root / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    r = gguf.GGUFReader(convert(root, tmp_path / "tied.gguf", "bf16"))
    assert "output.weight" not in {t.name for t in r.tensors}


def test_missing_tensor_is_named(tiny, tmp_path):
    """A checkpoint without one of a layer's tensors is refused before anything is written, naming it."""
    raw = _raw(tiny)
    del raw["model.layers.1.post_attention_layernorm.weight"]
    root = _checkpoint(tiny, tmp_path / "hf", [raw])
    _expect_error(root, tmp_path, r"the checkpoint lacks 1 tensors a qwen3next GGUF needs \(GGUF names "
                                  r"blk.1.post_attention_norm.weight\)")


def test_config_without_architectures(tiny, tmp_path):
    """model_type qwen3_next stands for Qwen3NextForCausalLM (the fallback compared a model type with class
    names and could never match); another model type says that architectures is missing."""
    root = _with_config(tiny, tmp_path / "hf", architectures=None)
    out = convert(root, tmp_path / "noarch.gguf", "q8_0", name="qwen3next-tiny")
    assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf").read_bytes()
    root = _with_config(tiny, tmp_path / "hf2", architectures=None, model_type="llama")
    _expect_error(root, tmp_path, r"config.json lacks architectures \(and its model_type is 'llama', not qwen3_next\)")


def test_keep_mtp_output_runs_the_decoder_layers_only(tiny, tmp_path):
    """Our --keep-mtp file (block_count 5, nextn_predict_layers 1) gives the logits of the file without it."""
    import localcoder

    root = _checkpoint(tiny, tmp_path / "hf", [_raw(tiny), _mtp(_raw(tiny))])
    keep = localcoder.load(convert(root, tmp_path / "keep.gguf", "bf16", keep_mtp=True), backend="numpy")
    drop = localcoder.load(convert(root, tmp_path / "drop.gguf", "bf16"), backend="numpy")
    assert (keep.config.n_layer, keep.config.n_nextn_layer) == (4, 1)
    ids = [750, 282, 579, 263, 580, 66, 72]
    assert np.array_equal(keep.logits(ids), drop.logits(ids))


# ---- the output path -----------------------------------------------------------------------------------

def _hf_cache_snapshot(tiny, root):
    """huggingface_hub's layout: snapshots/<rev>/<file> are relative symlinks to ../../blobs/<hash>."""
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in (*TOKENIZER_FILES, "model.safetensors"):
        shutil.copy(tiny / "hf" / f, root / "blobs" / (f + ".blob"))
        (snap / f).symlink_to(f"../../blobs/{f}.blob")
    return snap


@pytest.mark.parametrize("target", ["snapshots/abc/model.safetensors", "blobs/model.safetensors.blob",
                                    "blobs/config.json.blob", "snapshots/abc/../abc/tokenizer.json"])
def test_output_that_is_a_checkpoint_file_through_symlinks_is_refused(tiny, tmp_path, target):
    """-o snapshots/abc/model.safetensors replaced the symlink with the GGUF (the guard compared resolved
    parents, and resolving leads into blobs/): the checkpoint was lost."""
    snap = _hf_cache_snapshot(tiny, tmp_path / "cache")
    before = {p: p.read_bytes() for p in (tmp_path / "cache" / "blobs").iterdir()}
    out = tmp_path / "cache" / target
    with pytest.raises(LocalcoderError, match=r"is a file of the checkpoint being converted \(.*\); write the GGUF "
                                              "to a new path") as e:
        convert(snap, out, "q4_0")
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in (tmp_path / "cache" / "blobs").iterdir()} == before
    assert all(p.is_symlink() for p in snap.iterdir())
    assert convert(snap, snap / "new.gguf", "q4_0").exists()  # a new file in the snapshot is fine


# ---- the temporary file ----------------------------------------------------------------------------------

def test_concurrent_writers_of_one_output_do_not_mix(tiny, tmp_path):
    """Both runs wrote OUT.tmp: the second truncated the first's file, the first renamed it while the second
    was still writing (a 340 MB file of two models), and the second failed. Each run now has its own temp file:
    both succeed and the output is whole (the last to finish). A user's OUT.tmp is left alone."""
    out = tmp_path / "race.gguf"
    (tmp_path / "race.gguf.tmp").write_text("important")
    inner = []

    def start_another(done, total, name):
        if not inner:  # while the first run is writing, a second one writes the same output to the end
            inner.append(convert(tiny / "hf", out, "q4_0", name="qwen3next-tiny"))
            assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-Q4_0.gguf").read_bytes()

    convert(tiny / "hf", out, "q8_0", name="qwen3next-tiny", progress=start_another)
    assert inner == [out]
    assert out.read_bytes() == (tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf").read_bytes()
    assert (tmp_path / "race.gguf.tmp").read_text() == "important"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.gguf", "race.gguf.tmp"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
