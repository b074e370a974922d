r"""The accelerator check: how fast and how full the model runs on this machine's accelerators.

    python -m dcp_jax.bench --suite accelerator --out DIR          # B/16 + L/14 recipes, random weights
    python -m dcp_jax.bench --suite accelerator --config configs/tiny.py --large-config configs/tiny.py --out DIR

No data and no checkpoint: every case runs the recipe's model with random weights on random inputs.
Per case it prints and writes (DIR/accelerator.json, DIR/accelerator.md): compile seconds (lowering +
XLA compile of the step), step ms (median of --runs after a warm-up), images/s, XLA's GFLOPs and bytes
accessed per step, achieved TFLOP/s, MFU against the device's bfloat16 peak (named in the table; none
for CPUs and unknown devices), XLA's planned memory per device and the device's own peak where it
reports one.

FLOPs and bytes are XLA's cost analysis of the step traced with every loop unrolled
(compute.for_cost_analysis: the analysis counts a loop's body once), taken from the lowered program
before XLA's fusion passes, so nothing is compiled twice; bytes are therefore an upper bound.
Training cases use global batches on a data-parallel mesh over every local device.

The memory plan (`--suite plan`) needs no accelerator: it compiles the config's train step ahead of
time for a TPU slice (`--tpu v5e-8,v4-8`: jax.experimental.topologies with jax's TPU plugin installed,
as maxtext's train_compile.py does) or for this machine's devices, and prints XLA's memory plan per
device beside the chip's memory: whether a recipe fits, checked before a slice is booked.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcp_jax import distributed, files, forward, measure
from dcp_jax.models import build, compute, dcp

# Dense bfloat16 peak TFLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


def device_peak_tflops(device_kind: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str  # "base" (--config) | "large" (--large-config)
    kind: str  # "train" | "slide" (inference, CAT-Seg's 5 slide views of one image)
    dtype: str = "bfloat16"
    batch: int = 0  # global batch of a training case; 0 = one image per device
    slots: int = 32  # K decoded in training; 0 = every one of the 171 classes (theta 0, Table VII)
    remat: str = "none"
    selected: int = 16  # classes decoded in inference


CASES = (
    Case("B/16 train K=32 batch 4 bf16", "base", "train", batch=4),
    Case("B/16 train K=32 batch 16 bf16", "base", "train", batch=16),
    Case("B/16 train K=32 batch 4 f32", "base", "train", dtype="float32", batch=4),
    Case("B/16 train K=32 batch 16 f32", "base", "train", dtype="float32", batch=16),
    Case("B/16 train K=171 remat bf16", "base", "train", slots=0, remat="full"),
    Case("L/14 train K=32 bf16", "large", "train"),
    Case("B/16 slide inference 16 classes", "base", "slide"),
    Case("L/14 slide inference 16 classes", "large", "slide"),
)
TRAIN_CLASSES = 171  # COCO-Stuff's training vocabulary


def case_config(base, case: Case):
    config = copy.deepcopy(base)
    with config.unlocked():
        config.clip.dtype = case.dtype
        config.model.remat = case.remat
        config.model.dcs.num_slots = case.slots
        if case.slots == 0:
            config.model.dcs.theta = 0.0
    return config


def lowered_cost(lowered) -> tuple[float, float]:
    """(GFLOPs, GB accessed) of a lowered program, from XLA's cost analysis."""
    cost = lowered.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) / 1e9, float(cost.get("bytes accessed", 0.0)) / 1e9


def shared_model(config, cache: dict):
    """The config's model with random weights, built once per architecture and shared by the cases that
    differ only in how they compute (dtype, remat, slots): creating it is not what the check measures."""
    key = (config.clip.variant, config.clip.image_size, config.clip.get("checkpoint", ""))
    if key not in cache:
        cache[key] = nnx.state(build.create_model(config))
    return nnx.merge(nnx.graphdef(build.abstract_model(config)), cache[key])


