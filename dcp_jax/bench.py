r"""What category selection saves: parameters, FLOPs, latency and memory (the paper's Tables II and VII).

  python -m dcp_jax.bench --config configs/dcp_vitb16_coco_stuff.py --out bench/b16
  python -m dcp_jax.bench --config configs/dcp_vitb16_coco_stuff.py --vocab-sizes 150,847 --thetas 0,0.5 \
      --train --torch --out bench/b16
  python -m dcp_jax.bench --workdir runs/demo --dataset folder:runs/demo/toy_world --images 20 --out bench/demo

For every (vocabulary size C, theta) it measures the inference forward of one image (`--mode`: the
whole image, or CAT-Seg's 5 slide views), as the two compiled stages of dcp_jax/forward.py:
CLIP + selection, then the head on the slot bucket K the selection needs (theta 0 decodes every
class, K = C). GFLOPs come from XLA's cost analysis of each compiled stage (CLIP = stage 1, which
includes the selection matmul; head = stage 2: TGA, SED, tag validation); latency is the median of
`--runs` runs after a warm-up; memory is XLA's memory analysis of the compiled programs (arguments
+ outputs + temporaries of the larger stage) and, where the device reports one, its own peak.

Random weights select nothing meaningful, so the number of selected classes comes either from
`--selected N` (default 16) or, with `--workdir W --dataset SPEC`, from the trained model on the
dataset's first `--images` images (its vocabulary, the mean per image); each row says which.
`--train` adds one training step at batch 1 per theta on the `--train-classes`-class training vocabulary
(default 171, COCO-Stuff's; K = 171 at theta 0, else model.dcs.num_slots), to the rows of that vocabulary
size: Table VII's memory and time columns. A step whose compiled program would need more than 80 % of this
machine's memory is compiled and reported but not run.
`--torch` times the same inference forward in the PyTorch reference (dcp_jax.torch_ref) on the
same inputs and thread count, one torch run after each JAX run so that both see the same machine load
(not on CPU rows whose XLA plan exceeds 40 % of the machine's memory: the eager forward keeps more alive). bench.json and bench.md are rewritten after every row. Writes OUT/bench.json ({"rows": [...]}) and OUT/bench.md.
`--profile DIR` (tables and accelerator suites) also writes a jax.profiler trace of `--profile-steps` more runs of
each row's timed forward (and training step) or each case's step, after its timing, to DIR/<NN>_<row or case>/,
for TensorBoard's profile plugin and Perfetto; the row's "profile" names its Perfetto file.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcp_jax import cli, distributed, files, forward, runtime
from dcp_jax import config as config_lib
from dcp_jax.measure import (PROFILE_STEPS, Bench, compiled_stats, device_peak_gib, has_loops, median_seconds,
                             folder_name, profile_note, profile_runs, random_text, random_text_tokens,
                             too_big_to_run)
from dcp_jax.models import build, compute, dcp
from dcp_jax.models.summary import count_params


def measured_selection(workdir, config, spec: str, thetas, images: int) -> tuple[list[str], dict[float, float]]:
    """The dataset's vocabulary and, per theta, the mean number of classes the trained model selects per
    image (union over the views of `config.eval.mode`) on the dataset's first `images` images."""
    from dcp_jax.data import datasets, pipeline
    from dcp_jax.segmenter import Segmenter

    ds = datasets.open_dataset(spec, "val", config.eval.data_root or None)
    items = pipeline.eval_dataset(ds, short_side=config.eval.short_side, max_images=images)
    counts = {}
    for theta in thetas:
        with config.unlocked():
            config.model.dcs.theta = float(theta)  # a static attribute of the model: rebuilt per theta
        segmenter = Segmenter.from_workdir(workdir, config)
        segmenter.set_vocabulary(ds.class_names)
        selected = []
        for i in range(len(items)):
            segmenter.segment([items[i]["image"]], resized=True, original_sizes=[items[i]["label"].shape])
            selected.append(segmenter.last_slots["selected"])
        counts[theta] = float(np.mean(selected))
    return list(ds.class_names), counts


