#!/usr/bin/env bash
# The one prepared check for a machine with an NVIDIA GPU and no network:
#   scripts/gpu_check.sh [OUTDIR]
# 1. prints the GPU and versions; 2. builds the extension with the machine's own torch
# (pip install --no-build-isolation --no-deps ., MAX_JOBS = cores, arch = this GPU's);
# then, what the graph-mode issue needs measured first:
# 3. graph: the graph-mode CUDA tests (replay equals eager, no sync during replay);
# 4. graph-bench: the meta-step benchmark on CUDA with graph-mode rows (graph_bench.json) and a
#    torch.profiler summary of one eager batched and fused step (profile_*.json);
# 5. train: Omniglot 5-way 1-shot, full public schedule, graph mode, for TRAIN_SECONDS (default
#    240), stopped with SIGTERM (which checkpoints; continue with --resume in a later slot), and
#    evaluated on the 600 test tasks;
# then the rest:
# 6. calls the ops with bad arguments, one child process per call (scripts/probe_error_paths.py);
# 7. runs the other CUDA tests, then the rest of the suite (pytest-xdist when installed);
# 8. runs the other CUDA benchmarks (update, batch norm) into bench.json;
# 9. memory: the step peak per case, backend and recompute mode counted on the meta device, beside
#    a real step on the GPU (the live-storage count and torch.cuda.max_memory_allocated) and the
#    time with recompute off/steps/query (memory.json);
# 10. compiled: the compiled step (off by default; docs/compiled_step.md) in graph mode against the
#    graph-mode eager step, Omniglot 5-way and 20-way 1-shot (compiled.json; the first step of each
#    compiles: about a minute per graph on 16 cores, its time in the compile_s column).
# The task_conv, recompute, divergence and compiled-step CUDA tests run in step 7 (-k cuda).
# Writes at most 16 files into OUTDIR (default: $OUT, else ./gpu_out) and ends with a summary.
# Budget: steps 1-8 about 9-10 minutes on an H100, 9-10 about 8 more (each step has its own
# timeout); a 15-minute device slot runs SKIP="train probe tests" first, the rest in a second run.
# Omniglot: set MAMLPP_OMNIGLOT_ROOT, or carry a copy in ./gpu_data/omniglot; a preprocessed
# cache entry carried in ./gpu_data/omniglot_cache (meta.json + images-*.npy) saves decoding it.
# SKIP="graph graph-bench train probe cuda-tests tests bench memory compiled" skips steps by name.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-${OUT:-$REPO/gpu_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
SKIP="${SKIP:-}"
TRAIN_SECONDS="${TRAIN_SECONDS:-240}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${MAMLPP_OMNIGLOT_ROOT:-}" ] && [ -d "$REPO/gpu_data/omniglot" ]; then
  export MAMLPP_OMNIGLOT_ROOT="$REPO/gpu_data/omniglot"
fi
export MAMLPP_CACHE_DIR="${MAMLPP_CACHE_DIR:-/tmp/mamlpp_cache}"
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
status() { printf '%-10s %-6s %5ss  %s\n' "$1" "$2" "$(( $(date +%s) - START ))" "$3" | tee -a "$SUMMARY"; }
skipped() { case " $SKIP " in *" $1 "*) status "$1" skip "SKIP=$SKIP"; return 0;; esac; return 1; }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" || true
  nvcc --version | tail -2
  echo "cores: $(nproc); omniglot root: ${MAMLPP_OMNIGLOT_ROOT:-<default>}"
} > "$SUMMARY" 2>&1
cat "$SUMMARY"

# 2. build (the machine's own torch; nothing downloaded). Only this GPU's architecture unless
#    TORCH_CUDA_ARCH_LIST says otherwise: half the nvcc time of the default "8.0;9.0".
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "8.0;9.0")"
  export TORCH_CUDA_ARCH_LIST
fi
cd "$REPO"
build() { timeout 240 "$PY" -m pip install --no-build-isolation --no-deps -v . > "$OUTDIR/build.log" 2>&1; }
if build; then
  status build ok "arch $TORCH_CUDA_ARCH_LIST; $(grep -m1 'mamlpp_ext build\] building' "$OUTDIR/build.log" | cut -c1-100)"
