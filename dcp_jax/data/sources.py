"""What every dataset kind shares, and the spec registry that `open_dataset` dispatches through.

A dataset kind (the image and label files of `dcp_jax.data.file_datasets`: benchmarks and folder datasets; the TFDS
datasets of `dcp_jax.data.tfds_data`) plugs in with `register_kind(prefix, opener)`; importing `dcp_jax.data` plugs
in both. A kind's source is a `SegSource`, a random-access source (grain's RandomAccessDataSource protocol) whose
items are

    {"image": uint8 [H, W, 3] RGB, "label": int32 [H, W] (ignore -> -1), "name": str}

This module also owns what the kinds share to make those items: `DatasetError` (bad input, one line naming the
file and the fix), decoding images and labels (PIL, EXIF orientation, any bit depth), and the vocabulary a split
sees (the train split leaves unseen classes out).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DatasetError", "SegSource", "open_dataset", "read_image", "read_label", "register_kind", "split_vocabulary",
           "to_rgb8", "vocabulary_for_split"]


class DatasetError(ValueError):
    """Bad dataset input: a missing directory or file, an unreadable image, a bad label value.

    The message is one line that names the file and the fix.
    """


# --------------------------------------------------------------------------------------------
# decoding


def _open(source):
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else source)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3] RGB, scaled by its real range as viewers display it.

    PIL's convert("RGB") clips 16-bit and 32-bit integer images at 255 and float images at 0..255 (a 16-bit
    photo turns white). Here integer images are scaled by their type's range (16-bit: v / 257; 32-bit
    integers holding 16-bit data likewise, otherwise by their maximum), float images from 0..1 when their
    values lie there, else from their min..max. 1-bit, palette, grey, RGBA, CMYK and 16-bit-per-channel
    PNGs (which PIL reads as 8-bit RGB) go through convert("RGB").
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            low, high = (0.0, 1.0) if values.size and values.min() >= 0 and values.max() <= 1 else \
                (float(values.min(initial=0.0)), float(values.max(initial=1.0)))
        else:
            low, high = 0.0, 65535.0 if im.mode != "I" or values.max(initial=0) <= 65535 else float(values.max())
        scaled = np.clip((values - low) / max(high - low, 1e-12) * 255.0, 0, 255)
        grey = np.rint(scaled).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


# The most pixels an image may have (predict, evaluate, training data), checked from its header before it is
# decoded: predict peaked at 13.4 GB on a 12000 x 12000 PNG (about 93 bytes per pixel through decoding, the
# test-time resize and the label maps at full size), so 50 MP stays under about 5 GB.
MAX_IMAGE_PIXELS = 50_000_000


def read_image(source, what: str | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image (a path or encoded bytes) to uint8 [H, W, 3] RGB (`to_rgb8`: any bit depth).

    Corrupt or truncated data, and an image of more than `max_pixels` pixels (refused from its header, before
    decoding), raise DatasetError naming `what` (default: the path).
    """
    try:
        with _open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DatasetError(f"image {what or source} is {w} x {h} = {w * h / 1e6:.0f} megapixels, more than "
                                   f"the {max_pixels / 1e6:.0f} this reads (memory grows with the pixels); "
                                   "downscale it first")
            im = ImageOps.exif_transpose(im)  # detectron2's read_image applies EXIF orientation too
            return to_rgb8(im)
    except DatasetError:
        raise
    except IsADirectoryError as e:
        raise DatasetError(f"cannot read image {what or source}: it is a directory, not an image file; move it out "
                           f"of {Path(source).parent}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises OSError for unidentified or truncated files, SyntaxError/ValueError for some broken headers.
        raise DatasetError(f"cannot read image {what or source}: {e}; the file is corrupt or truncated, "
                           "copy or extract it again") from e


def _read_raw_label(source, what: str, channel: int | None = None) -> np.ndarray:
    try:
        with _open(source) as im:
            raw = np.array(im)  # 'L'/'P' -> uint8, 'I;16' -> uint16, 'I' -> int32
    except IsADirectoryError as e:
        raise DatasetError(f"cannot read label {what}: it is a directory, not a label file; move it out of "
                           f"{Path(source).parent}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read label {what}: {e}; the file is corrupt or truncated, "
                           "copy or extract it again") from e
    if raw.ndim == 3 and channel is not None:
        raw = raw[..., channel]
    if raw.ndim != 2:
        raise DatasetError(f"{what}: a label map must have one channel, got shape {raw.shape}; "
                           "convert colour-palette labels to class ids")
    return raw


def _map_label(raw: np.ndarray, ignore_label: int, num_label_classes: int, what: str,
               wrapped_ignore: int | None = None, offset: int = 0) -> tuple[np.ndarray, int]:
    """Raw label values (+ offset) -> int32 with ignore -1; returns (label, pixels that held wrapped_ignore)."""
    label = raw.astype(np.int32) + offset
    ignored = raw == ignore_label
    wrapped = 0
    if wrapped_ignore is not None:
        is_wrapped = raw == wrapped_ignore
        wrapped = int(np.count_nonzero(is_wrapped))
        ignored |= is_wrapped
    bad = ~ignored & ((label < 0) | (label >= num_label_classes))
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raw_values = f" (raw {', '.join(str(v - offset) for v in values[:10])})" if offset else ""
        raise DatasetError(f"{what}: label value(s) {shown}{raw_values} outside the vocabulary "
                           f"0..{num_label_classes - 1} and not the ignore value {ignore_label}; fix the label or "
                           "the class list")
    label[ignored] = -1
    return label, wrapped


def read_label(source, ignore_label: int, num_label_classes: int, what: str | None = None) -> np.ndarray:
    """Decode a label map (8-bit PNG or 16-bit TIFF; a path or bytes) to int32 [H, W], ignore -> -1.

    A value outside [0, num_label_classes) that is not the ignore value raises DatasetError.
    """
    what = what or str(source)
    return _map_label(_read_raw_label(source, what), ignore_label, num_label_classes, what)[0]


# --------------------------------------------------------------------------------------------
# sources


@dataclasses.dataclass(eq=False, kw_only=True)
class SegSource:
    """What every dataset type shares: the vocabulary, the label mapping and read-time notes.

    Attributes:
      name: short name (benchmark name, the folder's name or meta.json "name", the TFDS name).
      split: the split this source reads.
      class_names: the vocabulary given to the model (index = predicted class).
      num_label_classes: classes scored in mIoU (21 for voc20b, else len(class_names)).
      pred_to_label: int32 [len(class_names)], predicted vocabulary index -> scored label id.
      ignore_label: the raw ignore value on disk (mapped to -1 when loading).
      unseen_classes: names held out of training for zero-shot evaluation (empty for benchmarks).
        The train split's vocabulary leaves them out; other splits keep and list them.
    Subclasses implement `__len__` and `_raw(index) -> (image, label, name, image_what, label_what)`
    with image/label as a path or encoded bytes.
    """

    name: str
    split: str
    class_names: list[str]
    num_label_classes: int
    pred_to_label: np.ndarray
    ignore_label: int
    unseen_classes: list[str] = dataclasses.field(default_factory=list)
    raw_num_classes: int = 0  # label values on disk lie in 0..raw_num_classes-1 (0: num_label_classes)
    label_lut: np.ndarray | None = None  # raw label -> this split's label, -1 = ignore (unseen classes)
    label_channel: int | None = None  # take this channel of a multi-channel label image
    label_offset: int = 0  # added to raw values that are not ignored (ADE-style 1..N with 0 = unlabeled: -1)
    wrapped_ignore: int | None = None
    wrapped_note: str = ""  # notes() line when wrapped_ignore was read; {pixels} {images} filled in

    def __post_init__(self):
        self.raw_num_classes = self.raw_num_classes or self.num_label_classes
        self._init_counters()

    def _init_counters(self):
        self._lock = threading.Lock()  # grain may read from several threads
        self._wrapped_pixels = self._wrapped_images = 0

    def __getstate__(self):  # what grain worker processes receive: no lock, and counts start at 0 there
        state = dict(self.__dict__)
        del state["_lock"]
        state["_wrapped_pixels"] = state["_wrapped_images"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range 0..{len(self) - 1}")
        image_src, label_src, name, image_what, label_what = self._raw(index)
        image = read_image(image_src, image_what)
        raw = _read_raw_label(label_src, label_what, self.label_channel)
        label, wrapped = _map_label(raw, self.ignore_label, self.raw_num_classes, label_what, self.wrapped_ignore,
                                    self.label_offset)
        if wrapped:
            with self._lock:
                self._wrapped_pixels += wrapped
                self._wrapped_images += 1
        if self.label_lut is not None:
            label = np.where(label >= 0, self.label_lut[np.maximum(label, 0)], -1).astype(np.int32)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{label_what}: label size {label.shape[1]}x{label.shape[0]} differs from image "
                               f"{image_what} size {image.shape[1]}x{image.shape[0]} (width x height); "
                               "pair each image with its own label")
        return {"image": image, "label": label, "name": name}

    def notes(self) -> list[str]:
        """One-line messages a run prints after reading: what this process read that needs a word."""
        with self._lock:
            pixels, images = self._wrapped_pixels, self._wrapped_images
        if not pixels:
            return []
        return [self.wrapped_note.format(pixels=f"{pixels:,}", images=f"{images:,}")]


def split_vocabulary(class_names: list[str], unseen: list[str], where: str) -> tuple[list[str], np.ndarray]:
    """(seen names in their order, LUT full index -> seen index or -1) for a train split."""
    unknown = [n for n in unseen if n not in class_names]
    if unknown:
        raise DatasetError(f"{where}: unseen class {unknown[0]!r} is not in the class list; "
                           "use names exactly as classes.json spells them")
    held_out = set(unseen)
    seen = [n for n in class_names if n not in held_out]
    if not seen:
        raise DatasetError(f"{where}: unseen_classes holds every class; the train split would have none")
    lut = np.full(len(class_names), -1, np.int32)
    lut[[i for i, n in enumerate(class_names) if n not in held_out]] = np.arange(len(seen), dtype=np.int32)
    return seen, lut


def vocabulary_for_split(class_names: list[str], unseen: list[str], split: str, where: str,
                         full_vocabulary: bool) -> dict:
    """SegSource keyword arguments of the vocabulary a split sees (train drops unseen classes)."""
    if unseen and split.split("[")[0] == "train" and not full_vocabulary:
        seen, lut = split_vocabulary(class_names, unseen, where)
        return dict(class_names=seen, num_label_classes=len(seen), pred_to_label=np.arange(len(seen), dtype=np.int32),
                    raw_num_classes=len(class_names), label_lut=lut, unseen_classes=list(unseen))
    if unseen:
        split_vocabulary(class_names, unseen, where)  # validates the names
    return dict(class_names=class_names, num_label_classes=len(class_names),
                pred_to_label=np.arange(len(class_names), dtype=np.int32), unseen_classes=list(unseen))


# --------------------------------------------------------------------------------------------
# the spec registry

# spec prefix ("folder:", "tfds:"; "" for bare names: the benchmarks) -> opener
_KINDS: dict[str, Callable[..., SegSource]] = {}


def register_kind(prefix: str, opener: Callable[..., SegSource]) -> None:
    """Plug a dataset kind in: `open_dataset` opens specs that start with `prefix` ("" for bare names) as
    `opener(spec without the prefix, split, data_root or None, full_vocabulary=...)`."""
    _KINDS[prefix] = opener


def open_dataset(spec: str, split: str = "val", data_root: str | None = None, *,
                 full_vocabulary: bool = False) -> SegSource:
    """Open a dataset by spec: a benchmark name, `folder:PATH` or `tfds:NAME[:SPLIT]`.

    Args:
      spec: e.g. "coco_stuff_171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b",
        "folder:/data/x", "tfds:my_data", "tfds:my_data:validation".
      split: "train" or "val" (benchmarks other than COCO have only "val"); a split in a tfds spec wins.
      data_root: the benchmarks' root ("" or None: $DETECTRON2_DATASETS, else ./datasets), or for
        tfds specs the TFDS data_dir ("" or None: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
        Not used for folder datasets (PATH is absolute or relative to the working directory).
      full_vocabulary: keep unseen classes in the train split too (for packing a dataset as it is).
    """
    prefix = next((p for p in _KINDS if p and spec.startswith(p)), "")  # the package's import registered them all
    return _KINDS[prefix](spec[len(prefix):], split, data_root or None, full_vocabulary=full_vocabulary)