def train_row(config, model, num_classes: int, slots: int, runs: int, profile: Path | None = None,
              profile_steps: int = PROFILE_STEPS) -> dict:
    """One training step at batch 1 with K slots on a C-class vocabulary: time, GFLOPs, memory. `profile`: a
    folder for a trace of `profile_steps` more steps, after the timing ("train_profile" in the result)."""
    from dcp_jax import optim, train

    config = copy.deepcopy(config)  # the caller's config keeps its K
    with config.unlocked():
        config.model.dcs.num_slots = slots
        config.train.batch_size = 1
    mesh = distributed.make_mesh(devices=jax.local_devices()[:1])
    optimizer = optim.make_optimizer(config, model)
    graphdef, state = nnx.split((model, optimizer))
    shardings = distributed.tree_shardings(state, mesh, config.mesh)
    state = jax.device_put(state, shardings)  # onto the one device, wherever the caller's model lives
    step = train.make_train_step(config, graphdef, shardings, num_classes)
    crop = int(config.train.crop_size)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (1, crop, crop, 3)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, num_classes, (1, crop, crop)), jnp.int32)}
    text = jnp.asarray(random_text(num_classes, dcp.num_templates(config), model.clip_dim))
    tokens = random_text_tokens(config, model.clip.config.text.vocab_size, num_classes)
    state = jax.tree.leaves(state)  # the train step's flat state
    compiled = step.compile(state, batch, text, *tokens)
    gflops, memory = compiled_stats(compiled)
    if has_loops(model):
        with compute.for_cost_analysis():  # the FLOPs of the same step without loops (Bench.gflops)
            gflops = compiled_stats(train.make_train_step(config, graphdef, shardings, num_classes)
                                     .lower(state, batch, text, *tokens).compile())[0]
    result = {"train_slots": slots, "train_gflops": gflops, "train_xla_memory_gib": memory, "train_step_s": None,
              "train_device_peak_gib": None}
    if too_big_to_run(memory):
        return result
    holder = {"state": state}

    def once():
        holder["state"], metrics = step(holder["state"], batch, text, *tokens)
        return metrics

    result.update(train_step_s=median_seconds(once, runs), train_device_peak_gib=device_peak_gib())
    if profile:  # after the timing, which the profiler would slow
        result["train_profile"] = str(profile_runs(once, profile, profile_steps, name="train").perfetto)
    return result


def _seconds(value: float | None, digits: int) -> str:
    return "not run (memory)" if value is None else f"{value:.{digits}f}"