elif grep -qi "license" "$OUTDIR/build.log"; then
  # pyproject's SPDX licence field needs setuptools >= 77; an older one (no network to upgrade)
  # reads the table form. This copy of the tree only: rewrite the field and build again.
  sed -i 's/^license = "MIT"$/license = { text = "MIT" }/; /^license-files = /d' pyproject.toml
  if build; then
    status build ok "arch $TORCH_CUDA_ARCH_LIST; licence field rewritten for setuptools < 77"
  else
    status build FAIL "see build.log"; tail -40 "$OUTDIR/build.log"; exit 1
  fi
else
  status build FAIL "see build.log"; tail -40 "$OUTDIR/build.log"; exit 1
fi

# Run from outside the checkout so the installed package (with _C) is imported, not ./mamlpp_ext.
cd "$OUTDIR"
if ! "$PY" -c "
import mamlpp_ext, torch
print('installed:', mamlpp_ext.__file__, mamlpp_ext.build_info())
assert mamlpp_ext.has_extension(), mamlpp_ext.extension_error()
assert mamlpp_ext.cuda_built(), 'CUDA kernels were not built'
" >> "$SUMMARY" 2>&1; then
  status import FAIL "$(tail -1 "$SUMMARY")"; exit 1
fi

# A carried preprocessing cache goes where load_omniglot will look for it on this machine.
if [ -d "$REPO/gpu_data/omniglot_cache" ] && [ -n "${MAMLPP_OMNIGLOT_ROOT:-}" ]; then
  "$PY" - "$REPO/gpu_data/omniglot_cache" <<'EOF' >> "$SUMMARY" 2>&1 || true
import os, shutil, sys
from pathlib import Path
from mamlpp_ext.data.loader import cache_folder
folder = cache_folder("omniglot", os.environ["MAMLPP_OMNIGLOT_ROOT"], cache_dir=os.environ["MAMLPP_CACHE_DIR"])
folder.mkdir(parents=True, exist_ok=True)
for f in Path(sys.argv[1]).iterdir():
    shutil.copy(f, folder / f.name)
print("omniglot cache placed in", folder)
EOF
fi

# 3. graph mode: replay equals eager, no host sync during replay (tests/test_graph_mode.py)
TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout 120"
if ! skipped graph; then
  timeout 150 "$PY" -m pytest "$REPO/tests/test_graph_mode.py" $TIMEOUT_OPT -q -rfEs --tb=short -p no:cacheprovider \
    > "$OUTDIR/tests_graph.log" 2>&1
  rc=$?
  status graph "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(tail -1 "$OUTDIR/tests_graph.log")"
fi

# 4. the meta-step on CUDA: eager and graph mode per backend, then where an eager step's time goes
if ! skipped graph-bench; then
  timeout 150 "$PY" "$REPO/benchmarks/meta_step.py" --device cuda --json "$OUTDIR/graph_bench.json" \
    > "$OUTDIR/graph_bench.log" 2>&1
  rc=$?
  timeout 90 "$PY" "$REPO/scripts/profile_step.py" --device cuda --out "$OUTDIR" > "$OUTDIR/profile.log" 2>&1 || rc=1
  status graph-bench "$([ $rc = 0 ] && echo ok || echo FAIL)" "graph_bench.log / profile_*.json"
fi

# 5. the public Omniglot 5-way 1-shot schedule on the GPU in graph mode, for as long as TRAIN_SECONDS allows
if ! skipped train && [ -n "${MAMLPP_OMNIGLOT_ROOT:-}" ]; then
  RUN=/tmp/mamlpp_gpu_run
  rm -rf "$RUN"
  {
    echo "== train: omniglot-5way-1shot, full public schedule, fused, cuda, graph mode, stopped after ${TRAIN_SECONDS}s"
    timeout -s TERM -k 30 "$TRAIN_SECONDS" "$PY" -m mamlpp_ext.training.train --preset omniglot-5way-1shot \
      --backend fused --device cuda --graph on --workers 4 --run-dir "$RUN" --no-progress --log-every 500
    echo "train exit: $?"
    echo "== metrics.csv"; cat "$RUN/metrics.csv" 2>/dev/null
    echo "== last train records"; grep '"kind": *"train"' "$RUN/metrics.jsonl" 2>/dev/null | tail -3
    grep '"kind": *"interrupt"' "$RUN/metrics.jsonl" 2>/dev/null | tail -1
    if [ -f "$RUN/checkpoints/best.json" ]; then TARGET="$RUN"; else TARGET="$RUN/checkpoints/latest.pt"; fi
    echo "== eval: $TARGET"
    timeout 90 "$PY" -m mamlpp_ext.training.evaluate "$TARGET" --device cuda --graph on
    echo "eval exit: $?"
  } > "$OUTDIR/train.log" 2>&1
  status train done "$(grep -m1 'test: accuracy' "$OUTDIR/train.log" | cut -c1-100) (train.log)"