def run_train(config, case: Case, runs: int, models: dict, profile: Path | None = None,
              profile_steps: int = measure.PROFILE_STEPS) -> dict:
    """One training case (`profile`: a folder for a trace of `profile_steps` more steps, after the timing)."""
    from dcp_jax import optim, train

    devices = jax.local_devices()
    batch_size = case.batch or len(devices)
    if batch_size % len(devices):
        return {"skipped": f"global batch {batch_size} is not a multiple of the {len(devices)} devices"}
    with config.unlocked():
        config.train.batch_size = batch_size
    mesh = distributed.make_mesh(config.mesh.fsdp, devices)
    model = nnx.merge(*nnx.split(shared_model(config, models)))
    nnx.update(model, distributed.to_mesh(nnx.state(model), mesh, config.mesh))
    optimizer = optim.make_optimizer(config, model)
    graphdef, state = nnx.split((model, optimizer))
    shardings = distributed.tree_shardings(state, mesh, config.mesh)
    crop = int(config.train.crop_size)
    rng = np.random.default_rng(0)
    data = distributed.batch_sharding(mesh)
    batch = {"image": jax.device_put(rng.integers(0, 256, (batch_size, crop, crop, 3), dtype=np.uint8), data),
             "label": jax.device_put(rng.integers(0, TRAIN_CLASSES, (batch_size, crop, crop), dtype=np.int32), data)}
    text = jnp.asarray(measure.random_text(TRAIN_CLASSES, dcp.num_templates(config), model.clip_dim))
    tokens = measure.random_text_tokens(config, model.clip.config.text.vocab_size, TRAIN_CLASSES)
    state = jax.tree.leaves(state)  # the train step's flat state
    start = time.perf_counter()
    train_step = train.make_train_step(config, graphdef, shardings, TRAIN_CLASSES)
    compiled = train_step.compile(state, batch, text, *tokens)
    compile_s = time.perf_counter() - start
    with compute.for_cost_analysis():
        gflops, gbytes = lowered_cost(train.make_train_step(config, graphdef, shardings, TRAIN_CLASSES)
                               .lower(state, batch, text, *tokens))
    # the step donates its state: a copy, so that the shared model stays
    holder = {"state": jax.device_put(jax.tree.map(jnp.copy, state), jax.tree.leaves(shardings))}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch, text, *tokens)
        return metrics["loss"]

    step_s, host_s = measure.median_step_and_host_seconds(step, runs)
    result = {"images": batch_size, "compile_s": compile_s, "step_ms": 1e3 * step_s, "host_ms": 1e3 * host_s,
              "gflops": gflops, "gbytes": gbytes,
              "plan_gib": measure.compiled_stats(compiled)[1], "device_peak_gib": measure.device_peak_gib()}
    if profile:  # after the timing, which the profiler would slow
        result["profile"] = str(measure.profile_runs(step, profile, profile_steps, name="train").perfetto)
    return result


def run_slide(config, case: Case, runs: int, models: dict, profile: Path | None = None,
              profile_steps: int = measure.PROFILE_STEPS) -> dict:
    """One slide-inference case (`profile`: as run_train's)."""
    model = shared_model(config, models)
    runner = measure.Bench(config, model, mode="slide")
    classes = max(case.selected, 171)  # the vocabulary stage 1 ranks; K = case.selected decoded
    text = jnp.asarray(measure.random_text(classes, dcp.num_templates(config), model.clip_dim))
    start = time.perf_counter()
    (one, args_one), (two, args_two) = runner.stages(text, case.selected)
    compile_s = time.perf_counter() - start
    with compute.for_cost_analysis():
        views = runner.views_per_image
        cost_one = lowered_cost(forward.encode_select.lower(runner.graphdef, *args_one, views_per_image=views,
                                                            max_slots=classes))
        cost_two = lowered_cost(forward.decode.lower(runner.graphdef, *args_two, views_per_image=views,
                                                     num_slots=case.selected))
    infer = lambda: (one(*args_one), two(*args_two))  # noqa: E731
    step_s, host_s = measure.median_step_and_host_seconds(infer, runs)
    result = {"images": 1, "compile_s": compile_s, "step_ms": 1e3 * step_s, "host_ms": 1e3 * host_s,
              "gflops": cost_one[0] + cost_two[0],
              "gbytes": cost_one[1] + cost_two[1], "plan_gib": max(measure.compiled_stats(c)[1] for c in (one, two)),
              "device_peak_gib": measure.device_peak_gib()}
    if profile:  # after the timing, which the profiler would slow
        result["profile"] = str(measure.profile_runs(infer, profile, profile_steps, name="forward").perfetto)
    return result