def format_markdown(rows: list[dict], header: dict) -> str:
    lines = [f"# dcp_jax bench: {header['model']}, {header['mode']} mode, {header['device']}", "",
             f"Parameters: {header['params_total'] / 1e6:.2f} M total, {header['params_learnable'] / 1e6:.2f} M "
             f"learnable. Selected classes: {header['selected_from']}. Latency: median of {header['runs']} runs "
             f"of one image ({header['views']} view(s)).", "",
             "| C | theta | selected | K | GFLOPs | CLIP | head | latency s | XLA memory GiB |"
             + (" torch s | JAX/torch |" if any("torch_latency_s" in r for r in rows) else "")
             + (" train K | train s | train GFLOPs | train memory GiB |" if any("train_slots" in r for r in rows) else ""),
             ]
    lines.append("|" + "---|" * (lines[-1].count("|") - 1))
    for r in rows:
        cells = [str(r["vocab_size"]), f"{r['theta']:g}", f"{r['selected']:.1f}", str(r["slots"]), f"{r['gflops']:.1f}",
                 f"{r['clip_gflops']:.1f}", f"{r['head_gflops']:.1f}", _seconds(r["latency_s"], 3),
                 f"{r['xla_memory_gib']:.2f}"]
        if "torch_latency_s" in r:
            cells += [_seconds(r["torch_latency_s"], 3), f"{r['latency_s'] / r['torch_latency_s']:.2f}"]
        elif any("torch_latency_s" in r for r in rows):
            cells += ["-", "-"]
        if "train_slots" in r:
            cells += [str(r["train_slots"]), _seconds(r["train_step_s"], 2), f"{r['train_gflops']:.1f}",
                      f"{r['train_xla_memory_gib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.bench", __doc__, argv, config=cli.default_config())
    f = cmd.flags
    flags.DEFINE_string("vocab-sizes", "20,59,150,459,847", "vocabulary sizes C (random unit text embeddings)",
                        flag_values=f)
    flags.DEFINE_string("thetas", "0,0.3,0.5,0.7,0.9", "DCS thresholds; 0 decodes every class", flag_values=f)
    flags.DEFINE_enum("mode", "whole", ["whole", "slide"], "one view per image, or CAT-Seg's 5 slide views",
                      flag_values=f)
    flags.DEFINE_integer("selected", 16, "classes selected per image at theta > 0, with random weights",
                         flag_values=f)
    flags.DEFINE_string("workdir", None, "a trained workdir: measure the selected classes on --dataset instead",
                        flag_values=f)
    flags.DEFINE_string("dataset", None, "dataset spec for --workdir (its vocabulary is the one measured)",
                        flag_values=f)
    flags.DEFINE_integer("images", 20, "images of --dataset to count selected classes on", flag_values=f)
    flags.DEFINE_integer("runs", 5, "timed runs per row, after one warm-up", flag_values=f)
    flags.DEFINE_bool("train", False, "also time one training step at batch 1 per theta", flag_values=f)
    flags.DEFINE_integer("train-classes", 171, "training vocabulary size of --train (COCO-Stuff: 171)",
                         flag_values=f)
    flags.DEFINE_bool("torch", False, "also time the PyTorch reference on the same inputs", flag_values=f)
    flags.DEFINE_integer("threads", 0, "torch threads for --torch (0 = os.cpu_count())", flag_values=f)
    flags.DEFINE_string("out", None, "output directory for bench.json and bench.md (accelerator.json and "
                        "accelerator.md with --suite accelerator)", flag_values=f)
    flags.DEFINE_enum("suite", "tables", ["tables", "accelerator", "plan"], "tables: the rows above; accelerator: "
                      "the accelerator check; plan: XLA's memory plan per device of one train step, compiled "
                      "ahead of time (both in dcp_jax/accelerator.py)", flag_values=f)
    flags.DEFINE_string("tpu", "", "--suite plan: TPU slices to plan for, e.g. v5e-8,v4-8 (needs jax's TPU "
                        "plugin, not a TPU); empty: this machine's devices", flag_values=f)
    flags.DEFINE_string("gpu", "", "--suite plan: GPUs to compile every accelerator-check program for, e.g. "
                        "h100,h200 (a100 too; needs jax's CUDA plugin and cuDNN, pip install -e \".[gpu-plan]\", "
                        "not a GPU): kernels, CUDA graphs, memory, FLOPs, attention paths, estimated time",
                        flag_values=f)
    flags.DEFINE_bool("keep-dumps", False, "--suite plan --gpu: keep the XLA dump files each program was read "
                      "from, in OUT/xla/GPU/PROGRAM", flag_values=f)
    flags.DEFINE_string("large-config", config_lib.config_file("dcp_vitl14_coco_stuff"),
                        "--suite accelerator and --suite plan --gpu: the config of their L/14 cases", flag_values=f)
    flags.DEFINE_string("only", "", "--suite accelerator and --suite plan --gpu: only the cases whose name contains "
                        "this", flag_values=f)
    flags.DEFINE_string("profile", None, "also write a jax.profiler trace of --profile-steps runs of each row (tables) "
                        "or case (accelerator), after its timing, to DIR/<NN>_<name>/ (TensorBoard's profile plugin, "
                        "Perfetto)", flag_values=f)
    flags.DEFINE_integer("profile-steps", PROFILE_STEPS, "--profile: runs traced per row or case", flag_values=f)
    cmd.required("out")
    args = cmd.parse()
    suite = {"accelerator": run_accelerator_suite, "plan": run_memory_plan, "tables": run}[args.suite]

    def body():
        check_profile(args)
        suite(cmd, args)

    return cmd.run(body)


def check_profile(args) -> None:
    """A --profile that cannot be written, or that has nothing to trace: an error before any work."""
    if not args.profile:
        return
    if args.suite == "plan":
        raise ValueError("--profile: --suite plan compiles ahead of time and runs nothing to trace; profile "
                         "--suite tables or --suite accelerator")
    files.check_writable_dir(args.profile, "--profile")
    if args["profile-steps"].value < 1:
        raise ValueError(f"--profile-steps {args['profile-steps'].value}: trace at least 1 run")


