"""Benchmark mIoU: python -m dcp_jax.evaluate --workdir W --datasets ade150,pc59,... [options]

Uses W's saved config (unless --config) and W's latest checkpoint (unless --checkpoint), runs the
CAT-Seg protocol of MODEL.md section 7 (slide window by default), streams a dataset-wide confusion
matrix, writes W/eval/<dataset>.json and prints a table in the layout of the paper's Table I.

  python -m dcp_jax.evaluate --workdir runs/b16 --datasets ade847,pc459,ade150,pc59,voc20
  python -m dcp_jax.evaluate --workdir runs/zs --zero-shot ~/models/clip-vit-base-patch16 --datasets ade150
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import config as config_lib
from dcp_jax import metrics as metrics_lib
from dcp_jax.data import datasets as datasets_lib
from dcp_jax.data import pipeline
from dcp_jax.segmenter import Segmenter

# The paper's column names (Table I), in its order.
TABLE_NAMES = {"ade847": "A-847", "pc459": "PC-459", "ade150": "A-150", "pc59": "PC-59", "voc20": "PAS-20",
               "voc20b": "PAS-20b", "coco_stuff_171": "COCO-171"}


def evaluate_dataset(segmenter: Segmenter, spec: str, *, data_root: str | None = None,
                     max_images: int = 0, progress: bool = True) -> dict:
    """mIoU and friends of one dataset; every host takes its share of the images and the counts are summed."""
    config = segmenter.config
    ds = datasets_lib.open_dataset(spec, "val", data_root)
    segmenter.set_vocabulary(ds.class_names)
    items = pipeline.eval_dataset(ds, short_side=config.eval.short_side, max_images=max_images,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())
    confusion = metrics_lib.ConfusionMatrix(ds.num_label_classes)
    bar = tqdm(total=len(items), desc=f"eval {ds.name}", unit="img", dynamic_ncols=True,
               disable=not progress or not ckpt_lib.is_primary())
    start = time.time()
    batch: list[dict] = []

    def flush():
        labels = segmenter.segment([b["image"] for b in batch], resized=True,
                                   original_sizes=[b["label"].shape for b in batch])
        for item, pred in zip(batch, labels):
            confusion.update(metrics_lib.map_predictions(pred, ds.pred_to_label), item["label"])
        bar.update(len(batch))
        batch.clear()

    for i in range(len(items)):
        batch.append(items[i])
        if len(batch) == segmenter.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    counts = confusion.counts
    num_images = len(items)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
        num_images = int(np.asarray(multihost_utils.process_allgather(np.int64(num_images))).sum())
    result = metrics_lib.compute_metrics(counts)
    label_names = (list(ds.class_names[:ds.num_label_classes - 1]) + ["background"]
                   if ds.num_label_classes != len(ds.class_names) else list(ds.class_names))
    result.update(dataset=ds.name, spec=spec, num_images=num_images, mode=config.eval.mode,
                  num_slots=int(config.eval.num_slots), class_names=label_names,
                  seconds_per_image=(time.time() - start) / max(1, len(items)))
    return result


def evaluate_datasets(segmenter: Segmenter, specs: list[str], *, workdir: Path, step: int,
                      data_root: str | None = None, max_images: int = 0, command: str | None = None) -> dict:
    """Evaluate each dataset, write W/eval/<name>.json, print the table; returns {name: result}."""
    results = {}
    for spec in specs:
        result = evaluate_dataset(segmenter, spec, data_root=data_root, max_images=max_images)
        result.update(step=int(step), checkpoint=str(getattr(segmenter, "checkpoint_dir", "")),
                      zero_shot=segmenter.zero_shot,
                      command=command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
        results[result["dataset"]] = result
        if ckpt_lib.is_primary():
            # The zero-shot baseline never overwrites a trained model's results in the same workdir.
            out = Path(workdir) / "eval" / ("zero_shot" if segmenter.zero_shot else "")
            out.mkdir(parents=True, exist_ok=True)
            ckpt_lib.write_json(out / f"{result['dataset']}.json", result)
    if ckpt_lib.is_primary():
        print(format_table(results, step=step))
    return results


def evaluate_model(model, config, *, workdir: Path, step: int, clip_path: Path) -> dict:
    """The trainer's periodic and final evaluation (same code as the command line)."""
    from dcp_jax import text as text_lib
    segmenter = Segmenter(model, config, text_lib.load_tokenizer(clip_path),
                          train_classes=ckpt_lib.load_train_classes(workdir))
    return evaluate_datasets(segmenter, parse_specs(config.eval.datasets), workdir=workdir, step=step,
                             data_root=config.eval.data_root or None, max_images=config.eval.max_images,
                             command=f"dcp_jax.train (step {step})")


