"""Replay expert-routing traces against cache policies and budgets; print hit rates.

    python benchmarks/expert_cache.py                       # synthetic traces (uniform and temporal locality)
    python benchmarks/expert_cache.py --trace trace.jsonl   # a trace written by `localcoder run --expert-stats`

The temporal-locality trace is SYNTHETIC: a generator whose locality is tuned until per-layer LRU with 64
of 512 experts resident hits ~67 %, the figure public traces of Qwen3-Next report (128 experts: ~81 %).
It is not a real model's routing; it only lets the policies be compared on a plausible workload.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from localcoder.experts import POLICIES  # noqa: E402

N_EXPERT, TOP_K = 512, 10


def replay(steps: list[list[int]], capacity: int, policy_name: str) -> float:
    """Hit rate of one layer's trace (a list of per-step expert id lists) with `capacity` slots."""
    policy, resident, hits, total = POLICIES[policy_name](), set(), 0, 0
    for ids in steps:
        pinned = set(ids)
        for e in ids:
            total += 1
            if e in resident:
                hits += 1
            else:
                if len(resident) >= capacity:
                    victim = policy.victim(pinned)
                    resident.discard(victim)
                    policy.remove(victim)
                resident.add(e)
            policy.touch(e)
    return hits / max(total, 1)


def uniform_trace(n_tokens: int, rng) -> list[list[int]]:
    return [rng.choice(N_EXPERT, TOP_K, replace=False).tolist() for _ in range(n_tokens)]


def local_trace(n_tokens: int, rng, reuse: float, window: int = 8, zipf: float = 0.8) -> list[list[int]]:
    """Each of a token's 10 experts is, with probability `reuse`, one used in the last `window` tokens,
    otherwise a draw from a skewed (Zipf-like) popularity over all 512."""
    pop = 1.0 / np.arange(1, N_EXPERT + 1) ** zipf
    pop = rng.permutation(pop / pop.sum())
    steps: list[list[int]] = []
    for _ in range(n_tokens):
        recent = sorted({e for s in steps[-window:] for e in s})
        chosen: set[int] = set()
        while len(chosen) < TOP_K:
            if recent and rng.random() < reuse:
                chosen.add(int(recent[rng.integers(len(recent))]))
            else:
                chosen.add(int(rng.choice(N_EXPERT, p=pop)))
        steps.append(sorted(chosen))
    return steps


def calibrate(rng, n_tokens: int, target: float = 0.67) -> tuple[float, list[list[int]]]:
    lo, hi = 0.0, 0.99
    for _ in range(12):
        mid = (lo + hi) / 2
        trace = local_trace(n_tokens, np.random.default_rng(1), mid)
        if replay(trace, 64, "lru") < target:
            lo = mid
        else:
            hi = mid
    reuse = (lo + hi) / 2
    return reuse, local_trace(n_tokens, rng, reuse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, help="JSON lines {layer, experts} from --expert-stats")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    traces: dict[str, list[list[int]]] = {}
    n_expert = N_EXPERT
    if args.trace:
        by_layer: dict[int, list[list[int]]] = {}
        for line in args.trace.read_text().splitlines():
            rec = json.loads(line)
            by_layer.setdefault(rec["layer"], []).append(rec["experts"])
        n_expert = max(e for steps in by_layer.values() for s in steps for e in s) + 1
        traces = {f"{args.trace.name} layer {k}": v for k, v in sorted(by_layer.items())}
    else:
        traces["uniform (synthetic)"] = uniform_trace(args.tokens, rng)
        reuse, trace = calibrate(rng, args.tokens)
        traces[f"temporal locality (synthetic, reuse={reuse:.2f})"] = trace
    sizes = sorted({64 * n_expert // 512, n_expert // 4, n_expert // 2, 3 * n_expert // 4} - {0})
    print(f"hit rate by resident experts per layer (of {n_expert}); {args.tokens if not args.trace else ''} steps")
    print(f"{'trace':55s} {'policy':6s} " + " ".join(f"{s:>7d}" for s in sizes))
    for name, steps in traces.items():
        for pol in POLICIES:
            rates = [replay(steps, s, pol) for s in sizes]
            print(f"{name[:55]:55s} {pol:6s} " + " ".join(f"{100 * r:6.1f}%" for r in rates))


if __name__ == "__main__":
    main()
