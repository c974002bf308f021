"""Every published GGUF layout loads and gives the same logits: fused DeltaNet input `ssm_in` (q,k,v,z per key
head) vs split `attn_qkv` + `attn_gate`; fused `ffn_gate_up_exps` vs separate; split files; tied output."""

import gguf
import numpy as np
import pytest

import localcoder
from localcoder.gguf_file import GGUFFile

PROMPT = [750, 282, 579, 263, 580, 66, 72, 1000, 13, 2000]


def rewrite(src: GGUFFile, dst_paths, transform, n_split=1):
    """Write src's metadata and transformed raw tensors to one or more files (llama.cpp's split layout)."""
    tensors = transform(dict((n, (t.ggml_type, t.shape, np.asarray(t.data))) for n, t in src.tensors.items()))
    names = list(tensors)
    parts = np.array_split(np.arange(len(names)), n_split)
    for i, (path, idx) in enumerate(zip(dst_paths, parts)):
        w = gguf.GGUFWriter(path, arch="qwen3next")
        if i == 0:
            for k, v in src.metadata.items():
                if k.startswith("GGUF.") or k == "general.architecture":
                    continue
                field_type = gguf.GGUFValueType.get_type(v)
                if isinstance(v, list):
                    w.add_array(k, v)
                elif isinstance(v, float):
                    w.add_float32(k, v)
                elif field_type == gguf.GGUFValueType.INT32:
                    w.add_uint32(k, v)
                else:
                    w.add_key_value(k, v, field_type)
        if n_split > 1:
            w.add_uint16("split.no", i)
            w.add_uint16("split.count", n_split)
            w.add_int32("split.tensors.count", len(names))
        for j in idx:
            qtype, shape, raw = tensors[names[j]]
            w.add_tensor(names[j], raw, raw_shape=raw.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def fuse_ssm_in(cfg):
    Hk, Hv, Dk, Dv = cfg.ssm_n_k_heads, cfg.ssm_n_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim
    r = Hv // Hk

    def transform(ts):
        for i in range(cfg.n_layer):
            key = f"blk.{i}.attn_qkv.weight"
            if key not in ts:
                continue
            qt, _, qkv = ts.pop(key)
            qt2, _, z = ts.pop(f"blk.{i}.attn_gate.weight")
            assert qt == qt2, "fusing needs one type"
            q, k, v = qkv[:Hk * Dk], qkv[Hk * Dk:2 * Hk * Dk], qkv[2 * Hk * Dk:]
            groups = [np.concatenate([q[g * Dk:(g + 1) * Dk], k[g * Dk:(g + 1) * Dk], v[g * r * Dv:(g + 1) * r * Dv],
                                      z[g * r * Dv:(g + 1) * r * Dv]]) for g in range(Hk)]
            fused = np.concatenate(groups)
            ts[f"blk.{i}.ssm_in.weight"] = (qt, None, fused)
        return ts
    return transform


def fuse_gate_up(cfg):
    def transform(ts):
        for i in range(cfg.n_layer):
            qt, _, gate = ts.pop(f"blk.{i}.ffn_gate_exps.weight")
            qt2, _, up = ts.pop(f"blk.{i}.ffn_up_exps.weight")
            assert qt == qt2
            ts[f"blk.{i}.ffn_gate_up_exps.weight"] = (qt, None, np.concatenate([gate, up], axis=1))
        return ts
    return transform


@pytest.fixture(scope="module")
def base(fixtures_dir):
    path = fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-BF16.gguf"
    model = localcoder.load(path, backend="numpy")
    return path, model, model.logits(PROMPT)


@pytest.mark.parametrize("layout", ["ssm_in", "gate_up", "both", "split3"])
def test_layout_gives_same_logits(base, tmp_path, layout):
    path, model, expect = base
    src = GGUFFile(path)
    cfg = model.config
    if layout == "split3":
        paths = [tmp_path / f"tiny-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
        rewrite(src, paths, lambda ts: ts, n_split=3)
        other = localcoder.load(paths[1], backend="numpy")  # any part opens the whole set
        assert len(other.file.paths) == 3
    else:
        def transform(ts):
            if layout in ("ssm_in", "both"):
                ts = fuse_ssm_in(cfg)(ts)
            if layout in ("gate_up", "both"):
                ts = fuse_gate_up(cfg)(ts)
            return ts
        out = tmp_path / "fused.gguf"
        rewrite(src, [out], transform)
        other = localcoder.load(out, backend="numpy")
        names = set(other.file.tensors)
        assert ("blk.0.ssm_in.weight" in names) == (layout in ("ssm_in", "both"))
        assert ("blk.0.ffn_gate_up_exps.weight" in names) == (layout in ("gate_up", "both"))
    assert np.abs(other.logits(PROMPT) - expect).max() <= 1e-5


def test_split_with_missing_part(base, tmp_path):
    path, _, _ = base
    paths = [tmp_path / f"tiny-{i:05d}-of-00002.gguf" for i in (1, 2)]
    rewrite(GGUFFile(path), paths, lambda ts: ts, n_split=2)
    paths[1].unlink()
    with pytest.raises(localcoder.errors.GGUFError, match="missing 1 of 2 parts"):
        localcoder.load(paths[0])


def test_missing_output_means_tied(base, tmp_path):
    path, model, _ = base
    out = tmp_path / "tied.gguf"

    def transform(ts):
        ts.pop("output.weight")
        return ts
    rewrite(GGUFFile(path), [out], transform)
    tied = localcoder.load(out, backend="numpy")
    assert tied.weights.output is tied.weights.token_embd
    x = tied.logits(PROMPT)
    # logits = final hidden state @ token_embd^T
    assert x.shape == (len(PROMPT), tied.config.n_vocab) and np.isfinite(x).all()