def parse_specs(datasets: str) -> list[str]:
    specs = [s.strip() for s in datasets.split(",") if s.strip()]
    if not specs:
        raise ValueError("no dataset given: pass --datasets ade150,pc59,... or folder:PATH")
    return specs


def format_table(results: dict, *, step: int | None = None) -> str:
    """A markdown table in the layout of the paper's Table I (known benchmarks first, in its order)."""
    order = [n for n in TABLE_NAMES if n in results] + [n for n in results if n not in TABLE_NAMES]
    header = "| step | " + " | ".join(TABLE_NAMES.get(n, n) for n in order) + " |"
    rule = "|---|" + "---|" * len(order)
    row = f"| {step if step is not None else ''} | " + " | ".join(f"{results[n]['mIoU']:.1f}" for n in order) + " |"
    return "\n".join(["mIoU (%)", header, rule, row])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dcp_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (config.json, checkpoints/); results "
                        "go to WORKDIR/eval/<dataset>.json")
    parser.add_argument("--datasets", help="comma-separated dataset specs: ade847, pc459, ade150, pc59, voc20, "
                        "voc20b, coco_stuff_171 or folder:PATH (default: the config's eval.datasets)")
    parser.add_argument("--config", help="config file (configs/X.py[:args]) instead of WORKDIR/config.json")
    parser.add_argument("--checkpoint", help="step number or step directory (default: the latest in WORKDIR)")
    parser.add_argument("--mode", choices=["slide", "whole"], help="inference mode (default: eval.mode)")
    parser.add_argument("--zero-shot", metavar="CLIP", help="evaluate the zero-shot CLIP baseline from this CLIP "
                        "checkpoint instead of a trained model (the floor every trained model must beat)")
    parser.add_argument("--data-root", help="root of the prepared benchmarks (default: eval.data_root, else "
                        "$DETECTRON2_DATASETS, else ./datasets)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images of each dataset")
    parser.add_argument("--num-slots", type=int, help="K at inference (0 = every class)")
    return parser


def load_config_file(path: str):
    """Load a config file (`configs/X.py[:args]`): its get_config(args)."""
    import importlib.util
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise FileNotFoundError(f"config file {file} not found")
    spec = importlib.util.spec_from_file_location("_dcp_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dcp_jax import distributed
    distributed.initialize()
    workdir = Path(args.workdir)
    try:
        config = load_config_file(args.config) if args.config else None
        if args.zero_shot:
            if config is None:  # the workdir's config if it has one (same protocol as the trained run)
                has_config = (workdir / ckpt_lib.CONFIG_NAME).exists()
                config = ckpt_lib.load_config(workdir) if has_config else config_lib.base_config()
            segmenter = Segmenter.from_clip(args.zero_shot, config)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            segmenter = Segmenter.from_workdir(workdir, config, args.checkpoint)
        with segmenter.config.unlocked():
            if args.mode:
                segmenter.config.eval.mode = args.mode
            if args.num_slots is not None:
                segmenter.config.eval.num_slots = args.num_slots
        # An explicit --datasets "" is an error, not a silent fall-back to the config's datasets.
        specs = parse_specs(segmenter.config.eval.datasets if args.datasets is None else args.datasets)
        # The command as given (argv when called as a function, not the calling process's sys.argv).
        command = "python -m dcp_jax.evaluate " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        evaluate_datasets(segmenter, specs, workdir=workdir, step=segmenter.step, command=command,
                          data_root=args.data_root or segmenter.config.eval.data_root or None,
                          max_images=args.max_images if args.max_images is not None
                          else segmenter.config.eval.max_images)
    except (ValueError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
