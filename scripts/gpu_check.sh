#!/usr/bin/env bash
# Every GPU check of the project in one go: one GPU (sized for an H200), no network, at most
# 8 minutes. Each step has its own time limit, and steps that would start too late are skipped.
#   1. EAC: the Triton kernels against the float64 reference (every dtype), and their bandwidth
#      against the device's copy bandwidth          scripts/gpu_check_eac.py
#   2. the tests that use CUDA (tiny models: half precision, tiling, torch.compile)
#   3. the 512² inference table: fp32 eager, fp16 (PSNR against fp32), bf16, channels-last,
#      torch.compile, DPM-Solver++/DDIM, and the targets (<= 3 s/image, >= 4x, peak <= 6 GB)
#                                                   benchmarks/bench_inference.py
#   4. AoTI: export and compile time of the full-size networks, compiled against eager
#      (error and speed)                             scripts/gpu_check_aoti.py
#   5. fp16 peak memory of untiled calls, fitted     benchmarks/bench_peak_memory.py
#   6. batch throughput at 512² (batch 1, 2, 4, 8)  benchmarks/bench_throughput.py, when present
# Writes one log per step and summary.txt under $OUT (default ./gpu_results); prints the summary.
#
# Packages the GPU machine lacks travel as wheels in .whl/ (ignored by git). Where pip reaches
# PyPI, fetch them (for that machine's Python 3.12, x86-64) with
#   bash scripts/gpu_check.sh --wheels
# On the GPU machine the wheels of distributions that are missing, or there at another version,
# are installed into a temporary folder put first on PYTHONPATH.
#
# Usage: bash scripts/gpu_check.sh [--wheels]     (GPU_CHECK_LIMIT_S: the whole budget, default 465)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${GPU_CHECK_PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

# Versions of the carried wheels: the project's pins, and for their dependencies this machine's.
WHEEL_PINNED=(diffusers transformers ftfy)
WHEEL_DEPS=(importlib_metadata lazy-importer wcwidth)

if [ "${1:-}" = "--wheels" ]; then
  specs=()
  for name in "${WHEEL_PINNED[@]}"; do
    spec=$(grep -iE "^$name==" requirements.txt | cut -d';' -f1 | tr -d ' ')
    [ -n "$spec" ] || { echo "error: $name is not pinned in requirements.txt"; exit 2; }
    specs+=("$spec")
  done
  for name in "${WHEEL_DEPS[@]}"; do
    version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
      || { echo "error: $name is not installed here; install it or pin its version in scripts/gpu_check.sh"; exit 2; }
    specs+=("$name==$version")
  done
  mkdir -p .whl
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}" || exit 1
  echo "wheels in .whl/ ($(du -sh .whl | cut -f1)): ${specs[*]}"
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu_check.sh [--wheels]"
  exit 2
fi

OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT" || { echo "error: cannot create $OUT"; exit 2; }
START=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-465}
elapsed() { echo $(($(date +%s) - START)); }
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
RESULTS=()
STATUS=0

