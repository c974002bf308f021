"""A second random Qwen3-Next with a different shape (tests/fixtures/make_alt_model.py) against transformers.

8 layers (attention at 3 and 7), GQA 4:1, head_dim 32 with 16 rotary dims, 3 value heads per key head with
key/value head dims 32/48, 16 experts top-4. The GGUF is our converter's F32 output of the bf16 checkpoint,
so exact float32 math must match transformers' float32 logits to ~1e-6; the bound is 1e-5 as for the tiny model.
"""

from pathlib import Path

import numpy as np
import pytest

import localcoder

TOL = 1e-5
ALT = Path(__file__).resolve().parent / "fixtures" / "alt"


@pytest.fixture(scope="module")
def alt():
    return localcoder.load(ALT / "qwen3next-alt-F32.gguf", backend="numpy"), np.load(ALT / "ref.npz")


def test_config_differs_from_tiny(alt):
    cfg = alt[0].config
    assert (cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_rot) == (8, 4, 1, 32, 16)
    assert (cfg.ssm_n_k_heads, cfg.ssm_n_v_heads, cfg.ssm_k_dim, cfg.ssm_v_dim) == (2, 6, 32, 48)
    assert (cfg.n_expert, cfg.n_expert_used) == (16, 4)
    assert cfg.recurrent_layers == (True, True, True, False) * 2


@pytest.mark.parametrize("prompt", ["p5", "p150"])
def test_logits_match_transformers(alt, prompt):
    model, ref = alt
    logits = model.logits(ref[f"{prompt}_ids"].tolist())
    err = np.abs(logits - ref[f"{prompt}_logits"]).max()
    assert err <= TOL, f"{prompt}: max |delta logits| {err:.3g} > {TOL}"


def test_greedy_decode_matches_hf_cache(alt):
    """Prefill the 5-token prompt, then one token per forward through our cache, as HF's cache did."""
    model, ref = alt
    cache = model.new_cache()
    logits = model.forward(ref["p5_ids"].tolist(), cache, all_logits=False)[-1]
    tokens = []
    for step in range(16):
        err = np.abs(logits - ref["greedy16_logits"][step]).max()
        assert err <= TOL, f"decode step {step}: max |delta logits| {err:.3g} > {TOL}"
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], cache, all_logits=False)[-1]
    assert tokens == ref["greedy16"].tolist()
