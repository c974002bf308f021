"""Quantizers and llama-quantize's path against llama.cpp's files of the tiny fixture and gguf-py.

llama.cpp made the Q4_0/Q4_K_M/Q5_K_M/Q6_K fixtures with `llama-quantize F32.gguf OUT TYPE` (see the fixture
README). Our `convert(hf, TYPE)` and `requantize(F32/BF16 gguf, TYPE)` must give the same tensor types and
the same blocks (the issue accepts >= 99.9 % identical blocks, any other block no worse than llama.cpp's),
the same metadata, and logits matching transformers run on the same dequantized weights.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
from numba import njit

import localcoder
from localcoder.errors import LocalcoderError
from localcoder.quant import convert as conv
from localcoder.quant import quantizers as Qz
from localcoder.quant.convert import OUT_TYPES, convert, llama_order, mix_types, requantize
from localcoder.quant.formats import dequantize

Q = gguf.GGMLQuantizationType
FIXTURES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
MIN_IDENTICAL = 0.999


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    fixtures_dir / "qwen3next-tiny" / "hf" / "model.safetensors"  # the checkpoint (not in the in-repo subset)
    return fixtures_dir / "qwen3next-tiny"


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """Our conversion of the fixture checkpoint to each llama-quantize type (once per module)."""
    out = tmp_path_factory.mktemp("converted")
    return {t: convert(tiny / "hf", out / f"{t}.gguf", t, name="qwen3next-tiny") for t in FIXTURES}


@pytest.fixture(scope="module")
def weights(tiny):
    """name -> float32 weights as llama-quantize saw them (the BF16 file holds them exactly)."""
    r = gguf.GGUFReader(tiny / "gguf" / "qwen3next-tiny-BF16.gguf")
    return {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type) for t in r.tensors}


def _bf16(a):
    return ((np.asarray(a, np.float32).view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)


# ---- the quantizers ------------------------------------------------------------------------------------

def _edge_blocks(rng):
    """(n, 32) blocks: zeros, huge, tiny, subnormal, exact halves (roundf ties), equal |max| of both signs."""
    blocks = [np.zeros(32), np.full(32, 3e38), rng.standard_normal(32) * 1e30, rng.standard_normal(32) * 1e-30,
              rng.standard_normal(32) * 1e-42, np.r_[127.0, np.arange(31) - 15.5],       # Q8_0: d = 1, .5 ties
              np.r_[-8.0, np.arange(31) / 4 - 3.75], np.r_[-3.0, 3.0, rng.uniform(-3, 3, 30)],
              np.r_[3.0, -3.0, rng.uniform(-3, 3, 30)], np.full(32, -0.25), np.full(32, 65519.0 * 127)]
    return np.array(blocks, np.float32)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_q8_0_q4_0_bit_exact_with_gguf_py(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 64, 512)) * np.array([0.02, 1.0, 300.0])[:, None, None]).astype(np.float32)
    x = x.reshape(-1, 512)
    assert np.array_equal(Qz.quantize(x, qtype), gguf.quants.quantize(x, qtype))
    blocks = np.concatenate([_bf16(rng.standard_normal((64, 32))), _edge_blocks(rng)])  # rows of one block
    assert np.array_equal(Qz.quantize(blocks, qtype), gguf.quants.quantize(blocks, qtype))


def test_q4_0_negative_zero_block_is_ggml_s():
    """ggml starts max at +0.0, so an all-zero block gets d = 0.0 / -8 = -0.0 even when its first weight is
    -0.0 (gguf-py takes that weight and writes +0.0: the one block where the two references disagree)."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = -0.0
    assert Qz.quantize(x, Q.Q4_0)[0, :2].tolist() == [0x00, 0x80]


@njit(cache=True)
def _f16_bits_all(x):
    tb = np.empty(1, np.float32)
    ib = tb.view(np.int32)
    out = np.empty(x.shape[0], np.int64)
    for i in range(x.shape[0]):
        out[i] = Qz._f16_bits(x[i], tb, ib)
    return out


