#!/bin/sh
# Build the host emulation of the CUDA kernels (see runtime.h) as a library that
# registers torch.ops.s3emu.* for CPU tensors, then e.g.
#   S3SPARSE_CUDA_EMU=/tmp/s3emu.so pytest tests/test_ops.py -k cuda
# Usage: tools/cuda_emu/build.sh OUT.so [extra g++ flags, e.g. -fsanitize=address]
set -e
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$1
shift
tinc=$(python -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))")
tlib=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
tmp=$(mktemp -d)
flags="-std=c++20 -O1 -g -fPIC -pthread -ffp-contract=off -DS3SPARSE_EMULATE_CUDA -Ds3sparse=s3emu -I$root/tools/cuda_emu -I$root/csrc $tinc $*"
for src in "$root/csrc/ops.cpp" "$root"/csrc/cuda/*.cu; do
  echo "g++ $flags -x c++ -c $src -o $tmp/$(basename "$src").o"
done | xargs -P "$(nproc)" -I{} sh -c {}
g++ -shared -pthread "$@" "$tmp"/*.o -o "$out" -L"$tlib" -Wl,-rpath,"$tlib" -ltorch -ltorch_cpu -lc10
# The runtime's own checks (barriers, shuffles, divergence, exceptions, stacks): tools/cuda_emu/selftest.cpp.
g++ $flags "$root/tools/cuda_emu/selftest.cpp" -o "$tmp/selftest" -L"$tlib" -Wl,-rpath,"$tlib" -ltorch -ltorch_cpu -lc10
"$tmp/selftest"
rm -rf "$tmp"
echo "built $out"
