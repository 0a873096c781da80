#!/usr/bin/env bash
# GPU checks of inference speed and memory, in one go (under 8 minutes on an H100, no network):
#   1. the tests that use CUDA (tiny models: half precision, tiling, torch.compile),
#   2. the Triton EAC (explicitly and as dispatched for CUDA tensors) against the float64
#      reference at latent sizes (scripts/gpu_check_eac.py is the EAC's own, longer check),
#   3. benchmarks/bench_inference.py's GPU table (full-size random-weight models),
#   4. the targets: 512², 50 steps, guidance 1: <= 3 s/image, >= 4x faster than fp32 eager,
#      peak <= 6 GB; 2048² tiled: peak <= 12 GB.
#
# Python packages the GPU machine may lack travel as wheels in .whl/ (ignored by git). Prepare
# them where pip reaches PyPI (pure-Python wheels; the machine's Python was 3.12):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata lazy-importer
# Only the wheels of distributions that are not installed there are installed.
#
# Usage: bash scripts/gpu_check_inference.sh     (writes logs and JSON to $OUT when it is set)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
START=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-470}  # whole script
elapsed() { echo $(( $(date +%s) - START )); }
PY=python3
command -v $PY >/dev/null || PY=python
STATUS=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  MISSING=$($PY - <<'EOF'
import glob, importlib.metadata as md, os
for path in sorted(glob.glob(".whl/*.whl")):
    name = os.path.basename(path).split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
EOF
)
  if [ -n "$MISSING" ]; then
    echo "installing from .whl: $(echo $MISSING | tr '\n' ' ')"
    SITE=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $MISSING \
      && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
$PY - <<'EOF' || { echo "cannot import the project's dependencies: stopping"; exit 2; }
import torch, diffusers, transformers, safetensors
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, cuda available: {torch.cuda.is_available()}")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF

echo
echo "== tests that use CUDA  ($(elapsed) s)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests -k "cuda" -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU tests: FAILED or timed out"; STATUS=1; }

echo
echo "== Triton EAC vs float64 reference at latent sizes  ($(elapsed) s)"
timeout 60 $PY - <<'EOF' 2>&1 | tee "$OUT/eac_check.log"
import torch
from deblurdiff.ops import eac
from deblurdiff.ops.eac import eac_reference
tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
gen = torch.Generator("cuda").manual_seed(0)
ok = True
for shape in [(1, 4, 64, 64), (2, 4, 128, 96), (1, 4, 256, 256)]:
    b, c, h, w = shape
    x = torch.randn(shape, device="cuda", generator=gen)
    k = torch.randn(b, c * 25, h, w, device="cuda", generator=gen) / 5
    ref = eac_reference(x.double(), k.double(), residual=True)
    for dtype, t in tol.items():
        for backend in ("triton", None):
            out = eac(x.to(dtype), k.to(dtype), residual=True, backend=backend)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            good = out.dtype == dtype and err < t
            ok &= good
            print(f"  {str(shape):<18} {str(dtype):<15} {backend or 'auto':<6} max rel err {err:.2e} "
                  f"{'ok' if good else 'FAIL'}")
print("EAC:", "ok" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || STATUS=1

echo
LEFT=$(( LIMIT - $(elapsed) ))
echo "== inference benchmark, full-size random-weight models  ($(elapsed) s; ${LEFT} s left)"
# Stop starting new configurations ~100 s before the end, so the table is always printed.
timeout $(( LEFT > 30 ? LEFT : 30 )) $PY benchmarks/bench_inference.py --preset gpu \
  --budget-s $(( LEFT > 160 ? LEFT - 100 : 60 )) --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "benchmark: FAILED or timed out"; STATUS=1; }

echo
echo "== targets  ($(elapsed) s)"
$PY - "$OUT/bench_gpu.json" <<'EOF' || STATUS=1
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"no benchmark results: {exc}"); raise SystemExit(1)
ok_rows = [r for r in rows if r["status"] == "ok"]
def pick(size, pred):
    c = [r for r in ok_rows if r["size"] == size and pred(r)]
    return min(c, key=lambda r: r["image_s"]) if c else None
base = pick(512, lambda r: r["name"].startswith("fp32 eager"))
best = pick(512, lambda r: r["sampler"] == "ddpm" and r["dtype"] != "fp32" and not r["tiled"])
tiled = pick(2048, lambda r: r["tiled"] and r["sampler"] == "ddpm")
checks = []
if base and best:
    checks += [
        (f"512², DDPM 50, guidance 1: {best['image_s']:.2f} s/image ({best['name']})", best["image_s"] <= 3.0, "<= 3 s"),
        (f"speed-up over fp32 eager: {base['image_s'] / best['image_s']:.2f}x", base["image_s"] / best["image_s"] >= 4.0, ">= 4x"),
        (f"peak memory: {best['peak_gb']:.2f} GB", best["peak_gb"] <= 6.0, "<= 6 GB"),
    ]
if tiled:
    checks.append((f"2048² tiled peak memory: {tiled['peak_gb']:.2f} GB ({tiled['name']})", tiled["peak_gb"] <= 12.0, "<= 12 GB"))
if not checks:
    print("targets: not measured"); raise SystemExit(1)
for text, good, target in checks:
    print(f"  {'PASS' if good else 'MISS'}  {text}  (target {target})")
raise SystemExit(0 if all(g for _, g, _ in checks) else 1)
EOF

echo
echo "done in $(elapsed) s, status $STATUS"
exit $STATUS
