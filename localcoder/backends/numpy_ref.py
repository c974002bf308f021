"""The NumPy reference backend: every op, plainly, in float32. It is the oracle the fast backends are tested
against, so clarity beats speed here; it follows transformers' Qwen3Next numerics step by step."""

from __future__ import annotations

import numpy as np

from ..gguf_file import QTensor

CHUNK = 64  # chunk length of the chunked gated delta rule (as transformers and llama.cpp)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def softplus(x: np.ndarray) -> np.ndarray:
    # torch.nn.functional.softplus: log1p(exp(x)), linear above threshold 20
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(np.float32)


def rope_cos_sin(positions: np.ndarray, n_rot: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (T, n_rot), NeoX layout (the two halves repeat), computed in float32 as HF does."""
    inv_freq = (1.0 / (theta ** (np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / n_rot))).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, n_rot/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def gated_delta_recurrent(q, k, v, g, beta, state):
    """One token at a time. q, k (T, Hv, Dk) normalised, q scaled; v (T, Hv, Dv); g, beta (T, Hv);
    state (Hv, Dk, Dv) float32. Per head: S <- S*exp(g); S <- S + k (x) beta (v - S^T k); o = S^T q."""
    state = state.copy()
    out = np.empty_like(v)
    for t in range(q.shape[0]):
        state *= np.exp(g[t])[:, None, None]
        kv_mem = np.einsum("hkv,hk->hv", state, k[t])  # (Hv, Dv)
        delta = (v[t] - kv_mem) * beta[t][:, None]
        state += k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hkv,hk->hv", state, q[t])
    return out, state


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int = CHUNK, solve=None):
    """The same recurrence in chunks of `chunk` tokens (the WY / UT-transform form of transformers'
    torch_chunk_gated_delta_rule): within a chunk the delta-rule updates are condensed into a
    triangular solve, and the state is carried from chunk to chunk. `solve(a, b)` solves (I + strict_lower(a))
    x = b; backends pass a faster one."""
    solve = solve or _solve_unit_lower
    T, H, Dk = q.shape
    Dv = v.shape[-1]
    pad = (-T) % chunk

    def chunks(x):  # (T, H, ...) -> (H, N, C, ...) after padding the sequence to whole chunks
        x = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return np.ascontiguousarray(np.moveaxis(x, 0, 1).reshape(H, -1, chunk, *x.shape[2:]))

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    k_beta = k * beta[..., None]
    decay = np.cumsum(g, axis=-1)  # (H, N, C): log of the decay from the chunk start to each position
    lower = np.tril(np.ones((chunk, chunk), dtype=bool))
    # pair[i, j] = decay from position j to i (j <= i), 0 above the diagonal
    pair = np.exp(np.where(lower, decay[..., :, None] - decay[..., None, :], -np.inf)).astype(np.float32)
    # A[i, j] = (k_beta_i . k_j) * decay(j -> i); only its strictly lower part enters (I + A)
    a = (k_beta @ np.swapaxes(k, -1, -2)) * pair
    ed = np.exp(decay)[..., None]
    # new values u and the decayed keys w that read the old state, in one solve: (H, N, C, Dv + Dk)
    uw = solve(a, np.concatenate([v * beta[..., None], k_beta * ed], axis=-1))
    u, w = uw[..., :Dv], uw[..., Dv:]
    attn = (q @ np.swapaxes(k, -1, -2)) * pair  # intra-chunk attention, causal incl. diagonal
    q_dec = q * ed
    k_dec = k * np.exp(decay[..., -1:] - decay)[..., None]
    chunk_decay = np.exp(decay[..., -1])  # (H, N)
    state = np.array(state, dtype=np.float32, copy=True)
    out = np.empty((H, q.shape[1], chunk, Dv), dtype=np.float32)
    for n in range(q.shape[1]):
        v_new = u[:, n] - w[:, n] @ state  # (H, C, Dv)
        out[:, n] = q_dec[:, n] @ state + attn[:, n] @ v_new
        state = state * chunk_decay[:, n, None, None] + np.swapaxes(k_dec[:, n], -1, -2) @ v_new
    out = np.moveaxis(out.reshape(H, -1, Dv), 0, 1)[:T]
    return np.ascontiguousarray(out), state


def _solve_unit_lower(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve (I + strict_lower(a)) x = b, a (..., C, C), by forward substitution over rows."""
    x = np.empty_like(b)
    for i in range(a.shape[-1]):
        x[..., i, :] = b[..., i, :] - np.einsum("...j,...jd->...d", a[..., i, :i], x[..., :i, :])
    return x


def topk_softmax(be, logits, k: int):
    """The MoE router's choice: softmax over the last axis, the k largest (ties: the lower index first),
    renormalised to sum 1. logits (T, E) -> ids (T, k) int64, weights (T, k) float32. In be's namespace."""
    xp = be.xp
    probs = be.softmax(logits)
    ids = xp.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = xp.take_along_axis(probs, ids, axis=-1)
    return ids, weights / weights.sum(axis=-1, keepdims=True)


def add_shared(be, y, x, shared):
    """y + the shared expert's weighted output (y itself when there is none)."""
    if shared is None:
        return y
    return y + shared.weight * be.swiglu(x, shared.gate, shared.up, shared.down)


class NumpyBackend:
    """Float32 NumPy ops over dequantized weights (dense weights are dequantized once and kept)."""

    name = "numpy"
    xp = np

    def __init__(self):
        self._dense: dict[str, np.ndarray] = {}

    silu = staticmethod(silu)
    sigmoid = staticmethod(sigmoid)
    softplus = staticmethod(softplus)

    @staticmethod
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def topk_softmax(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return topk_softmax(self, logits, k)

    @staticmethod
    def kv_append(kv, k: np.ndarray, v: np.ndarray):
        return kv.append(k, v)

    def prepare(self, w: QTensor) -> np.ndarray:
        dense = self._dense.get(w.name)
        if dense is None:
            dense = self._dense[w.name] = w.dequantize().astype(np.float32, copy=False)
        return dense

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """x (T, K) float32, w (N, K) -> (T, N)."""
        return x @ self.prepare(w).T

    def matmuls(self, x: np.ndarray, ws: tuple[QTensor, ...]) -> tuple[np.ndarray, ...]:
        """Several weights applied to one input: (matmul(x, w) for w in ws). A backend may run them as one
        pass over all their rows."""
        return tuple(self.matmul(x, w) for w in ws)

    def vector(self, w: QTensor) -> np.ndarray:
        """A small float weight (norm, bias, conv kernel) as float32."""
        return self.prepare(w)

    def embed(self, ids: np.ndarray, w: QTensor) -> np.ndarray:
        rows = QTensor(w.name + "[rows]", w.ggml_type, (len(ids), w.shape[1]), w.data[ids], -1, w.path)
        return rows.dequantize()

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w

    def l2_norm(self, x: np.ndarray, eps: float) -> np.ndarray:
        return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + np.float32(eps))

    def rope(self, x: np.ndarray, positions: np.ndarray, n_rot: int, theta: float) -> np.ndarray:
        """NeoX-style rotary embedding on the first n_rot dims of each head. x (T, H, D)."""
        cos, sin = rope_cos_sin(positions, n_rot, theta)
        cos, sin = cos[:, None, :], sin[:, None, :]
        rot, rest = x[..., :n_rot], x[..., n_rot:]
        half = n_rot // 2
        rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        return np.concatenate([rot * cos + rotated * sin, rest], axis=-1)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Causal softmax attention. q (T, Hq, D) at absolute positions; k, v (S, Hkv, D) hold positions
        0..S-1. Query heads are grouped onto kv heads (GQA): head h reads kv head h // (Hq/Hkv)."""
        T, Hq, D = q.shape
        group = Hq // k.shape[1]
        qg = q.reshape(T, k.shape[1], group, D)
        scores = np.einsum("tkgd,skd->kgts", qg, k) * np.float32(D ** -0.5)  # (Hkv, G, T, S)
        mask = np.arange(k.shape[0])[None, :] > positions[:, None]  # (T, S)
        scores = np.where(mask, -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("kgts,skd->tkgd", p.astype(np.float32), v)
        return out.reshape(T, Hq, D)

    def conv1d(self, x: np.ndarray, w: np.ndarray, conv_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Causal depthwise conv + SiLU. x (T, C), w (C, K), conv_state (K-1, C): the last K-1 inputs."""
        K = w.shape[1]
        full = np.concatenate([conv_state, x], axis=0)  # (K-1+T, C)
        T = x.shape[0]
        out = np.zeros_like(x)
        for j in range(K):
            out += full[j:j + T] * w[:, j]
        return silu(out), full[T:].copy()

    def gated_delta(self, q, k, v, g, beta, state):
        if q.shape[0] == 1:
            return gated_delta_recurrent(q, k, v, g, beta, state)
        return gated_delta_chunked(q, k, v, g, beta, state)

    def swiglu(self, x: np.ndarray, gate: QTensor, up: QTensor, down: QTensor) -> np.ndarray:
        return self.matmul(silu(self.matmul(x, gate)) * self.matmul(x, up), down)

    def moe(self, x: np.ndarray, experts, expert_ids: np.ndarray, expert_weights: np.ndarray,
            shared=None) -> np.ndarray:
        """Routed experts' SwiGLU, plus the shared expert if given (a SharedExpert). x (T, D); expert_ids,
        expert_weights (T, k). Each (token, slot) result is kept apart and the k results are summed in
        routing order, so the answer does not depend on which experts were resident together (expert
        streaming changes speed, never results)."""
        T, k = expert_ids.shape
        y = np.zeros((T, k, x.shape[1]), dtype=np.float32)
        for arrays, ids, slots in experts.fetch(np.unique(expert_ids)):
            for e, slot in zip(ids, slots):
                tok, kk = np.nonzero(expert_ids == e)
                gate, up, down = experts.split(arrays, int(slot))
                h = silu(x[tok] @ gate.dequantize().T) * (x[tok] @ up.dequantize().T)
                y[tok, kk] = (h @ down.dequantize().T) * expert_weights[tok, kk][:, None]
        return add_shared(self, y.sum(axis=1), x, shared)