def _profile_folder(args, name: str) -> Path | None:
    """Where --profile puts one row's trace: DIR/<NN>_<row> (NN: the row's place)."""
    return Path(args.profile).expanduser() / folder_name(name) if args.profile else None


def _print_profile_note(args, rows: list[dict], what: str) -> None:
    if args.profile:
        traces = [r[key] for r in rows for key in ("profile", "train_profile") if r.get(key)]
        print(profile_note(args.profile, traces, what), file=sys.stderr)


def run_accelerator_suite(cmd, args) -> None:
    from dcp_jax import accelerator

    config = cmd.config()
    runtime.start(config)
    large = accelerator.load_config(args["large-config"].value, args["config"].override_values)
    rows, header = accelerator.run_suite(config, large, Path(args.out), runs=args.runs, only=args.only,
                                         profile=Path(args.profile).expanduser() if args.profile else None,
                                         profile_steps=args["profile-steps"].value)
    print(accelerator.format_markdown(rows, header))
    _print_profile_note(args, rows, f"{args['profile-steps'].value} steps per case, one folder per case")
    print(f"[dcp_jax] {runtime.format_compile_stats()}", file=sys.stderr)


def run_memory_plan(cmd, args) -> None:
    from dcp_jax import accelerator

    config = cmd.config()
    if args.gpu:
        if args.tpu:
            raise ValueError("--gpu and --tpu: plan for one kind of accelerator at a time")
        return run_gpu_plan(cmd, args, config)
    runtime.start(config, require_backend="")  # a plan compiles for the slices named, not for this machine
    slices = [t.strip() for t in args.tpu.split(",") if t.strip()]
    targets = ([(name, *accelerator.tpu_slice_devices(name)) for name in slices] if slices
               else [("this machine", jax.devices(), None)])
    from ml_collections import config_flags
    config_name = Path(config_flags.get_config_filename(cmd.flags["config"])).name
    overrides = dict(cmd.flags["config"].override_values)
    if overrides:
        config_name += " with " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    rows = []
    for name, devices, device_gib in targets:
        print(f"[dcp_jax.bench] compiling the train step for {name} ({len(devices)} x {devices[0].device_kind})",
              file=sys.stderr, flush=True)
        rows.append({"name": name, "device_gib": device_gib, **accelerator.memory_plan(config, devices)})
        out = Path(args.out)
        files.write_json(out / "plan.json", {"config": config_name, "rows": rows})
        files.write_text(out / "plan.md", accelerator.format_plan(rows, config_name))
    print(accelerator.format_plan(rows, config_name))


def run_gpu_plan(cmd, args, config) -> None:
    from dcp_jax import accelerator, gpu_plan, gpu_targets

    names = [g.strip() for g in args.gpu.split(",") if g.strip()]
    for name in names:
        gpu_targets.gpu_target(name)  # an unknown name fails before anything compiles
    # The CUDA plugin's own start-up needs a driver; its compile-only devices come from the CPU backend.
    jax.config.update("jax_platforms", "cpu")
    runtime.start(config, require_backend="")
    large = accelerator.load_config(args["large-config"].value, args["config"].override_values)
    rows = gpu_plan.run_plan(config, large, names, Path(args.out), only=args.only,
                             keep_dumps=args["keep-dumps"].value)
    print(gpu_plan.format_plan(rows))


