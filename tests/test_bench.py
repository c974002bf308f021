"""`localcoder bench`: the figures it reports are consistent with each other and with the model, and the
synthetic bench file takes llama-quantize's Q4_K_M tensor types. Nothing here checks a speed."""

import json
import os
import re
import subprocess
import sys

import gguf
import pytest

import localcoder
from localcoder.bench import run_bench, weight_bytes_per_token
from localcoder.synthetic import PRESETS, q4_k_m_type, write_synthetic

REQUIRED = ["pp_tokens_per_s", "tg_tokens_per_s", "weight_bytes_per_token", "read_bandwidth_gbs", "roofline_fraction",
            "threads", "peak_rss_bytes", "backend", "first_token_s"]
STREAMING = ["expert_hits", "expert_misses", "disk_bytes_per_token", "expert_cache_bytes", "io_wait_s_per_token",
             "io_cpu_s_per_gb", "io_busy_fraction", "io_busy_gbs", "streaming_limit_tokens_per_s", "distinct_experts_per_layer"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("bench") / "demo.gguf", PRESETS["demo"], "q8_0")


def test_q4_k_m_types_match_llama_quantize(fixtures_dir):
    """Every tensor of llama.cpp's Q4_K_M fixture has the type q4_k_m_type gives, except the attention
    tensors that llama-quantize raises for models with exactly 8 experts (the fixture has 8; Qwen3-Coder-Next
    has 512): attn_qkv, attn_k, attn_v to Q8_0, attn_output to Q5_K."""
    reader = gguf.GGUFReader(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf")
    n_layer = 1 + max(int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name)))
    eight_expert_rule = {"attn_qkv.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"}
    checked = 0
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.(.+)", t.name)
        layer, name = (int(m.group(1)), m.group(2)) if m else (None, t.name)
        if name in eight_expert_rule:
            continue
        assert q4_k_m_type(name, layer, n_layer).name == t.tensor_type.name, t.name
        checked += 1
    assert checked > 60
    # the "more bits" layers at 48 layers: i < 6, i >= 42, (i - 6) % 3 == 2
    q6 = [i for i in range(48) if q4_k_m_type("ffn_down_exps.weight", i, 48) == gguf.GGMLQuantizationType.Q6_K]
    assert q6 == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47]
    assert q4_k_m_type("attn_v.weight", 8, 48) == gguf.GGMLQuantizationType.Q6_K
    assert q4_k_m_type("attn_v.weight", 9, 48) == gguf.GGMLQuantizationType.Q4_K
    assert q4_k_m_type("output.weight", None, 48) == gguf.GGMLQuantizationType.Q6_K


def test_bench_figures_fit_together(demo):
    res = run_bench(demo, backend="numpy", prompt_tokens=6, gen_tokens=3)
    for key in REQUIRED:
        assert key in res, key
    model = localcoder.load(demo, backend="numpy")
    assert res["weight_bytes_per_token"] == weight_bytes_per_token(model) < os.path.getsize(demo)
    assert res["roofline_fraction"] == pytest.approx(
        res["tg_tokens_per_s"] * res["weight_bytes_per_token"] / (res["read_bandwidth_gbs"] * 1e9))
    assert res["backend"] == "numpy" and res["pp_tokens_per_s"] > 0 and res["tg_tokens_per_s"] > 0
    assert res["peak_rss_bytes"] > 0 and res["first_token_s"] > 0
    # the budget holds every expert: read at load (waited for), so decode only hits
    dims = PRESETS["demo"]
    assert res["expert_misses"] == 0 and res["expert_hits"] == 3 * dims.n_layer * dims.n_expert_used
    assert res["expert_slots_per_layer"] == dims.n_expert


