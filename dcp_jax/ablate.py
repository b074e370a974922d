r"""The paper's ablation tables, measured on the toy world:
python -m dcp_jax.ablate --out DIR [--tables removal,3,4,5,6,7 | --table 3] [--seeds N | --quick]

Each table's rows are variants of a recipe (default configs/demo.py, the full model), trained on the demo's
seen/unseen benchmark once per seed (config.seed, +1, ...) and evaluated on all classes; a row prints the
mean +- sample standard deviation over seeds, its difference from the row it is compared with (+- the
standard error of that difference; * where it is at least 2 standard errors) and the paper's A-847 and
A-150 mIoU for the same row. The tables (`--tables`, any of):

  removal  DCP-CLIP with one part switched off (w/o DCS, TGA, SED, TV) and the zero-shot toy CLIP
  3        Table III as the paper ran it: a fine-tuned CLIP baseline (CLIP q/v fine-tuned as the recipe
           does, the plain cost-volume head: no DCS, TGA, SED or TV), then + DCS, + TGA, + SED, + TV
  4        Table IV, TGA's branches: neither (the cost volume alone), cross-attention, self-attention, both
  5        Table V, the textual guidance: full, without the CLS logit c_k, and without the learnable prompt too
  6        Table VI, the decoder: (a) spatial enhance off/on, (b) 0/1/2 layers, (c) feature fusion
           none / shallow / shallow + cost map / all three
  7        Table VII, theta trained and evaluated at each `--train-thetas`, with XLA's memory plan and the
           time of one training step at batch 1 (seed 0, as `bench --train` measures them); then the
           inference sweep, seed 0's full model evaluated at each `--thetas` with the head's GFLOPs

A variant that several tables use (the full model is in all of them) trains once per seed. Runs live in
DIR/<variant>/seed_<i> and resume there, so a second call (or one with fewer seeds) only re-evaluates;
evaluations without tag validation go to DIR/<variant>_no_tv/seed_<i>. DIR/ablation.md and
DIR/ablation.json are rewritten after each seed, so a call stopped in seed i keeps the tables of seeds
0..i-1. `--quick` is `--seeds 1`: every row, without the spread (about a third of the time).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import sys
import time
from pathlib import Path

import ml_collections

from dcp_jax import cli, files, runtime
from dcp_jax import config as config_lib
from dcp_jax import evaluate, measure, train
from dcp_jax.segmenter import Segmenter

NO_DCS = {"model.dcs.theta": 0.0, "model.dcs.num_slots": 0, "eval.num_slots": 0}
NO_TGA = {"model.tga.cross_attention": False, "model.tga.self_attention": False}
NO_SED = {"model.decoder.spatial_enhance": False}
# Every trained variant a table uses, as config changes of the recipe (the full model). Theta variants
# ("theta 0.2") are made from --train-thetas; theta 0 is "w/o DCS", the recipe's theta "DCP-CLIP".
VARIANTS = {
    "DCP-CLIP": {},
    "w/o DCS": NO_DCS,
    "w/o TGA": NO_TGA,
    "w/o SED": NO_SED,
    "fine-tuned CLIP": {**NO_DCS, **NO_TGA, **NO_SED},
    "DCS only": {**NO_TGA, **NO_SED},
    "CA only": {"model.tga.self_attention": False},
    "SA only": {"model.tga.cross_attention": False},
    "w/o CLS logit": {"model.guidance.cls_logit": False},
    "w/o CLS logit and prompt": {"model.guidance.cls_logit": False, "model.guidance.prompt": "none"},
    "decoder layers 0": {"model.decoder.layers": 0},
    "decoder layers 1": {"model.decoder.layers": 1},
    "no fusion": {"model.decoder.fuse_shallow": False, "model.decoder.fuse_cost": False,
                  "model.decoder.fuse_attn": False},
    "shallow fusion": {"model.decoder.fuse_cost": False, "model.decoder.fuse_attn": False},
    "shallow + cost fusion": {"model.decoder.fuse_attn": False},
}
ZERO_SHOT = "zero-shot CLIP"  # the toy CLIP alone: not trained, one value


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    variant: str  # a trained variant (VARIANTS, "theta X") or ZERO_SHOT
    tv: bool = True  # evaluated with tag validation (inference-only, so no variant of its own)
    versus: str | None = None  # the label of the row its difference is taken from
    paper: tuple[float, float] | None = None  # the paper's mIoU for this row


# The paper's rows (L/14 trained on COCO-Stuff). Table III's check marks were lost in extraction: its rows
# 3 and 4 are DCS + TGA and DCS + SED because the paper's SED gain (1.3 / 1.9 / 2.0 on A-847 / PC-459 /
# A-150) is exactly row 5 minus row 3. Table VI-c's fusion symbols were lost too: the order none, shallow,
# + similarity (the cost map), + attention follows its text.
TABLES = {
    "removal": ("Parts removed from the full model one at a time", [
        Row("DCP-CLIP", "DCP-CLIP", paper=(12.3, 32.4)),
        Row("w/o DCS", "w/o DCS", versus="DCP-CLIP"),
        Row("w/o TGA", "w/o TGA", versus="DCP-CLIP"),
        Row("w/o SED", "w/o SED", versus="DCP-CLIP"),
        Row("w/o TV", "DCP-CLIP", tv=False, versus="DCP-CLIP", paper=(12.1, 32.2)),
        Row(ZERO_SHOT, ZERO_SHOT, tv=False, versus="DCP-CLIP")]),
    "3": ("Table III: parts added to a fine-tuned CLIP baseline, in the paper's order", [
        Row("fine-tuned CLIP", "fine-tuned CLIP", tv=False, paper=(7.1, 23.1)),
        Row("+ DCS", "DCS only", tv=False, versus="fine-tuned CLIP", paper=(7.4, 23.3)),
        Row("+ DCS + TGA", "w/o SED", tv=False, versus="+ DCS", paper=(10.8, 30.2)),
        Row("+ DCS + SED", "w/o TGA", tv=False, versus="+ DCS", paper=(11.3, 31.5)),
        Row("+ DCS + TGA + SED", "DCP-CLIP", tv=False, versus="+ DCS + TGA", paper=(12.1, 32.2)),
        Row("+ DCS + TGA + SED + TV", "DCP-CLIP", versus="+ DCS + TGA + SED", paper=(12.3, 32.4))]),
    "4": ("Table IV: TGA's attention branches", [
        Row("neither (cost volume alone)", "w/o TGA", versus="CA + SA", paper=(11.4, 31.2)),
        Row("CA", "CA only", versus="CA + SA", paper=(12.1, 31.9)),
        Row("SA", "SA only", versus="CA + SA", paper=(11.6, 32.1)),
        Row("CA + SA", "DCP-CLIP", paper=(12.3, 32.4))]),
    "5": ("Table V: the textual guidance of the cross-attention", [
        Row("full textual guidance", "DCP-CLIP", paper=(12.3, 32.4)),
        Row("w/o the CLS logit c_k", "w/o CLS logit", versus="full textual guidance", paper=(12.2, 32.5)),
        Row("w/o c_k and the learnable prompt", "w/o CLS logit and prompt", versus="full textual guidance",
            paper=(12.0, 32.0))]),
    "6": ("Table VI: the decoder's (a) aggregation, (b) layers, (c) feature fusion", [
        Row("(a) no aggregation", "w/o SED", versus="(a) spatial enhance", paper=(11.0, 30.8)),
        Row("(a) spatial enhance", "DCP-CLIP", paper=(12.3, 32.4)),
        Row("(b) 0 layers", "decoder layers 0", versus="(b) 2 layers", paper=(11.4, 31.5)),
        Row("(b) 1 layer", "decoder layers 1", versus="(b) 2 layers", paper=(11.8, 31.9)),
        Row("(b) 2 layers", "DCP-CLIP", paper=(12.3, 32.4)),
        Row("(c) no fusion", "no fusion", versus="(c) shallow + cost + attention", paper=(11.6, 31.3)),
        Row("(c) shallow", "shallow fusion", versus="(c) shallow + cost + attention", paper=(11.8, 31.8)),
        Row("(c) shallow + cost", "shallow + cost fusion", versus="(c) shallow + cost + attention",
            paper=(12.0, 32.1)),
        Row("(c) shallow + cost + attention", "DCP-CLIP", paper=(12.3, 32.4))]),
}
# Table VII: theta -> the paper's mIoU (its memory and training time are in docs/ablations.md)
PAPER_THETAS = {0.0: (12.4, 32.5), 0.2: (12.4, 32.6), 0.5: (12.3, 32.4), 0.8: (12.1, 32.2), 0.9: (11.9, 32.0)}
TABLE_KEYS = (*TABLES, "7")
SUMMARY_KEYS = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")
NUMERIC_KEYS = (*SUMMARY_KEYS, "selected_mean", "tv_relabelled")


def parse_tables(text: str) -> list[str]:
    """--tables "3,4" -> ["3", "4"]; "all" is every table; an unknown name is an error that lists them."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TABLE_KEYS)
    unknown = [n for n in names if n not in TABLE_KEYS]
    if unknown or not names:
        raise ValueError(f"--tables {text!r}: expected some of {', '.join(TABLE_KEYS)} (comma-separated) or all")
    return list(dict.fromkeys(names))


