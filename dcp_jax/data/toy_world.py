"""A small synthetic world with nameable things, for an open-vocabulary demo that runs on a CPU.

    python -m dcp_jax.data.toy_world --out DIR [--num-images 240] [--seed 0] [--size 96]

The world has textured "stuff" (grass, sky, water, ...) and objects that are a shape times a colour
("red ball", "cyan triangle", ...): 8 + 4 x 4 = 24 classes. It serves two purposes:

- `caption_batch(...)`: image-caption pairs on which `dcp_jax.toy_clip` pre-trains a small CLIP, so that
  CLIP's zero-shot knowledge of every class is real;
- `write_benchmark(...)` (the command line): a seen/unseen segmentation benchmark as a folder dataset,
  DIR/images/{train,val}/*.png, DIR/annotations/{train,val}/*.png (pixel = class index, 255 = ignore,
  a 1-pixel ignore ring around objects as in VOC), DIR/classes.json and DIR/meta.json, whose
  "unseen_classes" are meant to be dropped from segmentation training. The unseen objects are
  compositional: "cyan triangle" is unseen while "cyan ball" and "red triangle" are seen.

Annotations of both splits hold the true labels of every class. Everything is a deterministic function of
the seed (and the image index, size and split).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

from dcp_jax import cli

IGNORE_LABEL = 255
STUFF = ("grass", "sky", "water", "sand", "brick wall", "road", "snow", "wood")
COLOURS = {"red": (220, 35, 35), "yellow": (245, 215, 40), "purple": (150, 50, 200), "cyan": (30, 200, 215)}
SHAPES = ("ball", "triangle", "box", "ring")
OBJECTS = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
CLASS_NAMES = STUFF + OBJECTS  # index = label value
# One unseen colour per shape and one unseen shape per colour, so each unseen object's colour and shape are
# both seen in other objects; plus one stuff class.
UNSEEN_CLASSES = ("snow", "purple ball", "cyan triangle", "yellow box", "red ring")
# Surface tone per shape, (gain, offset): fill = gain * colour + offset. Box: towards white; triangle: darker;
# ring: darkest; ball: the colour itself, shaded.
SHAPE_TONES = {"ball": (1.0, 0.0), "box": (0.45, 0.55 * 255), "triangle": (0.55, 0.0), "ring": (0.25, 0.0)}
WORLD_VERSION = "toy_world-1"  # bump when rendering or captions change (it keys the toy CLIP cache)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32 [S, S] each; cached because every texture and shape needs them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _stuff_texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, S, 3] RGB texture of a stuff class, recognisable within an 8x8 patch."""
    yy, xx = _grid(size)
    noise = lambda amp: rng.uniform(-amp, amp, (size, size, 1)).astype(np.float32)  # noqa: E731
    tint = rng.uniform(-12, 12, 3).astype(np.float32)  # per-image colour variation
    if name == "grass":  # green with vertical blades: per-column streaks
        streaks = np.repeat(rng.uniform(-35, 35, (1, size, 1)), size, axis=0)
        out = np.array([60, 140, 40]) + streaks * np.array([0.5, 1, 0.4]) + noise(12)
    elif name == "sky":  # smooth light blue, brighter towards the bottom
        t = (yy / max(size - 1, 1))[..., None]
        out = (1 - t) * np.array([115, 165, 235]) + t * np.array([180, 212, 250]) + noise(2)
    elif name == "water":  # deep blue with horizontal waves
        waves = np.sin(2 * np.pi * yy / 6 + 0.8 * np.sin(2 * np.pi * xx / 23) + rng.uniform(0, 2 * np.pi))
        out = np.array([25, 70, 140]) + waves[..., None] * np.array([15, 25, 40]) + noise(5)
    elif name == "sand":  # beige with fine speckle
        out = np.array([215, 190, 135]) + noise(30)
    elif name == "brick wall":  # red-brown bricks with light mortar, half-offset rows
        row = (yy // 8).astype(np.int32)
        shifted = xx + 8 * (row % 2)
        col = (shifted // 16).astype(np.int32)
        out = np.array([160, 65, 40]) + rng.uniform(-25, 25, (row.max() + 1, col.max() + 1))[row, col][..., None]
        out = out + noise(8)
        out[(yy % 8 == 0) | (shifted % 16 == 0)] = (205, 200, 190)
    elif name == "road":  # dark grey asphalt with a dashed white line
        out = np.full((size, size, 3), 80.0) + noise(14)
        line_y = rng.integers(0, size)
        out[(np.abs(yy - line_y) <= 1) & ((xx // 6) % 2 == 0)] = (230, 230, 225)
    elif name == "snow":  # near white with soft blue-grey speckle
        out = np.array([238, 242, 250]) + noise(8) * np.array([1.0, 1.0, 0.6]) - (noise(1) > 0.8) * 30
    elif name == "wood":  # brown planks with wavy grain
        grain = np.sin(2 * np.pi * (yy + 2 * np.sin(2 * np.pi * xx / 19)) / 4)[..., None]
        planks = ((xx // 12) % 2)[..., None] * 18
        out = np.array([140, 90, 45]) + grain * np.array([22, 15, 8]) - planks + noise(6)
    else:
        raise ValueError(f"no texture for stuff class {name!r}")
    return (out + tint).astype(np.float32)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of a shape centred at (cy, cx) with radius r, on the pixel coordinates (yy, xx)."""
    yy, xx = yy + 0.5, xx + 0.5  # pixel centres
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if shape == "ball":
        return d2 <= r * r
    if shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.45 * r) ** 2)
    if shape == "box":
        return (np.abs(yy - cy) <= 0.85 * r) & (np.abs(xx - cx) <= 0.85 * r)
    if shape == "triangle":  # upright: apex at the top
        t = (yy - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= 1.1 * t * r)
    raise ValueError(f"unknown shape {shape!r}")


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (the ignore ring around objects), as a vertical then a horizontal 3-pixel one."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def render_scene(rng: np.random.Generator, size: int, *, stuff=None, objects=None, num_stuff=(1, 3),
                 num_objects=(0, 3), radius=(0.10, 0.22)):
    """One square scene -> (uint8 [S,S,3] image, uint8 [S,S] label with an ignore ring, visible class indices).

    `stuff` / `objects` are lists of class names (default: drawn at random, `num_stuff` and `num_objects` are
    inclusive ranges); stuff fills Voronoi cells, objects (radius a fraction of the side) are pasted on top.
    A class is visible when at least 12 of its pixels survive occlusion (the caption names only those).
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if stuff is None:
        k = int(rng.integers(num_stuff[0], num_stuff[1] + 1))
        stuff = [STUFF[i] for i in rng.choice(len(STUFF), k, replace=False)]
    if objects is None:
        objects = [OBJECTS[i] for i in rng.integers(0, len(OBJECTS), int(rng.integers(num_objects[0],
                                                                                       num_objects[1] + 1)))]
    unknown = [n for n in [*stuff, *objects] if n not in CLASS_NAMES]
    if unknown or not stuff:
        raise ValueError(f"unknown class names {unknown}" if unknown else "a scene needs at least one stuff class")

    # stuff: Voronoi cells, one per stuff class
    centres = rng.uniform(0.1, 0.9, (len(stuff), 2)) * size
    yy, xx = _grid(size)
    cell = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2).argmin(0)
    label = np.asarray([CLASS_NAMES.index(n) for n in stuff], np.uint8)[cell]
    image = np.zeros((size, size, 3), np.float32)
    for i, name in enumerate(stuff):
        np.copyto(image, _stuff_texture(name, size, rng), where=(cell == i)[..., None])

    ignore = np.zeros((size, size), bool)
    for name in objects:
        colour, shape = name.split(" ")
        r = rng.uniform(*radius) * size
        cy, cx = rng.uniform(min(r, size / 2), max(size - r, size / 2), 2)  # a close-up may overflow the frame
        # drawn inside the object's bounding box (+2 pixels for the ignore ring): 3x faster than the whole canvas
        box = (slice(max(int(cy - r) - 2, 0), int(cy + r) + 3), slice(max(int(cx - r) - 2, 0), int(cx + r) + 3))
        wy, wx = yy[box], xx[box]
        mask = np.zeros((size, size), bool)
        mask[box] = inside = _shape_mask(shape, wy, wx, cy, cx, r)  # a triangle may reach past its box: cut there
        rgb = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-15, 15)
        fill = rgb + rng.uniform(-6, 6, (*wy.shape, 1)).astype(np.float32)
        # Each shape also has its own surface tone (a gain and an offset on the colour; the ball is shaded): CAT-Seg's
        # dense features see one 8-pixel patch at a time, so a patch inside an object must tell its shape, not only
        # its colour, and a tone survives the resize to the toy CLIP's 64 pixels where a fine pattern would not.
        gain, offset = SHAPE_TONES[shape]
        fill = gain * fill + offset
        if shape == "ball":
            d = np.sqrt((wy - cy + 0.35 * r) ** 2 + (wx - cx + 0.35 * r) ** 2)[..., None] / r
            fill = fill * (1.15 - 0.3 * d)
        np.copyto(image[box], fill, where=inside[..., None])  # views of the canvas: only the box is touched
        ring = (slice(max(box[0].start - 1, 0), box[0].stop + 1), slice(max(box[1].start - 1, 0), box[1].stop + 1))
        near = mask[ring]  # the ignore ring reaches at most one pixel past the box
        ignore[ring] = (ignore[ring] | (_dilate(near) & ~near)) & ~near
        label[box][inside] = CLASS_NAMES.index(name)
    counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES))
    visible = [int(c) for c in np.flatnonzero(counts >= 12)]
    label[ignore] = IGNORE_LABEL
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label, visible


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

# Caption grammar: "<lead> <phrase>." with varied leads whose words cover those of CLIP's ImageNet prompt
# templates, so the text tower also understands "a blurry photo of a {}." and the like.
_ADJECTIVES = ("", "", "", "bad", "good", "bright", "dark", "blurry", "cropped", "close-up", "low resolution",
               "pixelated", "jpeg corrupted", "black and white", "clean", "dirty", "nice", "weird", "cool", "large",
               "small", "hard to see", "one", "many", "my")
_MEDIA = ("photo", "photo", "photo", "picture", "image", "rendering", "rendition", "drawing", "painting", "sketch",
          "doodle", "sculpture", "tattoo")
_LEADS = ("", "", "the toy", "a plushie", "the origami", "the embroidered", "a cartoon", "the plastic", "art of",
          "graffiti of", "itap of")
_SCENES = ("{objects} on {stuff}", "{objects} in front of {stuff}", "there is {objects} and {stuff}",
           "{stuff} with {objects}", "this is {objects} on {stuff}", "a scene with {objects} and {stuff}",
           "{stuff} and {objects} in the scene", "{objects} in a video game")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(rng: np.random.Generator, class_ids) -> str:
    """A caption naming every class in `class_ids` (each once, in random order, in a random template)."""
    names = [CLASS_NAMES[i] for i in class_ids]
    if not names:
        raise ValueError("a caption needs at least one class")
    names = [names[i] for i in rng.permutation(len(names))]
    articled = [f"a {n}" if n in OBJECTS and rng.random() < 0.7 else n for n in names]
    objects = [a for a, n in zip(articled, names) if n in OBJECTS]
    stuff = [a for a, n in zip(articled, names) if n not in OBJECTS]
    if objects and stuff and rng.random() < 0.4:  # a scene sentence
        body = _SCENES[rng.integers(len(_SCENES))]
        body = body.format(objects=_join(objects), stuff=_join(stuff)) if "{stuff}" in body else \
            body.format(objects=_join(articled))
    else:  # a list of everything
        body = _join(articled)
    lead = _LEADS[rng.integers(len(_LEADS))]
    if not lead:  # "a <adjective> photo of"
        adjective, medium = _ADJECTIVES[rng.integers(len(_ADJECTIVES))], _MEDIA[rng.integers(len(_MEDIA))]
        lead = " ".join(w for w in (str(rng.choice(["a", "the"])), adjective, medium, "of") if w)
    return f"{lead} {body}."


def caption_batch(seed: int, index: int, batch_size: int, size: int):
    """A deterministic batch of (uint8 [B,S,S,3] images, captions, [B,C] bool captioned-class sets) for CLIP.

    A batch draws from a random theme (3 stuff classes; objects of only 1 or 2 colours, or of only 2 shapes), so its
    contrastive negatives are hard: telling its scenes apart needs each object's colour AND shape. Like web
    captions, two in five images are close-ups of one object (half of them filling most of the frame) whose caption
    names only the object (these teach shapes fastest), one in eight show only stuff, and the rest are scenes whose
    captions name everything visible.
    """
    rng = np.random.default_rng([seed, index])
    images, captions = np.zeros((batch_size, size, size, 3), np.uint8), []
    present = np.zeros((batch_size, len(CLASS_NAMES)), bool)
    stuff_pool = [STUFF[i] for i in rng.choice(len(STUFF), 3, replace=False)]
    num_colours, num_shapes = ((1, 4), (2, 4), (len(COLOURS), 2))[rng.integers(3)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), num_colours, replace=False)]
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), num_shapes, replace=False)]
    object_pool = [f"{c} {s}" for s in shapes for c in colours]
    for b in range(batch_size):
        kind = rng.choice(4, p=[0.125, 0.2, 0.2, 0.475])  # stuff only, close-up, filling close-up, scene
        stuff = [stuff_pool[i] for i in rng.choice(3, int(rng.integers(1, 3)), replace=False)]
        num_objects = (0, 1, 1, int(rng.integers(1, 3)))[kind]
        objects = [object_pool[i] for i in rng.integers(0, len(object_pool), num_objects)]
        image, _, visible = render_scene(rng, size, stuff=stuff, objects=objects,
                                         radius=((0.1, 0.2), (0.25, 0.4), (0.5, 0.8), (0.12, 0.35))[kind])
        if kind in (1, 2):
            visible = [i for i in visible if CLASS_NAMES[i] in objects] or visible
        images[b], present[b, visible] = image, True
        captions.append(caption(rng, visible))
    return images, captions, present


