"""Multi-host start-up and the data-parallel mesh.

One process per host. `initialize()` calls `jax.distributed.initialize` when the environment says
this is a multi-process job:
- explicit: DCP_COORDINATOR_ADDRESS (host:port), DCP_NUM_PROCESSES, DCP_PROCESS_ID
  (and optionally DCP_LOCAL_DEVICE_IDS, comma separated), e.g. two processes on 127.0.0.1;
- Slurm with more than one task (SLURM_NTASKS > 1) and TPU pods (TPU_WORKER_HOSTNAMES with more
  than one host, or MEGASCALE_*): jax auto-detects everything.
A single process (one GPU host with 4 GPUs: the paper's setup) needs none of it.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def _multi_host_cluster() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize() -> None:
    """Join the multi-process job described by the environment; a no-op for one process."""
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("DCP_COORDINATOR_ADDRESS")
    if address:
        missing = [k for k in ("DCP_NUM_PROCESSES", "DCP_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"DCP_COORDINATOR_ADDRESS is set but {missing} are not; set all three "
                             "(DCP_COORDINATOR_ADDRESS=host:port DCP_NUM_PROCESSES=N DCP_PROCESS_ID=i)")
        local = os.environ.get("DCP_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["DCP_NUM_PROCESSES"]),
            process_id=int(os.environ["DCP_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None)
    elif _multi_host_cluster():
        jax.distributed.initialize()  # Slurm / TPU pod: auto-detected


def data_mesh() -> Mesh:
    """A 1-D mesh over every device of every host; batches are split along it, params replicated."""
    return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