def theta_variant(theta: float, recipe_theta: float) -> str:
    return "w/o DCS" if theta == 0.0 else "DCP-CLIP" if theta == recipe_theta else f"theta {theta:g}"


def plan(tables: list[str], train_thetas, recipe_theta: float) -> tuple[dict, dict]:
    """The selected tables' rows, {key: (title, [Row])}, and the variants they train, {name: overrides}
    in the order they train (the full model first, then each table's new ones)."""
    rows = {key: TABLES[key] for key in tables if key != "7"}
    known = dict(VARIANTS)
    if "7" in tables:
        thetas = sorted({float(t) for t in train_thetas} | {recipe_theta})
        known.update({theta_variant(t, recipe_theta): {"model.dcs.theta": t} for t in thetas
                      if theta_variant(t, recipe_theta) not in VARIANTS})
        rows["7"] = ("Table VII: theta, trained and evaluated at each theta", [
            Row(f"{theta:g}", theta_variant(theta, recipe_theta), paper=PAPER_THETAS.get(theta),
                versus=None if theta == recipe_theta else f"{recipe_theta:g}") for theta in thetas])
    variants = {"DCP-CLIP": {}}
    for _, table_rows in rows.values():
        variants.update({row.variant: known[row.variant] for row in table_rows
                         if row.variant != ZERO_SHOT and row.variant not in variants})
    return rows, variants


