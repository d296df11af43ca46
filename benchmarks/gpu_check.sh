#!/usr/bin/env bash
# GPU check of mamlext on a machine with an NVIDIA GPU (one H100 or H200, 16 cores), torch preinstalled, no
# network: builds the CUDA kernels in place, runs the CUDA tests (the kernels' own tests first) and the CUDA
# benchmarks, measures the device-to-device copy bandwidth as the yardstick, and writes one summary.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # default OUT=./gpu-results (relative to the repo root)
#
# Environment:
#   OUT                   where logs, junit xml, JSON results, summary.txt and summary.json go
#   GPU_CHECK_BUDGET_S    wall-clock budget of the whole script in seconds (default 510: under 9 minutes with the
#                         summary); each stage's timeout is cut to what is left of it, a stage with no time left is
#                         skipped
#   CUDA_HOME             CUDA toolkit root; default /usr/local/cuda if it has bin/nvcc, else from `which nvcc`
#
# Every stage runs under its own `timeout`; a failing or timed-out stage is recorded and later stages still run (no
# -x across stages); the script exits 1 when any stage failed. $OUT/summary.json (benchmarks/gpu_summary.py): per
# stage passed / failed / skipped / timed out and the failing test ids, the copy bandwidth, every benchmark's JSON.
# To add a benchmark, append one line at the end:
#   stage NAME TIMEOUT_S command args...
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

BUDGET_S=${GPU_CHECK_BUDGET_S:-510}
KILL_AFTER_S=5
START_S=$SECONDS
STAGES=()
FAILED=()
: >"$OUT/stages.tsv"  # name, verdict, seconds, exit status: what gpu_summary.py reads

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) host $(hostname) repo $REPO_ROOT commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+local changes)')"
echo "gpu_check: OUT=$OUT budget ${BUDGET_S}s"

# stage NAME TIMEOUT_S CMD...: runs CMD under `timeout` (cut to the remaining budget), logs it to $OUT/NAME.log
# (and the main log), records pass/fail and never stops the script.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START_S) - KILL_AFTER_S))
  if ((left < limit)); then limit=$left; fi
  echo
  echo "=== stage $name: $* (timeout ${limit}s) ==="
  if ((limit < 5)); then
    echo "=== stage $name: SKIPPED (no time left in the ${BUDGET_S}s budget) ==="
    STAGES+=("$name skipped (no time left)")
    FAILED+=("$name")
    printf '%s\tskipped\t0\t-1\n' "$name" >>"$OUT/stages.tsv"
    return 0
  fi
  local t0=$SECONDS rc
  set +e
  timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$((SECONDS - t0)) verdict short
  if ((rc == 0)); then
    verdict="ok" short="passed"
  elif ((rc == 124 || rc == 137)); then
    verdict="FAILED (timed out after ${limit}s, rc $rc)" short="timed out"
  else
    verdict="FAILED (rc $rc)" short="failed"
  fi
  echo "=== stage $name: $verdict in ${took}s ==="
  STAGES+=("$name $verdict in ${took}s")
  printf '%s\t%s\t%s\t%s\n' "$name" "$short" "$took" "$rc" >>"$OUT/stages.tsv"
  if ((rc != 0)); then FAILED+=("$name"); fi
  return 0
}

