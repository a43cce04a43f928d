#!/usr/bin/env bash
# The whole chain in one command, on the bundled demo images by default:
#   set up .venv -> extract region features into an LMDB store -> verify and describe the store.
#
#   bash pipelines/full_run.sh [IMAGES_DIR] [OUT_DIR]
#
# Environment knobs (all optional):
#   WEIGHTS=/path/faster_rcnn_from_caffe_attr.pkl   detector weights; without it the detector runs with
#                                                   random weights (a demo of the chain, not real features)
#   CONFIG=vg_r101_c4 | vg_tiny | file.yaml         detector config (default: the full VG R101-C4 model)
#   DEVICE=cuda|cpu  BATCH_SIZE (default: 4 on CUDA, 1 on CPU)  WORKERS=2  AMP=none|fp16|bf16
set -Eeuo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGES="${1:-$ROOT/demo/images}"
OUT="${2:-$ROOT/outputs/demo}"
CONFIG="${CONFIG:-vg_r101_c4}"
WORKERS="${WORKERS:-2}"
AMP="${AMP:-none}"
STEP="start"
trap 'rc=$?; echo "[full_run] FAILED at step: ${STEP} (exit ${rc})" >&2; exit $rc' ERR

STEP="environment"
bash "$ROOT/pipelines/setup_env.sh"
BIN="$ROOT/.venv/bin"
mkdir -p "$OUT"
STORE="$OUT/features.lmdb"

if [ -n "${WEIGHTS:-}" ]; then
  weight_args=(--weights "$WEIGHTS")
else
  echo "[full_run] WEIGHTS not set: extracting with RANDOM detector weights (demo of the chain only)."
  weight_args=(--random-weights)
fi
device_args=()
[ -n "${DEVICE:-}" ] && device_args=(--device "$DEVICE")
[ -n "${BATCH_SIZE:-}" ] && device_args+=(--batch-size "$BATCH_SIZE")

STEP="extract-features $IMAGES -> $STORE"
echo "[full_run] step 1/3: extract region features from $IMAGES"
"$BIN/extract-features" "$IMAGES" "$STORE" "${weight_args[@]}" --config "$CONFIG" \
  --workers "$WORKERS" --amp "$AMP" "${device_args[@]}"

STEP="lxmert-features verify $STORE"
echo "[full_run] step 2/3: verify every record of the store"
"$BIN/lxmert-features" verify "$STORE"

STEP="lxmert-features info $STORE"
echo "[full_run] step 3/3: describe the store"
"$BIN/lxmert-features" info "$STORE"

echo "[full_run] done: features in $STORE"