def _variant(config, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()  # a key the recipe lacks is an error, not a new key nothing reads
    config.update_from_flattened_dict(dict(overrides, **{"eval.zero_shot_baseline": False}))
    config.unlock()
    return config


def slug(name: str) -> str:
    """A variant's directory name: "w/o CLS logit" -> "no_cls_logit", "theta 0.2" -> "theta_0_2"."""
    name = name.lower().replace("w/o ", "no ").replace("+", "plus")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def _directory(out: Path, name: str, seed_index: int, tv: bool = True) -> Path:
    return out / (slug(name) + ("" if tv else "_no_tv")) / f"seed_{seed_index}"


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


def difference(row: dict, versus: dict, key: str = "mIoU") -> tuple[float, float | None] | None:
    """row's mean minus versus's, and the standard error of that difference from the two rows' sample
    standard deviations (unpaired: sqrt(s1^2/n1 + s2^2/n2)); None for the error where a row has one seed."""
    a, b = row["mean"].get(key), versus["mean"].get(key)
    if a is None or b is None:
        return None
    n, m = len(row["seeds"]), len(versus["seeds"])
    if n < 2 and m < 2:
        return a - b, None
    se = math.sqrt((row["std"][key] ** 2 / n if n > 1 else 0.0) + (versus["std"][key] ** 2 / m if m > 1 else 0.0))
    return a - b, se


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


def run(config, out: Path, *, tables=TABLE_KEYS, seeds: int = 1, train_thetas=tuple(PAPER_THETAS),
        thetas=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9)) -> dict:
    """Train and evaluate the tables' variants seed by seed. DIR/ablation.md and .json are rewritten after
    each seed, with report["seeds"] the seeds done, so a call stopped in seed i keeps the tables of i seeds."""
    start = time.time()
    if len(evaluate.parse_specs(config.eval.datasets)) != 1:
        raise ValueError(f"config.eval.datasets={config.eval.datasets!r}: the ablation evaluates one dataset")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least 1")
    out.mkdir(parents=True, exist_ok=True)
    table_rows, variants = plan(list(tables), train_thetas, float(config.model.dcs.theta))
    scores: dict[tuple[str, bool], list[dict]] = {(row.variant, row.tv): [] for _, rows in table_rows.values()
                                                  for row in rows}
    report = {"seeds": 0, "train_seconds": {}}
    for i in range(seeds):  # every variant's seed 0 first, then seed 1, ...
        for name, overrides in variants.items():
            begun = time.time()
            variant = _variant(config, {**overrides, "seed": int(config.seed) + i})
            workdir = _directory(out, name, i)
            summary = train.train_and_evaluate(variant, workdir)
            report["train_seconds"][f"{name}, seed {i}"] = time.time() - begun
            if (name, True) in scores:
                scores[(name, True)].append(_scores(summary["eval"]))
            if (name, False) in scores:
                no_tv = _variant(config_lib.resolve_workdir(variant, workdir), {"model.tv.enabled": False})
                scores[(name, False)].append(_evaluate(Segmenter.from_workdir(workdir, no_tv), workdir,
                                                       _directory(out, name, i, tv=False)))
        if i == 0:  # what one seed gives: the zero-shot row, Table VII's step costs, the inference sweep
            report.update(_seed_0_extras(config, out, table_rows, variants, scores, thetas))
        report["seeds"] = i + 1
        report["tables"] = _tables(table_rows, scores, report.get("step_costs", {}))
        report["seconds"] = time.time() - start
        files.write_json(out / "ablation.json", report)
        files.write_text(out / "ablation.md", format_markdown(report))
    return report