def test_bench_streaming_counters(demo):
    """With one expert slot per layer every decode step's experts are counted once each, and the store read
    exactly the misses' bytes."""
    gen = 3
    res = run_bench(demo, backend="numpy", prompt_tokens=4, gen_tokens=gen, expert_cache=1)
    for key in STREAMING:
        assert key in res, key
    dims = PRESETS["demo"]
    assert res["expert_hits"] + res["expert_misses"] == gen * dims.n_layer * dims.n_expert_used
    assert res["expert_misses"] > 0 and res["expert_slots_per_layer"] == 1
    model = localcoder.load(demo, backend="numpy")
    per_expert = model.weights.layers[0].experts.expert_nbytes()
    assert res["expert_bytes_read_per_token"] * gen == res["expert_misses"] * per_expert
    assert res["expert_miss_bytes_per_token"] * gen == pytest.approx(res["expert_misses"] * per_expert)
    assert 0 < res["streaming_limit_fraction"] and res["io_cpu_s_per_gb"] >= 0
    assert 0 < res["io_busy_fraction"] <= 1 and res["io_busy_gbs"] > 0  # reads happened, and took time
    assert 1 <= res["distinct_experts_per_layer"] <= dims.n_expert


def test_bench_at_depth(demo, monkeypatch):
    """-d: the context is filled once with `depth` tokens, every timed prefill starts at that point (rolled back
    to it), and generation continues after it; the KV cache type is the one asked for."""
    import localcoder.generate as generate

    starts, real = [], generate.prefill

    def spy(model, ids, cache, *a, **kw):
        starts.append((cache.pos, len(ids), cache.layers[-1].k.dtype.name))
        return real(model, ids, cache, *a, **kw)

    monkeypatch.setattr(generate, "prefill", spy)
    res = run_bench(demo, backend="numpy", prompt_tokens=4, gen_tokens=2, depth=20, kv_type="f16")
    assert res["depth"] == 20 and res["kv_type"] == "f16" and res["depth_fill_s"] > 0
    assert (0, 20, "float16") in starts  # the fill
    assert starts[-3:] == [(20, 4, "float16")] * 3  # the timed prefills, each from depth 20


def test_bench_cli_json(demo):
    proc = subprocess.run([sys.executable, "-m", "localcoder", "bench", "-m", str(demo), "-p", "4", "-n", "2",
                           "--backend", "numpy", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in REQUIRED:
        assert key in res, key
    assert res["prompt_tokens"] == 4 and res["gen_tokens"] == 2 and res["model"] == str(demo)


def test_bench_cli_table_with_streaming(demo):
    proc = subprocess.run([sys.executable, "-m", "localcoder", "bench", "-m", str(demo), "-p", "4", "-n", "2",
                           "--backend", "numpy", "--expert-cache", "1"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="160"))
    assert proc.returncode == 0, proc.stderr
    for row in ("generation (tg2)", "roofline", "expert hits / misses", "waiting for reads", "streaming limit"):
        assert row in proc.stdout, row


def test_peak_rss_is_this_process_not_its_parent():
    """bench's peak RSS belongs to the process that ran it: a child started by a 600 MB parent reports its own
    peak (ru_maxrss on Linux would report the parent's, which is how a conversion memory test once failed in
    CI), and growing it by 200 MB shows up."""
    child = ("import numpy as np; from localcoder.memory import peak_rss_bytes; a = peak_rss_bytes(); "
             "b = np.ones(200 * 2 ** 20 // 8); b += 1; print(a, peak_rss_bytes())")
    parent = ("import numpy as np, subprocess, sys; big = np.ones(600 * 2 ** 20 // 8); big += 1; "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before < 300 * 2 ** 20, before
    assert after - before > 180 * 2 ** 20, (before, after)


def test_heap_tuning_leaves_user_settings_alone():
    """localcoder tunes glibc's malloc on import (freed temporaries stay in the heap) unless the user set
    MALLOC_* or GLIBC_TUNABLES; without glibc it does nothing."""
    code = "from localcoder.memory import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    import platform
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    for extra, want in (({}, glibc), ({"MALLOC_ARENA_MAX": "2"}, False)):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(want)
