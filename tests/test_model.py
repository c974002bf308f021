"""The forward pass on the NumPy reference backend against transformers' Qwen3Next (../shared/fixtures).

Tolerance: max |delta logits| <= 1e-5 at every position of every prompt (llama.cpp's own float32 path reaches
1.8e-6 there; this random model is chaotic, so anything inexact shows up at once).
"""

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