fi

# 6. error paths: every bad call must raise, not kill the process (one child process per call)
PROBE_RC=0
if ! skipped probe; then
  timeout 150 "$PY" "$REPO/scripts/probe_error_paths.py" --device cpu --gdb > "$OUTDIR/probe.log" 2>&1
  PROBE_RC=$?
  timeout 60 "$PY" "$REPO/scripts/probe_error_paths.py" --device cuda >> "$OUTDIR/probe.log" 2>&1 || PROBE_RC=1
  status probe "$([ $PROBE_RC = 0 ] && echo ok || echo FAIL)" "$(grep -c CRASHED "$OUTDIR/probe.log") crashing calls (probe.log)"
fi

# 7. tests: the other CUDA tests first (one process), then the rest of the suite (xdist when installed);
#    when the probe saw crashes, the rejected-input tests are left to it (a crash kills a worker).
if ! skipped cuda-tests; then
  timeout 200 "$PY" -m pytest "$REPO/tests" -k "cuda and not test_graph_mode" $TIMEOUT_OPT -q -rfEs --tb=short -p no:cacheprovider \
    > "$OUTDIR/tests_cuda.log" 2>&1
  rc=$?
  status cuda-tests "$([ $rc = 0 ] && echo ok || echo FAIL)" "$(tail -1 "$OUTDIR/tests_cuda.log")"
fi
if ! skipped tests; then
  XDIST=""
  "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
  SEL="not cuda"
  [ "$PROBE_RC" = 0 ] || SEL="not cuda and not rejects_bad_input"
  timeout 180 "$PY" -m pytest "$REPO/tests" -k "$SEL" $XDIST $TIMEOUT_OPT -q -rfEs --tb=short -p no:cacheprovider \
    > "$OUTDIR/tests.log" 2>&1
  rc=$?
  status tests "$([ $rc = 0 ] && echo ok || echo FAIL)" "-k '$SEL': $(tail -1 "$OUTDIR/tests.log")"
fi

# 8. the other benchmarks on CUDA
if ! skipped bench; then
  timeout 150 "$PY" "$REPO/benchmarks/inner_loop.py" --device cuda --what update,batchnorm,host --json "$OUTDIR/bench.json" \
    > "$OUTDIR/bench.log" 2>&1
  rc=$?
  status bench "$([ $rc = 0 ] && echo ok || echo FAIL)" "bench.log / bench.json"
fi

# 9. memory per meta-step: the count (meta device) beside a real GPU step and the allocator's peak,
#    and the cost of recomputation (ResNet-12 included: it fits this GPU without recomputation)
if ! skipped memory; then
  timeout 300 "$PY" "$REPO/benchmarks/memory.py" --device cuda --memory-backends fused,batched \
    --memory-time-cases omniglot-5way-1shot,mini-imagenet-5way-1shot,mini-imagenet-5way-1shot-resnet12 \
    --json "$OUTDIR/memory.json" > "$OUTDIR/memory.log" 2>&1
  rc=$?
  status memory "$([ $rc = 0 ] && echo ok || echo FAIL)" "memory.log / memory.json"
fi

# 10. the compiled step in graph mode on CUDA
if ! skipped compiled; then
  timeout 300 "$PY" "$REPO/benchmarks/meta_step.py" --device cuda --meta-step-cases omniglot-5way-1shot,omniglot-20way-1shot \
    --meta-step-backends fused+graph,fused+graph+compiled,batched+graph \
    --json "$OUTDIR/compiled.json" > "$OUTDIR/compiled.log" 2>&1
  rc=$?
  status compiled "$([ $rc = 0 ] && echo ok || echo FAIL)" "compiled.log / compiled.json"
fi

echo; echo "== summary ($(( $(date +%s) - START )) s) =="
cat "$SUMMARY"
echo; grep -A40 '^## ' "$OUTDIR/bench.log" 2>/dev/null | head -80
