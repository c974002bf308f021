"""The forward pass on the NumPy reference backend against transformers' Qwen3Next (../shared/fixtures).

Tolerance: max |delta logits| <= 1e-5 at every position of every prompt (llama.cpp's own float32 path reaches
1.8e-6 there; this random model is chaotic, so anything inexact shows up at once).
"""

import gguf
import numpy as np
import pytest
from conftest import greedy_decode

import localcoder
from localcoder.generate import prefill

TOL = 1e-5
QUANTS = ["BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    root = fixtures_dir / "qwen3next-tiny"
    return root


def _model(root, q):
    return localcoder.load(root / "gguf" / f"qwen3next-tiny-{q}.gguf", backend="numpy")


def _ref(root, q):
    return np.load(root / "ref" / ("hf_f32.npz" if q == "BF16" else f"hf_dequant_{q}.npz"))


@pytest.mark.parametrize("q", QUANTS)
def test_logits_match_transformers(tiny, q):
    model, ref = _model(tiny, q), _ref(tiny, q)
    for p in ("p7", "p64", "p300"):
        logits = model.logits(ref[f"{p}_ids"].tolist())
        assert logits.shape == ref[f"{p}_logits"].shape and logits.dtype == np.float32
        err = np.abs(logits - ref[f"{p}_logits"]).max()
        assert err <= TOL, f"{q} {p}: max |delta| {err:.3g} > {TOL}"


def test_residual_stream_per_layer(tiny):
    from localcoder.models import qwen3next

    model, ref = _model(tiny, "BF16"), _ref(tiny, "BF16")
    for p in ("p7", "p64"):
        outs = []
        qwen3next.forward(model.backend, model.config, model.weights, ref[f"{p}_ids"], model.new_cache(),
                          layer_out=outs)
        for i, x in enumerate(outs):
            err = np.abs(x - ref[f"{p}_layer_out"][i]).max()
            assert err <= TOL, f"{p} layer {i}: max |delta| {err:.3g}"


def test_greedy_decode_matches_transformers(tiny):
    """32 greedy tokens through the decode path (KV cache, conv state, recurrent state)."""
    model, ref = _model(tiny, "BF16"), _ref(tiny, "BF16")
    for p in ("p7", "p64", "p300"):
        tokens, step_logits = greedy_decode(model, ref[f"{p}_ids"], model.new_cache())
        assert tokens == ref[f"{p}_hf_greedy32"].tolist(), p
        err = np.abs(step_logits - ref[f"{p}_hf_greedy32_logits"]).max()
        assert err <= TOL, f"{p}: decode logits max |delta| {err:.3g}"


def test_generate_api_greedy(tiny):
    from localcoder.sampling import greedy

    model, ref = _model(tiny, "BF16"), _ref(tiny, "BF16")
    ids = ref["p7_ids"].tolist()
    out = list(model.generate(ids, max_tokens=32, sampler=greedy()))
    expect = ref["p7_hf_greedy32"].tolist()
    stop = [i for i, t in enumerate(expect) if t in model.tokenizer.stop_token_ids]
    assert out == expect[: stop[0] if stop else 32]


def test_llamacpp_greedy_tokens_agree_on_f32_path(tiny):
    """llama.cpp's float32 greedy tokens (from the F32 GGUF, same weights as BF16) equal ours."""
    model = _model(tiny, "BF16")
    ref = np.load(tiny / "ref" / "llamacpp_F32.npz")
    for p in ("p7", "p64"):
        cache = model.new_cache()
        logits = prefill(model, ref[f"{p}_ids"].tolist(), cache)
        toks = []
        for _ in range(32):
            toks.append(int(np.argmax(logits)))
            logits = model.forward([toks[-1]], cache, all_logits=False)[-1]
        assert toks == ref[f"{p}_gen32"].tolist()


# ---- files the loader must read as llama.cpp does (built from the Q4_K_M fixture in tmp_path) ---------------

PROMPT = [750, 282, 579, 263, 580, 66, 72, 1000, 13, 2000]


def _q4km(fixtures_dir):
    return fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf"


def test_mtp_layers_are_not_run(fixtures_dir, tmp_path):
    """A GGUF with an MTP (nextn) block, as llama.cpp's converter writes by default: block_count 5 with
    nextn_predict_layers 1. llama.cpp runs n_layer() = 4 decoder layers; running the MTP block as a fifth
    layer gave different, wrong logits with no warning."""
    from gguf_edit import rewrite

    src = _q4km(fixtures_dir)
    base = localcoder.load(src, backend="numpy")

    def add_mtp(ts):
        rng = np.random.default_rng(0)
        for name, (qtype, raw) in list(ts.items()):
            if name.startswith("blk.3."):
                ts["blk.4." + name[6:]] = (qtype, raw.copy())
        D = base.config.n_embd
        def f32(*shape):
            return gguf.GGMLQuantizationType.F32, rng.standard_normal(shape).astype(np.float32)
        ts.update({"blk.4.nextn.eh_proj.weight": f32(D, 2 * D), "blk.4.nextn.enorm.weight": f32(D),
                   "blk.4.nextn.hnorm.weight": f32(D), "blk.4.nextn.shared_head_norm.weight": f32(D)})
        return ts

    def meta(m):
        m["qwen3next.block_count"] = 5
        m["qwen3next.nextn_predict_layers"] = 1
        if "qwen3next.attention.recurrent_layers" in m:
            m["qwen3next.attention.recurrent_layers"] = m["qwen3next.attention.recurrent_layers"] + [False]
        return m

    (out,) = rewrite(src, [tmp_path / "mtp.gguf"], add_mtp, meta)
    import localcoder.model as lm
    read = []
    orig = lm._pread_all
    lm._pread_all = lambda jobs, *a, **k: (read.extend(o for _, o, _ in jobs), orig(jobs, *a, **k))[1]
    try:
        m = localcoder.load(out, backend="numpy")
        assert (m.config.n_layer, m.config.n_nextn_layer, m.config.n_block) == (4, 1, 5)
        assert len(m.config.recurrent_layers) == 4 and len(m.weights.layers) == 4 and len(m.new_cache().layers) == 4
        assert np.array_equal(m.logits(PROMPT), base.logits(PROMPT))
    finally:
        lm._pread_all = orig
    mtp = {t.file_offset for name, t in m.file.tensors.items() if name.startswith("blk.4.")}
    assert read and not mtp & set(read)  # the MTP block is never copied into memory


def test_nextn_layers_must_leave_a_decoder_layer(fixtures_dir):
    from localcoder.config import ModelConfig
    from localcoder.errors import GGUFError
    from localcoder.gguf_file import GGUFFile

    meta = dict(GGUFFile(_q4km(fixtures_dir)).metadata)
    meta["qwen3next.nextn_predict_layers"] = 4
    with pytest.raises(GGUFError, match="nextn_predict_layers = 4 leaves no decoder layer of block_count 4"):
        ModelConfig.from_gguf(meta, 2176, "tiny.gguf")


@pytest.mark.parametrize("n_tokens", [2100, 2304])
def test_embedding_rows_must_equal_the_vocabulary(fixtures_dir, tmp_path, n_tokens):
    """llama.cpp requires token_embd {n_embd, n_vocab} with n_vocab = len(tokenizer.ggml.tokens). A file with
    2100 tokens and 2176 embedding rows loaded, and sampling id 2135 ended in a traceback."""
    from gguf_edit import rewrite

    from localcoder.errors import GGUFError

    def meta(m):
        tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
        extra = n_tokens - len(tokens)
        m["tokenizer.ggml.tokens"] = tokens[:n_tokens] + [f"[PAD{len(tokens) + i}]" for i in range(extra)]
        m["tokenizer.ggml.token_type"] = types[:n_tokens] + [5] * extra
        return m

    (out,) = rewrite(_q4km(fixtures_dir), [tmp_path / "v.gguf"], meta=meta)
    with pytest.raises(GGUFError, match=f"token_embd.weight has 2176 rows but the vocabulary "
                                        rf"\(tokenizer.ggml.tokens\) has {n_tokens} tokens; llama.cpp refuses"):
        localcoder.load(out, backend="numpy")


def test_a_tokenizer_error_names_the_file_and_the_fix(fixtures_dir, tmp_path):
    from gguf_edit import rewrite

    from localcoder.errors import GGUFError

    def meta(m):
        del m["tokenizer.ggml.model"]
        return m

    (out,) = rewrite(_q4km(fixtures_dir), [tmp_path / "notok.gguf"], lambda ts: ts, meta)
    with pytest.raises(GGUFError) as e:
        localcoder.load(out, backend="numpy")
    assert str(out) in str(e.value) and "tokenizer.ggml.model" in str(e.value) and "re-convert" in str(e.value)
