"""A synthetic folder dataset: textured "stuff" regions plus shaped "things", with named classes.

    python -m dcp_jax.data.synthetic --out DIR --num-images 128 --seed 0 [--size 128] [--val-fraction 0.25]

writes DIR/images/{train,val}/*.png, DIR/annotations/{train,val}/*.png, DIR/classes.json and
DIR/meta.json, readable as `open_dataset("folder:DIR", split)`. Every class has its own colour and
texture, so the class of a pixel is recoverable from its neighbourhood: a tiny model can learn it
(the CPU demo and tests rely on that). Stuff regions are Voronoi cells; things (a disc, a triangle,
a square) are pasted on top with a 1-pixel ignore ring (255) around them, as in VOC annotations.
The output is a deterministic function of (seed, image index, size, num_classes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

IGNORE_LABEL = 255
# Class order = label value. Stuff and things alternate so a short prefix (num_classes) keeps both.
CLASS_NAMES = ("grass", "sky", "red ball", "water", "sand", "yellow triangle", "brick wall", "road",
               "purple box")
THINGS = {"red ball": "disc", "yellow triangle": "triangle", "purple box": "square"}


def _texture(name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [H, W, 3] RGB texture of a class over the whole canvas (masked by the caller)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = lambda amp: rng.uniform(-amp, amp, (height, width, 1)).astype(np.float32)  # noqa: E731
    if name == "grass":  # green with vertical blades: per-column streaks
        streaks = np.repeat(rng.uniform(-35, 35, (1, width, 1)), height, axis=0)
        return np.array([60, 150, 45], np.float32) + streaks * np.array([0.5, 1, 0.4]) + noise(12)
    if name == "sky":  # smooth light-blue vertical gradient
        t = (yy / max(height - 1, 1))[..., None]
        return (1 - t) * np.array([110, 160, 235], np.float32) + t * np.array([185, 215, 250]) + noise(2)
    if name == "water":  # deep blue with horizontal waves
        phase = rng.uniform(0, 2 * np.pi)
        waves = np.sin(2 * np.pi * yy / 6 + 0.8 * np.sin(2 * np.pi * xx / 23) + phase)[..., None]
        return np.array([25, 75, 150], np.float32) + waves * np.array([15, 25, 40]) + noise(5)
    if name == "sand":  # beige with fine grey speckle
        return np.array([215, 190, 135], np.float32) + noise(30)
    if name == "brick wall":  # red-brown bricks with light mortar lines, half-offset rows
        row = (yy // 8).astype(np.int32)
        col = ((xx + 8 * (row % 2)) // 16).astype(np.int32)
        brick_jitter = rng.uniform(-25, 25, (row.max() + 1, col.max() + 1))[row, col][..., None]
        image = np.array([165, 65, 40], np.float32) + brick_jitter + noise(8)
        mortar = (yy % 8 == 0) | ((xx + 8 * (row % 2)) % 16 == 0)
        image[mortar] = np.array([205, 200, 190], np.float32)
        return image
    if name == "road":  # dark neutral grey asphalt
        return np.full((height, width, 3), 85, np.float32) + noise(14)
    if name == "red ball":
        return np.array([215, 30, 30], np.float32) + noise(6)
    if name == "yellow triangle":
        return np.array([245, 215, 35], np.float32) + noise(6)
    if name == "purple box":  # purple with a diagonal stripe pattern
        stripes = (((xx + yy) // 4) % 2)[..., None]
        return np.array([120, 45, 160], np.float32) + stripes * np.array([35, 20, 40]) + noise(5)
    raise ValueError(f"no texture for class {name!r}")


def _shape_mask(shape: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    short = min(height, width)
    r = rng.uniform(short / 10, short / 5)
    cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
    if shape == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    if shape == "triangle":  # upright isosceles: apex at the top
        t = (yy - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
    raise ValueError(shape)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (the ignore ring around things)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def make_sample(index: int, seed: int, size: int = 128, num_classes: int = len(CLASS_NAMES)):
    """One synthetic (uint8 [H, W, 3] image, uint8 [H, W] label) pair; H, W within size * [0.75, 1.25]."""
    rng = np.random.default_rng([seed, index])
    names = CLASS_NAMES[:num_classes]
    stuff = [i for i, n in enumerate(names) if n not in THINGS]
    things = [i for i, n in enumerate(names) if n in THINGS]
    height, width = (int(round(size * s)) for s in rng.uniform(0.75, 1.25, 2))

    # stuff: Voronoi cells of 2-4 random seeds, each with a random stuff class
    num_cells = int(rng.integers(2, 5))
    centers = rng.uniform(0, 1, (num_cells, 2)) * (height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    dist = (yy[None] - centers[:, 0, None, None]) ** 2 + (xx[None] - centers[:, 1, None, None]) ** 2
    cell = dist.argmin(axis=0)
    cell_class = rng.choice(stuff, num_cells)
    label = cell_class[cell].astype(np.uint8)

    # things: 0-3 shapes on top, each with a 1-pixel ignore ring
    ignore = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(0, 4)) if things else 0):
        cls = int(rng.choice(things))
        mask = _shape_mask(THINGS[names[cls]], height, width, rng)
        ignore = (ignore | (_dilate(mask) & ~mask)) & ~mask
        label[mask] = cls

    image = np.zeros((height, width, 3), np.float32)
    for cls in np.unique(label):
        mask = label == cls
        image[mask] = _texture(names[cls], height, width, rng)[mask]
    label[ignore] = IGNORE_LABEL
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def write_synthetic_dataset(out, num_images: int, seed: int, size: int = 128, num_classes: int = len(CLASS_NAMES),
                            val_fraction: float = 0.25, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a synthetic folder dataset to `out` (see the module doc); returns its path.

    The last round(num_images * val_fraction) images (at least 1 when val_fraction > 0 and
    num_images > 1) form the val split, the rest the train split.
    """
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 2..{len(CLASS_NAMES)}, got {num_classes}")
    if num_images < 1 or size < 16:
        raise ValueError(f"need num_images >= 1 and size >= 16 (got {num_images}, {size})")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    written = [out / "images", out / "annotations", out / "classes.json", out / "meta.json"]
    if any(p.exists() for p in written):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")
        for p in written:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    num_val = int(round(num_images * val_fraction))
    if val_fraction > 0 and num_images > 1:
        num_val = min(max(num_val, 1), num_images - 1)
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(num_images), desc="synthetic images", disable=not progress):
        split = "train" if i < num_images - num_val else "val"
        image, label = make_sample(i, seed, size, num_classes)
        Image.fromarray(image).save(out / "images" / split / f"{i:06d}.png", compress_level=1)
        Image.fromarray(label).save(out / "annotations" / split / f"{i:06d}.png", compress_level=1)
    (out / "classes.json").write_text(json.dumps(list(CLASS_NAMES[:num_classes]), indent=1) + "\n")
    meta = {"ignore_label": IGNORE_LABEL, "generator": "dcp_jax.data.synthetic", "seed": seed, "size": size,
            "num_images": num_images, "num_val": num_val}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcp_jax.data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (a folder dataset)")
    parser.add_argument("--num-images", type=int, required=True, help="total images (train + val)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic for a seed)")
    parser.add_argument("--size", type=int, default=128, help="nominal image side; each side varies by +-25%%")
    parser.add_argument("--num-classes", type=int, default=len(CLASS_NAMES),
                        help=f"use the first N of: {', '.join(CLASS_NAMES)}")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="fraction of images in the val split")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    args = parser.parse_args(argv)
    out = write_synthetic_dataset(args.out, args.num_images, args.seed, args.size, args.num_classes,
                                  args.val_fraction, args.overwrite, progress=True)
    print(f"wrote {args.num_images} images to {out} (use --data folder:{out})")


if __name__ == "__main__":
    main()
