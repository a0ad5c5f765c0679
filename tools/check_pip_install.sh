#!/usr/bin/env bash
# `pip install .` as a user types it (with pip's build isolation), in fresh venvs:
#   1. a venv that holds torch: builds against that torch (no other torch downloaded), imports, prunes;
#   2. a venv without torch: fails at once, with one line saying to install torch first.
# Usage: tools/check_pip_install.sh [torch requirement, default torch==2.13.0] [work dir, default /tmp/s3-pip-check]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
torch_req="${1:-torch==2.13.0}"
work="${2:-/tmp/s3-pip-check}"
rm -rf "$work" && mkdir -p "$work"

python3 -m venv "$work/with-torch"
"$work/with-torch/bin/pip" install -q "$torch_req"
before="$("$work/with-torch/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
"$work/with-torch/bin/pip" install "$src" > "$work/with-torch.log" 2>&1 || { tail -40 "$work/with-torch.log"; exit 1; }
if grep -Eq "^(Collecting|Downloading|Processing) .*torch-[0-9]" "$work/with-torch.log"; then
    echo "with torch: pip fetched another torch:"; grep -E "torch-[0-9]" "$work/with-torch.log"; exit 1
fi
grep -q "Requirement already satisfied: torch" "$work/with-torch.log"
cd "$work"
OMP_NUM_THREADS=1 "$work/with-torch/bin/python" - "$before" <<'PY'
import sys
import torch
import s3sparse
from s3sparse import compute_hessian, output_error, patterns, prune_sparsegpt

assert torch.__version__ == sys.argv[1], f"torch changed from {sys.argv[1]} to {torch.__version__}"
info = s3sparse.build_info()
assert info["torch_version"] == torch.__version__, info
W = torch.randn(16, 64)
W0 = W.clone()
X = torch.randn(256, 64)
scope, nnz = patterns.nm(W, 2, 4)
prune_sparsegpt(scope, compute_hessian(X), nnz)
assert ((W != 0).view(16, -1, 4).sum(-1) == 2).all()
print(f"with torch: OK, built against torch {info['torch_version']} ({s3sparse.__file__}); "
      f"2:4 SparseGPT error {output_error(W, W0, compute_hessian(X)):.4f}")
PY

python3 -m venv "$work/without-torch"
if "$work/without-torch/bin/pip" install "$src" > "$work/without-torch.log" 2>&1; then
    echo "without torch: the install succeeded, it must not"; exit 1
fi
grep -q "s3sparse: PyTorch is not installed" "$work/without-torch.log" || { tail -40 "$work/without-torch.log"; exit 1; }
echo "without torch: refused with: $(grep -m1 's3sparse: ' "$work/without-torch.log" | sed 's/^ *//')"
