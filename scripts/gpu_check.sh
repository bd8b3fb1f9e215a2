#!/usr/bin/env bash
# The one prepared check for a machine with an NVIDIA GPU and no network:
#   scripts/gpu_check.sh [OUTDIR]
# prints the GPU and versions, builds the extension with the machine's own torch
# (pip install --no-build-isolation --no-deps .), runs the test suite (CUDA tests included),
# runs the benchmarks on CUDA, and writes logs + JSON + a summary into OUTDIR (default: $OUT,
# else ./gpu_out). Budget: well inside 9 minutes on an H100 (each step has its own timeout).
# Omniglot for the data tests: set MAMLPP_OMNIGLOT_ROOT, or carry a copy in ./gpu_data/omniglot.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-${OUT:-$REPO/gpu_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${MAMLPP_OMNIGLOT_ROOT:-}" ] && [ -d "$REPO/gpu_data/omniglot" ]; then
  export MAMLPP_OMNIGLOT_ROOT="$REPO/gpu_data/omniglot"
fi
export MAMLPP_CACHE_DIR="${MAMLPP_CACHE_DIR:-/tmp/mamlpp_cache}"
START=$(date +%s)
status() { printf '%-10s %-6s %5ss  %s\n' "$1" "$2" "$(( $(date +%s) - START ))" "$3" | tee -a "$OUTDIR/summary.txt"; }
: > "$OUTDIR/summary.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  nvcc --version | tail -2
  echo "omniglot root: ${MAMLPP_OMNIGLOT_ROOT:-<default>}"
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

# 1. build (the machine's own torch; nothing downloaded)
cd "$REPO"
if timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -v . > "$OUTDIR/build.log" 2>&1; then
  status build ok "$(grep -m1 'mamlpp_ext build\] building' "$OUTDIR/build.log" | cut -c1-120)"
else
  status build FAIL "see build.log"; tail -40 "$OUTDIR/build.log"; exit 1
fi

# Run from outside the checkout so the installed package (with _C) is imported, not ./mamlpp_ext.
cd "$OUTDIR"
"$PY" -c "import mamlpp_ext; print('installed:', mamlpp_ext.__file__, mamlpp_ext.build_info())" | tee -a "$OUTDIR/env.txt"

# 2. tests: the whole suite (CUDA tests run here; CPU ones too, as a cross-check)
timeout 240 "$PY" -m pytest "$REPO/tests" -q -rs -p no:cacheprovider > "$OUTDIR/tests.log" 2>&1
rc=$?
status tests "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(tail -1 "$OUTDIR/tests.log")"

# 3. benchmarks on CUDA
timeout 180 "$PY" "$REPO/benchmarks/inner_loop.py" --device cuda --json "$OUTDIR/bench.json" > "$OUTDIR/bench.log" 2>&1
rc=$?
status bench "$([ $rc = 0 ] && echo ok || echo FAIL)" "bench.log / bench.json"

echo; echo "== summary ($(( $(date +%s) - START )) s) =="
cat "$OUTDIR/summary.txt"
echo; grep -A40 '^## ' "$OUTDIR/bench.log" | head -80
