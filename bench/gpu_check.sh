#!/usr/bin/env bash
# The GPU pass in one command (issue 23): the test suite, bench/model_step.py, bench/extract.py and
# bench/train_loop.py on CUDA, and a tiny full_run demo on CUDA; one markdown table at OUT/gpu_check.md.
#
#   bash bench/gpu_check.sh [OUT]              # on a GPU machine (OUT: runs/gpu_check); about 7-8 minutes on one
#                                              H200 by its parts' times there (not yet run whole)
#   GPU_CHECK_QUICK=1 bash bench/gpu_check.sh  # tiny sizes, any device: a dry run of the script itself (CPU)
#   PARTS="model_step extract" bash bench/gpu_check.sh   # only some parts (env tests model_step extract
#                                                        # train_loop demo)
#
# STEP_ARGS / EXTRACT_ARGS / LOOP_ARGS / DEMO_ARGS replace a part's arguments (a shorter second pass).
# Each part runs under its own `timeout` (seconds: TIMEOUT_<part>, e.g. TIMEOUT_tests=200); a part that fails
# or runs out of time is recorded in the table and the script goes on. Logs and JSON results: OUT/<part>.log,
# OUT/<part>.json. PYTHON picks the interpreter (default: .venv/bin/python, else python3); the demo needs one whose
# folder holds the project's console scripts (DEMO_PYTHON, default: the same), as pipelines/full_run.sh's does.
# Prints figures; asserts no time.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/runs/gpu_check}" && cd "${1:-$ROOT/runs/gpu_check}" && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
DEMO_PY="${DEMO_PYTHON:-$PY}"
QUICK="${GPU_CHECK_QUICK:-0}"
PARTS="${PARTS:-env tests model_step extract train_loop demo}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEVICE="$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
: > "$OUT/parts.tsv"

part() {  # part NAME DEFAULT_TIMEOUT COMMAND...
    local name=$1 limit=$2 start rc var="TIMEOUT_$1"
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    limit="${!var:-$limit}"
    echo "[gpu_check] $name (timeout ${limit}s): $*"
    start=$(date +%s)
    timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" "$limit" >> "$OUT/parts.tsv"
    echo "[gpu_check] $name: exit $rc after $(($(date +%s) - start)) s"
    tail -n 25 "$OUT/$name.log"
}

env_info() {
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import json, platform, torch, transformers
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "capability": torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None}
print("ENV " + json.dumps(info))
EOF
}

if [[ "$QUICK" == 1 ]]; then
    tests=(tests/model/test_model_cuda.py tests/tasks/test_trainer_cuda.py)
    step=(--batches 2 --steps 1 --warmup 0 --dtypes fp32 --rounds 1)
    [[ "$DEVICE" == cuda ]] && step+=(--graph)
    extract=(--config vg_tiny --n-images 4 --batch-sizes 1,2 --dtypes fp32 --min-size 224 --max-size 300
             --workers 1 --one-process)
    loop=(--small --steps 2 --warmup 1 --images 8 --rounds 1 --trainer-workers 0,1 --loader-workers 1
          --loader-batches 2 --no-bert-adam)
    demo=(demo.train_images=40 demo.test_images=20 "demo.pretrain_overrides=[train.epochs=1]"
          "demo.vqa_overrides=[train.epochs=1]" demo.draw_examples=1 demo.check_margin=-1)
else
    tests=(tests)
    step=(--graph --batches 32,max --steps 10 --warmup 3 --big-steps 3 --dtypes fp32,bf16 --rounds 1)
    extract=(--n-images 32 --batch-sizes 1,4,8,16 --dtypes fp32,fp16,bf16)
    loop=(--dtype bf16 --batch 32 --steps 20 --warmup 5 --rounds 1 --trainer-workers 4,8 --loader-workers 4,8
          --loader-batches 20 --no-bert-adam)
    demo=(demo.train_images=200 demo.test_images=60 "demo.pretrain_overrides=[train.epochs=1,data.workers=4]"
          "demo.vqa_overrides=[train.epochs=3,data.workers=4]" demo.draw_examples=1 demo.check_margin=-1)
fi
# a shorter pass: any of these replaces that part's arguments (words split on spaces)
[[ -n "${STEP_ARGS:-}" ]] && read -r -a step <<< "$STEP_ARGS"
[[ -n "${EXTRACT_ARGS:-}" ]] && read -r -a extract <<< "$EXTRACT_ARGS"
[[ -n "${LOOP_ARGS:-}" ]] && read -r -a loop <<< "$LOOP_ARGS"
[[ -n "${DEMO_ARGS:-}" ]] && read -r -a demo <<< "$DEMO_ARGS"
xdist=()
"$PY" -c 'import xdist' 2> /dev/null && [[ "$QUICK" != 1 ]] && xdist=(-n 12)

export -f env_info
export PY
part env 60 bash -c env_info
# the model step first, alone (nothing else on the machine) ...
part model_step 180 "$PY" bench/model_step.py --device "$DEVICE" "${step[@]}" --json "$OUT/model_step.json"
# ... then the two correctness checks side by side (they time nothing) ...
rm -rf "$OUT/demo_run"
part tests 180 "$PY" -m pytest -q -rfE -p no:cacheprovider "${xdist[@]}" --junitxml="$OUT/tests.xml" "${tests[@]}" &
part demo 180 env DEVICE="$DEVICE" "$DEMO_PY" -m pipelines.full_run --run-dir "$OUT/demo_run" "${demo[@]}" &
wait
# ... then the other timings, one at a time
part train_loop 110 "$PY" bench/train_loop.py --device "$DEVICE" "${loop[@]}" --json "$OUT/train_loop.json"
part extract 130 "$PY" bench/extract.py --device "$DEVICE" "${extract[@]}" --json "$OUT/extract.json"
if [[ -f "$OUT/demo_run/summary.json" ]]; then cp "$OUT/demo_run/summary.json" "$OUT/demo_summary.json"; fi

"$PY" bench/gpu_report.py "$OUT" > "$OUT/gpu_check.md" || echo "[gpu_check] the report failed" >&2
cat "$OUT/gpu_check.md"