def _evaluate(segmenter: Segmenter, workdir: Path, out_dir: Path) -> dict:
    """Scores of a trained run's model (or the zero-shot CLIP) on the recipe's one dataset."""
    config = segmenter.config
    return _scores(evaluate.evaluate_datasets(
        segmenter, evaluate.parse_specs(config.eval.datasets), workdir=workdir, step=config.total_steps,
        data_root=config.eval.data_root or None, out_dir=out_dir, print_table=False))


def _seed_0_extras(config, out: Path, table_rows: dict, variants: dict, scores: dict, thetas) -> dict:
    workdir = _directory(out, "DCP-CLIP", 0)
    full = config_lib.resolve_workdir(_variant(config, {}), workdir)
    extras = {"config": full.to_dict()}
    if (ZERO_SHOT, False) in scores:
        zero_shot = Segmenter.from_clip(train.clip_checkpoint_path(full, workdir, create=False), full)
        scores[(ZERO_SHOT, False)].append(_evaluate(zero_shot, workdir, _directory(out, ZERO_SHOT, 0)))
    if "7" in table_rows:
        extras["step_costs"] = {}
        for row in table_rows["7"][1]:
            run_dir = _directory(out, row.variant, 0)
            variant = config_lib.resolve_workdir(_variant(config, variants[row.variant]), run_dir)
            extras["step_costs"][row.variant] = train_step_cost(variant, run_dir)
        extras["theta_sweep"] = {}
        for theta in thetas:
            segmenter = Segmenter.from_workdir(workdir, _variant(full, {"model.dcs.theta": float(theta)}))
            result = _evaluate(segmenter, workdir, out / "theta_sweep" / f"{theta:g}")
            extras["theta_sweep"][float(theta)] = {**result,
                                                   "head_gflops": mean_head_gflops(segmenter, result["buckets"])}
    return extras


def _tables(table_rows: dict, scores: dict, step_costs: dict) -> dict:
    """The report's tables: each row's summary over the seeds so far (Table VII's with seed 0's step cost)."""
    return {key: {"title": title, "rows": [
        {"label": row.label, "variant": row.variant, "tv": row.tv, "versus": row.versus,
         "paper": list(row.paper) if row.paper else None, **summarise(scores[(row.variant, row.tv)]),
         **(step_costs.get(row.variant, {}) if key == "7" else {})} for row in rows]}
        for key, (title, rows) in table_rows.items()}


