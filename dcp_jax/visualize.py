"""Writing predictions for people: label PNGs, colour overlays with a legend, and per-class pixel fractions.

Label maps are int arrays of vocabulary ids with -1 = unlabelled (ignore / padding).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dcp_jax import files

MAX_8BIT_CLASSES = 255  # ids 0..254; 255 is the "unlabelled" value of 8-bit files
MAX_16BIT_CLASSES = 65535  # ids 0..65534; 65535 is the "unlabelled" value of 16-bit files


def save_label_png(labels, path: str | os.PathLike, num_classes: int) -> None:
    """Write a label map as a grayscale PNG of class ids.

    8-bit when the vocabulary has at most 255 classes, 16-bit otherwise; -1 is stored as the file's maximum
    value (255 or 65535). `load_label_png` reads back the same ids.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer map; got shape {labels.shape}, dtype {labels.dtype}")
    if not 0 < num_classes <= MAX_16BIT_CLASSES:
        raise ValueError(f"num_classes={num_classes}: a label PNG holds 1..{MAX_16BIT_CLASSES} classes")
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"label ids span [{labels.min()}, {labels.max()}]; expected -1 or [0, {num_classes})")
    dtype = np.uint8 if num_classes <= MAX_8BIT_CLASSES else np.uint16
    save_png(np.where(labels < 0, np.iinfo(dtype).max, labels).astype(dtype), path)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write an image array (uint8 RGB / grayscale, uint16 grayscale) as a PNG, atomically."""
    files.atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a `save_label_png` file: int32 class ids with the file's maximum value (255 / 65535) as -1."""
    with Image.open(path) as image:
        if image.mode not in ("L", "I;16", "I"):
            raise ValueError(f"{path}: mode {image.mode!r} is not a grayscale label PNG (8 or 16 bit)")
        ignore = 255 if image.mode == "L" else 65535
        stored = np.asarray(image).astype(np.int32)
    return np.where(stored == ignore, -1, stored)


def palette_color(class_id: int) -> tuple[int, int, int]:
    """Deterministic, well-spread colour of a class id (PASCAL VOC's bit-interleaved colormap, of id + 1)."""
    value, rgb = int(class_id) + 1, [0, 0, 0]
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[channel] |= ((value >> channel) & 1) << shift
        value >>= 3
    return tuple(rgb)


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


def overlay(image, labels, class_names: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """The image with each class painted in its palette colour, and a legend of the classes present.

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
    colors = np.zeros((len(class_names), 3), np.float32)
    for entry in summary:
        colors[entry["id"]] = palette_color(entry["id"])
    labelled = labels >= 0
    paint = colors[np.where(labelled, labels, 0)]
    blend = np.where(labelled[..., None], (1 - alpha) * image + alpha * paint, image)
    blend = np.clip(np.rint(blend), 0, 255).astype(np.uint8)

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
                           fill=palette_color(summary[i]["id"]), outline=(0, 0, 0))
        draw.text((w + pad + swatch + pad, top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