def load_config(spec: str, overrides: dict):
    """A config file spec 'path.py[:ARG]' -> its get_config(ARG), with the --config.KEY overrides applied."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--large-config {path}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"dcp_jax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.update_from_flattened_dict(dict(overrides))
    return config


def run_suite(base, large, out, *, runs: int = 5, only: str = "", profile: Path | None = None,
              profile_steps: int = measure.PROFILE_STEPS) -> tuple[list[dict], dict]:
    """Every case of CASES (those whose name contains `only`), a row each; writes out/accelerator.{json,md}
    after every row. Returns (rows, header). `profile`: a folder for a trace of `profile_steps` steps per case,
    after its timing, in profile/<NN>_<case> (NN: the case's place, since the tiny config names two cases alike);
    the row's "profile" names its Perfetto file."""
    from tqdm import tqdm

    device = jax.local_devices()[0]
    peak = device_peak_tflops(device.device_kind) if device.platform != "cpu" else None
    header = {"device": f"{len(jax.local_devices())} x {device.device_kind} ({device.platform})",
              "jax": jax.__version__, "peak_bf16_tflops": peak, "date": time.strftime("%Y-%m-%d"), "runs": runs}
    cases = [c for c in CASES if only.lower() in c.name.lower()]
    if not cases:
        raise ValueError(f"--only {only!r} matches no case; the cases: {', '.join(c.name for c in CASES)}")
    rows, models = [], {}
    for i, case in enumerate(tqdm(cases, desc="accelerator check", unit="case", file=sys.stderr)):
        config = case_config(base if case.model == "base" else large, case)
        name = case.name.replace("B/16" if case.model == "base" else "L/14", config.clip.variant or "tiny")
        folder = Path(profile) / f"{i:02d}_{measure.folder_name(name)}" if profile else None
        result = (run_train if case.kind == "train" else run_slide)(config, case, runs, models, folder, profile_steps)
        row = {**dataclasses.asdict(case), "case": name, **result}
        if "step_ms" in result:
            row["images_per_s"] = result["images"] / (result["step_ms"] / 1e3)
            row["tflops_per_s"] = result["gflops"] / result["step_ms"]  # GFLOP / ms = TFLOP/s
            row["mfu"] = None if peak is None else row["tflops_per_s"] / (peak * len(jax.local_devices()))
        rows.append(row)
        files.write_json(out / "accelerator.json", {"header": header, "rows": rows})
        files.write_text(out / "accelerator.md", format_markdown(rows, header))
        jax.clear_caches()  # each case's programs are its own: free them
    return rows, header


# ---------------------------------------------------------------------------------------------
# Ahead-of-time memory plans
# ---------------------------------------------------------------------------------------------

# Single-host TPU slices by their Cloud name: (topology, chip config, chips per host, GiB per jax device).
# A v4 chip is one jax device (megacore: its two TensorCores act as one).
TPU_SLICES = {
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1), 32.0),
    "v5e-4": ("v5e:2x2", "default", (2, 2, 1), 16.0),
    "v5e-8": ("v5e:2x4", "default", (2, 4, 1), 16.0),
}


def tpu_slice_devices(name: str) -> tuple[list, float]:
    """The abstract devices of a TPU slice (enough to compile for, nothing to run on) and each device's
    memory in GiB. Needs jax's TPU plugin installed, not a TPU."""
    if name not in TPU_SLICES:
        raise ValueError(f"--tpu {name!r}: unknown slice; known: {', '.join(TPU_SLICES)}")
    topology, chip_config, host_bounds, gib = TPU_SLICES[name]
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                            chips_per_host_bounds=host_bounds, num_slices=1,
                                            wrap=(False, False, False))
    except Exception as e:  # no TPU plugin: jax cannot describe a TPU
        raise RuntimeError(f"cannot describe a TPU {name} here ({type(e).__name__}: {str(e)[:200]}); install jax's "
                           'TPU plugin beside this jax (pip install -e ".[tpu]"); no TPU is needed') from e
    return list(desc.devices), gib


