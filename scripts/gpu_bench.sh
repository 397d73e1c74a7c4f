#!/usr/bin/env bash
# One prepared GPU benchmark run: `bash scripts/gpu_bench.sh` from the repository root (vishwam need not be
# pip-installed: it runs with PYTHONPATH=.). Writes gpu_bench.json / gpu_bench.log under $OUT (default
# outputs/gpu_bench, git-ignored) and prints the markdown table last.
#
# 1. machine and versions (nvidia-smi, python, jax, torch, jax.devices());
# 2. `python -m benchmarks.bench --size gpu --dtype bfloat16` (Qwen2.5-0.5B-shaped student under a Qwen2.5-1.5B-shaped
#    teacher, batch 8 × seq 1024): the torch step first in its own process, then the vishwam step;
# 3. only if a side failed in pass 2 (an out-of-memory, say) and time is left: the same at batch 4, so that both
#    frameworks are still compared at one shape (gpu_bench_b4.json / .log).
# Everything ends by ~7 minutes (DEADLINE_S) whatever happens: each python command runs under `timeout`.
# BENCH_EXTRA_ARGS is appended to the bench's arguments (for a CPU smoke test of this script:
# BENCH_EXTRA_ARGS="--shrink --seq 16 --steps 1 --warmup 1 --matmul-n 256").
set -o pipefail
set -u

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/outputs/gpu_bench}"
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE_S="${DEADLINE_S:-420}"
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }

if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The torch step runs (and exits) before JAX starts, so XLA may take 90% of the GPU instead of its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
unset JAX_COMPILATION_CACHE_DIR  # compile times must not come from a persistent cache

echo "=== machine ($(date -u +%FT%TZ))"
nvidia-smi -L || echo "nvidia-smi: not available"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
echo "cores: $(nproc)   python: $PYTHON"
timeout -k 5 60 "$PYTHON" - <<'EOF' || echo "warning: the version check failed (exit $?)"
import sys, jax, jaxlib, equinox, optax, numpy, torch, transformers
print("python", sys.version.split()[0], "| jax", jax.__version__, "| jaxlib", jaxlib.__version__, "| equinox",
      equinox.__version__, "| optax", optax.__version__, "| numpy", numpy.__version__)
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available(),
      "| transformers", transformers.__version__)
print("jax.devices():", jax.devices())
EOF

# The bench at one batch; its own log and JSON. $1 = tag, $2 = batch, $3 = time limit (s).
bench() {
  local tag=$1 batch=$2 limit=$3
  echo
  echo "=== python -m benchmarks.bench --size gpu --dtype bfloat16 --batch $batch (limit ${limit} s)"
  timeout -k 10 "$limit" "$PYTHON" -m benchmarks.bench --size gpu --dtype bfloat16 --batch "$batch" --steps 10 \
    --warmup 2 --torch-timeout "$((limit / 2))" --json "$OUT/$tag.json" ${BENCH_EXTRA_ARGS:-} 2>&1 \
    | tee "$OUT/$tag.log"
  local rc=$?
  echo "=== exit status $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
  return "$rc"
}

# The last markdown table in a log.
table() { awk '/^\| size \| metric /{buf=""; on=1} on && /^\|/{buf=buf $0 "\n"; next} on{on=0} END{printf "%s", buf}' "$1"; }

# Whether a JSON says one side of the gpu size failed (exit 0: yes).
failed() {
  "$PYTHON" -c 'import json,sys; s=json.load(open(sys.argv[1]))["sizes"]["gpu"]; sys.exit(0 if any(isinstance(s[k], dict) and "error" in s[k] for k in ("vishwam","torch")) else 1)' "$1" 2>/dev/null
}

bench gpu_bench 8 $(( $(left) - 20 < 300 ? $(left) - 20 : 300 ))
rc=$?

second=""
if [ -f "$OUT/gpu_bench.json" ] && failed "$OUT/gpu_bench.json"; then
  if [ "$(left)" -gt 150 ]; then
    echo "=== a side failed at batch 8: once more at batch 4 ($(left) s left)"
    bench gpu_bench_b4 4 $(( $(left) - 10 ))
    second="$OUT/gpu_bench_b4.log"
  else
    echo "=== a side failed at batch 8, and too little time is left for batch 4"
  fi
fi

echo
echo "=== done in $(( $(date +%s) - START )) s; files in $OUT"
if [ -n "$second" ]; then
  echo "--- batch 8 (the failed pass), its key rows:"
  table "$OUT/gpu_bench.log" | grep -E "FAILED|step \||throughput|MFU|matmul peak|device peak" || true
  echo
  echo "--- batch 4:"
  table "$second"
else
  table "$OUT/gpu_bench.log"
fi
exit "$rc"
