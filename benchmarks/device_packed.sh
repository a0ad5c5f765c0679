#!/usr/bin/env bash
# One GPU session of the packed-execution work (see docs/performance.md):
# build (or reuse a carried wheel in .whl/), install, the packed CUDA tests,
# then the packed benchmarks. Results go to $OUT (default ./out).
#   bash benchmarks/device_packed.sh [build|cpubuild|tests|cuda|cudaalt|bench|table1|crossover|nmab|lab|spanlab|sp24ext|rowblock|rowblockncu|trueobs|refine|host|refineab|refineprof|model36|bf16probe|modelpdl|model|all]...
# After the install, the wheel's compiled library is copied into this checkout
# and PYTHONPATH points here, so Python-only changes run without a new wheel.
# At most 8 files come back from a device call: logs stay in $LOG (copied to
# $OUT only when a step fails); $OUT gets the wheel, the test summaries, the
# tables and the JSON.
set -uo pipefail
OUT=${OUT:-$PWD/out}
LOG=${LOG:-/tmp/device_packed}
mkdir -p "$OUT" "$LOG"
commit=${S3SPARSE_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export S3SPARSE_GIT_COMMIT=$commit
repo=$PWD
# The installed package's compiled library, copied into this checkout, which PYTHONPATH then points at.
use_installed_library() {
  local site
  site=$(cd /tmp && python3 -c "import os, s3sparse; print(os.path.dirname(s3sparse.__file__))")
  cp "$site"/_C*.so "$repo/s3sparse/"
  export PYTHONPATH=$repo
}
for step in "${@:-all}"; do
  case $step in
    build|all)
      if ! ls .whl/*.whl >/dev/null 2>&1; then
        t0=$SECONDS
        # (a fixed build directory, so ninja's log of each object's compile time survives for the summary below)
        SKBUILD_BUILD_DIR=/tmp/s3sparse-build TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip wheel -q --no-build-isolation \
          --no-deps . -w .whl/ > "$LOG/build.log" 2>&1 || { cp "$LOG/build.log" "$OUT/"; tail -50 "$LOG/build.log"; exit 1; }
        echo "built wheel in $((SECONDS - t0)) s; the slowest objects (s):"
        awk -F'\t' 'NR > 1 {printf "%7.1f %s\n", ($2 - $1) / 1000, $4}' /tmp/s3sparse-build/.ninja_log 2>/dev/null | sort -rn | head -6
        cp .whl/*.whl "$OUT/"
      fi
      python3 -m pip install -q --no-deps --force-reinstall .whl/*.whl > "$LOG/install.log" 2>&1 || { cp "$LOG/install.log" "$OUT/"; tail -20 "$LOG/install.log"; exit 1; }
      use_installed_library
      ;;&
    cpubuild)
      # A CPU-only install (about a minute on 16 cores, against the wheel's five): enough for the lab steps that
      # build their own kernels (sp24ext, refineprof); its library is copied here like the wheel's.
      t0=$SECONDS
      SKBUILD_CMAKE_DEFINE="S3SPARSE_CUDA=OFF" MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps . \
        > "$LOG/cpubuild.log" 2>&1 || { cp "$LOG/cpubuild.log" "$OUT/"; tail -30 "$LOG/cpubuild.log"; exit 1; }
      echo "CPU-only install in $((SECONDS - t0)) s"
      use_installed_library
      ;;&
    tests|all)
      (cd /tmp && timeout 400 python3 -m pytest -q -m cuda -p no:cacheprovider "$repo/tests/test_op_packed.py" \
        "$repo/tests/test_sparse_packed.py" 2>&1 | tail -15 | tee "$OUT/pytest-packed-cuda.txt")
      # The same with the tensor-core kernel forced (not yet on the automatic path).
      (cd /tmp && S3SPARSE_PACKED_CUDA_PATH=mma timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider \
        "$repo/tests/test_op_packed.py" 2>&1 | tail -5 | tee -a "$OUT/pytest-packed-cuda.txt")
      ;;&
    cuda)
      # The whole suite's cuda tests: the summary comes back, and on a failure each failing test's
      # seed, replay line and error lines (a tail alone cut them off once).
      (cd /tmp && timeout 500 python3 -m pytest -q -m cuda -p no:cacheprovider "$repo/tests" > "$LOG/pytest-cuda-full.txt" 2>&1)
      tail -25 "$LOG/pytest-cuda-full.txt" | tee "$OUT/pytest-cuda.txt"
      if grep -q "failed" "$OUT/pytest-cuda.txt"; then
        grep -E "^(_{3,} test|E  |FAILED|replay:|S3SPARSE_TEST_SEED=)" "$LOG/pytest-cuda-full.txt" | head -300 > "$OUT/pytest-cuda-failures.txt"
      fi
      ;;&
    cudaalt)
      # The packed and sp24 cuda tests with the decode kernels launched plainly (S3SPARSE_PACKED_PDL=0; the default
      # launches them as programmatic dependents on sm_90+).
      (cd /tmp && S3SPARSE_PACKED_PDL=0 timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider \
        "$repo/tests/test_op_packed.py" "$repo/tests/test_op_sp24.py" "$repo/tests/test_sparse_packed.py" "$repo/tests/test_llm_pack.py" \
        > "$LOG/pytest-cuda-alt.txt" 2>&1)
      tail -15 "$LOG/pytest-cuda-alt.txt" | tee "$OUT/pytest-cuda-alt.txt"
      ;;&
    crossover)
      # The same calls through each path forced (stream decode kernel / tensor-core kernel / expansion + cuBLAS).
      for path in ${CROSS_PATHS:-stream mma expand}; do
        (cd /tmp && S3SPARSE_PACKED_CUDA_PATH=$path timeout 200 python3 "$repo/benchmarks/packed.py" --device cuda \
          --shapes 2560x9728 9728x2560 --tokens ${CROSS_TOKENS:-1 4 6 8 12 16 32} --patterns 2:4 4:8 coupled-2:4 block16-rows --methods dense packed \
          --out "$LOG/packed-crossover-$path.json" > "$LOG/packed-crossover-$path.txt" 2>&1; tail -3 "$LOG/packed-crossover-$path.txt")
      done
      for path in ${CROSS_PATHS:-stream mma expand}; do echo "# S3SPARSE_PACKED_CUDA_PATH=$path"; cat "$LOG/packed-crossover-$path.txt"; done \
        > "$OUT/packed-crossover.txt"
      ;;&
    bench|all)
      (cd /tmp && timeout 400 python3 "$repo/benchmarks/packed.py" --device cuda --check ${BENCH_ARGS:-} \
        --out "$OUT/packed-cuda.json" > "$OUT/packed-cuda.txt" 2>&1; tail -5 "$OUT/packed-cuda.txt")
      ;;&
    nmab)
      # Issue 17: decode at 1-16 tokens in variants, one process each (the switches are read once):
      # S3SPARSE_PACKED_SP24 (2:4 / 4:8 / coupled 2:4 on sp24_linear, the default, or the packed kernels' n:m path)
      # and S3SPARSE_PACKED_PDL (1: the decode kernels as programmatic dependent launches, the default; 0: plainly);
      # the first again last, for the run-to-run drift. A variant is name:SP24:PDL.
      for v in ${NMAB_VARIANTS:-base:1:0 pdl:1:1 nm:0:0 nm-pdl:0:1 base2:1:0}; do
        IFS=: read -r name sp24 pdl <<< "$v"
        (cd /tmp && S3SPARSE_PACKED_SP24=$sp24 S3SPARSE_PACKED_PDL=$pdl timeout ${NMAB_TIMEOUT:-120} \
          python3 "$repo/benchmarks/packed.py" --device cuda --check --shapes ${NMAB_SHAPES:-2560x9728 9728x2560 4096x4096} \
          --tokens ${NMAB_TOKENS:-1 2 16} --patterns 2:4 4:8 coupled-2:4 --methods dense packed \
          --out "$LOG/nmab-$name.json" > "$LOG/nmab-$name.txt" 2>&1
          echo "# $name: S3SPARSE_PACKED_SP24=$sp24 S3SPARSE_PACKED_PDL=$pdl"
          cat "$LOG/nmab-$name.txt")
      done | tee "$OUT/packed-nmab.txt"
      (cd "$LOG" && tar cf "$OUT/packed-nmab-json.tar" nmab-*.json)
      ;;&
    lab)
      # The tensor-core kernel alone, in variants (benchmarks/lab/packed_mma_lab.py).
      timeout 400 python3 benchmarks/lab/packed_mma_lab.py diag_nometa=-DS3_LAB_NO_META \
        diag_noexpand=-DS3_LAB_NO_EXPAND diag_nomma=-DS3_LAB_NO_MMA diag_bare=-DS3_LAB_NO_EXPAND,-DS3_LAB_NO_MMA \
        diag_nobarrier=-DS3_LAB_NO_BARRIER depth2=-DS3_LAB_DEPTH=2 depth4=-DS3_LAB_DEPTH=4 min1=-DS3_LAB_MIN_BLOCKS=1 > "$LOG/lab.txt" 2>&1
      tail -3 "$LOG/lab.txt"; cp "$LOG/lab.txt" "$OUT/packed-mma-lab.txt"
      ;;&
    rowblock)
      # The row-block kernel alone (block16-rows, 1-16 tokens) against dense and the installed package's path.
      # ROWBLOCK_VARIANTS="pairs=-DS3_LAB_ROWBLOCK_MMA_PAIRS=1,-DS3_LAB_ROWBLOCK_MMA_UNROLL=2 diag_nox=-DS3_LAB_ROWBLOCK_DIAG=1"
      # adds variants beside the package's form (base); the knobs are at the top of csrc/cuda/packed_rowblock.cuh.
      (cd "$repo" && timeout ${ROWBLOCK_TIMEOUT:-240} python3 benchmarks/lab/packed_mma_lab.py --kernel=rowblock \
        ${ROWBLOCK_VARIANTS:-} > "$OUT/rowblock-lab.txt" 2>&1; tail -15 "$OUT/rowblock-lab.txt")
      ;;&
    spanlab)
      # The span decode kernel alone, in variants (benchmarks/lab/packed_mma_lab.py --kernel=span).
      timeout 400 python3 benchmarks/lab/packed_mma_lab.py --kernel=span ${SPANLAB_VARIANTS:-diag_norows=-DS3_LAB_SPAN_NO_ROWS \
        diag_nox=-DS3_LAB_SPAN_NO_X diag_notable=-DS3_LAB_SPAN_NO_TABLE \
        diag_nox_notable=-DS3_LAB_SPAN_NO_X,-DS3_LAB_SPAN_NO_TABLE loads2=-DS3_LAB_SPAN_LOADS=2 \
        loads8=-DS3_LAB_SPAN_LOADS=8 warps32=-DS3_LAB_SPAN_WARPS_PER_SM=32 nm_off=-DS3_LAB_NM_OFF \
        nm_pipe0=-DS3_LAB_NM_PIPELINE=0 nm_pipe3=-DS3_LAB_NM_PIPELINE=3 nm_pipe4=-DS3_LAB_NM_PIPELINE=4} > "$LOG/spanlab.txt" 2>&1
      tail -3 "$LOG/spanlab.txt"; cp "$LOG/spanlab.txt" "$OUT/packed-span-lab.txt"
      ;;&
    sp24ext)
      # The package's sp24_linear kernel built alone (about a minute) and checked + timed: every column
      # order, both kernel forms, a corrupt word (benchmarks/lab/sp24_ext.py).
      # (Written to $OUT line by line: a call cut short still brings back what was timed.)
      timeout ${SP24EXT_TIMEOUT:-400} python3 benchmarks/lab/sp24_ext.py > "$OUT/sp24-ext.txt" 2>&1
      grep -v "^check" "$OUT/sp24-ext.txt" | tail -40; grep -c FAILED "$OUT/sp24-ext.txt"
      ;;&
    rowblockncu)
      # ncu of the row-block kernel on 2560x9728 block16-rows: its FMA form (1 token) and tensor-core form
      # (16 tokens), the call after the warm-ups only (its NVTX range; benchmarks/lab/rowblock_one.py;
      # RB_SHAPE picks another shape).
      (cd /tmp && timeout ${NCU_TIMEOUT:-300} ${NCU:-ncu} --nvtx --nvtx-include "tokens1/" --nvtx-include "tokens16/" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
        --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
        -k regex:rowblock python3 "$repo/benchmarks/lab/rowblock_one.py" 1 16 > "$OUT/ncu-rowblock.txt" 2>&1)
      grep -E "rowblock_kernel|Block Size|Duration|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued" \
        "$OUT/ncu-rowblock.txt"
      ;;&
    table1)
      # Issue 16: benchmarks/table1.py on the 2560x9728 layer, ours on the four patterns (SparseGPT, interleaved-16,
      # True OBS) and, when its wheel is carried in .whl/peer/, the reference (sparsekit 0.1.5) on 2:4 in the same run.
      peer=()
      if ls .whl/peer/sparsekit-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-deps --target /tmp/peer-site .whl/peer/sparsekit-*.whl > "$LOG/peer.log" 2>&1 &&
          peer=(--peer sparsekit --peer-path /tmp/peer-site --skip-peer-cells "48:*,coupled24:*,block16:*")
      fi
      (cd /tmp && timeout ${TABLE1_TIMEOUT:-420} python3 "$repo/benchmarks/table1.py" --device cuda \
        --methods ${TABLE1_METHODS:-sparsegpt obs_interleaved true_obs_l2r} --repeat 3 --cell-budget 10 "${peer[@]}" \
        --markdown --out "$OUT/table1.json" > "$OUT/table1.txt" 2>&1; tail -30 "$OUT/table1.txt")
      ;;&
    trueobs)
      # Issue 16: True OBS's blocked form on the 16-column pattern, panel_batches G (one timed call each).
      for G in ${TOBS_G:-1 4 8 16}; do
        (cd /tmp && timeout 200 python3 "$repo/benchmarks/profile_true_obs.py" --patterns block16 --panel-batches "$G" \
          --no-profile --out "$LOG/true-obs-block16-G$G.json" > "$LOG/true-obs-G$G.txt" 2>&1; echo "# G=$G"; tail -4 "$LOG/true-obs-G$G.txt")
      done | tee "$OUT/true-obs-panel-batches.txt"
      ;;&
    refine)
      # Issue 19: refine_mask's 2 sweeps on the 2560x9728 layer after True OBS (2:4): time, peak, error per sweep
      # (REFINE_ROWS=256 for its first 256 rows: rows are independent, a tenth of the time).
      rows=${REFINE_ROWS:-2560}
      (cd /tmp && timeout ${REFINE_TIMEOUT:-560} python3 "$repo/benchmarks/refine.py" --synthetic ${rows}x9728 --device cuda --patterns 2:4 \
        --starts true_obs --sweeps 2 --progress --out "$OUT/refine-${rows}x9728.json" > "$OUT/refine-${rows}x9728.txt" 2>&1; tail -4 "$OUT/refine-${rows}x9728.txt")
      ;;&
    host)
      # Issue 17: an eager PackedLinear call's host time against F.linear's, on a layer too small for the GPU to matter.
      (cd /tmp && timeout 120 python3 "$repo/benchmarks/lab/packed_host.py" --device cuda --out "$OUT/packed-host.json" 2>&1 | tee "$OUT/packed-host.txt")
      ;;&
    refineab)
      # Issue 19: refine_mask's sweep forms on the first 256 rows of the 2560x9728 layer (2:4, 2 sweeps from
      # True OBS), one run each: synced (the CPU's), sync-free, sync-free + CUDA-graph replay of the blocks;
      # chunks of 32 rows (8 full chunks: the first eager, the second captured, the rest replayed).
      for mode in ${REFINE_MODES:-off:off on:off on:on}; do
        sf=${mode%%:*}; gr=${mode##*:}
        (cd /tmp && timeout ${REFINE_TIMEOUT:-150} python3 "$repo/benchmarks/refine.py" --synthetic ${REFINE_SHAPE:-256x9728} --device cuda \
          --patterns 2:4 --starts true_obs --sweeps 2 --sync-free $sf --graphs $gr --chunk-size ${REFINE_CHUNK:-32} --progress \
          --out "$OUT/refine-$sf-$gr.json" > "$LOG/refine-$sf-$gr.txt" 2>&1; echo "# sync-free $sf, graphs $gr"; tail -2 "$LOG/refine-$sf-$gr.txt")
      done | tee "$OUT/refine-forms.txt"
      ;;&
    refineprof)
      # Issue 19: where a refine sweep's time goes on the GPU: one eager sync-free sweep of one 32-row chunk of the
      # 2560x9728 layer under torch.profiler (ops and kernels by device time, kernels a scope), after the same sweep
      # unprofiled (the profiler's overhead). refine_mask is plain torch: a CPU-only build is enough
      # (the cpubuild step).
      (cd /tmp && timeout 300 python3 "$repo/benchmarks/lab/refine_forms.py" --shape ${REFINE_SHAPE:-32x9728} --device cuda \
        --sweeps 1 --chunk-size 32 --forms sync-free --profile "$OUT/refine-profile.txt" > "$LOG/refineprof.txt" 2>&1; head -45 "$OUT/refine-profile.txt")
      ;;&
    model36)
      # Issue 16: the whole random Qwen3-4B-shaped model (36 blocks), SparseGPT and True OBS (about 7 min).
      (cd /tmp && timeout 580 python3 "$repo/benchmarks/model.py" --device cuda --methods ${MODEL_METHODS:-sparsegpt true-obs} \
        --out "$OUT/model-qwen3-4b-36blocks.json" > "$OUT/model-qwen3-4b-36blocks.txt" 2>&1; tail -12 "$OUT/model-qwen3-4b-36blocks.txt")
      ;;&
    bf16probe)
      # The bf16 packed_linear case an H200 once computed double-rounded, through each kernel path.
      (cd /tmp && timeout 200 python3 "$repo/benchmarks/lab/bf16_bias_probe.py" 2>&1 | tail -20 | tee "$OUT/bf16-bias-probe.txt")
      ;;&
    modelpdl)
      # Issue 17: the model step (fused siblings, compiled + graph) with the decode kernels launched as programmatic
      # dependents (S3SPARSE_PACKED_PDL=1, the default) and plainly (0), one process each.
      # (run i with PDL p writes packed-model-pdl<p>-<i>: a repeated setting does not overwrite the earlier run)
      i=0
      for pdl in ${MODELPDL_RUNS:-1 0 1}; do
        i=$((i + 1)); run="packed-model-pdl$pdl-$i"
        (cd /tmp && S3SPARSE_PACKED_PDL=$pdl timeout ${MODELPDL_TIMEOUT:-200} python3 "$repo/benchmarks/packed_model.py" --device cuda \
          ${MODELPDL_ARGS:---fuse --compile --repeat 3} --out "$LOG/$run.json" > "$LOG/$run.txt" 2>&1
          echo "# run $i: S3SPARSE_PACKED_PDL=$pdl"; tail -12 "$LOG/$run.txt")
      done | tee "$OUT/packed-model-pdl.txt"
      (cd "$LOG" && tar cf "$OUT/packed-model-pdl-json.tar" packed-model-pdl*.json)
      ;;&
    model|all)
      # (MODEL_ARGS="--compile" for the compiled step; the profile: GPU time a step by kernel, eager steps)
      (cd /tmp && timeout 300 python3 "$repo/benchmarks/packed_model.py" --device cuda ${MODEL_ARGS:-} \
        --profile "$OUT/packed-model-profile.txt" --out "$OUT/packed-model-cuda.json" > "$OUT/packed-model-cuda.txt" 2>&1
        tail -8 "$OUT/packed-model-cuda.txt")
      ;;
  esac
done