def corpus_words() -> list[str]:
    """Every word the captions use (repeated by rough frequency): the toy CLIP's BPE merges are learnt from them."""
    words = [w for name in CLASS_NAMES for w in name.split()] * 8
    text = " ".join([*_ADJECTIVES, *_MEDIA, *_LEADS, *_SCENES, "a the of"])
    return words + re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text))


# --------------------------------------------------------------------------------------------------
# The segmentation benchmark
# --------------------------------------------------------------------------------------------------


RADIUS = (0.2, 0.35)


def benchmark_sample(seed: int, split: str, index: int, size: int = 96):
    """One benchmark (uint8 [S,S,3] image, uint8 [S,S] label): 1-3 stuff regions and 1-3 objects."""
    rng = np.random.default_rng([seed, {"train": 1, "val": 2}[split], index])
    image, label, _ = render_scene(rng, size, num_stuff=(1, 3), num_objects=(1, 3), radius=RADIUS)
    return image, label


def _is_toy_world(path: Path) -> bool:
    """Whether `path` holds a dataset that write_benchmark wrote (its meta.json names the generator)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("generator", "")).startswith("toy_world-")


def write_benchmark(out, num_images: int = 240, seed: int = 0, size: int = 96, val_fraction: float = 0.25,
                    overwrite: bool = False, progress: bool = False) -> Path:
    """Write the seen/unseen segmentation benchmark folder dataset to `out` (see the module doc); returns it."""
    if num_images < 2 or size < 32:
        raise ValueError(f"need num_images >= 2 and size >= 32 (got {num_images}, {size})")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a directory; give a new directory to write the dataset to")
    written = [out / "images", out / "annotations", out / "classes.json", out / "meta.json"]
    if any(p.exists() for p in written):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite) to replace it")
        if not _is_toy_world(out):  # --overwrite replaces a toy world, never the user's own data
            raise FileExistsError(f"{out} holds files that are not a toy-world dataset (no meta.json with "
                                  '"generator": "toy_world-..."); choose another directory')
        for p in written:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    num_val = min(max(int(round(num_images * val_fraction)), 1), num_images - 1)
    from tqdm import tqdm

    for split, count in (("train", num_images - num_val), ("val", num_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(count), desc=f"toy world {split}", disable=not progress):
            image, label = benchmark_sample(seed, split, i, size)
            Image.fromarray(image).save(out / "images" / split / f"{i:06d}.png", compress_level=1)
            Image.fromarray(label).save(out / "annotations" / split / f"{i:06d}.png", compress_level=1)
    (out / "classes.json").write_text(json.dumps(list(CLASS_NAMES), indent=1) + "\n")
    meta = {"ignore_label": IGNORE_LABEL, "name": "toy_world", "unseen_classes": list(UNSEEN_CLASSES),
            "generator": WORLD_VERSION, "seed": seed, "size": size, "num_images": num_images, "num_val": num_val}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    cmd = cli.Command("python -m dcp_jax.data.toy_world", __doc__, argv)
    f = cmd.flags
    flags.DEFINE_string("out", None, "output directory (a folder dataset)", flag_values=f)
    flags.DEFINE_integer("num-images", 240, "total images, train + val", flag_values=f)
    flags.DEFINE_integer("seed", 0, "random seed (the output is deterministic for a seed)", flag_values=f)
    flags.DEFINE_integer("size", 96, "image side in pixels", flag_values=f)
    flags.DEFINE_float("val-fraction", 0.25, "fraction of images in the val split", flag_values=f)
    flags.DEFINE_bool("overwrite", False, "replace a toy-world dataset already in --out", flag_values=f)
    cmd.required("out")
    args = cmd.parse()

    def body():
        num_images = args["num-images"].value
        out = write_benchmark(args.out, num_images, args.seed, args.size, args["val-fraction"].value, args.overwrite,
                              progress=True)
        print(f"wrote {num_images} images with {len(CLASS_NAMES)} classes ({len(UNSEEN_CLASSES)} unseen: "
              f"{', '.join(UNSEEN_CLASSES)}) to {out} (use folder:{out})")

    return cmd.run(body, errors=cli.INPUT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
