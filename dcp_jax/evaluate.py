r"""Benchmark mIoU: python -m dcp_jax.evaluate --workdir W [--config.eval.datasets=ade150,pc59,...] [--config.KEY=VALUE]

Uses W's saved config (unless --config) with any --config.KEY=VALUE overrides, and W's latest
checkpoint (unless --checkpoint). Runs the CAT-Seg protocol of MODEL.md section 7 (slide window by
default), streams a dataset-wide confusion matrix, writes W/eval/<dataset>.json and prints a table
in the layout of the paper's Table I. A dataset that declares unseen classes (a zero-shot split)
also gets mIoU on its seen and unseen classes and their harmonic mean, hIoU.

  python -m dcp_jax.evaluate --workdir runs/b16 --config.eval.datasets=ade847,pc459,ade150,pc59,voc20
  python -m dcp_jax.evaluate --workdir runs/b16 --config.eval.mode=whole --config.eval.max_images=100
  python -m dcp_jax.evaluate --workdir runs/zs --zero-shot ~/models/clip-vit-base-patch16 \
      --config.eval.datasets=ade150
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
from tqdm import tqdm

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import cli, distributed, files, runtime
from dcp_jax import metrics as metrics_lib
from dcp_jax.data import datasets as datasets_lib
from dcp_jax.data import pipeline
from dcp_jax.segmenter import Segmenter

# The paper's column names (Table I), in its order.
TABLE_NAMES = {"ade847": "A-847", "pc459": "PC-459", "ade150": "A-150", "pc59": "PC-59", "voc20": "PAS-20",
               "voc20b": "PAS-20b", "coco_stuff_171": "COCO-171"}


# Images decoded and resized ahead of the device, in threads (PIL and numpy release the GIL).
READ_THREADS, PREFETCH_BATCHES = 4, 2


def evaluate_dataset(segmenter: Segmenter, spec: str, *, data_root: str | None = None,
                     max_images: int = 0, progress: bool = True) -> dict:
    """mIoU and friends of one dataset; every host takes its share of the images and the counts are summed.

    Reading, decoding and the test-time resize run in READ_THREADS threads ahead of the main thread
    (grain, in order); the main thread pads each batch to its shape bucket and runs the compiled stages.
    The programs compiled on the way (a bounded number whatever the mix of image sizes: shape buckets,
    inference.bucket_size) are counted in the result and printed."""
    config = segmenter.config
    compiled_before = runtime.compile_stats()
    ds = datasets_lib.open_dataset(spec, "val", data_root)
    segmenter.set_vocabulary(ds.class_names)
    items = pipeline.eval_dataset(ds, short_side=config.eval.short_side, max_images=max_images,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())
    stream = iter(items.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                          prefetch_buffer_size=PREFETCH_BATCHES * segmenter.batch_size)))
    confusion = metrics_lib.ConfusionMatrix(ds.num_label_classes)
    sizes: set[tuple[int, int]] = set()
    bar = tqdm(total=len(items), desc=f"eval {ds.name}", unit="img", dynamic_ncols=True,
               disable=not progress or not distributed.is_primary())
    start = time.time()
    batch: list[dict] = []
    slots: list[dict] = []  # per batch: the largest selected count and the slot bucket it needed

    def flush():
        labels = segmenter.segment([b["image"] for b in batch], resized=True,
                                   original_sizes=[b["label"].shape for b in batch])
        if segmenter.last_slots is not None:
            slots.append(segmenter.last_slots)
        for item, pred in zip(batch, labels):
            confusion.update(metrics_lib.map_predictions(pred, ds.pred_to_label), item["label"])
            sizes.add(item["label"].shape)
        bar.update(len(batch))
        batch.clear()

    for item in stream:
        batch.append(item)
        if len(batch) == segmenter.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    compiled = {key: value - compiled_before[key] for key, value in runtime.compile_stats().items()}
    counts = confusion.counts
    num_images = len(items)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
        num_images = int(np.asarray(multihost_utils.process_allgather(np.int64(num_images))).sum())
    for note in getattr(ds, "notes", lambda: [])():
        if distributed.is_primary():
            print(note, file=sys.stderr)
    label_names = (list(ds.class_names[:ds.num_label_classes - 1]) + ["background"]
                   if ds.num_label_classes != len(ds.class_names) else list(ds.class_names))
    result = metrics_lib.compute_metrics(counts, label_names)  # with detectron2's keys, IoU-<class> and the rest
    unseen = list(getattr(ds, "unseen_classes", []) or [])
    if unseen:
        result.update(metrics_lib.seen_unseen(result["per_class_iou"], [n in unseen for n in label_names]))
        result["unseen_classes"] = unseen
    result.update(dataset=ds.name, spec=spec, num_images=num_images, mode=config.eval.mode,
                  num_slots=int(config.eval.num_slots), class_names=label_names,
                  seconds_per_image=(time.time() - start) / max(1, len(items)),
                  image_sizes=len(sizes), programs_compiled=compiled["compiles"],
                  compile_seconds=round(compiled["compile_seconds"], 2))
    if distributed.is_primary() and progress:
        print(f"[dcp_jax.evaluate] {ds.name}: {len(items)} images of {len(sizes)} size{'s' * (len(sizes) != 1)} on "
              "this host; "
              f"{compiled['compiles']} programs built ({compiled['compile_seconds']:.1f} s; "
              f"{compiled['cache_hits']} read from the persistent cache)", file=sys.stderr)
    if slots:  # what category selection decided (this host's batches)
        dropped = np.concatenate([s["dropped"] for s in slots])
        result.update(selected_mean=float(np.mean([s["selected"] for s in slots])),
                      tv_relabelled=int(sum(s["relabelled"] for s in slots)),
                      buckets={str(k): sum(s["bucket"] == k for s in slots) for k in sorted({s["bucket"] for s in slots})},
                      dropped_classes_mean=float(dropped.mean()), images_with_dropped_classes=int((dropped > 0).sum()))
        if dropped.any() and distributed.is_primary():
            print(f"[dcp_jax.evaluate] warning: {ds.name}: {int((dropped > 0).sum())} of {len(dropped)} images selected "
                  f"more classes than eval.num_slots={config.eval.num_slots} decodes; {dropped.mean():.2f} classes per "
                  "image were left out (those with the fewest patch votes). Raise eval.num_slots (0 = every class) "
                  "to decode them.", file=sys.stderr)
    return result


def evaluate_datasets(segmenter: Segmenter, specs: list[str], *, workdir: Path, step: int,
                      data_root: str | None = None, max_images: int = 0, command: str | None = None,
                      out_dir: str | Path | None = None, print_table: bool = True) -> dict:
    """Evaluate each dataset, write <out_dir>/<name>.json, print the table; returns {name: result}.

    out_dir defaults to W/eval (W/eval/zero_shot for the zero-shot baseline, so it never overwrites
    a trained model's results).
    """
    if out_dir is None:
        out_dir = Path(workdir) / ckpt_lib.EVAL_DIR / ("zero_shot" if segmenter.zero_shot else "")
    results = {}
    for spec in specs:
        result = evaluate_dataset(segmenter, spec, data_root=data_root, max_images=max_images)
        result.update(step=int(step), checkpoint=segmenter.checkpoint_dir, zero_shot=segmenter.zero_shot,
                      command=command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
        results[result["dataset"]] = result
        if distributed.is_primary():
            write_result(Path(out_dir) / f"{result['dataset']}.json", result)
    if distributed.is_primary() and print_table:
        print(format_table({str(step): results}))
        print(format_sem_seg(results))
    return results


def write_result(path: Path, result: dict) -> None:
    """Write a dataset's result JSON. A result already there for another dataset spec that carries the same
    name (two folders whose meta.json say "name": "x") is kept as <name>.<n>.json, with a line that says so."""
    if path.exists():
        try:
            previous_spec = json.loads(path.read_text()).get("spec")
        except (OSError, ValueError, AttributeError):
            previous_spec = None
        if previous_spec != result["spec"]:
            n = 1
            while (kept := path.with_name(f"{path.stem}.{n}.json")).exists():
                n += 1
            os.replace(path, kept)
            print(f"[dcp_jax.evaluate] {path} held the result of another dataset ({previous_spec}); kept as {kept}",
                  file=sys.stderr)
    files.write_json(path, result)


def parse_specs(datasets: str) -> list[str]:
    specs = [s.strip() for s in datasets.split(",") if s.strip()]
    if not specs:
        raise ValueError("no dataset given: set --config.eval.datasets=ade150,pc59,... (or folder:PATH)")
    return specs


def format_table(rows: dict[str, dict], *, label: str = "step") -> str:
    """A markdown table in the layout of the paper's Table I (known benchmarks first, in its order): one
    row per {row name: {dataset: result}}; datasets with unseen classes get seen / unseen / hIoU columns."""
    results = next(iter(rows.values()))
    order = [n for n in TABLE_NAMES if n in results] + [n for n in results if n not in TABLE_NAMES]
    header = [label]
    for name in order:
        header.append(TABLE_NAMES.get(name, name))
        if "hIoU" in results[name]:
            header += [f"{TABLE_NAMES.get(name, name)} {part}" for part in ("seen", "unseen", "hIoU")]
    lines = ["mIoU (%)", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_name, row in rows.items():
        cells = [str(row_name)]
        for name in order:
            r = row[name]
            cells.append(f"{r['mIoU']:.1f}")
            if "hIoU" in results[name]:
                cells += ["-" if r.get(k) is None else f"{r[k]:.1f}" for k in ("mIoU_seen", "mIoU_unseen", "hIoU")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEM_SEG_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")  # detectron2 SemSegEvaluator's summary keys, in its order


def format_sem_seg(results: dict[str, dict]) -> str:
    """detectron2's summary numbers per dataset: a markdown table, then the lines detectron2's test loop
    and print_csv_format write (`copypaste:`, 4 decimals), which its users' scripts parse."""
    lines = ["detectron2 SemSegEvaluator (%)", "| dataset | " + " | ".join(SEM_SEG_KEYS) + " |",
             "|" + "---|" * (len(SEM_SEG_KEYS) + 1)]
    lines += [f"| {TABLE_NAMES.get(name, name)} | " + " | ".join(f"{r[k]:.1f}" for k in SEM_SEG_KEYS) + " |"
              for name, r in results.items()]
    for name, r in results.items():
        lines += [f"Evaluation results for {name} in csv format:", "copypaste: Task: sem_seg",
                  "copypaste: " + ",".join(SEM_SEG_KEYS),
                  "copypaste: " + ",".join(f"{r[k]:.4f}" for k in SEM_SEG_KEYS)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.evaluate", __doc__, argv, config=cli.default_config(),
                      config_help="config file instead of WORKDIR/config.json; --config.KEY=VALUE overrides "
                                  "either (e.g. --config.eval.datasets=ade150 --config.eval.mode=whole)")
    f = cmd.flags
    flags.DEFINE_string("workdir", None, "run directory (config.json, checkpoints/); results go to "
                        "WORKDIR/eval/<dataset>.json", flag_values=f)
    flags.DEFINE_string("checkpoint", None, "step number or step directory (default: the latest in WORKDIR)",
                        flag_values=f)
    flags.DEFINE_string("zero-shot", None, "evaluate the zero-shot CLIP baseline of this CLIP checkpoint instead "
                        "of a trained model (the floor every trained model must beat)", flag_values=f)
    cmd.required("workdir")
    args = cmd.parse()

    def body():
        workdir = Path(args.workdir)
        zero_shot = args["zero-shot"].value
        config = cmd.config(workdir, required=not zero_shot)  # the baseline uses W's config if it has one
        runtime.start(config)
        if zero_shot:
            segmenter = Segmenter.from_clip(zero_shot, config)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            segmenter = Segmenter.from_workdir(workdir, config, args.checkpoint)
        files.check_writable_dir(workdir / ckpt_lib.EVAL_DIR, "the results folder")  # before any evaluation
        command = "python -m dcp_jax.evaluate " + " ".join(cmd.argv[1:])
        evaluate_datasets(segmenter, parse_specs(config.eval.datasets), workdir=workdir, step=segmenter.step,
                          command=command, data_root=config.eval.data_root or None, max_images=config.eval.max_images)

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
