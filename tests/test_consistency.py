"""Caches are exact: a prompt fed in pieces gives the logits of the prompt fed whole, and one-token decode
after a prefill gives the logits of a longer prefill (1e-5), across the chunk boundaries (64) of the
chunked delta rule. Run on the tiny fixture, on the transformers-made alt model (tests/fixtures/alt: 8 layers,
3 value heads per key head, 16 experts top-4, partial rotary 0.5) and on a random model of other dimensions
with the real vocabulary."""

import pathlib

from dataclasses import replace

import numpy as np
import pytest

import localcoder
from localcoder.synthetic import PRESETS, write_synthetic

TOL = 1e-5


@pytest.fixture(scope="module")
def models(fixtures_dir, tmp_path_factory):
    tiny = localcoder.load(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf", backend="numpy")
    # other head counts, 3 value heads per key head, 8 layers, fused gate/up not needed here
    dims = replace(PRESETS["demo"], n_layer=8, n_head=6, n_head_kv=2, head_dim=32, n_rot=8, ssm_n_k_heads=2,
                   ssm_n_v_heads=6, ssm_k_dim=32, ssm_v_dim=48, n_expert=12, n_expert_used=3, n_ff_exp=64,
                   n_ff_shexp=96)
    path = write_synthetic(tmp_path_factory.mktemp("alt") / "alt.gguf", dims, "q4_0", seed=3)
    alt_hf = pathlib.Path(__file__).parent / "fixtures" / "alt" / "qwen3next-alt-F32.gguf"
    return {"tiny": tiny, "synthetic": localcoder.load(path, backend="numpy"),
            "alt": localcoder.load(alt_hf, backend="numpy")}


@pytest.mark.parametrize("name", ["tiny", "alt", "synthetic"])
def test_split_prefill_equals_whole(models, name):
    model = models[name]
    ids = np.random.default_rng(0).integers(0, 2000, 150).tolist()
    whole = model.logits(ids)
    for cuts in ([1, 70, 150], [63, 64, 65, 150], [100, 150]):
        cache, parts, start = model.new_cache(), [], 0
        for cut in cuts:
            parts.append(model.forward(ids[start:cut], cache))
            start = cut
        err = np.abs(np.concatenate(parts) - whole).max()
        assert err <= TOL, f"{name} cuts {cuts}: {err:.3g}"


@pytest.mark.parametrize("name", ["tiny", "alt", "synthetic"])
def test_decode_equals_longer_prefill(models, name):
    model = models[name]
    ids = np.random.default_rng(1).integers(0, 2000, 75).tolist()
    whole = model.logits(ids)
    cache = model.new_cache()
    model.forward(ids[:60], cache)
    steps = [model.forward([t], cache)[0] for t in ids[60:]]
    err = np.abs(np.array(steps) - whole[60:]).max()
    assert err <= TOL, f"{name}: {err:.3g}"


def test_snapshot_restore_rolls_back(models):
    model = models["tiny"]
    ids = list(range(100, 140))
    cache = model.new_cache()
    model.forward(ids[:20], cache)
    snap = cache.snapshot()
    a = model.forward(ids[20:], cache)
    cache.restore(snap)
    b = model.forward(ids[20:], cache)
    assert np.array_equal(a, b) and cache.pos == 40
