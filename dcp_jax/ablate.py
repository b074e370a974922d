r"""The paper's ablations, measured on the toy world: python -m dcp_jax.ablate --out DIR [--config configs/demo.py]

Trains, with fixed seeds, the rows of the paper's Table III on the demo's seen/unseen benchmark (the
demo recipe, each row switching one part off) and evaluates each on all classes:

  DCP-CLIP       the full model (configs/demo.py)
  w/o DCS        no category selection: theta 0 and one slot per class, in training and inference
  w/o TGA        no cross- or self-attention in the text-guided alignment
  w/o SED        no Swin blocks in the decoder (its upsampling path stays)
  w/o TV         the full model evaluated without tag validation (TV is inference-only)
  zero-shot CLIP the toy CLIP alone

with the mean number of classes selected per image and the number of slots tag validation relabelled.

and the Table VII sweep: the full model evaluated at each inference theta, with the mean number of
classes selected per image and the head's GFLOPs at the slot buckets those selections needed (XLA's
cost analysis of the compiled head, one view). Each training run lives in DIR/<row> and resumes
there, so a second call only re-evaluates. Writes DIR/ablation.md and DIR/ablation.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ml_collections

from dcp_jax import cli, files, runtime
from dcp_jax import config as config_lib
from dcp_jax import evaluate, train
from dcp_jax.segmenter import Segmenter

# Table III's rows: the config changes of each trained variant.
TRAINED = {
    "DCP-CLIP": {},
    "w/o DCS": {"model.dcs.theta": 0.0, "model.dcs.num_slots": 0, "eval.num_slots": 0},
    "w/o TGA": {"model.tga.cross_attention": False, "model.tga.self_attention": False},
    "w/o SED": {"model.decoder.spatial_enhance": False},
}
SUMMARY_KEYS = ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")


def _variant(config, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.update_from_flattened_dict(dict(overrides, **{"eval.zero_shot_baseline": False}))
    return config


def _directory(out: Path, name: str) -> Path:
    return out / name.replace("w/o ", "no_").replace(" ", "_").replace("-", "_").lower()


def _scores(results: dict) -> dict:
    (result,) = results.values()
    return {k: result.get(k) for k in SUMMARY_KEYS} | {k: result.get(k) for k in ("selected_mean", "buckets",
                                                                                    "tv_relabelled")}


def mean_head_gflops(segmenter: Segmenter, buckets: dict) -> float:
    """The head's GFLOPs per image (one view) averaged over the slot buckets the images needed."""
    from flax import nnx

    from dcp_jax.bench import Bench

    bench = Bench(segmenter.config, nnx.merge(segmenter._graphdef, segmenter._params), mode="whole")
    counts = {int(k): n for k, n in buckets.items()}
    return sum(bench.head_gflops(segmenter._text_embeds, k) * n for k, n in counts.items()) / sum(counts.values())


def run(config, out: Path, thetas) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if len(evaluate.parse_specs(config.eval.datasets)) != 1:
        raise ValueError(f"config.eval.datasets={config.eval.datasets!r}: the ablation evaluates one dataset")
    rows, timings = {}, {}
    for name, overrides in TRAINED.items():
        start = time.time()
        variant = _variant(config, overrides)
        summary = train.train_and_evaluate(variant, _directory(out, name))
        rows[name] = _scores(summary["eval"])
        timings[name] = time.time() - start
    full = config_lib.resolve_workdir(_variant(config, {}), _directory(out, "DCP-CLIP"))
    workdir = _directory(out, "DCP-CLIP")
    specs = evaluate.parse_specs(full.eval.datasets)  # with {workdir} resolved
    common = dict(workdir=workdir, step=full.total_steps, data_root=full.eval.data_root or None,
                  print_table=False, out_dir=out / "eval_scratch")
    no_tv = _variant(full, {"model.tv.enabled": False})
    rows["w/o TV"] = _scores(evaluate.evaluate_datasets(Segmenter.from_workdir(workdir, no_tv), specs, **common))
    clip_path = train.clip_checkpoint_path(full, workdir, create=False)
    rows["zero-shot CLIP"] = _scores(evaluate.evaluate_datasets(Segmenter.from_clip(clip_path, full), specs, **common))

    sweep = {}
    for theta in thetas:
        segmenter = Segmenter.from_workdir(workdir, _variant(full, {"model.dcs.theta": float(theta)}))
        row = _scores(evaluate.evaluate_datasets(segmenter, specs, **common))
        row["head_gflops"] = mean_head_gflops(segmenter, row["buckets"])
        sweep[float(theta)] = row
    report = {"config": full.to_dict(), "rows": rows, "theta_sweep": sweep, "train_seconds": timings}
    files.write_json(out / "ablation.json", report)
    files.write_text(out / "ablation.md", format_markdown(report))
    return report


def format_markdown(report: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.1f}"

    lines = ["Table III (parts), trained and evaluated on the toy world's seen/unseen benchmark:", "",
             "| | mIoU | seen | unseen | hIoU | selected per image | slots TV relabelled |", "|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        relabelled = "-" if r.get("tv_relabelled") is None else str(r["tv_relabelled"])
        lines.append(f"| {name} | " + " | ".join(cell(r[k]) for k in SUMMARY_KEYS)
                     + f" | {cell(r['selected_mean'])} | {relabelled} |")
    lines += ["", "Table VII (theta), the full model at each inference theta:", "",
              "| theta | mIoU | seen | unseen | hIoU | selected per image | head GFLOPs |", "|---|---|---|---|---|---|---|"]
    for theta, r in report["theta_sweep"].items():
        lines.append(f"| {theta:g} | " + " | ".join(cell(r[k]) for k in SUMMARY_KEYS)
                     + f" | {cell(r['selected_mean'])} | {r['head_gflops']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.ablate", __doc__, argv, config=config_lib.config_file("demo"),
                      config_help="the recipe the rows switch parts off from (default: the CPU demo)")
    flags.DEFINE_string("out", None, "directory for the runs, ablation.md and ablation.json", flag_values=cmd.flags)
    flags.DEFINE_string("thetas", "0,0.1,0.3,0.5,0.7,0.9", "inference thetas of the Table VII sweep",
                        flag_values=cmd.flags)
    cmd.required("out")
    args = cmd.parse()

    def body():
        start = time.time()
        runtime.start(cmd.config())
        report = run(cmd.config(), Path(args.out), [float(t) for t in args.thetas.split(",") if t.strip()])
        print(format_markdown(report))
        print(f"ablation: {time.time() - start:.0f} s; {args.out}/ablation.md", file=sys.stderr)

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