finish() {
  local rc=$?
  {
    echo
    echo "=== summary ($((SECONDS - START_S))s) ==="
    local line
    for line in "${STAGES[@]}"; do echo "  $line"; done
    if ((${#FAILED[@]})); then
      echo "FAILED stages: ${FAILED[*]}"
    else
      echo "all stages passed"
    fi
  } | tee "$OUT/summary.txt"
  python benchmarks/gpu_summary.py "$OUT" || echo "gpu_check: could not write summary.json"
  if ((rc == 0 && ${#FAILED[@]})); then rc=1; fi
  exit "$rc"
}
trap finish EXIT

# The toolkit: CUDA_HOME, else /usr/local/cuda when it has nvcc, else two levels above `which nvcc`.
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  else
    CUDA_HOME=""
  fi
fi
if [[ -n "$CUDA_HOME" ]]; then
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
  if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
    echo "gpu_check: WARNING: CUDA_HOME=$CUDA_HOME has no include/cuda_runtime.h (nvcc may be a wrapper);" \
      "setup.py looks for the real toolkit itself"
  fi
else
  echo "gpu_check: WARNING: no CUDA toolkit found (no CUDA_HOME, /usr/local/cuda/bin/nvcc or nvcc on PATH)"
fi
echo "gpu_check: CUDA_HOME=${CUDA_HOME:-<none>}"

stage nvidia-smi 20 nvidia-smi
stage environment 30 bash -c 'python --version; which python; (nvcc --version || echo "no nvcc on PATH"); python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))"'
# mlp_block.cu alone compiles for about 110 s: the build gets the first long slot.
stage build 240 env FORCE_CUDA=1 MAX_JOBS="$(nproc)" PIP_DISABLE_PIP_VERSION_CHECK=1 python -m pip install --no-build-isolation --no-deps --no-index -v -e .
stage cuda-kernels 30 env MAMLEXT_REQUIRE_EXT=1 python -c 'import mamlext; i = mamlext.backend_info(); print(i); assert i["cuda_kernels"] and i["backend"]["cuda"] == "compiled", "the CUDA kernels are not serving cuda tensors"'
stage bandwidth 30 python benchmarks/gpu_summary.py --bandwidth "$OUT"
# The CUDA tests, the kernels' own first (the block kernel's paths, task_sgd's launches, the reverse step), then the
# ops, then the engines and the rest; each stage its own junit xml, no -x, so one failure does not hide the others.
cuda_tests() {  # cuda_tests NAME TIMEOUT_S FILES...
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" env MAMLEXT_REQUIRE_EXT=1 python -m pytest "$@" -q -m cuda -p no:cacheprovider \
    --junitxml="$OUT/junit_$name.xml"
}
cuda_tests tests-kernels 60 tests/test_ops_mlp_team.py tests/test_ops_task_sgd.py tests/test_ops_maml_reverse_step.py
cuda_tests tests-ops 60 tests/test_ops_mlp.py tests/test_ops_mlp_layerwise.py tests/test_ops_mlp_weights.py \
  tests/test_ops_mlp_gauss_newton.py tests/test_learner_ops.py
cuda_tests tests-rest 60 tests --ignore=tests/test_ops_mlp_team.py --ignore=tests/test_ops_task_sgd.py \
  --ignore=tests/test_ops_maml_reverse_step.py --ignore=tests/test_ops_mlp.py \
  --ignore=tests/test_ops_mlp_layerwise.py --ignore=tests/test_ops_mlp_weights.py \
  --ignore=tests/test_ops_mlp_gauss_newton.py --ignore=tests/test_learner_ops.py
# The suite of `python -m mamlext bench` (results.json, speedup.png under $OUT/bench): it starts no new case after
# --time-budget seconds (the cases left get skipped rows), so it ends with its table and plot inside the stage.
SUITE_BUDGET_S=$((BUDGET_S - (SECONDS - START_S) - KILL_AFTER_S - 60))
if ((SUITE_BUDGET_S > 90)); then SUITE_BUDGET_S=90; fi
if ((SUITE_BUDGET_S < 10)); then SUITE_BUDGET_S=10; fi
stage bench-suite $((SUITE_BUDGET_S + 30)) env MAMLEXT_REQUIRE_EXT=1 python -m mamlext bench --suite full --device cuda --no-progress --time-budget "$SUITE_BUDGET_S" --out "$OUT/bench"
stage bench-task-sgd 40 env MAMLEXT_REQUIRE_EXT=1 python benchmarks/bench_task_sgd.py --device cuda --quick --out "$OUT/task_sgd_cuda.json"
# Further benchmarks: stage NAME TIMEOUT_S command args...  (write results under "$OUT")
stage bench-rl 90 env MAMLEXT_REQUIRE_EXT=1 python -m mamlext bench --suite rl --device cuda --no-progress --out "$OUT/bench-rl"
