r"""The GPU plan: every program the accelerator check times, compiled for a GPU this machine does not have.

    python -m dcp_jax.bench --suite plan --gpu h100,h200 --out runs/gpu_plan
    python -m dcp_jax.bench --suite plan --gpu h100 --config configs/tiny.py --large-config configs/tiny.py \
        --out runs/gpu_plan_tiny

XLA:GPU compiles without a device from a description of one (gpu_targets.py). Each program is lowered
from shapes alone (no parameter is created) with every backend-dependent choice made for the GPU
(bfloat16, the attention kernels), compiled with XLA's dump switched on, and read back (gpu_program.py).
Per program it reports: trace and compile seconds on this machine; kernels per call by kind, loop
bodies multiplied by their trip counts, and how many run inside CUDA graphs; XLA's memory plan and
whether it fits the GPU; FLOPs with every layer counted (XLA's cost analysis of the same program with
its loops unrolled and XLA's attention, lowered for the CPU) and those of the compiled kernels
(matmuls, convolutions, attention; recomputation and padding included); an estimated time and the MFU
it implies; and which kernel each attention site runs on.

Two things differ from a real GPU, and the plan says so where they matter: XLA cannot autotune
without a device, so library calls use their default algorithms and Triton's gemm fusions are
switched off (without autotuning one of the recipe's backward matmuls finds no Triton tiling, and XLA
fails): every matmul is a cuBLAS call, where a real GPU picks cuBLAS or Triton per matmul; and the time
is a roofline estimate (gpu_program.estimate), calibrated against the one measurement there is
(docs/performance.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dcp_jax import accelerator, distributed, forward, gpu_program, gpu_targets, inference, measure
from dcp_jax.models import build, compute, dcp

# XLA's options for every plan compile: dump what gpu_program reads; no Triton gemm fusions (above).
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
DUMP_FILES = ("*gpu_after_optimizations.txt", "*thunk_metadata.txt", "*thunk_sequence_after_thunk_passes.txt",
              "*gpu_after_optimizations-memory-usage-report.txt")
FITS_FRACTION = 0.9  # a plan fits when its total is within this share of the GPU's memory (as the TPU plan)


@dataclasses.dataclass(frozen=True)
class Program:
    name: str  # "B/16" / "L/14" are replaced by the config's variant
    model: str  # "base" (--config) | "large" (--large-config)
    kind: str  # "train" | "slide 1" (CLIP + selection, 5 views) | "slide 2" (the head on `selected` classes)
    batch: int = 4  # images per step (one GPU)
    slots: int = 32  # K in training; 0 = every class (theta 0)
    remat: str = "none"
    selected: int = 16


PROGRAMS = (
    Program("B/16 train K=32 batch 4", "base", "train", 4),
    Program("B/16 train K=32 batch 16", "base", "train", 16),
    Program("B/16 train K=32 batch 32", "base", "train", 32),
    Program("B/16 train K=171 remat batch 4", "base", "train", 4, slots=0, remat="full"),
    Program("L/14 train K=32 batch 4", "large", "train", 4),
    Program("L/14 train K=32 batch 16", "large", "train", 16),
    Program("L/14 train K=32 batch 32", "large", "train", 32),
    Program("B/16 slide stage 1 (5 views, C=171)", "base", "slide 1"),
    Program("B/16 slide stage 2 (16 classes)", "base", "slide 2"),
    Program("L/14 slide stage 1 (5 views, C=171)", "large", "slide 1"),
    Program("L/14 slide stage 2 (16 classes)", "large", "slide 2"),
)
CLASSES = accelerator.TRAIN_CLASSES  # the vocabulary a train step and slide stage 1 see (COCO-Stuff's 171)


def program_config(base, program: Program):
    config = copy.deepcopy(base)
    with config.unlocked():
        config.model.remat = program.remat
        config.model.dcs.num_slots = program.slots
        if program.slots == 0:
            config.model.dcs.theta = 0.0
        config.train.batch_size = program.batch
    return config


def lower_slide_stage(config, devices, stage: int, *, selected: int = 16, classes: int = CLASSES,
                      target: str | None = None):
    """Slide inference stage 1 (CLIP + selection on the 5 views of one image) or stage 2 (the head on
    `selected` classes for every view) of `config`, lowered from shapes alone for `target`."""
    mesh = distributed.make_mesh(1, devices[:1])
    replicated = distributed.replicated(mesh)
    shaped = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
    crop = int(config.train.crop_size)
    views_per_image = inference.num_views("slide", crop=crop, stride=int(config.eval.slide_stride),
                                          canvas=int(config.eval.slide_canvas))
    with compute.compiling_for(target or devices[0].platform, devices[0]):
        graphdef, params = nnx.split(build.abstract_model(config))
        params = jax.tree.map(lambda a: shaped(a.shape, a.dtype), params)
        dim = build.clip_config_for(config).projection_dim
        text = shaped((classes, dcp.num_templates(config), dim), jnp.float32)
        views = shaped((views_per_image, crop, crop, 3), jnp.float32)
        stage_one = functools.partial(forward.encode_select.lower, graphdef, params, views, text,
                                      views_per_image=views_per_image, max_slots=classes)
        if stage == 1:
            return stage_one()
        with compute.recording_attention_paths():  # stage 1's sites are not stage 2's
            features = stage_one().out_info[0]
        features = jax.tree.map(lambda a: shaped(a.shape, a.dtype), features)
        args = (features, text, shaped((classes, dim), jnp.float32), shaped((1, classes), jnp.int32),
                shaped((1, classes), jnp.bool_), shaped((classes,), jnp.bool_))
        return forward.decode.lower(graphdef, params, *args, views_per_image=views_per_image, num_slots=selected)


def lower_program(config, program: Program, devices, *, target: str | None = None):
    if program.kind == "train":
        return accelerator.lower_train_step(config, devices, target=target)
    return lower_slide_stage(config, devices, 1 if program.kind == "slide 1" else 2, selected=program.selected,
                             target=target)


def model_gflop(config, program: Program) -> float:
    """FLOPs with every layer counted: XLA's cost analysis of the program traced for a GPU with its loops
    unrolled and attention on XLA's path (the same arithmetic; cuDNN's calls are opaque to the analysis),
    lowered for this machine's CPU (a compile-only GPU client has no cost analysis)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.attention = "xla"
    with compute.for_cost_analysis():
        lowered = lower_program(config, program, jax.devices("cpu")[:1], target="gpu")
    return accelerator.lowered_cost(lowered)[0]