# Carried wheels: only those not installed here at the same version.
if ls .whl/*.whl >/dev/null 2>&1; then
  WANTED=$($PY - <<'EOF'
import glob, importlib.metadata as md, os
for path in sorted(glob.glob(".whl/*.whl")):
    name, version = os.path.basename(path).split("-")[:2]
    try:
        if md.version(name) == version:
            continue
    except md.PackageNotFoundError:
        pass
    print(path)
EOF
)
  if [ -n "$WANTED" ]; then
    SITE=$(mktemp -d)
    # shellcheck disable=SC2086  # one path per word
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $WANTED; then
      export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
      echo "installed from .whl: $(basename -a $WANTED | tr '\n' ' ')"
    else
      echo "warning: the wheels in .whl/ could not be installed"
    fi
  fi
fi

# No GPU, no checks: say so before anything else runs.
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if ! $PY -c 'import torch' 2>/dev/null; then
    note "error: $PY cannot import torch; the GPU checks need PyTorch with CUDA"
  else
    note "error: no CUDA GPU is visible to PyTorch ($($PY -c 'import torch; print(torch.__version__)')): these are GPU checks, nothing was run"
    nvidia-smi -L >/dev/null 2>&1 || note "       (nvidia-smi finds no GPU either)"
  fi
  exit 2
fi
$PY - <<'EOF' 2>&1 | tee -a "$SUMMARY" || { note "error: the project's dependencies cannot be imported (see above; run --wheels where pip works and carry .whl/)"; exit 2; }
import platform, torch, diffusers, transformers
import triton
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")
EOF

# step NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit (no more than what is left),
# its output in $OUT/LOG.
step() {
  local name=$1 limit=$2 log=$3 left rc t0
  shift 3
  left=$((LIMIT - $(elapsed)))
  if [ "$left" -lt 20 ]; then
    RESULTS+=("SKIP     $name (no time left)")
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo
  echo "== $name  (at $(elapsed) s, limit $limit s) -> $OUT/$log"
  t0=$(date +%s)
  # timeout signals the command's whole process group (compile workers included).
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) RESULTS+=("PASS     $name ($(($(date +%s) - t0)) s)") ;;
    124 | 137) RESULTS+=("TIMEOUT  $name (limit $limit s; partial output in $log)"); STATUS=1 ;;
    *) RESULTS+=("FAIL     $name (exit $rc; see $log)"); STATUS=1 ;;
  esac
}

THROUGHPUT=benchmarks/bench_throughput.py
# Step limits (seconds) sum to the budget; they are first estimates for an H200 (no GPU run
# yet), to be refitted from the durations in summary.txt.
AOTI_LIMIT=100
[ -f "$THROUGHPUT" ] || AOTI_LIMIT=145  # its time goes to the compile step

step "EAC: correctness and bandwidth vs copy" 60 eac.log \
  $PY scripts/gpu_check_eac.py --no-sweep --bench-dtypes float32,float16,bfloat16

# Test files with CUDA tests; --continue-on-collection-errors: a file importing what this machine
# lacks (gradio, say) does not stop the others.
CUDA_TESTS=$(grep -l "cuda.is_available" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step "tests that use CUDA" 45 tests.log \
  $PY -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors $CUDA_TESTS -k cuda

# No configuration starts after 60 s (a torch.compile one takes a minute or two to warm up), so
# the table and its JSON are written within the step's limit.
step "512² inference table (fp16 PSNR vs fp32)" 170 inference_512.log \
  $PY benchmarks/bench_inference.py --preset gpu --sizes 512 --budget-s 60 --json "$OUT/inference_512.json"

step "AoTI: compile time and speed (full size, bf16, batch 1)" $AOTI_LIMIT aoti.log \
  $PY scripts/gpu_check_aoti.py --size full --dtype bf16 --batches 1

step "fp16 peak memory" 45 peak_memory.log \
  $PY benchmarks/bench_peak_memory.py --device cuda --dtype fp16 --sizes 512,1024 --guided-sizes 512

if [ -f "$THROUGHPUT" ]; then
  step "batch throughput at 512² (batch 1, 2, 4, 8)" 45 throughput.log $PY "$THROUGHPUT" --device cuda
else
  RESULTS+=("SKIP     batch throughput ($THROUGHPUT not in this checkout)")
fi

# The targets, from the 512² table.
TARGETS=$($PY - "$OUT/inference_512.json" <<'EOF'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1])) if r["status"] == "ok" and r["size"] == 512]
except (OSError, ValueError) as exc:
    print(f"  no 512² results: {exc}"); raise SystemExit(1)
def best(pred):
    c = [r for r in rows if pred(r)]
    return min(c, key=lambda r: r["image_s"]) if c else None
base = best(lambda r: r["name"].startswith("fp32 eager"))
fast = best(lambda r: r["sampler"] == "ddpm" and r["dtype"] != "fp32" and not r["tiled"])
fp16 = best(lambda r: r["name"] == "fp16")
if not (base and fast):
    print("  targets: not measured"); raise SystemExit(1)
checks = [
    (f"512², DDPM 50, guidance 1: {fast['image_s']:.2f} s/image ({fast['name']})", fast["image_s"] <= 3.0, "<= 3 s"),
    (f"speed-up over fp32 eager: {base['image_s'] / fast['image_s']:.2f}x", base["image_s"] / fast["image_s"] >= 4.0, ">= 4x"),
    (f"peak memory: {fast['peak_gb']:.2f} GB", fast["peak_gb"] <= 6.0, "<= 6 GB"),
]
for text, good, target in checks:
    print(f"  {'PASS' if good else 'MISS'}  {text}  (target {target})")
if fp16:
    print(f"  fp16 at 512²: PSNR {fp16['psnr_db']} dB against fp32, {fp16['image_s']:.2f} s/image, peak {fp16['peak_gb']:.2f} GB")
raise SystemExit(0 if all(g for _, g, _ in checks) else 1)
EOF
) || STATUS=1

{
  echo
  echo "== steps"
  printf '%s\n' "${RESULTS[@]}"
  echo
  echo "== targets (512² table)"
  echo "$TARGETS"
  echo
  echo "== 512² table"
  grep '^|' "$OUT/inference_512.log" 2>/dev/null || echo "(none)"
  echo
  echo "== AoTI"
  sed -n '/^ *network /,$p' "$OUT/aoti.log" 2>/dev/null || echo "(none)"
  echo
  echo "done in $(elapsed) s, status $STATUS; logs in $OUT"
} | tee -a "$SUMMARY"
exit $STATUS
