# build.sh D...: one harness binary per head dim (sm_90a), compiled in parallel.
# CUTLASS_DIR: a CUTLASS tree holding include/ (the nvidia-cutlass wheel's cutlass_library/source).
# HARNESS_FLAGS: more nvcc flags, e.g. -DJAX_FLASH_CTA_TRACE with cta_trace.patch applied.
cd "$(dirname "$0")"
: "${CUTLASS_DIR:?set CUTLASS_DIR to a CUTLASS tree holding include/}"
for D in "$@"; do
  nvcc -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 --expt-relaxed-constexpr --expt-extended-lambda \
    --use_fast_math -DNDEBUG ${HARNESS_FLAGS:-} -DHARNESS_D=$D -I../../cuda -isystem "$CUTLASS_DIR/include" -Xptxas -v \
    -o harness_d$D harness.cu 2>&1 | grep -iE "error|warning|registers|spill|stack|entry function" | cut -c1-200 &
done
wait