def plan_program(config, program: Program, target: gpu_targets.GpuTarget, devices, *,
                 keep: Path | None = None) -> dict:
    """One program compiled for `target`: what the module docstring lists, as a row."""
    with compute.recording_attention_paths() as sites:
        start = time.perf_counter()
        lowered = lower_program(config, program, devices)
        trace_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="dcp_gpu_plan_") as dump:
        start = time.perf_counter()
        previous = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would compile (and dump) nothing
        try:
            compiled = lowered.compile(compiler_options={**COMPILER_OPTIONS, "xla_dump_to": dump})
        finally:
            jax.config.update("jax_enable_compilation_cache", previous)
        compile_s = time.perf_counter() - start
        kernels = gpu_program.read_program(dump)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for pattern in DUMP_FILES:
                for path in Path(dump).glob(pattern):
                    shutil.copy(path, keep / path.name)
    memory = accelerator.memory_gib(compiled)
    estimate = gpu_program.estimate(kernels, target.bf16_tflops, target.memory_bandwidth)
    gflop = model_gflop(config, program)
    return {
        "gpu": target.name, "device_kind": target.device_kind, "program": program.name, "kind": program.kind,
        "batch": program.batch if program.kind == "train" else 1,
        "dtype": compute.resolve_dtype(config.clip.dtype, "gpu").name, "trace_s": trace_s, "compile_s": compile_s,
        "launches": kernels.launches(), "in_graphs": kernels.launches(in_graph=True),
        "kernels": {kind: kernels.launches(kind) for kind in gpu_program.KINDS},
        "graph_launches": kernels.graph_launches, "host_loop_iterations": kernels.host_loop_iterations,
        "memory_gib": memory, "device_gib": target.memory_gib,
        "fits": memory["total"] <= FITS_FRACTION * target.memory_gib,
        "gflop_model": gflop, "gflop_kernels": kernels.flops() / 1e9,
        "estimate_ms": 1e3 * estimate["seconds"], "launch_ms": 1e3 * estimate["launch_seconds"],
        "estimate_ms_by_kind": {k: 1e3 * v for k, v in estimate["seconds_by_kind"].items()},
        "mfu": gflop / estimate["seconds"] / (1e3 * target.bf16_tflops),
        "attention": unique_sites(sites),
        "top_kernels": [{"name": k.name, "kind": k.kind, "runs": k.runs, "gflop": k.flops / 1e9,
                         "mb": k.bytes / 1e6, "ms": 1e3 * s}
                        for k, s in gpu_program.top_kernels(kernels, target.bf16_tflops, target.memory_bandwidth)],
    }


def unique_sites(sites) -> list[dict]:
    """The attention sites traced (a scanned block is traced once), one row per distinct call."""
    rows = []
    for site in sites:
        row = {"site": site.site, "path": site.path, "q": list(site.q), "k": list(site.k), "reason": site.reason,
               "valid_keys": site.valid_keys}
        if row not in rows:
            rows.append(row)
    return rows


