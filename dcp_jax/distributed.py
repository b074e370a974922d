"""Multi-host start-up, the device mesh, and where every array lives on it.

One process per host. `initialize()` calls `jax.distributed.initialize` when the environment says
this is a multi-process job:
- explicit: DCP_COORDINATOR_ADDRESS (host:port), DCP_NUM_PROCESSES, DCP_PROCESS_ID
  (and optionally DCP_LOCAL_DEVICE_IDS, comma separated), e.g. two processes on 127.0.0.1;
- Slurm with more than one task (SLURM_NTASKS > 1) and TPU pods (TPU_WORKER_HOSTNAMES with more
  than one host, or MEGASCALE_*): jax auto-detects everything.
A single process (one GPU host with 4 GPUs: the paper's setup) needs none of it.

The mesh has two axes, ("data", "fsdp"): `config.mesh.fsdp` devices per group hold one copy of
the parameters between them (FSDP), and the data axis takes the remaining devices. The batch is
split over both axes. With fsdp = 1 (the default) parameters are replicated: plain data parallel.
Which parameters are sharded is decided by `config.mesh.shard_rules` (see `param_sharding`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcp_jax import rules as rules_lib

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
SHARDING_STRATEGIES = ("fsdp", "replicate")


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


def is_primary() -> bool:
    """Process 0 writes the files every process would otherwise write alike."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait for every process (no-op for one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# The mesh
# ---------------------------------------------------------------------------------------------

def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(fsdp)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be a positive divisor of the {len(devices)} devices")
    # make_mesh orders devices by the physical topology (rings on TPU); consecutive devices, which
    # share a host, end up on the fsdp axis, where the parameter all-gathers happen.
    return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def local_mesh(fsdp: int = 1) -> Mesh:
    """A mesh over this host's devices (inference: each host segments its own images)."""
    devices = jax.local_devices()
    return make_mesh(fsdp if len(devices) % max(1, int(fsdp)) == 0 else 1, devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------
# Parameter and optimizer-state shardings
# ---------------------------------------------------------------------------------------------

def param_sharding(path: str, shape, mesh: Mesh, shard_rules, min_size: int) -> NamedSharding:
    """The sharding of one parameter (or optimizer-state leaf) from the first matching rule.

    "fsdp": split the largest dimension that the fsdp axis divides; leaves with fewer than
    `min_size` elements, or with no such dimension, are replicated (their all-gather would cost
    more than the memory they save). "replicate": a full copy on every device.
    """
    _, strategy = rules_lib.first_match(shard_rules, path, "config.mesh.shard_rules")
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"config.mesh.shard_rules: strategy {strategy!r} for {path!r}; expected one of "
                         f"{SHARDING_STRATEGIES}")
    n = mesh.shape[FSDP_AXIS]
    shape = tuple(int(s) for s in shape)
    if strategy == "replicate" or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # largest first (stable on ties)
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def tree_shardings(tree, mesh: Mesh, mesh_config):
    """NamedShardings for every array leaf of a state/pytree (abstract or concrete), by its path."""
    shard_rules = rules_lib.check_rules(mesh_config.shard_rules, "config.mesh.shard_rules")
    min_size = int(mesh_config.min_shard_size)

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return param_sharding(rules_lib.path_str(path), leaf.shape, mesh, shard_rules, min_size)

    return jax.tree_util.tree_map_with_path(one, tree)


def bytes_per_device(tree) -> int:
    """Bytes of the arrays of `tree` held by this host's first device (FSDP-sharded leaves count a shard)."""
    device = jax.local_devices()[0]
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
               for shard in x.addressable_shards if shard.device == device)


def put(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array on `sharding` (multi-host safe)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_mesh(tree, mesh: Mesh, mesh_config):
    """Arrays (possibly sharded over other hosts) -> the same values in their rule shardings on `mesh`.

    Arrays this host holds whole move device to device; arrays split across hosts are gathered first.
    """
    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    tree = jax.tree.map(local, tree)
    shardings = tree_shardings(tree, mesh, mesh_config)
    return jax.tree.map(lambda x, s: jax.device_put(x, s) if isinstance(x, jax.Array) else put(x, s), tree, shardings)
