"""Time from process start to a ready chat prompt: what `localcoder chat` does before its first `>>>`
(open and validate the GGUF header, tokenizer, chat template, weights as memory-mapped views, the backend).

    python benchmarks/startup.py MODEL.gguf [--backend auto]

No tensor data is read. Nothing here is asserted in tests.
"""

import argparse
import time

from localcoder.bench import process_start_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    import localcoder
    from localcoder.chat import ChatSession

    model = localcoder.load(args.model, backend=args.backend)
    ChatSession(model)
    print(f"{args.model}: prompt ready {time.time() - process_start_time():.2f} s after process start "
          f"(backend {model.backend.name}, expert store: {'streaming' if model.expert_store else 'memory map'})")


if __name__ == "__main__":
    main()
