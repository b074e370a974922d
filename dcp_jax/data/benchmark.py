"""Training-pipeline throughput (images/s) per worker count, as a markdown table.

    python -m dcp_jax.data.benchmark [--data SPEC] [--crop 384] [--workers 0,1,2] [--batches 20]

Without --data, a toy-world dataset (dcp_jax.data.toy_world) of 560x560 images, about COCO's
640x480 in pixels, is generated into a temporary directory. Each row builds a fresh `train_dataset` iterator, discards --warmup batches
(worker start-up is reported separately), then times --batches batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tqdm import tqdm


def measure(source, *, crop: int, batch_size: int, workers: int, batches: int, warmup: int, seed: int = 0) -> dict:
    """Time the training pipeline over `source`; returns startup seconds and images/s."""
    from dcp_jax.data.pipeline import train_dataset

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcp_jax.data.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="dataset spec (e.g. folder:PATH or coco_stuff_171); "
                                                   "default: generate a toy-world dataset in a temp dir")
    parser.add_argument("--split", default="train", help="split of --data (default train)")
    parser.add_argument("--data-root", default="", help="benchmark root (default $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--crop", type=int, default=384, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker-process counts to try")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (include worker start-up)")
    parser.add_argument("--num-images", type=int, default=64, help="toy-world images to generate")
    args = parser.parse_args(argv)

    from dcp_jax.data.datasets import open_dataset
    from dcp_jax.data.toy_world import write_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        spec, split = args.data, args.split
        if not spec:
            path = write_benchmark(f"{tmp}/toy_world", args.num_images, seed=0, size=560, progress=True)
            spec, split = f"folder:{path}", "train"
        source = open_dataset(spec, split, args.data_root or None)
        rows = [measure(source, crop=args.crop, batch_size=args.batch_size, workers=int(w), batches=args.batches,
                        warmup=args.warmup) for w in args.workers.split(",") if w.strip()]
    print(f"\ntraining pipeline on {source.name} ({len(source)} images), crop {args.crop}, "
          f"batch {args.batch_size}, {args.batches} timed batches\n")
    print("| workers | images/s | ms/batch | start-up s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['ms_per_batch']:.0f} | {r['startup_s']:.1f} |")


if __name__ == "__main__":
    main()
