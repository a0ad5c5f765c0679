#!/usr/bin/env bash
# GPU check of the model pipeline (s3sparse.llm) on a small random Qwen3, offline.
#
#   bash examples/prune_model_gpu_check.sh [WORK_DIR]      (default WORK_DIR: /tmp/s3sparse-gpu-check)
#
# Needs: a CUDA build of s3sparse (build_info()['cuda'] True), transformers 5.x,
# safetensors, tokenizers, tqdm (pyyaml for the recipe step). Runs, on cuda:
#   1. prune 2:4 with true-obs, the whole model on the GPU;
#   2. the same with --offload (only the current block on the GPU);
#   3. sparsegpt with a recipe (4:8 on down_proj, coupled-2:4 on the MLP, block16-rows on o_proj);
#   4. checks: every pruned Linear of each saved model keeps its pattern, AutoModel loads it,
#      --offload gives the same weights as the on-GPU run up to round-off, eval perplexity on cuda;
#   5. the CUDA tests of the pipeline (pytest -m cuda tests/test_llm_pipeline.py).
# Any failure stops the script with a non-zero exit status; "GPU CHECK PASSED" at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/s3sparse-gpu-check}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu runs the same steps on the CPU (a dry run of this script without a GPU)
rm -rf "$WORK" && mkdir -p "$WORK"

echo "== environment"
$PY -c "import torch, transformers, s3sparse; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'); print('transformers', transformers.__version__); print('s3sparse', s3sparse.build_info()); import sys; dev = sys.argv[1]; assert dev == 'cpu' or torch.cuda.is_available(), 'no CUDA device'; assert dev == 'cpu' or s3sparse.build_info()['cuda'], 's3sparse was built without CUDA kernels'" "$DEVICE"

echo "== tiny Qwen3 (4 blocks, hidden 256)"
$PY examples/make_tiny_qwen3.py "$WORK/qwen3" --hidden 256 --layers 4

COMMON=(--calib pydoc:calib --n-samples 32 --seq-len 256 --no-progress)

echo "== 1. true-obs 2:4 on $DEVICE"
time $PY -m s3sparse prune "$WORK/qwen3" --out "$WORK/tobs" --pattern 2:4 --method true-obs --device "$DEVICE" "${COMMON[@]}"

echo "== 2. true-obs 2:4 on $DEVICE with --offload"
time $PY -m s3sparse prune "$WORK/qwen3" --out "$WORK/tobs-offload" --pattern 2:4 --method true-obs --device "$DEVICE" --offload "${COMMON[@]}"

echo "== 3. sparsegpt with a recipe on $DEVICE (bfloat16)"
cat > "$WORK/recipe.yaml" <<'EOF'
pattern: 2:4
method: sparsegpt
overrides:
  - match: "*.mlp.down_proj"
    pattern: 4:8
  - match: "*.mlp.up_proj"
    pattern: coupled-2:4
    method: true-obs
    options: {ng: 32}
  - match: "*.o_proj"
    pattern: block16-rows
EOF
$PY -m s3sparse prune "$WORK/qwen3" --out "$WORK/recipe" --config "$WORK/recipe.yaml" --device "$DEVICE" --dtype bfloat16 "${COMMON[@]}"

echo "== 4. checks"
$PY - "$WORK" <<'EOF'
import json, sys, torch
from transformers import AutoModel, AutoModelForCausalLM
from s3sparse.llm import find_blocks, linear_layers, parse_pattern

work = sys.argv[1]
for run in ("tobs", "tobs-offload", "recipe"):
    info = json.load(open(f"{work}/{run}/s3sparse.json"))
    patterns = {layer["name"]: layer["pattern"] for layer in info["layers"] if layer["status"] == "pruned"}
    model = AutoModel.from_pretrained(f"{work}/{run}")
    name, blocks = find_blocks(model)
    checked = 0
    for i, block in enumerate(blocks):
        # AutoModel gives the base Qwen3Model ("layers.i"); the report names the causal LM's ("model.layers.i")
        for layer in linear_layers(block, f"model.layers.{i}"):
            assert layer.name in patterns, layer.name
            assert parse_pattern(patterns[layer.name]).holds(layer.module.weight), (run, layer.name)
            checked += 1
    errors = [layer["error"] for layer in info["layers"]]
    print(f"{run}: device {info['device']} offload {info['offload']}: pattern holds in {checked} linears; "
          f"mean output error {sum(errors) / len(errors):.4f}; fp32 redos {info['sparsity']['fp32_redos']}; "
          f"{info['seconds']:.1f} s")
a = AutoModelForCausalLM.from_pretrained(f"{work}/tobs").state_dict()
b = AutoModelForCausalLM.from_pretrained(f"{work}/tobs-offload").state_dict()
same_mask = all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
diff = max(float((a[k] - b[k]).abs().max()) for k in a)
print(f"offload vs on-GPU: identical masks {same_mask}, max weight difference {diff:.3g}")
EOF
$PY -m s3sparse eval "$WORK/tobs" --dense "$WORK/qwen3" --text pydoc:heldout --seq-len 256 --n-samples 16 --device "$DEVICE"
$PY -m s3sparse eval "$WORK/recipe" --dense "$WORK/qwen3" --text pydoc:heldout --seq-len 256 --n-samples 16 --device "$DEVICE" --dtype bfloat16

echo "== 5. CUDA tests of the pipeline"
$PY -m pytest -q -m cuda tests/test_llm_pipeline.py

echo "GPU CHECK PASSED"