def run(cmd, args) -> None:
    from tqdm import tqdm

    thetas = [float(t) for t in args.thetas.split(",") if t.strip()]
    if not thetas or any(not 0.0 <= t <= 1.0 for t in thetas):
        raise ValueError(f"--thetas {args.thetas}: give thresholds between 0 and 1 (0 decodes every class)")
    if args.runs < 1:
        raise ValueError(f"--runs {args.runs}: at least 1 timed run")
    if not args.workdir and any(int(c) < 1 for c in args["vocab-sizes"].value.split(",") if c.strip()):
        raise ValueError(f"--vocab-sizes {args['vocab-sizes'].value}: every vocabulary size must be >= 1")
    runtime.start(cmd.config(args.workdir) if args.workdir else cmd.config())
    if args.workdir:
        if not args.dataset:
            raise ValueError("--workdir needs --dataset SPEC: the selected classes are counted on its images")
        from dcp_jax import checkpoint
        config = cmd.config(args.workdir)
        vocabulary, counts = measured_selection(args.workdir, config, args.dataset, thetas, args.images)
        sizes = [len(vocabulary)]
        model = checkpoint.restore_model(args.workdir, config)[0]
        selected_from = f"the trained model on {args.dataset} ({args.images} images, mean per image)"
    else:
        config = cmd.config()
        sizes = [int(c) for c in args["vocab-sizes"].value.split(",") if c.strip()]
        counts = None
        model = build.create_model(config)
        selected_from = f"--selected {args.selected} (random weights)"
    counted = count_params(model, config)["TOTAL"]
    bench = Bench(config, model, mode=args.mode)
    out = Path(args.out)
    reference = _torch_reference(model, config) if args.torch else None
    rows = []
    header = {"model": f"{config.clip.variant or 'tiny'} @ {config.clip.image_size}", "mode": args.mode,
              "device": f"{jax.devices()[0].platform} x1", "params_total": counted[0],
              "params_learnable": counted[1], "selected_from": selected_from, "runs": args.runs,
              "views": bench.views_per_image}

    def save():  # after every row: a long run that is stopped keeps what it measured
        files.write_json(out / "bench.json", {"header": header, "rows": rows})
        files.write_text(out / "bench.md", format_markdown(rows, header))
    for c in sizes:
        text = jnp.asarray(random_text(c, dcp.num_templates(config), model.clip_dim))
        for theta in tqdm(thetas, desc=f"bench C={c}", unit="row", total=len(thetas), file=sys.stderr):
            selected = float(c) if theta <= 0 else (counts[theta] if counts else float(min(args.selected, c)))
            cap = c if theta <= 0 else forward.bucket_cap(config.eval.num_slots, c)
            slots = forward.slot_bucket(int(np.ceil(selected)), cap)

            def torch_forward(memory_gib, c=c, text=text, slots=slots):
                # PyTorch's eager forward keeps more intermediates alive than XLA's plan, beside the JAX buffers
                if reference is None or too_big_to_run(2 * memory_gib):
                    return contextlib.nullcontext()
                from dcp_jax import torch_ref
                # The same K as the JAX row (bucket=False: K = max_slots), tag validation included.
                return torch_ref.forward_call(reference, np.asarray(bench.views), np.asarray(text),
                                              seen=np.ones(c, bool), max_slots=slots, bucket=False,
                                              threads=args.threads or os.cpu_count())

            profile = _profile_folder(args, f"{len(rows):02d}_C{c}_theta{theta:g}_K{slots}")
            row = {"vocab_size": c, "theta": theta, "selected": selected, "selected_from": selected_from,
                   "params_total": counted[0], "params_learnable": counted[1],
                   **bench.row(text, slots, args.runs, torch_forward, profile=profile,
                               profile_steps=args["profile-steps"].value)}
            rows.append(row)
            save()
    if args.train:
        c = args["train-classes"].value
        if c not in sizes:
            raise ValueError(f"--train-classes={c} must be one of --vocab-sizes ({sizes}): its rows get the columns")
        for i, row in tqdm([(i, r) for i, r in enumerate(rows) if r["vocab_size"] == c], desc="bench train",
                           unit="row", file=sys.stderr):
            slots = c if row["theta"] <= 0 else int(config.model.dcs.num_slots)
            profile = _profile_folder(args, f"{i:02d}_C{c}_theta{row['theta']:g}_train_K{slots}")
            row.update(train_row(config, build.create_model(config), c, slots, args.runs, profile,
                                 args["profile-steps"].value))
            save()
    save()
    print(format_markdown(rows, header))
    _print_profile_note(args, rows, f"{args['profile-steps'].value} runs per row, one folder per row"
                        + (" and per training step" if args.train else ""))


def _torch_reference(model, config):
    from dcp_jax import export_format, torch_ref

    directory = Path(tempfile.mkdtemp(prefix="dcp_bench_export_"))
    export_format.write_export(model, config, directory, tokenizer_dir=None)
    return torch_ref.load_reference(directory)


if __name__ == "__main__":
    sys.exit(main())
