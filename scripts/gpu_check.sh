#!/usr/bin/env bash
# The GPU check, in one call on a fresh GPU machine (about 5-8 minutes on an H100/H200):
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--out DIR]
#
# 1. sets up the project against the CUDA build of torch already on the machine: a venv with
#    --system-site-packages and `pip install -e . --no-deps` (torch is never replaced; a missing package is
#    reported, and one the bench can do without only drops the pipeline row);
# 2. `dr2 verify-fixtures` (the golden fixtures, CPU reference path), then the same fixtures on the device:
#    fp32 within 1e-4 (TF32 off), bf16 and fp16 within their measured bands (dr2/verify.py DEVICE_BANDS);
# 3. face detection on the device against the CPU paths on the same photos (max differences against
#    pipeline/imaging/mtcnn.py's stated tolerances) and the device's detection images/s on 2 MP photos at batch 8 and 32
#    (benchmarks/bench_detect.py --check, under a minute; needs scikit-image, matplotlib and the facenet-pytorch
#    weights: installed, or carried as .venv/lib/python3*/site-packages/facenet_pytorch);
# 4. `dr2 bench` at full size (random weights) for batch sizes 8,32 in fp32 and bf16 (plus bf16 compiled),
#    writing bench.md / bench.json / verify_*.txt / detect_check.txt / the log to DIR (default gpu_check_out/).
#
# `--device cpu` is the dry run: tiny models, batch 4 (a few minutes on 2 busy cores).
set -euo pipefail

DEVICE=cuda
OUT=gpu_check_out
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

# --- 1. environment -------------------------------------------------------------------------------------------
step "environment"
if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python  # an existing project venv (the CPU dry run here)
else
  PYSYS="$(command -v python3 || command -v python)"
  VENV="${GPU_CHECK_VENV:-$ROOT/.gpu-venv}"
  [[ -x "$VENV/bin/python" ]] || "$PYSYS" -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . \
    || "$PY" -m pip install --quiet --no-deps -e . \
    || echo "WARNING: editable install failed; running from the source tree (PYTHONPATH)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import importlib, torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
missing = [m for m in ("numpy", "safetensors", "PIL", "cv2", "webdataset", "ray", "pyarrow", "skimage")
           if importlib.util.find_spec(m) is None]
print("missing:", ", ".join(missing) or "none")
EOF
MISSING=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('numpy','safetensors','PIL','cv2','webdataset','ray','pyarrow') if u.find_spec(m) is None))")
if [[ -n "$MISSING" ]]; then
  # Try the index once (short timeout: a sealed machine has none), never touching torch.
  declare -A PIP=([PIL]=pillow [cv2]=opencv-python-headless [ray]="ray[data]")
  pkgs=(); for m in $MISSING; do pkgs+=("${PIP[$m]:-$m}"); done
  "$PY" -m pip install --quiet --timeout 10 --retries 0 "${pkgs[@]}" 2>/dev/null || echo "could not install: ${pkgs[*]}"
fi
BENCH_EXTRA=()
if ! "$PY" -c "import ray, webdataset, cv2, pyarrow, PIL" 2>/dev/null; then
  echo "the pipeline's packages are missing: the bench runs without its end-to-end pipeline row"
  BENCH_EXTRA+=(--skip-pipeline)
fi
DR2=("$PY" -m jobs.cli)

# --- 2. golden fixtures -----------------------------------------------------------------------------------------
step "dr2 verify-fixtures (reference path)"
"${DR2[@]}" verify-fixtures | tee "$OUT/verify_fixtures.txt" | tail -3

if [[ "$DEVICE" == cpu ]]; then
  PRECISIONS=fp32,bf16; BATCHES=4; EXTRA=(--repeats 1 --pipeline-images 4)
else
  PRECISIONS=fp32,bf16; BATCHES=8,32; EXTRA=(--repeats 2 --pipeline-images 32)
  step "no host synchronisation inside the sampling loop (torch.cuda.set_sync_debug_mode('error'))"
  "$PY" - <<'EOF' | tee "$OUT/sync_check.txt"