def format_markdown(report: dict) -> str:
    seeds = report["seeds"]

    def cell(row, key):
        m, s = row["mean"].get(key), row["std"].get(key)
        if m is None:
            return "-"
        return f"{m:.1f}" if len(row["seeds"]) == 1 else f"{m:.1f} ± {s:.1f}"

    def delta(row, versus, key):
        d = difference(row, versus, key) if versus is not None else None
        if d is None:
            return ""
        value, se = d
        if se is None:
            return f"{value:+.1f}"
        return f"{value:+.1f} ± {se:.1f}" + (" *" if se > 0 and abs(value) >= 2 * se else "")

    plural = "seed" if seeds == 1 else "seeds, mean ± standard deviation"
    lines = [f"Trained and evaluated on the toy world's seen/unseen benchmark ({seeds} {plural}). Δ: the "
             "difference from the row named in \"vs\", ± its standard error (unpaired, from the seeds' spread); "
             "* where |Δ| is at least 2 standard errors. Paper: its L/14 model's A-847 / A-150 mIoU.", ""]
    for key, table in report["tables"].items():
        by_label = {row["label"]: row for row in table["rows"]}
        extra = " | train memory GiB | train step s" if key == "7" else ""
        lines += [f"{table['title']}:", "",
                  "| | mIoU | seen | unseen | hIoU | vs | Δ mIoU | Δ unseen | selected per image | TV relabelled | "
                  f"paper{extra} |", "|---" * (11 + (2 if key == "7" else 0)) + "|"]
        for row in table["rows"]:
            versus = by_label.get(row["versus"]) if row["versus"] else None
            paper = "-" if not row["paper"] else f"{row['paper'][0]:.1f} / {row['paper'][1]:.1f}"
            cost = ""
            if key == "7":
                step = "-" if row.get("train_step_s") is None else f"{row['train_step_s']:.3f}"
                cost = f" | {row['train_memory_gib']:.2f} | {step}"
            lines.append(f"| {row['label']} | " + " | ".join(cell(row, k) for k in SUMMARY_KEYS)
                         + f" | {row['versus'] or ''} | {delta(row, versus, 'mIoU')} | {delta(row, versus, 'mIoU_unseen')}"
                         + f" | {cell(row, 'selected_mean')} | {cell(row, 'tv_relabelled')} | {paper}{cost} |")
        lines.append("")
    if report.get("theta_sweep"):
        lines += ["Inference theta (seed 0's full model evaluated at each theta):", "",
                  "| theta | mIoU | seen | unseen | hIoU | selected per image | head GFLOPs |", "|---|---|---|---|---|---|---|"]
        for theta, r in report["theta_sweep"].items():
            values = ["-" if r.get(k) is None else f"{r[k]:.1f}" for k in (*SUMMARY_KEYS, "selected_mean")]
            lines.append(f"| {float(theta):g} | " + " | ".join(values) + f" | {r['head_gflops']:.2f} |")
        lines.append("")
    if report.get("seconds") is not None:
        lines.append(f"The command took {report['seconds'] / 60:.0f} min ({len(report['train_seconds'])} training runs).")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.ablate", __doc__, argv, config=config_lib.config_file("demo"),
                      config_help="the recipe (the full model) the rows vary (default: the CPU demo)")
    flags.DEFINE_string("out", None, "directory for the runs, ablation.md and ablation.json", flag_values=cmd.flags)
    flags.DEFINE_string("tables", "all", f"the tables, comma-separated: {', '.join(TABLE_KEYS)}, or all",
                        flag_values=cmd.flags)
    flags.DEFINE_string("table", None, "one table (`--table 3`): the same as --tables 3", flag_values=cmd.flags)
    flags.DEFINE_integer("seeds", 3, "training seeds per trained variant (config.seed, config.seed + 1, ...)",
                         flag_values=cmd.flags)
    flags.DEFINE_boolean("quick", False, "one seed per variant: every row, no spread (about a third of the time)",
                         flag_values=cmd.flags)
    flags.DEFINE_string("train-thetas", ",".join(f"{t:g}" for t in PAPER_THETAS),
                        "Table VII: thetas trained and evaluated at that theta", flag_values=cmd.flags)
    flags.DEFINE_string("thetas", "0,0.1,0.3,0.5,0.7,0.9", "Table VII's inference sweep on seed 0's full model",
                        flag_values=cmd.flags)
    cmd.required("out")
    args = cmd.parse()

    def thetas(name):
        text = args[name].value
        try:
            values = [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or any(not 0.0 <= t <= 1.0 for t in values):
            raise ValueError(f"--{name} {text!r}: expected comma-separated numbers in [0, 1]")
        return values

    def body():
        if args["table"].present and args["tables"].present:
            raise ValueError("--table and --tables: give one (--table 3 is --tables 3)")
        tables = parse_tables(args.table if args["table"].present else args.tables)
        if args.quick and args["seeds"].present and args.seeds != 1:
            raise ValueError(f"--quick is one seed: drop --seeds {args.seeds} or --quick")
        seeds = 1 if args.quick else args.seeds  # run() refuses fewer than 1
        train_thetas, sweep = thetas("train-thetas"), thetas("thetas")
        runtime.start(cmd.config())
        report = run(cmd.config(), Path(args.out), tables=tables, seeds=seeds, train_thetas=train_thetas,
                     thetas=sweep)
        print(format_markdown(report))
        print(f"ablation: {report['seconds']:.0f} s; {args.out}/ablation.md", file=sys.stderr)

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
