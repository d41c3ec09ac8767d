#!/usr/bin/env bash
# Every GPU figure the issues ask for, on one CUDA device, printed as one table:
#   1. head overhead, every loss vs normalised linear + CE, C = 100 000 and 1 000 000 (head_overhead.py)
#   2. JPEG decode: DataLoader workers vs nvJPEG on the device (gpu_decode.py)
#   3. iresnet50 / iresnet100 training samples/s at batch 128 through facemargin.train's path:
#      bf16 CPU decode (baseline) vs device decode, vs fp32, vs channels-last, vs compile (gpu_train.py)
#   4. peak GPU memory of Partial FC at world 1, sample_rate 1.0 / 0.2 / 0.1 (partial_fc_memory.py)
# Budget: under 8 minutes on one H100 (the compile rows are most of it). Not a test run: the
# pytest suite is not part of it.
#
#   benchmarks/gpu_check.sh OUT_DIR             # or: GPU_CHECK_OUT=OUT_DIR benchmarks/gpu_check.sh
#   benchmarks/gpu_check.sh --dry-run OUT_DIR   # every piece, tiny, on the CPU: checks the script itself
#
# OUT_DIR receives one JSON per piece, gpu_check.json and gpu_check.md (the table) and
# gpu_check.log. PYTHON (default: python) runs the pieces; GPU_CHECK_CACHE is where the demo face
# set is generated once (default: $TMPDIR/facemargin-gpu-check). It stops at once, before any
# piece runs, without an output folder (exit 2), without CUDA unless --dry-run (exit 3), or when
# a package it needs is missing (exit 4).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out="${1:-${GPU_CHECK_OUT:-}}"
if [[ -z "$out" ]]; then
  echo "gpu_check: no output folder: benchmarks/gpu_check.sh [--dry-run] OUT_DIR (or GPU_CHECK_OUT=OUT_DIR)" >&2
  exit 2
fi
if [[ -d "$here/../src/facemargin" ]]; then  # a checkout: use its sources
  export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ["torch", "torchvision", "lightning", "hydra", "omegaconf", "timm", "simplejpeg", "facemargin"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
) || missing="python ($PY) itself"
if [[ -n "$missing" ]]; then
  echo "gpu_check: $PY lacks: $missing (pip install -e . in the checkout, or carry the wheels); nothing was run" >&2
  exit 4
fi
if [[ $dry == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False with $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1)). Run it on a GPU machine; --dry-run runs every piece tiny on the CPU." >&2
  exit 3
fi
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1

start=$SECONDS
current=""
trap 'echo "gpu_check: FAILED in step \"$current\" after $((SECONDS - start)) s (see $out/gpu_check.log)" >&2' ERR
step() {
  current=$1; shift
  local t0=$SECONDS
  echo "== $current: $PY $*"
  "$PY" "$@"
  echo "== $current: $((SECONDS - t0)) s"
}

if [[ $dry == 1 ]]; then
  step "head overhead (dry run)" "$here/head_overhead.py" --device cpu --classes 1000 --dim 32 --batch 16 \
    --repeats 2 --warmup 1 --only "arcface,curricularface" --json "$out/1_head_overhead.json"
  step "JPEG decode (dry run)" "$here/gpu_decode.py" --device cpu --images 64 --batch 16 --workers 0 --repeats 1 \
    --json "$out/2_gpu_decode.json"
  step "training samples/s (dry run)" "$here/gpu_train.py" --dry-run --json "$out/3_gpu_train.json"
  step "Partial FC memory (dry run)" "$here/partial_fc_memory.py" --dry-run --json "$out/4_partial_fc_memory.json"
else
  step "head overhead, C = 100 000" "$here/head_overhead.py" --device cuda --classes 100000 --repeats 10 \
    --json "$out/1_head_overhead_100k.json"
  step "head overhead, C = 1 000 000" "$here/head_overhead.py" --device cuda --classes 1000000 --repeats 10 \
    --json "$out/1_head_overhead_1m.json"
  step "JPEG decode" "$here/gpu_decode.py" --device cuda --images 8192 --batch 128 --workers 8 --repeats 3 \
    --json "$out/2_gpu_decode.json"
  step "training samples/s" "$here/gpu_train.py" --backbones iresnet50,iresnet100 --batch 128 --workers 8 \
    --budget-s 330 --json "$out/3_gpu_train.json"
  step "Partial FC memory" "$here/partial_fc_memory.py" --device cuda --num-classes 1000000 --batch-size 128 \
    --json "$out/4_partial_fc_memory.json"
fi
current="report"
echo
"$PY" "$here/gpu_report.py" "$out"
echo
echo "gpu_check: $((SECONDS - start)) s in all; table in $out/gpu_check.md, rows in $out/gpu_check.json"
