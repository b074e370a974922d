"""Datasets of image and label files: the benchmarks in the layout CAT-Seg's scripts prepare, and folder datasets.

Two dataset kinds, plugged into `dcp_jax.data.sources.open_dataset`:

  * a benchmark name (see `BENCHMARKS`), read from a root directory: `data_root`, else
    $DETECTRON2_DATASETS, else ./datasets. A root that CAT-Seg's `datasets/prepare_*.py` wrote is
    read as it is; every vocabulary is built in (`dcp_jax.data.classnames`, CAT-Seg's lists).
  * `folder:PATH`, a folder dataset (layout in `FOLDER_HELP`).

Both read as a `SegDataset`. Images are paired with annotations by file stem and enumerated from the annotation
directory (VOC's JPEGImages holds other splits' images too).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from dcp_jax import vocabulary
from dcp_jax.data import classnames
from dcp_jax.data.sources import DatasetError, SegSource, register_kind, vocabulary_for_split

__all__ = ["BENCHMARKS", "FOLDER_HELP", "VOC20B_BACKGROUND", "SegDataset", "open_benchmark", "open_folder",
           "read_class_list", "read_meta", "resolve_root"]


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
# opening a benchmark or a folder dataset


def open_benchmark(spec: str, split: str = "val", data_root: str | None = None, *,
                   full_vocabulary: bool = False) -> SegDataset:
    """A benchmark (see `BENCHMARKS`) under `data_root` (see `resolve_root`); its vocabulary is built in."""
    del full_vocabulary  # benchmarks hold out no classes
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
    """A classes.json: a non-empty JSON list of distinct names, position = label value (dcp_jax/vocabulary.py)."""
    try:
        return vocabulary.read_label_list(path)
    except UnicodeDecodeError as e:  # a binary file
        raise DatasetError(f"cannot read class names {path}: {e}; write a JSON list of class names there") from e
    except OSError as e:
        raise DatasetError(f"cannot read class names {path}: {e}; write a JSON list of class names there") from e
    except ValueError as e:  # vocabulary's messages name the file
        raise DatasetError(str(e)) from e


def _list_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files in `directory` with one of `suffixes` (case-insensitive)."""
    found: dict[str, Path] = {}
    with os.scandir(directory) as it:
        for entry in it:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() not in suffixes or entry.name.startswith("."):
                continue
            if entry.is_dir():  # named like a file of the dataset: say so, not "label without an image"
                raise DatasetError(f"{entry.path} is a directory, not a file; move it out of {directory}")
            if entry.is_file():
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


def open_folder(path: str | os.PathLike, split: str = "val", data_root: str | None = None, *,
                full_vocabulary: bool = False) -> SegDataset:
    """A folder dataset (see FOLDER_HELP); `data_root` is not used (PATH is absolute or relative to the working
    directory)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetError(f"folder dataset not found: {path}; {_LAYOUT_HINT}")
    for required in ("images", "annotations"):
        if not (path / required).is_dir():
            raise DatasetError(f"folder dataset {path}: missing directory {path / required}; {_LAYOUT_HINT}")
    if not (path / "classes.json").is_file():
        problem = f"{path / 'classes.json'} is a directory" if (path / "classes.json").is_dir() else \
            f"missing {path / 'classes.json'}"
        raise DatasetError(f"folder dataset {path}: {problem}; it must be a file holding a JSON list of class names "
                           f"(index = label value); {_LAYOUT_HINT}")
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


register_kind("", open_benchmark)
register_kind("folder:", open_folder)
