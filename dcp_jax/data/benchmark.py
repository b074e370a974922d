"""Training-pipeline throughput (images/s) per worker count, as a markdown table.

    python -m dcp_jax.data.benchmark [--data SPEC] [--crop 384] [--workers 0,1,2] [--batches 20]

Without --data, a toy-world dataset (dcp_jax.data.toy_world) of 560x560 images, about COCO's 640x480 in pixels, is
generated into a temporary directory. Each row builds a fresh `train_dataset` iterator, discards --warmup batches
(worker start-up is reported separately), then times --batches batches.
"""

from __future__ import annotations

import sys
import tempfile
import time

from absl import flags
from tqdm import tqdm

from dcp_jax import cli
from dcp_jax.data.pipeline import train_dataset
from dcp_jax.data.sources import open_dataset
from dcp_jax.data.toy_world import write_benchmark


def measure(source, *, crop: int, batch_size: int, workers: int, batches: int, warmup: int, seed: int = 0) -> dict:
    """Time the training pipeline over `source`; returns startup seconds and images/s."""
    start = time.perf_counter()
    it = iter(train_dataset(source, crop_size=crop, global_batch_size=batch_size, seed=seed, num_workers=workers,
                            shard_index=0, shard_count=1))
    try:
        for _ in range(warmup):
            next(it)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in tqdm(range(batches), desc=f"{workers} workers", leave=False):
            next(it)
        elapsed = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"workers": workers, "startup_s": startup, "images_per_s": batches * batch_size / elapsed,
            "ms_per_batch": 1000 * elapsed / batches}


def main(argv=None) -> int:
    cmd = cli.Command("python -m dcp_jax.data.benchmark", __doc__, argv)
    f = cmd.flags
    flags.DEFINE_string("data", "", "dataset spec (e.g. folder:PATH or coco_stuff_171); default: generate a toy-world "
                        "dataset in a temp dir", flag_values=f)
    flags.DEFINE_string("split", "train", "split of --data", flag_values=f)
    flags.DEFINE_string("data-root", "", "benchmark root (default $DETECTRON2_DATASETS or ./datasets)", flag_values=f)
    flags.DEFINE_integer("crop", 384, "training crop size", flag_values=f)
    flags.DEFINE_integer("batch-size", 8, "images per batch", flag_values=f)
    flags.DEFINE_string("workers", "0,1,2", "comma-separated worker-process counts to try", flag_values=f)
    flags.DEFINE_integer("batches", 20, "timed batches per row", flag_values=f)
    flags.DEFINE_integer("warmup", 2, "untimed batches first (include worker start-up)", flag_values=f)
    flags.DEFINE_integer("num-images", 64, "toy-world images to generate", flag_values=f)
    args = cmd.parse()
    batch_size = args["batch-size"].value

    def body():
        try:
            workers = [int(w) for w in args.workers.split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"--workers {args.workers}: give worker-process counts, comma-separated, e.g. 0,1,2") \
                from None
        with tempfile.TemporaryDirectory() as tmp:
            spec, split = args.data, args.split
            if not spec:
                path = write_benchmark(f"{tmp}/toy_world", args["num-images"].value, seed=0, size=560, progress=True)
                spec, split = f"folder:{path}", "train"
            source = open_dataset(spec, split, args["data-root"].value or None)
            rows = [measure(source, crop=args.crop, batch_size=batch_size, workers=w, batches=args.batches,
                            warmup=args.warmup) for w in workers]
        print(f"\ntraining pipeline on {source.name} ({len(source)} images), crop {args.crop}, "
              f"batch {batch_size}, {args.batches} timed batches\n")
        print("| workers | images/s | ms/batch | start-up s |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['ms_per_batch']:.0f} | {r['startup_s']:.1f} |")

    return cmd.run(body, errors=cli.INPUT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