def test_f16_rounding_is_round_to_nearest_even():
    rng = np.random.default_rng(1)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000, 0x38800000, 0x1000, dtype=np.uint32),   # subnormal ties
                           np.arange(0x477F0000, 0x47810000, 0x100, dtype=np.uint32)])    # around overflow
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(_f16_bits_all(x), want)


def _adversarial(rng, K=512):
    parts = [rng.standard_normal((6, K)) * 0.02, _bf16(rng.standard_normal((6, K)) * 0.02), rng.standard_t(2, (6, K)),
             rng.standard_normal((2, K)) * 1e30, rng.standard_normal((2, K)) * 1e-30,
             rng.standard_normal((2, K)) * 1e-41, np.zeros((1, K)), np.full((1, K), 0.3), np.full((1, K), -0.3),
             rng.integers(-8, 8, (4, K)), rng.integers(-8, 8, (4, K)) + 0.5, np.abs(rng.standard_normal((2, K))),
             -np.abs(rng.standard_normal((2, K)))]
    spiky = rng.standard_normal((2, K)) * 1e-4
    spiky[:, ::37] = 1e4      # sub-block scales that round to 0: the levels of the fit must be kept
    holes = rng.standard_normal((2, K))
    holes[:, 32:64] = 0
    holes[:, 300:316] = 0
    bad = rng.standard_normal((4, K))
    bad[0, 5], bad[1, 7], bad[2, 9], bad[3, 3] = np.nan, np.inf, -np.inf, 3e38
    return np.concatenate(parts + [spiky, holes, bad]).astype(np.float32)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_fast_k_quants_match_the_scalar_ports(qtype):
    """The lane-vectorised quantizers against the line-by-line ports of ggml's C (also checked against
    the C itself, compiled with gcc, on this data and 2000 random rows: identical)."""
    x = _adversarial(np.random.default_rng(2))
    assert np.array_equal(Qz.quantize(x, qtype), Qz.quantize_ref(x, qtype))
    rows = np.ascontiguousarray(x[:7, :256])  # a task with fewer rows than threads, K = one super-block
    assert np.array_equal(Qz.quantize(rows, qtype), Qz.quantize_ref(rows, qtype))


def test_quantize_shapes_and_errors():
    x = np.random.default_rng(3).standard_normal((2, 3, 256)).astype(np.float32)
    assert Qz.quantize(x, Q.Q4_K).shape == (6, 144)
    assert Qz.quantize(x[:0].reshape(0, 256), Q.Q6_K).shape == (0, 210)
    with pytest.raises(ValueError, match="multiple of 256"):
        Qz.quantize(x[..., :96], Q.Q5_K)


# ---- llama-quantize's mix ------------------------------------------------------------------------------

@pytest.mark.parametrize("out_type", list(FIXTURES) + ["q8_0"])
def test_mix_matches_llamacpp_types_of_every_fixture_tensor(tiny, out_type):
    fixture = FIXTURES.get(out_type, "Q8_0")
    want = json.loads((tiny / "ref" / "gguf_tensor_types.json").read_text())[fixture]
    r = gguf.GGUFReader(tiny / "gguf" / "qwen3next-tiny-BF16.gguf")
    tensors = sorted(((t.name, tuple(int(d) for d in t.shape[::-1])) for t in r.tensors),
                     key=lambda t: llama_order(t[0]))
    types = mix_types(tensors, OUT_TYPES[out_type], n_expert=8, n_layer=4)
    got = {name: (t or Q.F32).name for (name, _), t in zip(tensors, types)}
    assert got == want
    if out_type in FIXTURES:  # and llama-quantize's order (the Q8_0 fixture is the converter's)
        assert list(got) == list(want)


