#!/bin/bash
# llama.cpp side by side: builds llama-bench at the commit the issues quote (0c1e570, the llama.cpp that ships in
# the PyPI sdist of llama-cpp-python 0.3.36, under vendor/llama.cpp) and runs it alternately with
# `localcoder bench` on the same GGUF, N rounds, so that both see the same minutes of this machine.
#
#   benchmarks/vs_llama_cpp.sh MODEL.gguf [N] [-p 128 -n 32]      e.g. the 8-layer synthetic file
#   DROP_CACHES=1 LLAMA_BENCH_ARGS="--repack 0 -r 1" benchmarks/vs_llama_cpp.sh 48L.gguf 1 -p 16 -n 32
#   benchmarks/vs_llama_cpp.sh MODEL.gguf 0     # only build; then run ~/.cache/localcoder-llama.cpp/build/bin/llama-bench
#   LOCALCODER_BENCH_ARGS="--kv-type f16" benchmarks/vs_llama_cpp.sh 8L.gguf 1 -p 64 -n 32 -d 32768
#                                                # at depth (-d: both tools), both with a float16 KV cache
#
# The build is CPU-only, -march=native without AMX: on this VM the AMX tile instructions that a native build
# compiles in crash llama-bench (SIGILL or SIGSEGV). It goes to $LLAMA_BUILD (default
# ~/.cache/localcoder-llama.cpp) and is reused. Both get the same -p/-n (localcoder's prompt figure is the median
# of 3 prefills, llama-bench's the mean of its -r repetitions, 5 by default). With DROP_CACHES=1 (root) the page
# cache is dropped before every run (streaming comparisons).
set -euo pipefail
model=$(realpath "${1:?usage: benchmarks/vs_llama_cpp.sh MODEL.gguf [N] [-p P -n N]}")
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
opts=("$@")
[ ${#opts[@]} -eq 0 ] && opts=(-p 128 -n 32)
build=${LLAMA_BUILD:-$HOME/.cache/localcoder-llama.cpp}
bin=$build/build/bin/llama-bench
if [ ! -x "$bin" ]; then
  mkdir -p "$build"
  (cd "$build" && pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 &&
     tar xzf llama_cpp_python-0.3.36.tar.gz && rm -rf src && mv llama_cpp_python-0.3.36/vendor/llama.cpp src &&
     rm -rf llama_cpp_python-0.3.36 llama_cpp_python-0.3.36.tar.gz)
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$build/src" -B "$build/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" >"$build/cmake.log" 2>&1
  cmake --build "$build/build" --target llama-bench -j "$(nproc)" >"$build/build.log" 2>&1
fi
here=$(cd "$(dirname "$0")/.." && pwd)
drop() { if [ "${DROP_CACHES:-0}" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }
# llama-bench's -p/-n as given; its threads = localcoder's default (every core)
threads=$(nproc)
for _ in $(seq "$rounds"); do
  drop
  # shellcheck disable=SC2086
  "$bin" -m "$model" "${opts[@]}" -t "$threads" ${LLAMA_BENCH_ARGS:-} 2>/dev/null | grep -E '\| +(pp|tg)[0-9]+ ' |
    awk -F'|' '{gsub(/ +/, " ", $(NF-2)); gsub(/ +/, " ", $(NF-1)); print "llama.cpp " $(NF-2) $(NF-1) "tokens/s"}'
  drop
  # shellcheck disable=SC2086
  (cd "$here" && python -m localcoder bench -m "$model" "${opts[@]}" ${LOCALCODER_BENCH_ARGS:-} --json 2>/dev/null |
     tail -1) |
    python -c "import json, sys; d = json.load(sys.stdin); print('localcoder pp %.1f tg %.2f tokens/s, read %.1f GB/s, depth %d, kv %s' % (d['pp_tokens_per_s'], d['tg_tokens_per_s'], d['read_bandwidth_gbs'], d['depth'], d['kv_type']))"
done