def lower_train_step(config, devices, *, num_classes: int = TRAIN_CLASSES, target: str | None = None):
    """One train step of `config` over `devices` (real ones or a compile-only topology's), lowered from
    shapes alone: no parameter is created, nothing runs. Backend-dependent choices (dtype and attention
    "auto", CPU chunks) are made for `target` (default: the devices' platform)."""
    from dcp_jax import optim, train

    batch_size = int(config.train.batch_size)
    if batch_size % len(devices):
        raise ValueError(f"train.batch_size={batch_size} does not divide over the {len(devices)} devices")
    mesh = distributed.make_mesh(config.mesh.fsdp, devices)

    def model_and_optimizer():
        model = build.abstract_model(config)
        return model, optim.make_optimizer(config, model)

    with compute.compiling_for(target or devices[0].platform, devices[0]):
        graphdef, state = nnx.split(nnx.eval_shape(model_and_optimizer))
        shardings = distributed.tree_shardings(state, mesh, config.mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
        state = jax.tree.leaves(state)  # the train step's flat state
        crop, data = int(config.train.crop_size), distributed.batch_sharding(mesh)
        batch = {"image": jax.ShapeDtypeStruct((batch_size, crop, crop, 3), jnp.uint8, sharding=data),
                 "label": jax.ShapeDtypeStruct((batch_size, crop, crop), jnp.int32, sharding=data)}
        clip_config = build.clip_config_for(config)
        dim = clip_config.projection_dim
        text = jax.ShapeDtypeStruct((num_classes, dcp.num_templates(config), dim), jnp.float32,
                                    sharding=distributed.replicated(mesh))
        tokens = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=distributed.replicated(mesh)),
                              measure.random_text_tokens(config, clip_config.text.vocab_size, num_classes))
        return train.make_train_step(config, graphdef, shardings, num_classes).lower(state, batch, text, *tokens)


def memory_gib(compiled) -> dict:
    """XLA's memory plan of a compiled program per device, in GiB: arguments, outputs, temporaries,
    donated (alias) and total = arguments + outputs + temporaries - donated."""
    m = compiled.memory_analysis()
    gib = {key: getattr(m, f"{key}_size_in_bytes") / measure.GIB for key in ("argument", "output", "temp", "alias")}
    return {**gib, "total": gib["argument"] + gib["output"] + gib["temp"] - gib["alias"]}


def memory_plan(config, devices, *, num_classes: int = TRAIN_CLASSES) -> dict:
    """XLA's memory plan per device of one train step of `config` over `devices` (real ones or a TPU
    topology's), compiled ahead of time from shapes alone (lower_train_step)."""
    start = time.perf_counter()
    compiled = lower_train_step(config, devices, num_classes=num_classes).compile()
    batch_size = int(config.train.batch_size)
    return {"devices": len(devices), "device_kind": devices[0].device_kind, "batch": batch_size,
            "per_device_batch": batch_size // len(devices), "slots": int(config.model.dcs.num_slots),
            "dtype": compute.resolve_dtype(config.clip.dtype, devices[0].platform).name,
            "remat": str(config.model.remat), "compile_s": time.perf_counter() - start, **memory_gib(compiled)}


def format_plan(rows: list[dict], config_name: str) -> str:
    lines = [f"# XLA memory plan per device: one train step of {config_name}", "",
             "Compiled ahead of time (no parameters created, nothing run); total = arguments + outputs + "
             "temporaries - donated buffers; fits = total within 90 % of the device's memory.", "",
             "| slice | per-device batch | K | dtype | remat | arguments GiB | temporaries GiB | total GiB | "
             "device GiB | fits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = r.get("device_gib")
        fits = "-" if memory is None else ("yes" if r["total"] <= 0.9 * memory else "no")
        lines.append(f"| {r['name']}: {r['devices']} x {r['device_kind']} | {r['per_device_batch']} | "
                     f"{r['slots'] or 'all'} | {r['dtype']} | {r['remat']} | {r['argument']:.2f} | {r['temp']:.2f} | "
                     f"{r['total']:.2f} | {'-' if memory is None else f'{memory:g}'} | {fits} |")
    return "\n".join(lines) + "\n"


def format_markdown(rows: list[dict], header: dict) -> str:
    peak = header["peak_bf16_tflops"]
    peak_text = f"bf16 peak {peak:g} TFLOP/s per device" if peak else "no bf16 peak known for this device: no MFU"
    lines = [f"# dcp_jax accelerator check: {header['device']}", "",
             f"jax {header['jax']}, {header['date']}; {peak_text}. Random weights; step = median of "
             f"{header['runs']} runs after a warm-up; host ms: until the step call returned (when it nears the "
             "step, the host sets the pace). GFLOPs and GB: XLA's cost analysis per step (GB before fusion: an upper "
             "bound).", "",
             "| case | compile s | step ms | host ms | images/s | GFLOPs | GB accessed | TFLOP/s | MFU | plan GiB | "
             "peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        device_peak = "-" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.2f}"
        lines.append(f"| {r['case']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | {r['host_ms']:.2f} | "
                     f"{r['images_per_s']:.1f} | "
                     f"{r['gflops']:.0f} | {r['gbytes']:.1f} | {r['tflops_per_s']:.2f} | {mfu} | "
                     f"{r['plan_gib']:.2f} | {device_peak} |")
    return "\n".join(lines) + "\n"