import torch
from dr2.diffusion import SpacedDiffusion
from dr2.lowpass import LowPass
from dr2.restorer import DR2Restorer
from dr2.sampling import KeyedNoise, dr2_sample
r = DR2Restorer.tiny_random(device="cuda", precision="bf16", batch_size=4)
y = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
noise = KeyedNoise([f"k{i}" for i in range(4)], device="cuda")
lp = LowPass(image_size=64, N=8).to("cuda")
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    dr2_sample(r.unet, y, SpacedDiffusion(), N=8, tau=35, noise=noise, lowpass=lp)
torch.cuda.set_sync_debug_mode("default")
print("sampling loop: no host synchronisation (26 steps, batch 4, bf16)")
EOF
fi

# --- 3. the bench -----------------------------------------------------------------------------------------------
step "golden fixtures on $DEVICE in fp32 / bf16 / fp16"
DEVICE="$DEVICE" OUT="$OUT" "$PY" - <<'EOF'
import os, sys
from pathlib import Path
from dr2.verify import format_table, verify_on_device
results = [r for p in ("fp32", "bf16", "fp16")
           for r in verify_on_device(Path("tests/fixtures/dr2_reference"), device=os.environ["DEVICE"], precision=p)]
table = format_table(results)
print(table)
Path(os.environ["OUT"], "verify_device.txt").write_text(table + "\n")
sys.exit(0 if all(r.passed for r in results) else 1)
EOF
step "face detection on $DEVICE against the CPU paths; images/s on 2 MP photos"
DETECT_PATH="$PYTHONPATH"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('facenet_pytorch') is None)" 2>/dev/null; then
  # the weights only (the package is never imported): a carried copy of the local venv's, else the index, once
  CARRIED=$(ls -d "$ROOT"/.venv/lib/python3*/site-packages/facenet_pytorch 2>/dev/null | head -1 || true)
  if [[ -n "$CARRIED" ]]; then
    LINKS=$(mktemp -d) && ln -s "$CARRIED" "$LINKS/facenet_pytorch" && DETECT_PATH="$LINKS:$PYTHONPATH"
  else
    "$PY" -m pip install --quiet --timeout 10 --retries 0 --no-deps facenet-pytorch==2.6.0 2>/dev/null || true
  fi
fi
if PYTHONPATH="$DETECT_PATH" "$PY" -c "import skimage, matplotlib, cv2; from pipeline.imaging.mtcnn import mtcnn_weights_dir as w; w()" \
    2>/dev/null; then
  if [[ "$DEVICE" == cpu ]]; then DETECT_BATCHES=2; else DETECT_BATCHES=8,32; fi
  PYTHONPATH="$DETECT_PATH" timeout 240 "$PY" benchmarks/bench_detect.py --check --device "$DEVICE" \
    --threads "$(nproc)" --batches "$DETECT_BATCHES" --repeats 3 | tee "$OUT/detect_check.txt" \
    || echo "detection check: a difference out of tolerance, a failure or a timeout (see above)"
else
  echo "detection check skipped: needs scikit-image, matplotlib, opencv and the facenet-pytorch weights"
fi

step "dr2 bench --device $DEVICE --precision $PRECISIONS --batch-size $BATCHES"
"${DR2[@]}" bench --device "$DEVICE" --precision "$PRECISIONS" --batch-size "$BATCHES" "${EXTRA[@]}" \
  ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"} --out "$OUT"
if [[ "$DEVICE" != cpu ]]; then
  step "dr2 bench, bf16 compiled (torch.compile, cost in the header)"
  timeout 120 "${DR2[@]}" bench --device "$DEVICE" --precision bf16 --batch-size 32 --compile --skip-pipeline \
    --repeats 2 --out "$OUT/compiled" || echo "compiled bench did not finish in 120 s (see the log)"
fi
step "done: $OUT"
ls -l "$OUT"
