#!/bin/bash
# A/B: `localcoder bench` alternately on an older commit and on this working tree, N rounds, so that both
# see the same minutes of this machine's (drifting) memory bandwidth.
#
#   benchmarks/ab.sh REF [N] [bench options...]     e.g. benchmarks/ab.sh HEAD~1 3 -p 128 -n 32
#
# REF is checked out into a temporary git worktree (removed at the end); each run imports its own tree.
set -euo pipefail
ref=${1:?usage: benchmarks/ab.sh REF [N] [bench options]}
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
opts=("$@")
[ ${#opts[@]} -eq 0 ] && opts=(-p 128 -n 32)
here=$(git rev-parse --show-toplevel)
old=$(mktemp -d)/old
git -C "$here" worktree add -q --detach "$old" "$ref"
trap 'git -C "$here" worktree remove --force "$old"' EXIT
for _ in $(seq "$rounds"); do
  for tree in "$old" "$here"; do
    (cd "$tree" && PYTHONPATH="$tree" python -m localcoder bench --synthetic qwen3-coder-next --layers 8 \
        "${opts[@]}" --json 2>/dev/null | tail -1) |
      python -c "import json, sys; d = json.load(sys.stdin); print(sys.argv[1], 'pp %.1f tg %.2f tokens/s, read %.1f GB/s' % (d['pp_tokens_per_s'], d['tg_tokens_per_s'], d['read_bandwidth_gbs']))" \
        "$([ "$tree" = "$old" ] && echo "$ref" || echo 'working tree')"
  done
done
