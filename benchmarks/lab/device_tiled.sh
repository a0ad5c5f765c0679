# One device call: the tiled sp24 kernel (csrc/cuda/sp24_tiled.cuh) in variants, checked and timed by
# benchmarks/lab/sp24_ext.py, with the carried wheel installed for the s3sparse imports (.whl/).
bash benchmarks/device_packed.sh build >/dev/null 2>&1
export PYTHONPATH=$PWD
SP24_VARIANTS=${SP24_VARIANTS:-"new= wm2=-DS3_LAB_TILED_WM=2,-DS3_LAB_TILED_U=1 wm2b1=-DS3_LAB_TILED_WM=2,-DS3_LAB_TILED_BLOCKS_PER_SM=1 mi4=-DS3_LAB_TILED_MIN_ITERS=4"} \
  SP_SHAPES=${SP_SHAPES:-"4096x4096 2560x9728 9728x2560"} SP_PATTERNS=${SP_PATTERNS:-"2:4 4:8"} \
  SP_TOKENS=${SP_TOKENS:-"16 32 64 128 512 4096"} timeout ${LAB_TIMEOUT:-400} python3 benchmarks/lab/sp24_ext.py > $OUT/sp24-tiled-lab.txt 2>&1
echo "lab rc=$? at $SECONDS s"; cp /tmp/sp24_ext.json $OUT/ 2>/dev/null
grep -c "^check" $OUT/sp24-tiled-lab.txt; grep -E "FAILED" $OUT/sp24-tiled-lab.txt | head; grep -v "^check" $OUT/sp24-tiled-lab.txt | tail -40
