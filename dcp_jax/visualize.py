"""Writing predictions for people: label PNGs, colour overlays with a legend, and per-class pixel fractions.

Label maps are int arrays of vocabulary ids with -1 = unlabelled (ignore / padding).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dcp_jax import files

MAX_8BIT_CLASSES = 255  # ids 0..254; 255 is the "unlabelled" value of 8-bit files
MAX_16BIT_CLASSES = 65535  # ids 0..65534; 65535 is the "unlabelled" value of 16-bit files


def save_label_png(labels, path: str | os.PathLike, num_classes: int) -> None:
    """Write a label map as a grayscale PNG of class ids (`label_image`); `load_label_png` reads back the ids."""
    save_png(label_image(labels, num_classes), path)


def label_image(labels, num_classes: int) -> np.ndarray:
    """What a label PNG stores: 8-bit ids when the vocabulary has at most 255 classes, 16-bit otherwise; -1 is
    stored as the file's maximum value (255 or 65535)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer map; got shape {labels.shape}, dtype {labels.dtype}")
    if not 0 < num_classes <= MAX_16BIT_CLASSES:
        raise ValueError(f"num_classes={num_classes}: a label PNG holds 1..{MAX_16BIT_CLASSES} classes")
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"label ids span [{labels.min()}, {labels.max()}]; expected -1 or [0, {num_classes})")
    dtype = np.uint8 if num_classes <= MAX_8BIT_CLASSES else np.uint16
    return np.where(labels < 0, np.iinfo(dtype).max, labels).astype(dtype)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an image array (uint8 RGB / grayscale, uint16 grayscale) as a PNG, atomically."""
    files.atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def png_bytes(array: np.ndarray) -> bytes:
    """An image array as PNG file bytes, as `save_png` writes them (the page's downloads)."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a `save_label_png` file: int32 class ids with the file's maximum value (255 / 65535) as -1."""
    with Image.open(path) as image:
        if image.mode not in ("L", "I;16", "I"):
            raise ValueError(f"{path}: mode {image.mode!r} is not a grayscale label PNG (8 or 16 bit)")
        ignore = 255 if image.mode == "L" else 65535
        stored = np.asarray(image).astype(np.int32)
    return np.where(stored == ignore, -1, stored)


# ---------------------------------------------------------------------------------------------
# Class colours: a function of the class NAME, so a class keeps its colour across runs and vocabularies
# ---------------------------------------------------------------------------------------------

# Glasbey's first 32 colours (colorcet): at least 19.6 CIE76 apart, so a small vocabulary is well separated.
PRIMARY = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in (
    "d60000 8c3bff 018700 00acc6 97ff00 ff7ed1 6b004f ffa52f 573b00 005659 0000dd 00fdcf a17569 bcb6ff 95b577 "
    "bf03b8 645474 790000 0774d8 729a7c ff7752 004b00 8e7b01 f2007b 8eba00 a57bb8 5901a3 e2afaf a03a52 a1c8c8 "
    "9e4b00 546744").split()], np.uint8)
# A class whose name has a colour word gets a shade of that colour (first colour word of the name).
COLOR_WORDS = {
    "red": (215, 35, 35), "orange": (245, 135, 25), "yellow": (240, 215, 30), "gold": (212, 170, 40),
    "green": (40, 165, 55), "lime": (150, 225, 40), "olive": (120, 125, 30), "cyan": (20, 205, 215),
    "turquoise": (60, 215, 190), "teal": (0, 128, 128), "blue": (35, 85, 225), "navy": (20, 35, 120),
    "purple": (135, 50, 200), "violet": (150, 90, 225), "magenta": (220, 30, 200), "pink": (250, 135, 190),
    "brown": (135, 85, 40), "beige": (225, 205, 160), "maroon": (125, 20, 40), "black": (25, 25, 25),
    "white": (245, 245, 245), "grey": (135, 135, 135), "gray": (135, 135, 135), "silver": (190, 190, 195),
}
# Things with a colour everyone expects, used when the name has no colour word ("grass" green, "sky" blue).
THING_COLORS = {
    "grass": (60, 160, 50), "tree": (30, 110, 40), "plant": (70, 150, 60), "forest": (30, 100, 40),
    "leaves": (80, 150, 40), "sky": (110, 170, 235), "water": (30, 100, 200), "sea": (20, 80, 170),
    "river": (40, 110, 190), "lake": (40, 120, 180), "snow": (240, 245, 250), "cloud": (225, 230, 240),
    "sand": (225, 200, 140), "road": (110, 110, 115), "wood": (140, 95, 50), "dirt": (120, 85, 50),
    "soil": (110, 75, 45), "mountain": (120, 110, 100),
}
SHADES = ((0, 0.0), (-1, 0.3), (1, 0.35), (-1, 0.5), (1, 0.6))  # (towards black -1 / white +1, amount)
MIN_PRIMARY_DISTANCE = 15.0  # CIE76: a palette colour this close to a colour already used is skipped
MIN_SHADE_DISTANCE = 6.0
MIN_EXTENDED_DISTANCE = 0.5  # large vocabularies: distinct colours, a stable first choice


def _lab(rgb) -> np.ndarray:
    """sRGB uint8 [...,3] -> CIELAB (D65): distances there follow what the eye tells apart."""
    c = np.asarray(rgb, np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _extended(n: int = 4096) -> np.ndarray:
    """n more colours for large vocabularies: golden-ratio hues at a few lightness and saturation levels."""
    import colorsys
    rows = [colorsys.hls_to_rgb((i * 0.6180339887) % 1, (0.5, 0.35, 0.65, 0.42, 0.58)[i % 5],
                                (0.95, 0.6, 0.8)[(i // 5) % 3]) for i in range(n)]
    return np.rint(np.array(rows) * 255).astype(np.uint8)


EXTENDED = _extended()


def _shades(base) -> np.ndarray:
    base = np.asarray(base, np.float64)
    return np.array([np.rint(base + a * ((255 if d > 0 else 0) - base)) for d, a in SHADES], np.uint8)


def name_key(name: str) -> str:
    """What a class's colour depends on: its name, case and spacing aside."""
    return " ".join(str(name).lower().split())


def color_word(name: str) -> str | None:
    """The first colour word of a class name ("yellow ball" -> "yellow"), else its first word of a thing with a
    usual colour ("grass", "sky"), else None."""
    words = re.findall(r"[a-z]+", name_key(name))
    return next((w for w in words if w in COLOR_WORDS), None) or next((w for w in words if w in THING_COLORS), None)


def _probe(key: str, n: int) -> np.ndarray:
    """The order in which a name tries the n (a power of two) entries of a palette: double hashing with an odd
    step, a fixed permutation per name."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    start, step = int.from_bytes(digest[:8], "big") % n, int.from_bytes(digest[8:16], "big") % n | 1
    return (start + step * np.arange(n)) % n


@functools.lru_cache(maxsize=64)
def _class_colors(keys: tuple[str, ...]) -> np.ndarray:
    colors = np.zeros((len(keys), 3), np.uint8)
    used = np.zeros((0, 3))
    tiers = {"primary": (PRIMARY, _lab(PRIMARY)), "extended": (EXTENDED, _lab(EXTENDED))}
    nearest = {t: np.full(len(p), np.inf) for t, (p, _) in tiers.items()}  # each entry's distance to the used

    def use(color) -> None:
        nonlocal used
        lab = _lab(color)
        used = np.vstack([used, lab])
        for t, (_, labs) in tiers.items():
            nearest[t] = np.minimum(nearest[t], np.linalg.norm(labs - lab, axis=-1))

    def first_free(palette, labs, key, minimum, near=None):
        order = _probe(key, len(palette)) if key else np.arange(len(palette))
        dist = near[order] if near is not None else (
            np.linalg.norm(labs[order][:, None] - used[None], axis=-1).min(1) if len(used) else np.full(len(order), np.inf))
        ok = np.flatnonzero(dist >= minimum)
        return palette[order[ok[0]]] if ok.size else None

    # Sorted by name, so the assignment does not depend on the vocabulary's order; colour-named classes first,
    # so that "red car" gets its red even when a plain name's hash landed near red.
    order = sorted(range(len(keys)), key=lambda i: (color_word(keys[i]) is None, keys[i]))
    for i in order:
        key, word, color = keys[i], color_word(keys[i]), None
        if word is not None:
            family = _shades(COLOR_WORDS.get(word) or THING_COLORS[word])
            color = first_free(family, _lab(family), None, MIN_SHADE_DISTANCE)  # the plain shade first
        if color is None:
            color = first_free(*tiers["primary"], key, MIN_PRIMARY_DISTANCE, nearest["primary"])
        if color is None:
            color = first_free(*tiers["extended"], key, MIN_EXTENDED_DISTANCE, nearest["extended"])
        if color is None:  # more classes than colours: repeat the name's own extended colour
            color = EXTENDED[_probe(key, len(EXTENDED))[0]]
        colors[i] = color
        use(color)
    colors.flags.writeable = False
    return colors


def class_colors(class_names: Sequence[str]) -> np.ndarray:
    """uint8 [C,3]: each class's colour, a function of its name (and, only to keep the classes of one vocabulary
    apart, of the other names in it; never of their order). A name's first choice is a well-separated palette
    colour picked by a hash of the name, or a shade of its colour word ("yellow ball"); a colour already used by
    the vocabulary (or too close to one) moves the later name, in sorted order, to its next choice. The page and
    predict's overlays both colour with this."""
    return _class_colors(tuple(name_key(n) for n in class_names))


