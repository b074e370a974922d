"""The GPUs that `bench --suite plan --gpu NAME` compiles for, on a machine that has none.

XLA:GPU compiles without a device when it is given a description of one (a GpuTargetConfigProto);
jax's CUDA plugin then makes compile-only devices of it (jax.experimental.topologies). The
descriptions are written here from each chip's published figures: NVIDIA's data sheets (SM count,
clocks, memory size and bandwidth, cache and shared memory sizes, dense bfloat16 tensor throughput),
which XLA's own target specs also hold (openxla/xla, xla/backends/gpu/target_config/specs/*.txtpb,
Apache License 2.0); no file of XLA's is copied. Only the fields XLA's compiler reads are written,
and the CUDA, driver and cuDNN versions are those of a current image: XLA leaves gemms, cuDNN calls
and loops out of CUDA graphs where the driver is older than 12.3, so the versions decide what the
plan counts as inside a graph.

The plugin and cuDNN are an opt-in extra: `pip install -e ".[gpu-plan]"` (about 1.5 GB to download:
jax's CUDA 12 plugin, cuDNN and cuBLAS; no driver and no GPU are needed).
"""

from __future__ import annotations

import dataclasses

INSTALL_HINT = 'pip install -e ".[gpu-plan]" -c constraints/cpu-py311.txt'


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str  # as --gpu takes it
    device_kind: str  # as jax names such a device
    compute_capability: tuple[int, int]
    sms: int
    fp32_units_per_sm: int
    clock_ghz: float
    memory_bytes: int  # what the driver reports as usable
    memory_bandwidth: float  # bytes / s
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    bf16_tflops: float  # dense tensor-core peak, the estimate's FLOP rate and MFU's denominator

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def config_text(self) -> str:
        """The GpuTargetConfigProto (text format) that jax's get_topology_desc takes."""
        major, minor = self.compute_capability
        # sm_90a: Hopper's architecture-specific features (wgmma, TMA), which XLA's Hopper kernels use
        extension = "ACCELERATED_FEATURES" if major >= 9 else "NONE"
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {self.sms}
  fpus_per_core: {self.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  memory_bandwidth: {int(self.memory_bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {extension} }}
  name: "{self.device_kind}"
  device_vendor: "NVIDIA Corporation"
  driver_version: "{DRIVER_CUDA_VERSION}"
  runtime_version: "{RUNTIME_CUDA_VERSION}"
  compile_time_toolkit_version: "{RUNTIME_CUDA_VERSION}"
  dnn_version: "{CUDNN_VERSION}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN_VERSION.split('.')[0]} minor: {CUDNN_VERSION.split('.')[1]} }}
device_description_str: "{self.device_kind}"
"""


# The software the plan assumes on the GPU machine: a CUDA 13 driver (the H200 image of
# shared/research/gpu_run.md had driver 580), jax's CUDA 12 plugin (12.9) and cuDNN 9.10 or newer.
DRIVER_CUDA_VERSION = "13.0.0"
RUNTIME_CUDA_VERSION = "12.9.0"
CUDNN_VERSION = "9.10.0"

GIB = 2**30
GPUS = {
    # H100 SXM5 80 GB: 132 SMs at 1.98 GHz boost, HBM3 3.35 TB/s, 50 MiB L2, 989 TFLOP/s dense bf16
    "h100": GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 84_942_979_072, 3.35232e12,
                      50 * 2**20, 233_472, 232_448, 989.0),
    # H200 SXM 141 GB: the H100's compute with HBM3e, 4.8 TB/s
    "h200": GpuTarget("h200", "NVIDIA H200 141GB HBM3e", (9, 0), 132, 128, 1.98, 151_397_597_184, 4.8e12,
                      50 * 2**20, 233_472, 232_448, 989.0),
    # A100 SXM4 80 GB: 108 SMs at 1.41 GHz, HBM2e 2.04 TB/s, 40 MiB L2, 312 TFLOP/s dense bf16
    "a100": GpuTarget("a100", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 85_100_068_864, 2.03904e12,
                      40 * 2**20, 167_936, 166_912, 312.0),
}


def gpu_target(name: str) -> GpuTarget:
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(f"--gpu {name!r}: unknown GPU; known: {', '.join(GPUS)}")
    return GPUS[key]


def compile_only_devices(target: GpuTarget) -> list:
    """One compile-only jax device of `target` (nothing can run on it). Needs jax's CUDA plugin and a
    process whose jax backend is the CPU (jax_platforms="cpu"): the plugin's own start-up needs a driver."""
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=target.config_text(), topology="1x1x1")
    except Exception as e:  # no CUDA plugin: jax cannot describe a GPU
        raise RuntimeError(f"cannot describe an {target.device_kind} here ({type(e).__name__}: {str(e)[:160]}); "
                           f"install jax's CUDA plugin and cuDNN beside this jax: {INSTALL_HINT} "
                           "(no GPU or driver is needed)") from e
    return list(desc.devices)
