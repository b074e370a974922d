"""Segmentation datasets: the benchmarks as CAT-Seg's scripts prepare them, folder datasets, TFDS datasets.

A dataset is named by one spec string:

  * a benchmark name (see `BENCHMARKS`), read from a root directory: `data_root`, else
    $DETECTRON2_DATASETS, else ./datasets. A root that CAT-Seg's `datasets/prepare_*.py` wrote is
    read as it is; every vocabulary is built in (`dcp_jax.data.classnames`, CAT-Seg's lists).
  * `folder:PATH`, a folder dataset (layout in `FOLDER_HELP`).
  * `tfds:NAME[:SPLIT]`, a TFDS dataset under the TFDS data_dir `data_root` (`dcp_jax.data.tfds_data`).

`open_dataset(spec, split, data_root)` returns a random-access source (grain's RandomAccessDataSource
protocol) whose items are

    {"image": uint8 [H, W, 3] RGB, "label": int32 [H, W] (ignore -> -1), "name": str}

and whose attributes are name, split, class_names, num_label_classes, pred_to_label, ignore_label,
unseen_classes and `notes()` (see `SegSource`). Images are paired with annotations by file stem and
enumerated from the annotation directory (VOC's JPEGImages holds other splits' images too).

`python -m dcp_jax.data.datasets SPEC --check` reads every sample and lists the bad ones;
`--pack DIR` writes the spec as a TFDS dataset (see --help).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dcp_jax.data import classnames

__all__ = ["BENCHMARKS", "FOLDER_HELP", "DatasetError", "SegDataset", "SegSource", "open_dataset", "read_image",
           "read_label", "resolve_root"]


class DatasetError(ValueError):
    """Bad dataset input: a missing directory or file, an unreadable image, a bad label value.

    The message is one line that names the file and the fix.
    """


@dataclasses.dataclass(frozen=True)
class _Benchmark:
    images: str  # image dir, relative to the root
    annotations: str  # annotation dir, relative to the root
    label_suffix: str
    ignore_label: int
    images_exclusive: bool  # the image dir holds exactly this split's images
    image_suffix: str = ".jpg"
    # A second value read as ignore and counted: pc459 labels written by CAT-Seg's script hold
    # 65535 where the LabelMap is 0 (uint16 `LabelMap - 1` wraps around).
    wrapped_ignore: int | None = None


def _coco(split_dir: str) -> _Benchmark:
    return _Benchmark(f"coco-stuff/images/{split_dir}", f"coco-stuff/annotations_detectron2/{split_dir}",
                      ".png", 255, True)


# name -> {split: layout}; the vocabulary is the built-in list of the same name. Benchmarks other
# than COCO have only their validation split.
BENCHMARKS: dict[str, dict[str, _Benchmark]] = {
    "coco_stuff_171": {"train": _coco("train2017"), "val": _coco("val2017")},
    "ade150": {"val": _Benchmark("ADEChallengeData2016/images/validation",
                                 "ADEChallengeData2016/annotations_detectron2/validation", ".png", 255, True)},
    "ade847": {"val": _Benchmark("ADE20K_2021_17_01/images_detectron2/validation",
                                 "ADE20K_2021_17_01/annotations_detectron2/validation", ".tif", 65535, True)},
    "pc59": {"val": _Benchmark("VOCdevkit/VOC2010/JPEGImages",
                               "VOCdevkit/VOC2010/annotations_detectron2/pc59_val", ".png", 255, False)},
    # ignore 459 never occurs in CAT-Seg's 0..458 labels, so class 430 'unknown' is scored (as in CAT-Seg).
    "pc459": {"val": _Benchmark("VOCdevkit/VOC2010/JPEGImages",
                                "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", ".tif", 459, False,
                                wrapped_ignore=65535)},
    "voc20": {"val": _Benchmark("VOCdevkit/VOC2012/JPEGImages",
                                "VOCdevkit/VOC2012/annotations_detectron2/val", ".png", 255, False)},
    # labels 0..20 with 20 = background; the vocabulary has 59 names (20 VOC + 39 background).
    "voc20b": {"val": _Benchmark("VOCdevkit/VOC2012/JPEGImages",
                                 "VOCdevkit/VOC2012/annotations_detectron2_bg/val", ".png", 255, False)},
}

VOC20B_BACKGROUND = 20  # the label of 'background' in voc20b; predictions >= 20 map to it
_FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_FOLDER_LABEL_SUFFIXES = (".png", ".tif", ".tiff")
_LAYOUT_HINT = "the layouts are in `python -m dcp_jax.data.datasets --help`"

FOLDER_HELP = """\
folder dataset layout (spec folder:PATH):
  PATH/images[/<split>]/*.jpg|*.jpeg|*.png
  PATH/annotations[/<split>]/*.png|*.tif    same file stems; pixel value = class index (8-bit or 16-bit)
  PATH/classes.json                         JSON list of class names, index = label value
  PATH/meta.json                            optional JSON object:
      "ignore_label": 255                   label value that is not scored (default 255)
      "name": "..."                         dataset name (default: the folder's name)
      "unseen_classes": ["cat", ...]        names from classes.json held out for zero-shot tests: the
                                            train split's vocabulary leaves them out (the others keep
                                            their order) and their pixels are ignored; every other
                                            split keeps the full vocabulary and lists them
  Without images/<split>/ and annotations/<split>/ subfolders the flat folders serve every split.
  `python -m dcp_jax.data.toy_world --out PATH --num-images 64 --seed 0` writes an example."""


def resolve_root(data_root: str | None) -> Path:
    """The datasets root: `data_root`, else $DETECTRON2_DATASETS, else ./datasets."""
    return Path(data_root or os.environ.get("DETECTRON2_DATASETS") or "datasets").expanduser()


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


def read_image(source, what: str | None = None) -> np.ndarray:
    """Decode an image (a path or encoded bytes) to uint8 [H, W, 3] RGB (`to_rgb8`: any bit depth).

    Corrupt or truncated data raise DatasetError naming `what` (default: the path).
    """
    try:
        with _open(source) as im:
            im = ImageOps.exif_transpose(im)  # detectron2's read_image applies EXIF orientation too
            return to_rgb8(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises OSError for unidentified or truncated files, SyntaxError/ValueError for some broken headers.
        raise DatasetError(f"cannot read image {what or source}: {e}; the file is corrupt or truncated, "
                           "copy or extract it again") from e


def _read_raw_label(source, what: str, channel: int | None = None) -> np.ndarray:
    try:
        with _open(source) as im:
            raw = np.array(im)  # 'L'/'P' -> uint8, 'I;16' -> uint16, 'I' -> int32
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


@dataclasses.dataclass(eq=False, kw_only=True)
class SegDataset(SegSource):
    """Image and label files on disk (a benchmark or a folder dataset); `ds[i]` reads one pair."""

    image_paths: list[str]
    label_paths: list[str]

    def __len__(self) -> int:
        return len(self.label_paths)

    def _raw(self, index: int):
        label_path = self.label_paths[index]
        return self.image_paths[index], label_path, Path(label_path).stem, self.image_paths[index], label_path

    def __repr__(self) -> str:
        return (f"SegDataset(name={self.name!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.class_names)}, ignore_label={self.ignore_label})")


# --------------------------------------------------------------------------------------------
# opening a spec


def open_dataset(spec: str, split: str = "val", data_root: str | None = None, *,
                 full_vocabulary: bool = False) -> SegSource:
    """Open a dataset by spec: a benchmark name (see `BENCHMARKS`), `folder:PATH` or `tfds:NAME[:SPLIT]`.

    Args:
      spec: e.g. "coco_stuff_171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b",
        "folder:/data/x", "tfds:my_data", "tfds:my_data:validation".
      split: "train" or "val" (benchmarks other than COCO have only "val"); a split in a tfds spec wins.
      data_root: the benchmarks' root ("" or None: $DETECTRON2_DATASETS, else ./datasets), or for
        tfds specs the TFDS data_dir ("" or None: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
        Not used for folder datasets (PATH is absolute or relative to the working directory).
      full_vocabulary: keep unseen classes in the train split too (for packing a dataset as it is).
    """
    if spec.startswith("folder:"):
        return _open_folder(Path(spec[len("folder:"):]).expanduser(), split, full_vocabulary)
    if spec.startswith("tfds:"):
        from dcp_jax.data import tfds_data

        return tfds_data.open_tfds(spec[len("tfds:"):], split, data_root or None, full_vocabulary=full_vocabulary)
    if spec not in BENCHMARKS:
        raise DatasetError(f"unknown dataset {spec!r}; use one of {', '.join(BENCHMARKS)}, folder:PATH or "
                           f"tfds:NAME[:SPLIT] ({_LAYOUT_HINT})")
    splits = BENCHMARKS[spec]
    if split not in splits:
        raise DatasetError(f"dataset {spec!r} has no split {split!r}; use {' or '.join(splits)}")
    layout = splits[split]
    root = resolve_root(data_root)
    for d in (layout.annotations, layout.images):
        if not (root / d).is_dir():
            raise DatasetError(f"dataset {spec!r} ({split}): directory not found: {root / d}; prepare it with "
                               f"`python -m dcp_jax.data.prepare {spec} --raw DOWNLOADS --out {root}`, or point "
                               "--data-root / $DETECTRON2_DATASETS at the root that holds it")
    class_names = classnames.load(spec)
    labels = _list_files(root / layout.annotations, (layout.label_suffix,))
    images = _list_files(root / layout.images, (layout.image_suffix,))
    image_paths, label_paths = _pair(spec, images, labels, root / layout.images, root / layout.annotations,
                                     layout.images_exclusive)
    num_label_classes = VOC20B_BACKGROUND + 1 if spec == "voc20b" else len(class_names)
    pred_to_label = np.arange(len(class_names), dtype=np.int32)
    if spec == "voc20b":
        pred_to_label = np.minimum(pred_to_label, VOC20B_BACKGROUND).astype(np.int32)
    note = ""
    if layout.wrapped_ignore is not None:
        note = (f"{spec}: {{pixels}} label pixels in {{images}} images held {layout.wrapped_ignore}, CAT-Seg's "
                "uint16 wrap of a LabelMap 0; they were read as ignore. "
                f"`python -m dcp_jax.data.prepare {spec} --raw {root} --overwrite` writes them the dcp_jax way "
                f"({layout.ignore_label}).")
    return SegDataset(name=spec, split=split, class_names=class_names, num_label_classes=num_label_classes,
                      pred_to_label=pred_to_label, ignore_label=layout.ignore_label,
                      wrapped_ignore=layout.wrapped_ignore, wrapped_note=note,
                      image_paths=image_paths, label_paths=label_paths)


def read_class_list(path: Path) -> list[str]:
    """A classes.json: a non-empty JSON list of names (index = label value)."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read class names {path}: {e}; write a JSON list of names") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: expected a non-empty JSON list of class-name strings (index = label value)")
    return names


def _list_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files in `directory` with one of `suffixes` (case-insensitive)."""
    found: dict[str, Path] = {}
    with os.scandir(directory) as it:
        for entry in it:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in suffixes and entry.is_file() and not entry.name.startswith("."):
                if stem in found:
                    raise DatasetError(f"{directory}: two files share the stem {stem!r}: "
                                       f"{found[stem].name} and {entry.name}; keep one")
                found[stem] = Path(entry.path)
    return found


def _pair(name: str, images: dict[str, Path], labels: dict[str, Path], image_dir: Path, label_dir: Path,
          images_exclusive: bool) -> tuple[list[str], list[str]]:
    if not labels:
        raise DatasetError(f"dataset {name!r}: no annotation files in {label_dir}; prepare or copy them there")
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DatasetError(f"dataset {name!r}: {len(missing)} label(s) without an image in {image_dir}, "
                           f"e.g. {labels[missing[0]]} (no image {missing[0]}.*); copy or extract the images again")
    if images_exclusive:
        extra = sorted(set(images) - set(labels))
        if extra:
            raise DatasetError(f"dataset {name!r}: {len(extra)} image(s) without a label in {label_dir}, "
                               f"e.g. {images[extra[0]]}; add their labels or move the images away")
    stems = sorted(labels)
    return [str(images[s]) for s in stems], [str(labels[s]) for s in stems]


def read_meta(path: Path) -> dict:
    """A folder dataset's optional meta.json, validated ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}; fix the JSON or remove the file") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object such as {{\"ignore_label\": 255}}")
    if not isinstance(meta.get("ignore_label", 255), int):
        raise DatasetError(f"{path}: ignore_label must be an integer, got {meta['ignore_label']!r}")
    unseen = meta.get("unseen_classes", [])
    if not isinstance(unseen, list) or not all(isinstance(n, str) for n in unseen):
        raise DatasetError(f"{path}: unseen_classes must be a JSON list of class names from classes.json")
    return meta


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


def _open_folder(path: Path, split: str, full_vocabulary: bool = False) -> SegDataset:
    """A folder dataset (see FOLDER_HELP)."""
    if not path.is_dir():
        raise DatasetError(f"folder dataset not found: {path}; {_LAYOUT_HINT}")
    for required in ("images", "annotations"):
        if not (path / required).is_dir():
            raise DatasetError(f"folder dataset {path}: missing directory {path / required}; {_LAYOUT_HINT}")
    if not (path / "classes.json").is_file():
        raise DatasetError(f"folder dataset {path}: missing {path / 'classes.json'} (a JSON list of class names, "
                           f"index = label value); {_LAYOUT_HINT}")
    meta = read_meta(path / "meta.json")
    name = str(meta.get("name") or path.resolve().name)
    class_names = read_class_list(path / "classes.json")
    vocab = vocabulary_for_split(class_names, meta.get("unseen_classes", []), split, str(path / "meta.json"),
                                 full_vocabulary)

    image_dir, label_dir = path / "images", path / "annotations"
    split_dirs = sorted(p.name for p in label_dir.iterdir() if p.is_dir())
    if (image_dir / split).is_dir() and (label_dir / split).is_dir():
        image_dir, label_dir = image_dir / split, label_dir / split
    elif split_dirs:
        raise DatasetError(f"folder dataset {path}: no split {split!r} (found annotations/ subdirs: "
                           f"{', '.join(split_dirs)}; each needs a matching images/<split>/)")
    images = _list_files(image_dir, _FOLDER_IMAGE_SUFFIXES)
    labels = _list_files(label_dir, _FOLDER_LABEL_SUFFIXES)
    image_paths, label_paths = _pair(name, images, labels, image_dir, label_dir, images_exclusive=True)
    return SegDataset(name=name, split=split, ignore_label=meta.get("ignore_label", 255), **vocab,
                      image_paths=image_paths, label_paths=label_paths)


# --------------------------------------------------------------------------------------------
# command line: summarise, check every sample, or pack as a TFDS dataset

_EPILOG = f"""\
specs:
  {', '.join(BENCHMARKS)}
      benchmarks in the layout CAT-Seg's datasets/prepare_*.py write (python -m dcp_jax.data.prepare
      --help shows it), under --data-root, else $DETECTRON2_DATASETS, else ./datasets
  folder:PATH  a folder dataset (below)
  tfds:NAME[:SPLIT]  a TFDS dataset (NAME may be name[/config][:version]) under the TFDS data_dir
      --data-root, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; --pack writes one

{FOLDER_HELP}

--pack DIR writes DIR/NAME/VERSION/ with TFDS's array_record files (tfds.data_source(NAME,
data_dir=DIR) reads it, without TensorFlow): images as their encoded file bytes, labels as PNG
segmentation masks (ignore 255, or 65535 above 255 classes), the vocabulary in metadata.json.
Another TFDS dataset with an image and a segmentation-mask feature needs its class list: put a
dcp_jax.json into DATA_DIR/NAME/, e.g. {{"class_names": ["wall", ...] or a built-in list name,
"ignore_label": 0, "label_offset": -1, "label_key": "annotation", "label_channel": 0}}.
"""


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dcp_jax.data.datasets", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Open a dataset spec and print a summary; optionally read every sample (--check) "
                    "or write it as a TFDS dataset (--pack DIR, read back as tfds:NAME --data-root DIR).")
    parser.add_argument("spec", help="a benchmark name, folder:PATH or tfds:NAME[:SPLIT]")
    parser.add_argument("--split", default="val", help="split(s), comma-separated (default val)")
    parser.add_argument("--data-root", default="", help="benchmark root, or the TFDS data_dir for tfds: specs")
    parser.add_argument("--check", action="store_true", help="decode every sample and list every bad one "
                                                             "(exit status 1 when there is one)")
    parser.add_argument("--pack", default="", metavar="DIR", help="write the split(s) as a TFDS dataset under DIR")
    parser.add_argument("--name", default="", help="--pack: TFDS dataset name (default: from the dataset's name)")
    parser.add_argument("--version", default="1.0.0", help="--pack: TFDS dataset version (default 1.0.0)")
    parser.add_argument("--skip-bad", action="store_true", help="--pack: leave unreadable samples out (listed) "
                                                                "instead of stopping at the first")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    try:
        status = 0
        for split in splits:
            status |= _summarise(args.spec, split, args.data_root or None, args.check)
        if args.pack:
            from dcp_jax.data import tfds_data

            report = tfds_data.pack(args.spec, splits, args.pack, data_root=args.data_root or None,
                                    name=args.name or None, version=args.version, skip_bad=args.skip_bad)
            for line in report.lines():
                print(line)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return status


def _summarise(spec: str, split: str, data_root: str | None, check: bool) -> int:
    from tqdm import tqdm

    ds = open_dataset(spec, split, data_root)
    unseen = f", {len(ds.unseen_classes)} unseen" if ds.unseen_classes else ""
    print(f"{ds.name} [{ds.split}]: {len(ds)} samples, {len(ds.class_names)} class names{unseen}, "
          f"{ds.num_label_classes} scored classes, ignore {ds.ignore_label}")
    if not check:
        return 0
    bad = []
    for i in tqdm(range(len(ds)), desc=f"checking {split}"):
        try:
            ds[i]
        except DatasetError as e:
            bad.append(str(e))
    print("\n".join(bad) if bad else "every sample reads cleanly")
    print(f"{len(bad)} bad of {len(ds)}")
    for note in ds.notes():
        print(f"note: {note}")
    return int(bool(bad))


if __name__ == "__main__":
    sys.exit(main())
