#!/usr/bin/env bash
# Builds jax-flash with its CUDA kernels, runs the GPU tests and the benchmark (forward and forward+backward, with charts), and keeps
# every log under OUTDIR. For anyone with an NVIDIA GPU and nvcc; run from anywhere in the repo.
#
#   scripts/gpu_check.sh OUTDIR [--no-build] [--no-tests] [--no-bench] [--bench-args "ARGS"]
#
# Environment: PYTHON (default python3, else python); CMAKE_BUILD_PARALLEL_LEVEL (default: nproc);
# JAX_FLASH_CUDA_ARCHS (e.g. 90a) and JAX_FLASH_HEAD_DIMS (e.g. 64,128) build fewer kernels for a
# faster iteration; CUTLASS_DIR points at a CUTLASS checkout instead of the nvidia-cutlass wheel.
#
# OUTDIR gets build.log, gpu_tests.log, gpu_tests.xml (junit), bench.log, bench.json and bench_*.png.
# Exit status: 0 when every step that ran passed; 1 build failed (tests and bench are then not
# run); 2 tests failed; 3 the benchmark failed; 64 bad usage.
set -uo pipefail

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }

outdir=""
do_build=1 do_tests=1 do_bench=1
bench_args=""
while (($#)); do
  case "$1" in
    --no-build) do_build=0 ;;
    --no-tests) do_tests=0 ;;
    --no-bench) do_bench=0 ;;
    --bench-args) [[ $# -ge 2 ]] || { usage >&2; exit 64; }; bench_args="$2"; shift ;;
    --bench-args=*) bench_args="${1#--bench-args=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 64 ;;
    *) [[ -z "$outdir" ]] || { echo "gpu_check: one OUTDIR only" >&2; exit 64; }; outdir="$1" ;;
  esac
  shift
done
[[ -n "$outdir" ]] || { usage >&2; exit 64; }

mkdir -p "$outdir" && outdir="$(cd "$outdir" && pwd)" || exit 64
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 64
python="${PYTHON:-$(command -v python3 || command -v python)}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PYTHONUNBUFFERED=1

status=0
build_summary="skipped" tests_summary="skipped" bench_summary="skipped"

# --- Build ------------------------------------------------------------------------------------
if ((do_build)); then
  echo "== build: $python -m pip install --no-build-isolation --no-deps -v -e ."
  start=$(date +%s)
  {
    echo "# $(date -u +%FT%TZ) on $(hostname)"
    echo "# CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL" \
         "JAX_FLASH_CUDA_ARCHS=${JAX_FLASH_CUDA_ARCHS:-<default>}" \
         "JAX_FLASH_HEAD_DIMS=${JAX_FLASH_HEAD_DIMS:-<default>}" \
         "CUTLASS_DIR=${CUTLASS_DIR:-<nvidia-cutlass wheel>}"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    # CMakeLists.txt reads JAX_FLASH_CUDA_ARCHS, JAX_FLASH_HEAD_DIMS and CUTLASS_DIR from the
    # environment, which pip passes through to the build.
    "$python" -m pip install --no-build-isolation --no-deps -v -e .
  } 2>&1 | tee "$outdir/build.log"
  build_rc=$?
  build_seconds=$(($(date +%s) - start))
  echo "# build exit status $build_rc after ${build_seconds}s" | tee -a "$outdir/build.log"
  if ((build_rc)); then
    build_summary="FAILED (exit $build_rc) after ${build_seconds}s, see $outdir/build.log"
    do_tests=0 do_bench=0 status=1
  else
    build_summary="ok in ${build_seconds}s"
  fi
fi

kernel_info=$("$python" -c 'import jax_flash; print(jax_flash.kernel_info())' 2>&1 | tail -n 1)

# --- GPU tests --------------------------------------------------------------------------------
if ((do_tests)); then
  echo "== tests: $python -m pytest -m gpu -q tests"
  "$python" -m pytest -m gpu -q tests --junitxml "$outdir/gpu_tests.xml" 2>&1 |
    tee "$outdir/gpu_tests.log"
  tests_rc=$?
  counts=$("$python" - "$outdir/gpu_tests.xml" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
keys = ("tests", "failures", "errors", "skipped")
total = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
print(f"{passed} passed, {total['failures']} failed, {total['errors']} errors, "
      f"{total['skipped']} skipped")
EOF
  )
  tests_summary="${counts:-no junit report}, pytest exit $tests_rc"
  if ((tests_rc)); then
    tests_summary="FAILED: $tests_summary, see $outdir/gpu_tests.log"
    ((status)) || status=2
  fi
fi

# --- Benchmark --------------------------------------------------------------------------------
if ((do_bench)); then
  read -r -a bench_argv <<<"$bench_args"
  echo "== bench: $python -m jax_flash.bench --out $outdir/bench.json ${bench_args}"
  "$python" -m jax_flash.bench --out "$outdir/bench.json" ${bench_argv[@]+"${bench_argv[@]}"} 2>&1 |
    tee "$outdir/bench.log"
  bench_rc=$?
  if ((bench_rc)); then
    bench_summary="FAILED (exit $bench_rc), see $outdir/bench.log"
    ((status)) || status=3
  else
    bench_summary="ok, $outdir/bench.json"
  fi
fi

# --- Summary ----------------------------------------------------------------------------------
echo
echo "== summary ($outdir)"
echo "kernels: $kernel_info"
echo "build:   $build_summary"
echo "tests:   $tests_summary"
echo "bench:   $bench_summary"
if ((do_bench)) && [[ -f "$outdir/bench.log" ]]; then
  # The benchmark's table, without the warnings JAX may interleave.
  grep -E '^(# |impl |flash|cudnn|xla)' "$outdir/bench.log"
fi
exit "$status"