def run_plan(base, large, gpus: list[str], out: Path, *, only: str = "", keep_dumps: bool = False) -> list[dict]:
    """Every program of PROGRAMS (those whose name contains `only`, or one of its comma-separated parts)
    for every GPU named; writes
    out/gpu_plan.{json,md} after every row."""
    from tqdm import tqdm

    from dcp_jax import files

    targets = [gpu_targets.gpu_target(name) for name in gpus]
    wanted = [w.strip().lower() for w in only.split(",")] if only.strip() else [""]
    programs = [p for p in PROGRAMS if any(w in p.name.lower() for w in wanted)]
    if not programs:
        raise ValueError(f"--only {only!r} matches no program; the programs: {', '.join(p.name for p in PROGRAMS)}")
    rows = []
    todo = [(t, p) for t in targets for p in programs]
    for target, program in tqdm(todo, desc="gpu plan", unit="program", file=sys.stderr):
        devices = gpu_targets.compile_only_devices(target)
        config = program_config(base if program.model == "base" else large, program)
        name = program.name.replace("B/16" if program.model == "base" else "L/14", config.clip.variant or "tiny")
        print(f"[dcp_jax.bench] {target.name}: compiling {name}", file=sys.stderr, flush=True)
        keep = out / "xla" / target.name / measure.folder_name(name) if keep_dumps else None
        rows.append({**plan_program(config, program, target, devices, keep=keep), "program": name})
        files.write_json(out / "gpu_plan.json", {"rows": rows, "constants": constants()})
        files.write_text(out / "gpu_plan.md", format_plan(rows))
        jax.clear_caches()
    return rows


def constants() -> dict:
    """Every constant the estimate uses, as the plan's JSON records them."""
    return {"launch_us": dataclasses.asdict(gpu_program.LaunchCosts()), "rate_by_dtype": gpu_program.RATE_BY_DTYPE,
            "gpus": {name: {"bf16_tflops": t.bf16_tflops, "memory_bandwidth_tb_s": t.memory_bandwidth / 1e12,
                            "memory_gib": round(t.memory_gib, 2)} for name, t in gpu_targets.GPUS.items()},
            "compiler_options": COMPILER_OPTIONS, "fits_fraction": FITS_FRACTION}


def format_plan(rows: list[dict]) -> str:
    costs = gpu_program.LaunchCosts()
    lines = ["# GPU plan: the programs compiled for GPUs this machine does not have", "",
             "Compiled ahead of time from shapes alone (dcp_jax/gpu_plan.py). Kernels: launches per call, loop bodies "
             "times their trip counts. GFLOP model: every layer counted once (XLA's cost analysis, loops unrolled); "
             "kernels: the compiled matmuls, convolutions and attention (recomputation and padding included). "
             "**est ms is an estimate**, not a measurement: per kernel max(FLOPs / peak, bytes / bandwidth) + "
             f"{costs.in_graph_us:g} us per launch inside a CUDA graph, {costs.host_us:g} us outside, "
             f"{costs.graph_us:g} us per graph launch, {costs.host_loop_iteration_us:g} us per iteration of a loop "
             "outside a graph; est MFU = model FLOPs / est time / bf16 peak. No autotuning without a device: every "
             "matmul is a cuBLAS call at its default algorithm.", "",
             "| GPU | program | trace s | compile s | kernels | fusions | gemms | convs | cuDNN attn | copies + dyn. slices "
             "| in CUDA graphs | temp GiB | total GiB | fits | GFLOP model | GFLOP kernels | est ms | est MFU |",
             "|" + "---|" * 18]
    for r in rows:
        k = r["kernels"]
        other = k["cudnn other"] + k["other"]
        kinds = f"{k['fusion']}" + (f" (+{other} other)" if other else "")
        share = r["in_graphs"] / max(1, r["launches"])
        lines.append(
            f"| {r['gpu']} | {r['program']} | {r['trace_s']:.1f} | {r['compile_s']:.1f} | {r['launches']} | {kinds} | "
            f"{k['gemm']} | {k['convolution']} | {k['cudnn attention']} | {k['copy'] + k['dynamic slice']} | "
            f"{r['in_graphs']} ({100 * share:.0f} %) | {r['memory_gib']['temp']:.2f} | {r['memory_gib']['total']:.2f} | "
            f"{'yes' if r['fits'] else 'no'} ({r['device_gib']:.0f}) | {r['gflop_model']:.0f} | "
            f"{r['gflop_kernels']:.0f} | {r['estimate_ms']:.2f} | {100 * r['mfu']:.1f} % |")
    lines += ["", "Where the estimated time goes (ms per call):", "",
              "| GPU | program | fusions | gemms | convs | cuDNN attention | copies + dyn. slices | launches | "
              "CUDA graphs launched | host-driven loop iterations |", "|" + "---|" * 10]
    for r in rows:
        t = r["estimate_ms_by_kind"]
        lines.append(f"| {r['gpu']} | {r['program']} | {t['fusion']:.2f} | {t['gemm']:.2f} | {t['convolution']:.2f} | "
                     f"{t['cudnn attention']:.2f} | {t['copy'] + t['dynamic slice']:.2f} | {r['launch_ms']:.2f} | "
                     f"{r['graph_launches']} | {r['host_loop_iterations']} |")
    lines += ["", "Attention: the kernel each site runs on (compute.attention_path), as traced for the GPU:", "",
              "| GPU | program | site | path | q | k | why |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["attention"]:
            q = "x".join(map(str, s["q"]))
            if s["valid_keys"]:
                q += f" ({s['valid_keys']} tokens, padded)"
            lines.append(f"| {r['gpu']} | {r['program']} | {s['site']} | {s['path']} | {q} | "
                         f"{'x'.join(map(str, s['k']))} | {s['reason']} |")
    return "\n".join(lines) + "\n"
