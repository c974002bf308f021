"""The forward pass on the Numba backend against transformers' Qwen3Next (../shared/fixtures), as
tests/test_model.py does for the NumPy backend. With float32 activations (prompt processing always;
decode with int8_activations=False) the tolerance is the exact-math one: max |delta logits| <= 1e-5 at
every position of every prompt. Decode with 8-bit activations (the default where the CPU has AVX-512
VNNI) is held to 2x llama.cpp's own differences from transformers on the same weights (llama.cpp also
quantizes activations to Q8_K/Q8_0), per variant, from ref/tolerances.json: max |delta| and rms ratio."""

import json

import numpy as np
import pytest
from conftest import greedy_decode

import localcoder
from localcoder.cache import make_cache

TOL = 1e-5
QUANTS = ["BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return fixtures_dir / "qwen3next-tiny"


def _model(root, q, int8=False):
    model = localcoder.load(root / "gguf" / f"qwen3next-tiny-{q}.gguf", backend="numba")
    model.backend.int8 = int8
    return model


def _ref(root, q):
    return np.load(root / "ref" / ("hf_f32.npz" if q == "BF16" else f"hf_dequant_{q}.npz"))


@pytest.mark.parametrize("q", QUANTS)
def test_logits_match_transformers(tiny, q):
    model, ref = _model(tiny, q), _ref(tiny, q)
    assert model.backend.name == "numba"
    for p in ("p7", "p64", "p300"):
        logits = model.logits(ref[f"{p}_ids"].tolist())
        err = np.abs(logits - ref[f"{p}_logits"]).max()
        assert err <= TOL, f"{q} {p}: max |delta| {err:.3g} > {TOL}"


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_greedy_decode_matches_transformers(tiny, kv_dtype):
    """32 greedy tokens through the decode path (matvec kernels, KV cache, conv and recurrent state)."""
    model, ref = _model(tiny, "BF16"), _ref(tiny, "BF16")
    for p in ("p7", "p300"):
        tokens, step_logits = greedy_decode(model, ref[f"{p}_ids"], make_cache(model.config, kv_dtype))
        assert tokens == ref[f"{p}_hf_greedy32"].tolist(), p
        if kv_dtype == np.float32:
            err = np.abs(step_logits - ref[f"{p}_hf_greedy32_logits"]).max()
            assert err <= TOL, f"{p}: decode logits max |delta| {err:.3g}"


def test_auto_backend_is_numba_on_x86():
    import platform
    from localcoder.backends import get_backend
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("auto picks numba on x86 only")
    assert get_backend("auto").name == "numba"


def test_threads_option_reaches_the_backend(tiny):
    """load(threads=N) (the CLI's -t/--threads) sets the numba backend's threads, capped at the machine's."""
    import numba
    try:
        m = localcoder.load(tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf", backend="numba", threads=1)
        assert m.backend.threads == 1 and numba.get_num_threads() == 1
        m = localcoder.load(tiny / "gguf" / "qwen3next-tiny-Q8_0.gguf", backend="numba", threads=10_000)
        assert m.backend.threads == numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("q", ["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_int8_activations_within_2x_llamacpp(tiny, q):
    """p64 through the 8-bit activation kernels, teacher-forced one token at a time (matvecs and experts)
    and as one prefill, and p300 as one prefill (every product through the 8-bit kernels): every position's
    logits against transformers (same dequantized weights)."""
    from localcoder.quant import kernels as K
    if not K.HAVE_VNNI:
        pytest.skip("8-bit activation kernels need AVX-512 VNNI")
    model, ref = _model(tiny, q, int8=True), _ref(tiny, q)
    tols = json.loads((tiny / "ref" / "tolerances.json").read_text())["cmp"][f"main/{q}"]
    ids = ref["p64_ids"].tolist()
    cache = make_cache(model.config, np.float32)
    logits = np.concatenate([model.forward([t], cache, all_logits=False) for t in ids])
    for name, got, p in (("decode", logits, "p64"), ("prefill", model.logits(ids), "p64"),
                         ("prefill", model.logits(ref["p300_ids"].tolist()), "p300")):
        want, tol = ref[f"{p}_logits"], tols[p]["vs_hf_dequant"]
        err = np.abs(got - want).max()
        rms = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
        assert err <= 2 * tol["max_abs"], f"{q} {name} {p}: max |delta| {err:.3g} > 2 x {tol['max_abs']:.3g}"
        assert rms <= 2 * tol["rms_err_over_rms_ref"], (
            f"{q} {name} {p}: rms ratio {rms:.3g} > 2 x {tol['rms_err_over_rms_ref']:.3g}")
        print(f"{q}: int8 {name} {p} max |delta| {err:.3g} (llama.cpp {tol['max_abs']:.3g}), rms {rms:.3g} "
              f"(llama.cpp {tol['rms_err_over_rms_ref']:.3g})")


WARMUP_CHECK = """
import sys
import localcoder
from localcoder.backends import numba_cpu
from localcoder.quant import kernels as K
numba_cpu.warmup()
kernels = {n: f for mod in (K, numba_cpu) for n, f in vars(mod).items() if hasattr(f, "signatures")}
before = {n: set(f.signatures) for n, f in kernels.items()}
model = localcoder.load(sys.argv[1], backend="numba")
cache = model.new_cache()
for ids in (list(range(1, 40)), [5], [6, 7], list(range(8, 14))):
    model.forward(ids, cache)
print(sorted(f"{n}{sorted(set(f.signatures) - before[n])}" for n, f in kernels.items() if set(f.signatures) - before[n]))
"""


def test_warmup_compiles_every_signature_the_model_uses(tiny):
    """`localcoder warmup` must leave nothing to compile for a run (read-only weights are a separate Numba
    type from writable arrays: warming up on writable ones compiled forms no model ever calls)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", WARMUP_CHECK, str(tiny / "gguf" / "qwen3next-tiny-Q4_K_M.gguf")],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


NOTICE_CHECK = """
from localcoder.backends import numba_cpu
numba_cpu.on_first_compile(lambda: print("compiling"))
numba_cpu.NumbaBackend()  # compiles (or loads from the cache) its first kernel
print("done")
"""


def test_compile_notice_only_when_compiling(tmp_path):
    """The CLI's "compiling the CPU kernels" notice: said once by a process that compiles (an empty Numba
    cache, as after an install), not by the next one, which loads the kernels from the cache."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", NOTICE_CHECK], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.split())
    assert outs == [["compiling", "done"], ["done"]]