def test_mix_for_qwen3_coder_next():
    """The real model: 48 layers (36 DeltaNet + 12 attention), 512 experts: no 8-expert rules."""
    names = ["output.weight", "token_embd.weight"]
    shapes = {"output.weight": (151936, 2048), "token_embd.weight": (151936, 2048)}
    for i in range(48):
        for n, shape in [("ffn_down_exps", (512, 2048, 512)), ("ffn_gate_exps", (512, 512, 2048)),
                         ("ffn_down_shexp", (2048, 512)), ("ffn_gate_inp_shexp", (1, 2048)),
                         ("ffn_gate_inp", (512, 2048))]:
            shapes[f"blk.{i}.{n}.weight"] = shape
        if i % 4 == 3:
            for n, shape in [("attn_q", (8192, 2048)), ("attn_k", (512, 2048)), ("attn_v", (512, 2048)),
                             ("attn_output", (2048, 4096))]:
                shapes[f"blk.{i}.{n}.weight"] = shape
        else:
            for n, shape in [("attn_qkv", (8192, 2048)), ("attn_gate", (4096, 2048)), ("ssm_out", (2048, 4096)),
                             ("ssm_conv1d", (8192, 4))]:
                shapes[f"blk.{i}.{n}.weight"] = shape
    names = sorted(shapes, key=llama_order)
    tensors = [(n, shapes[n]) for n in names]
    more = {i for i in range(48) if i < 6 or i >= 42 or (i - 6) % 3 == 2}
    for out_type, base in [("q4_k_m", Q.Q4_K), ("q5_k_m", Q.Q5_K)]:
        t = dict(zip(names, mix_types(tensors, OUT_TYPES[out_type], 512, 48)))
        assert t["output.weight"] == Q.Q6_K and t["token_embd.weight"] == base
        for i in range(48):
            wv = f"blk.{i}.attn_v.weight" if i % 4 == 3 else f"blk.{i}.attn_qkv.weight"
            assert t[wv] == (Q.Q6_K if i in more else base), wv  # i-th attn_v-like tensor is layer i here
            assert t[f"blk.{i}.ffn_down_exps.weight"] == t[f"blk.{i}.ffn_down_shexp.weight"] == \
                (Q.Q6_K if i in more else base)
            assert t[f"blk.{i}.ffn_gate_exps.weight"] == base
            assert t[f"blk.{i}.ffn_gate_inp.weight"] is None and t[f"blk.{i}.ffn_gate_inp_shexp.weight"] is None
            if i % 4 == 3:
                assert t[f"blk.{i}.attn_k.weight"] == t[f"blk.{i}.attn_output.weight"] == base
            else:
                assert t[f"blk.{i}.ssm_conv1d.weight"] is None
    t = dict(zip(names, mix_types(tensors, OUT_TYPES["q4_0"], 512, 48)))
    assert t["output.weight"] == Q.Q6_K and t["blk.0.ffn_down_exps.weight"] == Q.Q4_0
    assert set(mix_types(tensors, OUT_TYPES["q6_k"], 512, 48)) == {Q.Q6_K, None}


def test_mix_fallbacks_for_rows_not_whole_super_blocks():
    F = OUT_TYPES
    row = lambda name, K, ft: mix_types([(name, (64, K))], F[ft], 512, 48)[0]  # noqa: E731
    assert row("blk.0.ssm_out.weight", 96, "q4_k_m") == Q.Q5_0
    assert row("blk.0.ssm_out.weight", 96, "q5_k_m") == Q.Q5_1
    assert row("blk.0.ssm_out.weight", 96, "q6_k") == Q.Q8_0
    assert row("blk.0.ssm_out.weight", 48, "q6_k") == Q.F16
    assert row("blk.0.ssm_out.weight", 48, "q4_0") == Q.F16   # llama-quantize stops here; we write F16
    assert row("output.weight", 96, "q4_k_m") == Q.Q8_0
    assert row("token_embd.weight", 96, "q4_k_m") == Q.Q8_0   # no output.weight: tied embeddings


# ---- our files against llama.cpp's ---------------------------------------------------------------------

