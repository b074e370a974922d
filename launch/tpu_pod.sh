#!/usr/bin/env bash
# TPU VM pod: run the same command on every worker; jax.distributed.initialize() auto-detects the pod.
# The workdir must be shared by all workers (e.g. a gs:// bucket via gcsfuse or an NFS mount).
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR CLIP_DIR [--config.key=value ...]
# Default config: the B/16 recipe's TPU variant (global batch 16: fits a v4-8 or v5e-8 slice; check a
# slice's fit first, without a TPU: python -m dcp_jax.bench --suite plan --tpu v5e-8 --config ...:tpu).
# The trainer stops at start-up if jax finds no TPU (require_backend=tpu) or if the global batch does
# not divide over the slice's devices (then pass --config.train.batch_size=a multiple of them).
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE WORKDIR CLIP_DIR [overrides...]}; zone=${2:?}; workdir=${3:?}; clip=${4:?}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/dcp_jax && .venv/bin/python -m dcp_jax.train --config ${CONFIG:-configs/dcp_vitb16_coco_stuff.py:tpu} \
    --workdir $workdir --config.clip.checkpoint=$clip --config.require_backend=tpu $*"
