#!/usr/bin/env bash
# The whole chain in one command.
#
#   bash pipelines/full_run.sh                      # the demo: easy-VQA images -> features -> pretraining ->
#                                                   # VQA fine-tuning -> evaluation -> runs/demo/REPORT.md
#   bash pipelines/full_run.sh --dry-run            # print every stage's command, run nothing
#   bash pipelines/full_run.sh --config pipelines/configs/lxmert.yaml   # the real datasets (edit the paths)
#   bash pipelines/full_run.sh --config ... --nnodes 2 --node-rank 0 --master-addr HOST   # several machines
#
# Finished stages are skipped and partial ones resume when the command runs again; each stage's log is
# RUN/logs/<stage>.log. Demo knobs (environment): WEIGHTS=faster_rcnn_from_caffe_attr.pkl (real detector
# weights; without it the detector has random weights), CONFIG (detector config), DEVICE=cpu|cuda.
# Everything else: python -m pipelines.full_run --help.
set -Eeuo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trap 'rc=$?; echo "[full_run] FAILED during environment set-up (exit ${rc})" >&2; exit $rc' ERR
bash "$ROOT/pipelines/setup_env.sh"
trap - ERR
exec "$ROOT/.venv/bin/python" -m pipelines.full_run "$@"
