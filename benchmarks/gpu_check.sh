#!/usr/bin/env bash
# Device check (issue 19): on one GPU, the lowrank CLI, a quantizer (int4-g128-mse) and a 3-control ablation on a
# random-init ViT-B-32 with a generated 1,000-class image folder (+ an OOD folder and a calibration-role folder),
# all with --device cuda; prints images/s, the share of the image passes spent waiting for data, the SVDs and
# quantizations done, and any device error. Meant to finish well under 10 minutes on one H200.
#
#   benchmarks/gpu_check.sh                       # the GPU check
#   DEVICE=cpu SIZE=tiny benchmarks/gpu_check.sh  # the same path on the CPU, tiny (slow but minutes)
#
# Knobs (environment): DEVICE (cuda), SIZE (full | tiny: 10 classes of 32-px images, the single template, a
# 2-block model unless MODEL is set), MODEL (ViT-B-32; "tiny" = a 2-block config), CLASSES, PER_CLASS, OOD,
# CALIBRATION (images per class), IMAGE_SIZE, TEMPLATES (openai-80: 80k texts per classifier, as for ImageNet),
# WORKERS (auto = min(8, CPUs)), NOISE_SUBSET, B (bootstrap resamples of the ablation), WORK (a folder to keep;
# default a temporary one, removed at the end), PYTHON (.venv/bin/python if present, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT"

DEVICE="${DEVICE:-cuda}"
SIZE="${SIZE:-full}"
if [[ "$SIZE" == "tiny" ]]; then
  : "${CLASSES:=10}" "${PER_CLASS:=2}" "${OOD:=8}" "${CALIBRATION:=1}" "${IMAGE_SIZE:=32}" "${TEMPLATES:=single}"
  : "${NOISE_SUBSET:=8}" "${B:=100}" "${MODEL:=tiny}"
else
  : "${CLASSES:=1000}" "${PER_CLASS:=2}" "${OOD:=500}" "${CALIBRATION:=1}" "${IMAGE_SIZE:=128}"
  : "${TEMPLATES:=openai-80}" "${NOISE_SUBSET:=1000}" "${B:=200}" "${MODEL:=ViT-B-32}"
fi
WORKERS="${WORKERS:-auto}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TQDM_DISABLE="${TQDM_DISABLE:-1}" MPLBACKEND=Agg

if [[ -n "${WORK:-}" ]]; then
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d -t gpu-check-XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi

if [[ "$MODEL" == "tiny" ]]; then
  MODEL="$WORK/tiny_clip.json"
  cat > "$MODEL" <<'JSON'
{"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 16},
 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
JSON
fi

echo "== data: $CLASSES classes x $PER_CLASS images (+ $OOD OOD, $CALIBRATION calibration per class), ${IMAGE_SIZE}px"
SECONDS=0
DATASETS="$("$PYTHON" "$HERE/make_imagefolder.py" "$WORK/data" --classes "$CLASSES" --per-class "$PER_CLASS" \
  --ood "$OOD" --calibration "$CALIBRATION" --size "$IMAGE_SIZE")"
echo "   generated in ${SECONDS} s: --datasets $DATASETS"

ARGS=(--datasets "$DATASETS" --out "$WORK/out" --device "$DEVICE" --model "$MODEL" --templates "$TEMPLATES"
      --noise-subset "$NOISE_SUBSET" --B "$B")
if [[ "$WORKERS" != "auto" ]]; then ARGS+=(--workers "$WORKERS"); fi
if [[ "$DEVICE" == cuda* ]]; then nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true; fi
status=0
"$PYTHON" "$HERE/gpu_check.py" "${ARGS[@]}" || status=$?
echo "== gpu_check total ${SECONDS} s (exit $status)"
exit $status
