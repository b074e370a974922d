#!/usr/bin/env bash
# Two processes on one machine (127.0.0.1) with an explicit coordinator: the multi-host code path
# without a cluster (CPU collectives). Useful to try multi-host behaviour locally.
#   launch/local_2proc.sh WORKDIR [--config ...]
set -euo pipefail
workdir=${1:?usage: $0 WORKDIR [train args...]}; shift
export DCP_COORDINATOR_ADDRESS=127.0.0.1:${PORT:-12355} DCP_NUM_PROCESSES=2 JAX_PLATFORMS=cpu
for i in 0 1; do
  DCP_PROCESS_ID=$i python -m dcp_jax.train --workdir "$workdir" "$@" &
done
wait