def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("out_type", FIXTURES)
def test_same_types_and_blocks_as_llamacpp(tiny, converted, weights, out_type):
    ours = _tensors(converted[out_type])
    theirs = _tensors(tiny / "gguf" / f"qwen3next-tiny-{FIXTURES[out_type]}.gguf")
    assert list(ours) == list(theirs)
    same = total = 0
    for name, b in theirs.items():
        a = ours[name]
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), name
        size = gguf.GGML_QUANT_SIZES[b.tensor_type][1]
        ba = np.asarray(a.data).view(np.uint8).reshape(-1, size)
        bb = np.asarray(b.data).view(np.uint8).reshape(-1, size)
        eq = (ba == bb).all(axis=1)
        same, total = same + eq.sum(), total + eq.size
        if not eq.all():  # a block that differs must be no worse than llama.cpp's
            block = gguf.GGML_QUANT_SIZES[b.tensor_type][0]
            w = weights[name].reshape(-1, block)[~eq]
            err = lambda blocks: np.sqrt(((dequantize(blocks, b.tensor_type, w.shape) - w) ** 2).mean(1))  # noqa
            assert (err(ba[~eq]) <= err(bb[~eq]) * (1 + 1e-6)).all(), name
    assert same / total >= MIN_IDENTICAL, f"{out_type}: {same}/{total} identical blocks"


