r"""The paper's ablations, measured on the toy world: python -m dcp_jax.ablate --out DIR [--seeds N] [--config configs/demo.py]

Trains the rows of the paper's Table III on the demo's seen/unseen benchmark (the demo recipe, each
row switching one part off), each with `--seeds` training seeds (config.seed, +1, ...), and evaluates
each on all classes; a row prints the mean +- standard deviation over its seeds:

  DCP-CLIP       the full model (configs/demo.py)
  w/o DCS        no category selection: theta 0 and one slot per class, in training and inference
  w/o TGA        no cross- or self-attention in the text-guided alignment
  w/o SED        no Swin blocks in the decoder (its upsampling path stays)
  w/o TV         the full model evaluated without tag validation (TV is inference-only)
  zero-shot CLIP the toy CLIP alone (no training: one value)

with the mean number of classes selected per image and the number of slots tag validation relabelled.

Table VII, theta trained and evaluated at that theta (`--train-thetas`; theta 0 is the w/o DCS row and
the recipe's theta the DCP-CLIP row, so only the others train anew), with the classes selected per
image, and the training step's XLA memory plan and time at batch 1 (as `bench --train` measures them).
Then the inference sweep: the seed-0 full model evaluated at each `--thetas`, with the head's GFLOPs
at the slot buckets the selections needed. Each training run lives in DIR/<row>/seed_<i> and resumes
there, so a second call only re-evaluates; the evaluations of untrained rows go to DIR/no_tv/seed_<i>,
DIR/zero_shot_clip/seed_0 and DIR/theta_sweep/<theta>. Writes DIR/ablation.md and DIR/ablation.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import ml_collections

from dcp_jax import cli, files, runtime
from dcp_jax import config as config_lib
from dcp_jax import evaluate, measure, train
from dcp_jax.segmenter import Segmenter

# Table III's rows: the config changes of each trained variant.
TRAINED = {
    "DCP-CLIP": {},
    "w/o DCS": {"model.dcs.theta": 0.0, "model.dcs.num_slots": 0, "eval.num_slots": 0},
    "w/o TGA": {"model.tga.cross_attention": False, "model.tga.self_attention": False},
    "w/o SED": {"model.decoder.spatial_enhance": False},
}
SUMMARY_KEYS = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")
NUMERIC_KEYS = (*SUMMARY_KEYS, "selected_mean", "tv_relabelled")


def _variant(config, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.update_from_flattened_dict(dict(overrides, **{"eval.zero_shot_baseline": False}))
    return config


def _directory(out: Path, name: str, seed_index: int) -> Path:
    return out / name.replace("w/o ", "no_").replace(" ", "_").replace("-", "_").lower() / f"seed_{seed_index}"


def _scores(results: dict) -> dict:
    (result,) = results.values()
    return {k: result.get(k) for k in SUMMARY_KEYS} | {k: result.get(k) for k in ("selected_mean", "buckets",
                                                                                    "tv_relabelled")}


def summarise(per_seed: list[dict]) -> dict:
    """Scores of each seed -> {"seeds": [...], "mean": {...}, "std": {...}} (sample std; 0 for one seed)."""
    mean, std = {}, {}
    for key in NUMERIC_KEYS:
        values = [s[key] for s in per_seed if s.get(key) is not None]
        mean[key] = statistics.fmean(values) if values else None
        std[key] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    return {"seeds": per_seed, "mean": mean, "std": std}


def mean_head_gflops(segmenter: Segmenter, buckets: dict) -> float:
    """The head's GFLOPs per image (one view) averaged over the slot buckets the images needed."""
    bench = measure.Bench(segmenter.config, segmenter.model(), mode="whole")
    counts = {int(k): n for k, n in buckets.items()}
    return sum(bench.head_gflops(segmenter.text_embeddings, k) * n for k, n in counts.items()) / sum(counts.values())


def train_step_cost(config, workdir: Path) -> dict:
    """XLA's memory plan and the time of one training step at batch 1 of a trained row (bench.train_row)."""
    from dcp_jax import bench
    from dcp_jax import checkpoint as ckpt_lib

    model, *_ = ckpt_lib.restore_model(workdir, config)
    classes = len(ckpt_lib.load_train_classes(workdir))
    row = bench.train_row(config, model, classes, int(config.model.dcs.num_slots) or classes, runs=3)
    return {"train_memory_gib": row["train_xla_memory_gib"], "train_step_s": row["train_step_s"]}


