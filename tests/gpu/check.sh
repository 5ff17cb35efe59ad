#!/usr/bin/env bash
# The prepared GPU check (issue 13), one command on one GPU, at most about 8 minutes:
#   bash tests/gpu/check.sh OUT          # or: make gpu-check GPU_OUT=OUT
# 1. correctness: pytest -m gpu tests/gpu (bf16 at every ZeRO stage against fp32, flash
#    attention, CUDA-event timing, a sync-free step loop, exact resume, memory against the
#    estimate, export and sampling) -> OUT/gpu_figures.json, OUT/pytest.log
# 2. throughput: the GPU rows of docs/benchmarks.md -> OUT/bench.json, OUT/profile.txt, bench.log
# Needs the demo corpus prepared (make data) and, where DeepSpeed is not installed, the wheels
# of ../shared/gpu/fetch-wheels.sh in .whl/ (both carried to the GPU machine). OUT keeps at most
# eight files, one folder deep, as the device tool returns them. ZEROLAUNCH_GPU_DRY=1 runs the
# same steps on the CPU, small, to check the plumbing before a GPU is spent on it.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled ZEROLAUNCH_GPU_OUT="$OUT"
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  [ -d .whl ] || { echo "no DeepSpeed and no .whl/: run ../shared/gpu/fetch-wheels.sh here first"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/zerolaunch-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/zerolaunch-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
started=$(date +%s)
# Written by Python itself: DeepSpeed logs its accelerator to stdout on import.
"$PY" - "$OUT/versions.json" <<'PY'
import json, platform, sys, torch, deepspeed
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cuda": torch.version.cuda, "gpu": gpu, "python": platform.python_version()}
with open(sys.argv[1], "w") as f:
    json.dump(versions, f)
PY
cat "$OUT/versions.json"
# A second run on a machine with little time left may narrow them:
# ZEROLAUNCH_GPU_TESTS (a pytest -k expression), ZEROLAUNCH_GPU_TEST_S, ZEROLAUNCH_GPU_BENCH_S.
timeout "${ZEROLAUNCH_GPU_TEST_S:-270}" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider \
  -o addopts="" -rA ${ZEROLAUNCH_GPU_TESTS:+-k "$ZEROLAUNCH_GPU_TESTS"} > "$OUT/pytest.log" 2>&1
echo "pytest -m gpu: exit $? after $(( $(date +%s) - started )) s"
tail -n 25 "$OUT/pytest.log"
timeout "${ZEROLAUNCH_GPU_BENCH_S:-210}" "$PY" tests/gpu/bench_rows.py "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rows: exit $? after $(( $(date +%s) - started )) s"
tail -n 8 "$OUT/bench.log"
ls "$OUT"
