#!/usr/bin/env bash
# Suspected label errors on ants and bees, and the probe zoo again without them (docs/label_issues.md).
#
#   bash examples/label_issues.sh [DATA] [OUT]
#
# 1. The probe zoo (examples/hymenoptera_probes.toml, 5 folds): its OUT/base/label_issues.csv is
#    cleanlab's default flagged set on the fitted ensemble's out-of-fold probabilities.
# 2. The exclusion list, by the rule fixed before any excluded run was scored: cleanlab's default set;
#    where it is empty, cleanlab's `predicted_neq_given` set on the same probabilities (the images
#    whose given label the ensemble's out-of-fold prediction contradicts).
# 3. The same zoo with --exclude, the same folds less those images; val/ stays the untouched holdout.
# 4. The table of docs/label_issues.md and a contact sheet of the 24 most suspect images.
set -euo pipefail
DATA=${1:-../shared/datasets/hymenoptera}
OUT=${2:-runs/label_issues}
ZOO=examples/hymenoptera_probes.toml

zoo run "$DATA" --zoo "$ZOO" --folds 5 --out "$OUT/base"
cp "$OUT/base/label_issues.csv" "$OUT/exclude.csv"
if [ "$(wc -l < "$OUT/exclude.csv")" -le 1 ]; then
  echo "cleanlab's default flags nothing: excluding its predicted_neq_given set instead"
  zoo label-issues "$OUT/base/ensemble.json" --filter-by predicted_neq_given --out "$OUT/exclude.csv"
fi
zoo run "$DATA" --zoo "$ZOO" --folds 5 --exclude "$OUT/exclude.csv" --out "$OUT/excluded"
python examples/label_issues_sheet.py "$OUT/base/ensemble.json" "$DATA" "$OUT/suspects.jpg"
python examples/label_issues_table.py "$OUT/base" "$OUT/excluded"