def run(config, out: Path, thetas, *, seeds: int = 1, train_thetas=(0.0, 0.9)) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if len(evaluate.parse_specs(config.eval.datasets)) != 1:
        raise ValueError(f"config.eval.datasets={config.eval.datasets!r}: the ablation evaluates one dataset")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least 1")
    recipe_theta = float(config.model.dcs.theta)
    trained = dict(TRAINED)
    for theta in train_thetas:  # Table VII rows trained at their theta (0 and the recipe's are rows above)
        if float(theta) not in (0.0, recipe_theta):
            trained[f"theta {float(theta):g}"] = {"model.dcs.theta": float(theta)}
    per_seed: dict[str, list[dict]] = {name: [] for name in [*trained, "w/o TV"]}
    timings: dict[str, float] = {}
    for i in range(seeds):
        for name, overrides in trained.items():
            start = time.time()
            variant = _variant(config, {**overrides, "seed": int(config.seed) + i})
            summary = train.train_and_evaluate(variant, _directory(out, name, i))
            per_seed[name].append(_scores(summary["eval"]))
            timings[f"{name}, seed {i}"] = time.time() - start
        workdir = _directory(out, "DCP-CLIP", i)
        full = config_lib.resolve_workdir(_variant(config, {"seed": int(config.seed) + i}), workdir)
        specs = evaluate.parse_specs(full.eval.datasets)  # with {workdir} resolved
        common = dict(workdir=workdir, step=full.total_steps, data_root=full.eval.data_root or None,
                      print_table=False)
        no_tv = _variant(full, {"model.tv.enabled": False})
        per_seed["w/o TV"].append(_scores(evaluate.evaluate_datasets(Segmenter.from_workdir(workdir, no_tv), specs,
                                                                     out_dir=_directory(out, "w/o TV", i), **common)))
    rows = {name: summarise(scores) for name, scores in per_seed.items()}
    workdir = _directory(out, "DCP-CLIP", 0)
    full = config_lib.resolve_workdir(_variant(config, {}), workdir)
    specs = evaluate.parse_specs(full.eval.datasets)
    common = dict(workdir=workdir, step=full.total_steps, data_root=full.eval.data_root or None,
                  print_table=False)
    clip_path = train.clip_checkpoint_path(full, workdir, create=False)
    zero_shot = Segmenter.from_clip(clip_path, full)
    rows["zero-shot CLIP"] = summarise([_scores(evaluate.evaluate_datasets(
        zero_shot, specs, out_dir=_directory(out, "zero-shot CLIP", 0), **common))])
    theta_rows = {0.0: "w/o DCS", recipe_theta: "DCP-CLIP",
                  **{float(t): f"theta {float(t):g}" for t in train_thetas if float(t) not in (0.0, recipe_theta)}}
    trained_thetas = {}
    for theta, name in sorted(theta_rows.items()):
        variant = config_lib.resolve_workdir(_variant(config, trained[name]), _directory(out, name, 0))
        trained_thetas[theta] = {"row": name, **rows[name], **train_step_cost(variant, _directory(out, name, 0))}
    sweep = {}
    for theta in thetas:
        segmenter = Segmenter.from_workdir(workdir, _variant(full, {"model.dcs.theta": float(theta)}))
        row = _scores(evaluate.evaluate_datasets(segmenter, specs, out_dir=out / "theta_sweep" / f"{theta:g}",
                                                 **common))
        row["head_gflops"] = mean_head_gflops(segmenter, row["buckets"])
        sweep[float(theta)] = row
    report = {"config": full.to_dict(), "seeds": seeds, "rows": rows, "trained_thetas": trained_thetas,
              "theta_sweep": sweep, "train_seconds": timings}
    files.write_json(out / "ablation.json", report)
    files.write_text(out / "ablation.md", format_markdown(report))
    return report


def format_markdown(report: dict) -> str:
    seeds = report["seeds"]

    def cell(row, key):
        m, s = row["mean"].get(key), row["std"].get(key)
        if m is None:
            return "-"
        return f"{m:.1f}" if seeds == 1 or len(row["seeds"]) == 1 else f"{m:.1f} ± {s:.1f}"

    plural = "seed" if seeds == 1 else "seeds, mean ± standard deviation"
    lines = [f"Table III (parts), trained and evaluated on the toy world's seen/unseen benchmark ({seeds} {plural}):",
             "", "| | mIoU | seen | unseen | hIoU | selected per image | slots TV relabelled |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        if name.startswith("theta "):
            continue
        lines.append(f"| {name} | " + " | ".join(cell(r, k) for k in (*SUMMARY_KEYS, "selected_mean", "tv_relabelled"))
                     + " |")
    lines += ["", "Table VII (theta), trained and evaluated at each theta (seed 0's step at batch 1 for the last two "
              "columns):", "",
              "| theta | row | mIoU | seen | unseen | hIoU | selected per image | train memory GiB | train step s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for theta, r in report["trained_thetas"].items():
        step = "-" if r.get("train_step_s") is None else f"{r['train_step_s']:.3f}"
        lines.append(f"| {float(theta):g} | {r['row']} | " + " | ".join(cell(r, k) for k in (*SUMMARY_KEYS, "selected_mean"))
                     + f" | {r['train_memory_gib']:.2f} | {step} |")
    lines += ["", "Inference theta (seed 0's full model evaluated at each theta):", "",
              "| theta | mIoU | seen | unseen | hIoU | selected per image | head GFLOPs |", "|---|---|---|---|---|---|---|"]
    for theta, r in report["theta_sweep"].items():
        values = ["-" if r.get(k) is None else f"{r[k]:.1f}" for k in (*SUMMARY_KEYS, "selected_mean")]
        lines.append(f"| {float(theta):g} | " + " | ".join(values) + f" | {r['head_gflops']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.ablate", __doc__, argv, config=config_lib.config_file("demo"),
                      config_help="the recipe the rows switch parts off from (default: the CPU demo)")
    flags.DEFINE_string("out", None, "directory for the runs, ablation.md and ablation.json", flag_values=cmd.flags)
    flags.DEFINE_integer("seeds", 1, "training seeds per trained row (config.seed, config.seed + 1, ...)",
                         flag_values=cmd.flags)
    flags.DEFINE_string("train-thetas", "0,0.9", "Table VII: thetas trained and evaluated at that theta",
                        flag_values=cmd.flags)
    flags.DEFINE_string("thetas", "0,0.1,0.3,0.5,0.7,0.9", "inference thetas of the sweep on seed 0's full model",
                        flag_values=cmd.flags)
    cmd.required("out")
    args = cmd.parse()

    def body():
        start = time.time()
        runtime.start(cmd.config())
        report = run(cmd.config(), Path(args.out), [float(t) for t in args.thetas.split(",") if t.strip()],
                     seeds=args.seeds,
                     train_thetas=[float(t) for t in args["train-thetas"].value.split(",") if t.strip()])
        print(format_markdown(report))
        print(f"ablation: {time.time() - start:.0f} s; {args.out}/ablation.md", file=sys.stderr)

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