def class_summary(labels, class_names: Sequence[str]) -> list[dict]:
    """Classes present in a label map: [{id, name, fraction}], largest fraction first (ties by id).

    Fractions are of the labelled pixels (label >= 0).
    """
    labels = np.asarray(labels)
    valid = labels[labels >= 0]
    if valid.size and valid.max() >= len(class_names):
        raise ValueError(f"label id {valid.max()} has no name: class_names has {len(class_names)} entries")
    counts = np.bincount(valid.ravel(), minlength=len(class_names))
    total = max(int(valid.size), 1)
    present = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    return [dict(id=int(i), name=str(class_names[i]), fraction=float(counts[i] / total)) for i in present]


LEGEND_NAME_CHARS = 48  # longer class names are cut in the legend (the JSON keeps them whole)


def _short(name: str) -> str:
    return name if len(name) <= LEGEND_NAME_CHARS else name[:LEGEND_NAME_CHARS - 3] + "..."


def blend_labels(image, labels, colors, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H,W,3]: each labelled pixel blended with its class colour (`colors` [C,3]) at weight alpha;
    -1 pixels keep the image's colours."""
    labels = np.asarray(labels)
    labelled = labels >= 0
    paint = np.asarray(colors, np.float32)[np.where(labelled, labels, 0)]
    blend = np.where(labelled[..., None], (1 - alpha) * np.asarray(image) + alpha * paint, image)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def overlay(image, labels, class_names: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """The image with each class painted in its colour (`class_colors`), and a legend of the classes present.

    Args:
      image: [H,W,3] uint8 RGB; labels: [H,W] int ids (-1 pixels keep the image's colours).
      alpha: weight of the class colour.

    Returns:
      uint8 [max(H, legend height), W + legend width, 3]: the blend on the left, on white, and a legend on the
      right listing the classes present (colour swatch, name, pixel percentage), largest first.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H,W,3] uint8 RGB; got shape {image.shape}, dtype {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} != image size {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    summary = class_summary(labels, class_names)
    colors = class_colors(class_names)
    blend = blend_labels(image, labels, colors, alpha)

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [f"{_short(e['name'])} ({100 * e['fraction']:.1f}%)" for e in summary] or ["(no labelled pixels)"]
    pad, swatch = 6, 12
    row_height = max(swatch, max(measure.textbbox((0, 0), t, font=font)[3] for t in rows)) + 4
    text_width = max(measure.textlength(t, font=font) for t in rows)
    legend_w = int(pad + swatch + pad + text_width + pad)
    legend_h = pad + row_height * len(rows) + pad
    h, w = labels.shape
    canvas = Image.new("RGB", (w + legend_w, max(h, legend_h)), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(rows):
        top = pad + i * row_height
        if summary:
            draw.rectangle([w + pad, top, w + pad + swatch - 1, top + swatch - 1],
                           fill=tuple(int(v) for v in colors[summary[i]["id"]]), outline=(0, 0, 0))
        draw.text((w + pad + swatch + pad, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