@pytest.mark.parametrize("out_type", FIXTURES)
def test_same_metadata_as_llamacpp(tiny, converted, out_type):
    def fields(path):
        r = gguf.GGUFReader(path)
        return {k: (f.types, [f.contents(i) for i in range(len(f.data))] if f.types[0] == gguf.GGUFValueType.ARRAY
                    else f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}

    ours, theirs = fields(converted[out_type]), fields(tiny / "gguf" / f"qwen3next-tiny-{FIXTURES[out_type]}.gguf")
    assert list(ours) == list(theirs)
    assert ours["general.file_type"][1] == {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[out_type]
    ours.pop("general.name"), theirs.pop("general.name")
    assert ours == theirs


@pytest.mark.parametrize("out_type", FIXTURES)
def test_whole_file_byte_identical(tiny, converted, out_type):
    theirs = tiny / "gguf" / f"qwen3next-tiny-{FIXTURES[out_type]}.gguf"
    assert converted[out_type].read_bytes() == theirs.read_bytes()


def test_requantize_f32_and_bf16_gguf_gives_llamacpps_files(tiny, tmp_path):
    """llama-quantize's own input was the converter's F32 file; our BF16 file holds the same values."""
    f32 = convert(tiny / "hf", tmp_path / "f32.gguf", "f32", name="qwen3next-tiny")
    for src in (f32, tiny / "gguf" / "qwen3next-tiny-BF16.gguf"):
        for out_type, fixture in FIXTURES.items():
            out = requantize(src, tmp_path / f"{out_type}.gguf", out_type)
            assert out.read_bytes() == (tiny / "gguf" / f"qwen3next-tiny-{fixture}.gguf").read_bytes(), (src, out_type)


@pytest.mark.parametrize("out_type", FIXTURES)
def test_round_trip_logits_match_transformers(tiny, converted, out_type):
    model = localcoder.load(converted[out_type], backend="numpy")
    ref = np.load(tiny / "ref" / f"hf_dequant_{FIXTURES[out_type]}.npz")
    for p in ("p7", "p64"):
        err = np.abs(model.logits(ref[f"{p}_ids"].tolist()) - ref[f"{p}_logits"]).max()
        assert err <= 1e-5, f"{out_type} {p}: {err:.3g}"


def test_requantize_to_float_types_copies_what_it_does_not_quantize(tiny, tmp_path):
    src = tiny / "gguf" / "qwen3next-tiny-BF16.gguf"
    out = _tensors(requantize(src, tmp_path / "f16.gguf", "f16"))
    for name, t in _tensors(src).items():
        want = Q.F32 if t.tensor_type == Q.F32 else Q.F16
        assert out[name].tensor_type == want, name
        if want == Q.F32:
            assert np.array_equal(np.asarray(out[name].data).reshape(-1), np.asarray(t.data).reshape(-1)), name
    r = gguf.GGUFReader(tmp_path / "f16.gguf")
    assert r.fields["general.file_type"].contents() == 1 and list(r.fields)[-1] == "general.file_type"


# ---- progress, interruption, bad input -----------------------------------------------------------------

def test_requantize_progress_and_interrupt(tiny, tmp_path):
    src = tiny / "gguf" / "qwen3next-tiny-BF16.gguf"
    calls = []
    requantize(src, tmp_path / "a.gguf", "q4_k_m", progress=lambda done, total, name: calls.append((done, total)))
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][0] == calls[-1][1] > 5_000_000

    def boom(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        requantize(src, tmp_path / "b.gguf", "q4_k_m", progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def _expect_error(tmp_path, match, fn, *args, **kw):
    out = tmp_path / "out.gguf"
    with pytest.raises(LocalcoderError, match=match) as e:
        fn(*args, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("out.gguf*.tmp"))


def test_requantize_bad_input(tiny, tmp_path):
    bf16 = tiny / "gguf" / "qwen3next-tiny-BF16.gguf"
    _expect_error(tmp_path, "does not exist", requantize, tmp_path / "missing.gguf", out_type="q4_k_m")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    _expect_error(tmp_path, "is GGUF version 4294967295", requantize, tmp_path / "junk.gguf", out_type="q4_k_m")
    _expect_error(tmp_path, "already quantized .*Q8_0", requantize, tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf",
                  out_type="q4_k_m")
    _expect_error(tmp_path, "unknown output type 'q3_x'", requantize, bf16, out_type="q3_x")
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_error(tmp_path, "expected arch qwen3next, file says llama", requantize, tmp_path / "llama.gguf",
                  out_type="q4_k_m")
    with pytest.raises(LocalcoderError, match="does not exist; create it"):
        requantize(bf16, tmp_path / "nope" / "out.gguf", "q4_k_m")
    shutil.copy(bf16, tmp_path / "same.gguf")
    with pytest.raises(LocalcoderError, match="is the input file"):
        requantize(tmp_path / "same.gguf", tmp_path / "same.gguf", "q4_k_m")


def test_no_disk_space_is_refused_before_writing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    _expect_error(tmp_path, "not enough disk space", requantize, tiny / "gguf" / "qwen3next-tiny-BF16.gguf",
                  out_type="q4_k_m")
    _expect_error(tmp_path, "not enough disk space", convert, tiny / "hf", out_type="q6_k")


# ---- memory ---------------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, shutil, sys, pathlib
    import numpy as np
    from localcoder.quant.convert import convert
    from localcoder.memory import peak_rss_bytes
    root, tiny = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    D, E, F, V = 2048, 24, 512, 8192               # hidden, experts, expert ffn, vocab (real D and F)
    Hk, Hv, Dk, Dv, Hq, Hkv, Dh = 16, 32, 128, 128, 16, 2, 256
    L = 4
    shapes = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "mlp.gate.weight": (E, D), p + "mlp.shared_expert_gate.weight": (1, D)})
        for w, s in (("gate_proj", (F, D)), ("up_proj", (F, D)), ("down_proj", (D, F))):
            shapes[p + f"mlp.shared_expert.{w}.weight"] = s
            shapes.update({p + f"mlp.experts.{e}.{w}.weight": s for e in range(E)})
        if i % 4 == 3:
            shapes.update({p + "self_attn.q_proj.weight": (2 * Hq * Dh, D),
                           p + "self_attn.k_proj.weight": (Hkv * Dh, D),
                           p + "self_attn.v_proj.weight": (Hkv * Dh, D), p + "self_attn.o_proj.weight": (D, Hq * Dh),
                           p + "self_attn.q_norm.weight": (Dh,), p + "self_attn.k_norm.weight": (Dh,)})
        else:
            q = p + "linear_attn."
            shapes.update({q + "in_proj_qkvz.weight": (2 * Hk * Dk + 2 * Hv * Dv, D),
                           q + "in_proj_ba.weight": (2 * Hv, D),
                           q + "conv1d.weight": (2 * Hk * Dk + Hv * Dv, 1, 4), q + "A_log": (Hv,), q + "dt_bias": (Hv,),
                           q + "norm.weight": (Dv,), q + "out_proj.weight": (D, Hv * Dv)})
    pool = (np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16).tobytes()
    header, offset = {}, 0
    for n, s in shapes.items():
        nb = 2 * int(np.prod(s))
        header[n] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + nb]}
        offset += nb
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(root / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for n, s in shapes.items():
            nb = 2 * int(np.prod(s))
            while nb:
                f.write(pool[:min(nb, len(pool))])
                nb -= min(nb, len(pool))
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(hidden_size=D, num_experts=E, moe_intermediate_size=F, shared_expert_intermediate_size=F, vocab_size=V,
               num_hidden_layers=L, linear_num_key_heads=Hk, linear_num_value_heads=Hv, linear_key_head_dim=Dk,
               linear_value_head_dim=Dv, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=Dh,
               intermediate_size=F)
    (root / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, root / name)
    before = peak_rss_bytes()     # this process's own peak, not the test runner's (see localcoder.memory)
    convert(root, root / "out.gguf", "q4_k_m")
    peak = peak_rss_bytes()
    print(json.dumps({"checkpoint": offset, "before": before, "peak": peak, "largest_stacked": 4 * E * F * D}))
""")


def test_convert_memory_is_bounded(tiny, tmp_path):
    """A 0.7 GB bf16 checkpoint with the real hidden/expert sizes: peak RSS stays under 2 GB plus the
    largest stacked tensor (as float32), measured in a fresh process."""
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(tiny / "hf")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["checkpoint"] > 500e6
    assert m["peak"] < 2e9 + m["largest_stacked"], m
    assert (tmp_path / "out.gguf").stat().st_size > m["checkpoint"] / 4
    print(f"peak RSS {m['peak'] / 1e6:.0f} MB for a {m['checkpoint'] / 1e6:.0f} MB checkpoint")


def test_requantize_reads_every_part_of_a_split_input(tiny, tmp_path):
    """A split BF16 (gguf-split layout) was re-quantized from its first part only: 40 of 73 tensors, and the
    output lacked the rest. Every part is read now (any part given), as llama-quantize does."""
    from gguf_edit import rewrite

    bf16 = tiny / "gguf" / "qwen3next-tiny-BF16.gguf"
    (whole,) = rewrite(bf16, [tmp_path / "whole.gguf"])  # the same metadata path as the split files
    parts = rewrite(bf16, [tmp_path / f"tiny-{i:05d}-of-00002.gguf" for i in (1, 2)])
    expect = requantize(whole, tmp_path / "from-whole.gguf", "q4_k_m").read_bytes()
    for part in parts:
        out = requantize(part, tmp_path / f"from-{part.name}", "q4_k_m")
        assert out.read_bytes() == expect
        assert len(gguf.GGUFReader(out).tensors) == 73
    parts[1].unlink()
    _expect_error(tmp_path, "split model is missing 1 of 2 parts", requantize, parts[0], out_type="q4_k_m")


def test_requantize_refuses_writing_over_a_part_of_its_input(tiny, tmp_path):
    from gguf_edit import rewrite

    parts = rewrite(tiny / "gguf" / "qwen3next-tiny-BF16.gguf",
                    [tmp_path / f"tiny-{i:05d}-of-00002.gguf" for i in (1, 2)])
    before = parts[1].read_bytes()
    with pytest.raises(LocalcoderError, match="is a part of the input model"):
        requantize(parts[0], parts[1], "q4_k_m")
    (tmp_path / "link.gguf").symlink_to(parts[0].name)  # the same file through a symlink
    with pytest.raises(LocalcoderError, match="link.gguf is a part of the input model"):
        requantize(parts[1], tmp_path / "link.gguf", "q4_k_m")
    assert parts[1].read_bytes() == before and (tmp_path / "link.gguf").is_symlink()


def test_requantize_truncated_input_says_so(tiny, tmp_path):
    """Was 'not a valid GGUF file (cannot reshape array of size 977376 into shape (8,256,512))'."""
    data = (tiny / "gguf" / "qwen3next-tiny-BF16.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
    _expect_error(tmp_path, rf"cut.gguf is truncated at byte {len(data) - 1000:,} of {len(data):,} .*re-download or "
                            "re-convert it", requantize, tmp_path / "cut.gguf", out_type="q4_k_m")
