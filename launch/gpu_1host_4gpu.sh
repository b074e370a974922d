#!/usr/bin/env bash
# The paper's setup: one host, 4 GPUs, global batch 4 (one image per GPU), data parallel.
# Usage: launch/gpu_1host_4gpu.sh WORKDIR CLIP_DIR [extra --config.key=value ...]
#   e.g. launch/gpu_1host_4gpu.sh runs/b16 ~/models/clip-vit-base-patch16
set -euo pipefail
workdir=${1:?usage: $0 WORKDIR CLIP_DIR [overrides...]}; clip=${2:?usage: $0 WORKDIR CLIP_DIR [overrides...]}
shift 2
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1,2,3}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m dcp_jax.train --config "${CONFIG:-configs/dcp_vitb16_coco_stuff.py}" \
  --workdir "$workdir" --config.clip.checkpoint="$clip" --config.require_backend=gpu "$@"
