import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


SUBSET = REPO / "tests" / "fixtures" / "shared"  # a verbatim subset of ../shared/fixtures (see its README)


class _SubsetPath(type(pathlib.Path())):
    """A path under the in-repo subset: joining a file the subset leaves out skips the test (the full
    fixtures have every file; there a missing one fails as usual)."""

    def __truediv__(self, key):
        p = super().__truediv__(key)
        if not p.exists():
            pytest.skip(f"{p.relative_to(SUBSET)} is only in the full fixtures: set LOCALCODER_FIXTURES or "
                        "place ../shared/fixtures beside the repo")
        return p


def _find_fixtures():
    for cand in [os.environ.get("LOCALCODER_FIXTURES"), REPO.parent / "shared" / "fixtures", SUBSET]:
        if cand and pathlib.Path(cand, "qwen3next-tiny").is_dir():
            path = pathlib.Path(cand).resolve()
            return _SubsetPath(path) if path == SUBSET.resolve() else path
    return None


FIXTURES = _find_fixtures()


@pytest.fixture(scope="session")
def fixtures_dir():
    if FIXTURES is None:
        pytest.skip("fixtures not found: set LOCALCODER_FIXTURES or place ../shared/fixtures beside the repo")
    return FIXTURES


def gguf_metadata(path) -> dict:
    """A GGUF's metadata as plain values (localcoder's reader; checked equal to gguf.GGUFReader's in
    tests/test_gguf_file.py)."""
    from localcoder.gguf_file import GGUFFile

    return dict(GGUFFile(path).metadata)


def delta_inputs(rng, T, H, Dk, Dv, g_max=2.0, state_scale=1.0):
    """Random gated-delta inputs (q, k, v, g, beta, state) as the model makes them: q and k L2-normalised
    (q scaled by Dk^-1/2), g <= 0, beta in (0, 1)."""
    import numpy as np

    from localcoder.backends.numpy_ref import NumpyBackend
    nb = NumpyBackend()
    q = nb.l2_norm(rng.standard_normal((T, H, Dk)).astype(np.float32), 1e-6) * np.float32(Dk ** -0.5)
    k = nb.l2_norm(rng.standard_normal((T, H, Dk)).astype(np.float32), 1e-6)
    v = rng.standard_normal((T, H, Dv)).astype(np.float32)
    g = -rng.uniform(0.01, g_max, (T, H)).astype(np.float32)
    beta = rng.uniform(0, 1, (T, H)).astype(np.float32)
    state = rng.standard_normal((H, Dk, Dv)).astype(np.float32) * state_scale
    return q, k, v, g, beta, state


def greedy_decode(model, prompt_ids, cache, n=32):
    """Prefill prompt_ids into cache, then n greedy single-token steps: (tokens, the logits each token was
    chosen from)."""
    import numpy as np

    from localcoder.generate import prefill
    logits = prefill(model, list(prompt_ids), cache)
    tokens, step_logits = [], []
    for _ in range(n):
        step_logits.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], cache, all_logits=False)[-1]
    return tokens, np.array(step_logits)
