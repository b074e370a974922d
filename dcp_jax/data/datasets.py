"""Segmentation datasets on disk, in the layout CAT-Seg's preparation scripts produce.

A dataset is named by one spec string: a benchmark name (see `BENCHMARKS`) or `folder:PATH`.
`open_dataset(spec, split, data_root)` returns a `SegDataset`, a random-access source (grain's
RandomAccessDataSource protocol) whose items are

    {"image": uint8 [H, W, 3] RGB, "label": int32 [H, W] (ignore -> -1), "name": file stem}

Benchmarks live under a root directory: `data_root`, else $DETECTRON2_DATASETS, else ./datasets,
so a root prepared for CAT-Seg or SED works unchanged. Images are paired with annotations by
file stem and enumerated from the annotation directory (VOC's JPEGImages holds more images).

A folder dataset PATH holds images/, annotations/ (.png or 16-bit .tif, same stems), classes.json
(a JSON list, index = label value) and optionally meta.json ({"ignore_label": 255, "name": ...}).
It may split into images/<split>/ and annotations/<split>/; without such subdirs the flat dirs
serve every split.

`arrayrecord:PATH` opens a split packed by `pack_array_record` (original file bytes in a few
ArrayRecord shards, for multi-host training). `python -m dcp_jax.data.datasets SPEC --check`
reads every sample and lists the bad ones; `--pack OUT` packs a split.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BENCHMARKS", "ArrayRecordSegDataset", "DatasetError", "SegDataset", "open_dataset", "pack_array_record",
           "resolve_root"]


class DatasetError(ValueError):
    """Bad dataset input: a missing directory or file, an unreadable image, a bad label value."""


@dataclasses.dataclass(frozen=True)
class _Benchmark:
    images: str  # image dir, relative to the root
    annotations: str  # annotation dir, relative to the root
    label_suffix: str
    ignore_label: int
    classes: str  # a built-in list name, or a classes.json path relative to the root
    images_exclusive: bool  # the image dir holds exactly this split's images
    num_classes: int
    image_suffix: str = ".jpg"


def _coco(split_dir: str) -> _Benchmark:
    return _Benchmark(f"coco-stuff/images/{split_dir}", f"coco-stuff/annotations_detectron2/{split_dir}",
                      ".png", 255, "coco_stuff_171", True, 171)


# name -> {split: layout}. Benchmarks other than COCO have only their validation split.
BENCHMARKS: dict[str, dict[str, _Benchmark]] = {
    "coco_stuff_171": {"train": _coco("train2017"), "val": _coco("val2017")},
    "ade150": {"val": _Benchmark("ADEChallengeData2016/images/validation",
                                 "ADEChallengeData2016/annotations_detectron2/validation",
                                 ".png", 255, "ade150", True, 150)},
    "ade847": {"val": _Benchmark("ADE20K_2021_17_01/images_detectron2/validation",
                                 "ADE20K_2021_17_01/annotations_detectron2/validation",
                                 ".tif", 65535, "ADE20K_2021_17_01/classes.json", True, 847)},
    "pc59": {"val": _Benchmark("VOCdevkit/VOC2010/JPEGImages",
                               "VOCdevkit/VOC2010/annotations_detectron2/pc59_val",
                               ".png", 255, "pc59", False, 59)},
    # ignore 459 never occurs in the 0..458 labels, so class 430 'unknown' is scored (CAT-Seg).
    "pc459": {"val": _Benchmark("VOCdevkit/VOC2010/JPEGImages",
                                "VOCdevkit/VOC2010/annotations_detectron2/pc459_val",
                                ".tif", 459, "VOCdevkit/VOC2010/classes_pc459.json", False, 459)},
    "voc20": {"val": _Benchmark("VOCdevkit/VOC2012/JPEGImages",
                                "VOCdevkit/VOC2012/annotations_detectron2/val",
                                ".png", 255, "voc20", False, 20)},
    # labels 0..20 with 20 = background; the vocabulary has 59 names (20 VOC + 39 background).
    "voc20b": {"val": _Benchmark("VOCdevkit/VOC2012/JPEGImages",
                                 "VOCdevkit/VOC2012/annotations_detectron2_bg/val",
                                 ".png", 255, "voc20b", False, 59)},
}

VOC20B_BACKGROUND = 20  # the label of 'background' in voc20b; predictions >= 20 map to it
_FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_FOLDER_LABEL_SUFFIXES = (".png", ".tif", ".tiff")


def resolve_root(data_root: str | None) -> Path:
    """The datasets root: `data_root`, else $DETECTRON2_DATASETS, else ./datasets."""
    return Path(data_root or os.environ.get("DETECTRON2_DATASETS") or "datasets").expanduser()


@dataclasses.dataclass(eq=False)
class SegDataset:
    """A random-access segmentation source; `ds[i]` reads and decodes one image and its label.

    Attributes:
      name: short name (benchmark name, or the folder's last path component / meta.json "name").
      class_names: the vocabulary given to the model (index = predicted class).
      num_label_classes: classes scored in mIoU (21 for voc20b, else len(class_names)).
      pred_to_label: int32 [len(class_names)], predicted vocabulary index -> scored label id.
      ignore_label: the raw ignore value on disk (mapped to -1 when loading).
    """

    name: str
    split: str
    class_names: list[str]
    num_label_classes: int
    pred_to_label: np.ndarray
    ignore_label: int
    image_paths: list[str]
    label_paths: list[str]

    def __len__(self) -> int:
        return len(self.label_paths)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range 0..{len(self) - 1}")
        return decode_sample(self.image_paths[index], self.label_paths[index], Path(self.label_paths[index]).stem,
                             self.ignore_label, self.num_label_classes)

    def __repr__(self) -> str:
        return (f"SegDataset(name={self.name!r}, split={self.split!r}, images={len(self)}, "
                f"classes={len(self.class_names)}, ignore_label={self.ignore_label})")


def decode_sample(image, label, name: str, ignore_label: int, num_label_classes: int,
                  image_what: str | None = None, label_what: str | None = None) -> dict:
    """Decode one (image, label) pair, each a path or the encoded file's bytes, into a dataset item."""
    image_what, label_what = image_what or str(image), label_what or str(label)
    image = read_image(image, image_what)
    label = read_label(label, ignore_label, num_label_classes, label_what)
    if image.shape[:2] != label.shape:
        raise DatasetError(f"{label_what}: label size {label.shape[1]}x{label.shape[0]} differs from image "
                           f"{image_what} size {image.shape[1]}x{image.shape[0]} (width x height)")
    return {"image": image, "label": label, "name": name}


def _open(source):
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else source)


def read_image(source, what: str | None = None) -> np.ndarray:
    """Decode an image (a path or encoded bytes) to uint8 [H, W, 3] RGB.

    Corrupt or truncated data raise DatasetError naming `what` (default: the path).
    """
    try:
        with _open(source) as im:
            im = ImageOps.exif_transpose(im)  # detectron2's read_image applies EXIF orientation too
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises OSError for unidentified or truncated files, SyntaxError/ValueError for some broken headers.
        raise DatasetError(f"cannot read image {what or source}: {e} (corrupt or truncated file?)") from e


def read_label(source, ignore_label: int, num_label_classes: int, what: str | None = None) -> np.ndarray:
    """Decode a label map (8-bit PNG or 16-bit TIFF; a path or bytes) to int32 [H, W], ignore -> -1.

    A value outside [0, num_label_classes) that is not the ignore value raises DatasetError.
    """
    what = what or str(source)
    try:
        with _open(source) as im:
            raw = np.array(im)  # 'L'/'P' -> uint8, 'I;16' -> uint16, 'I' -> int32
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read label {what}: {e} (corrupt or truncated file?)") from e
    if raw.ndim != 2:
        raise DatasetError(f"{what}: a label map must have one channel, got shape {raw.shape} "
                           "(colour-palette labels must be converted to class ids)")
    label = raw.astype(np.int32)
    ignored = raw == ignore_label
    bad = ~ignored & ((label < 0) | (label >= num_label_classes))
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise DatasetError(f"{what}: label value(s) {shown} outside the vocabulary 0..{num_label_classes - 1} "
                           f"and not the ignore value {ignore_label}")
    label[ignored] = -1
    return label


def open_dataset(spec: str, split: str = "val", data_root: str | None = None) -> SegDataset:
    """Open a dataset by spec: a benchmark name (see `BENCHMARKS`), `folder:PATH` or `arrayrecord:PATH`.

    `arrayrecord:PATH` opens a split packed by `pack_array_record` (an ArrayRecordSegDataset with
    the same items and attributes).

    Args:
      spec: e.g. "coco_stuff_171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b", "folder:/data/x".
      split: "train" or "val" (benchmarks other than COCO have only "val").
      data_root: root of the benchmarks; "" or None means $DETECTRON2_DATASETS, else ./datasets.
        Not used for folder datasets (PATH is absolute or relative to the working directory).
    """
    if spec.startswith("folder:"):
        return _open_folder(Path(spec[len("folder:"):]).expanduser(), split)
    if spec.startswith("arrayrecord:"):
        return _open_array_record(Path(spec[len("arrayrecord:"):]).expanduser(), split)
    if spec not in BENCHMARKS:
        raise DatasetError(f"unknown dataset {spec!r}; known: {', '.join(BENCHMARKS)}, "
                           "or folder:PATH for a folder dataset (images/, annotations/, classes.json), "
                           "or arrayrecord:PATH for a packed one")
    splits = BENCHMARKS[spec]
    if split not in splits:
        raise DatasetError(f"dataset {spec!r} has no split {split!r}; available: {', '.join(splits)}")
    layout = splits[split]
    root = resolve_root(data_root)
    for d in (layout.annotations, layout.images):
        if not (root / d).is_dir():
            raise DatasetError(f"dataset {spec!r} ({split}): directory not found: {root / d}\n"
                               + _layout_help(spec, root))
    class_names = _benchmark_classes(spec, layout, root)
    labels = _list_files(root / layout.annotations, (layout.label_suffix,))
    images = _list_files(root / layout.images, (layout.image_suffix,))
    image_paths, label_paths = _pair(spec, images, labels, root / layout.images, root / layout.annotations,
                                     layout.images_exclusive)
    num_label_classes = 21 if spec == "voc20b" else len(class_names)
    pred_to_label = np.arange(len(class_names), dtype=np.int32)
    if spec == "voc20b":
        pred_to_label = np.minimum(pred_to_label, VOC20B_BACKGROUND).astype(np.int32)
    return SegDataset(spec, split, class_names, num_label_classes, pred_to_label, layout.ignore_label,
                      image_paths, label_paths)


def _layout_help(spec: str, root: Path) -> str:
    lines = [f"expected layout under the root {root} (set data_root or $DETECTRON2_DATASETS to change it):"]
    for split, b in BENCHMARKS[spec].items():
        lines.append(f"  [{split}] {b.images}/*{b.image_suffix}")
        lines.append(f"  [{split}] {b.annotations}/*{b.label_suffix}")
        if b.classes.endswith(".json"):
            lines.append(f"  {b.classes}")
    lines.append(f"prepare it with: python -m dcp_jax.data.prepare {spec} --raw DOWNLOAD_DIR --out {root}")
    return "\n".join(lines)


def _benchmark_classes(spec: str, layout: _Benchmark, root: Path) -> list[str]:
    if not layout.classes.endswith(".json"):
        from dcp_jax.data import classnames
        return classnames.load(layout.classes)
    path = root / layout.classes
    if not path.is_file():
        raise DatasetError(f"dataset {spec!r}: class names file not found: {path}\n"
                           f"run `python -m dcp_jax.data.prepare {spec} --raw DOWNLOAD_DIR --out {root}` "
                           f"(it writes this file), or supply it: a JSON list of {layout.num_classes} names, "
                           "index = label value")
    names = _read_class_list(path)
    if len(names) != layout.num_classes:
        raise DatasetError(f"{path}: expected {layout.num_classes} class names for {spec}, found {len(names)}")
    return names


def _read_class_list(path: Path) -> list[str]:
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read class names {path}: {e}") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: expected a non-empty JSON list of class-name strings (index = label value)")
    return names


def _list_files(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files in `directory` with one of `suffixes` (case-insensitive)."""
    found: dict[str, Path] = {}
    with os.scandir(directory) as it:
        for entry in it:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in suffixes and entry.is_file():
                if stem in found:
                    raise DatasetError(f"{directory}: two files share the stem {stem!r}: "
                                       f"{found[stem].name} and {entry.name}")
                found[stem] = Path(entry.path)
    return found


def _pair(name: str, images: dict[str, Path], labels: dict[str, Path], image_dir: Path, label_dir: Path,
          images_exclusive: bool) -> tuple[list[str], list[str]]:
    if not labels:
        raise DatasetError(f"dataset {name!r}: no annotation files in {label_dir}")
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DatasetError(f"dataset {name!r}: {len(missing)} label(s) without an image in {image_dir}, "
                           f"e.g. {labels[missing[0]]} (no image {missing[0]}.*)")
    if images_exclusive:
        extra = sorted(set(images) - set(labels))
        if extra:
            raise DatasetError(f"dataset {name!r}: {len(extra)} image(s) without a label in {label_dir}, "
                               f"e.g. {images[extra[0]]}")
    stems = sorted(labels)
    return [str(images[s]) for s in stems], [str(labels[s]) for s in stems]


def _open_folder(path: Path, split: str) -> SegDataset:
    """A folder dataset: images/, annotations/, classes.json, optional meta.json (see module doc)."""
    if not path.is_dir():
        raise DatasetError(f"folder dataset not found: {path}\n{_FOLDER_HELP}")
    for required in ("images", "annotations"):
        if not (path / required).is_dir():
            raise DatasetError(f"folder dataset {path}: missing directory {path / required}\n{_FOLDER_HELP}")
    if not (path / "classes.json").is_file():
        raise DatasetError(f"folder dataset {path}: missing {path / 'classes.json'}\n{_FOLDER_HELP}")
    meta = {}
    if (path / "meta.json").is_file():
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {path / 'meta.json'}: {e}") from e
        if not isinstance(meta, dict):
            raise DatasetError(f"{path / 'meta.json'}: expected a JSON object such as {{\"ignore_label\": 255}}")
    ignore_label = meta.get("ignore_label", 255)
    if not isinstance(ignore_label, int):
        raise DatasetError(f"{path / 'meta.json'}: ignore_label must be an integer, got {ignore_label!r}")
    name = str(meta.get("name") or path.resolve().name)
    class_names = _read_class_list(path / "classes.json")

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
    return SegDataset(name, split, class_names, len(class_names),
                      np.arange(len(class_names), dtype=np.int32), ignore_label, image_paths, label_paths)


_FOLDER_HELP = """\
expected folder dataset layout:
  PATH/images[/<split>]/*.jpg|*.png
  PATH/annotations[/<split>]/*.png|*.tif   (same file stems; pixel value = class index)
  PATH/classes.json                        (JSON list of names, index = label value)
  PATH/meta.json                           (optional: {"ignore_label": 255, "name": "..."})
`python -m dcp_jax.data.synthetic --out PATH --num-images 64 --seed 0` writes an example."""


# --------------------------------------------------------------------------------------------
# ArrayRecord packing (optional): a few large files instead of many small ones, for multi-host
# training from network storage. Records hold the ORIGINAL encoded file bytes (no re-encoding).

_PACK_FORMAT = "dcp_jax.segmentation.array_record.v1"


def _encode_record(name: str, image_bytes: bytes, label_bytes: bytes) -> bytes:
    header = json.dumps({"name": name, "image": len(image_bytes), "label": len(label_bytes)}).encode()
    return len(header).to_bytes(4, "little") + header + image_bytes + label_bytes


def _decode_record(record: bytes) -> tuple[str, bytes, bytes]:
    size = int.from_bytes(record[:4], "little")
    header = json.loads(record[4:4 + size])
    start = 4 + size
    image = record[start:start + header["image"]]
    label = record[start + header["image"]:start + header["image"] + header["label"]]
    return header["name"], image, label


def pack_array_record(source: SegDataset, out_dir, *, num_shards: int = 0, progress: bool = True) -> Path:
    """Pack a dataset split into ArrayRecord shards under out_dir/<split>/; returns that directory.

    Reads it back with `open_dataset("arrayrecord:OUT_DIR", split)`. num_shards 0 = one per 5000 images.
    Files are copied byte for byte, so corrupt files stay detectable (and skippable) at read time.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    if not isinstance(source, SegDataset):
        raise TypeError(f"pack_array_record needs a SegDataset from open_dataset, got {type(source).__name__}")
    out = Path(out_dir) / source.split
    if (out / "meta.json").exists():
        raise FileExistsError(f"{out} already holds a packed dataset; remove it first")
    out.mkdir(parents=True, exist_ok=True)
    num_shards = num_shards or max(1, -(-len(source) // 5000))
    files = [f"{source.split}-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
    bounds = np.linspace(0, len(source), num_shards + 1).astype(int)
    bar = tqdm(total=len(source), desc=f"packing {source.name}/{source.split}", disable=not progress)
    for k, file in enumerate(files):
        writer = ArrayRecordWriter(str(out / file), "group_size:1")  # group_size 1: fast random access
        for i in range(bounds[k], bounds[k + 1]):
            image, label = Path(source.image_paths[i]).read_bytes(), Path(source.label_paths[i]).read_bytes()
            writer.write(_encode_record(Path(source.label_paths[i]).stem, image, label))
            bar.update()
        writer.close()
    bar.close()
    meta = {"format": _PACK_FORMAT, "name": source.name, "split": source.split, "class_names": source.class_names,
            "num_label_classes": source.num_label_classes, "pred_to_label": source.pred_to_label.tolist(),
            "ignore_label": source.ignore_label, "num_records": len(source), "files": files}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


@dataclasses.dataclass(eq=False)
class ArrayRecordSegDataset:
    """A packed split (see `pack_array_record`); same items and attributes as SegDataset."""

    name: str
    split: str
    class_names: list[str]
    num_label_classes: int
    pred_to_label: np.ndarray
    ignore_label: int
    directory: str
    files: list[str]
    num_records: int

    def __post_init__(self):
        self._reader = None

    def _records(self):
        if self._reader is None:  # opened lazily, so the object pickles cheaply into grain workers
            import grain

            self._reader = grain.sources.ArrayRecordDataSource([str(Path(self.directory) / f) for f in self.files])
            if len(self._reader) != self.num_records:
                raise DatasetError(f"{self.directory}: {len(self._reader)} records, meta.json says {self.num_records}")
        return self._reader

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range 0..{len(self) - 1}")
        name, image, label = _decode_record(self._records()[index])
        where = f"{self.directory} record {index} ({name})"
        return decode_sample(image, label, name, self.ignore_label, self.num_label_classes,
                             f"{where} image", f"{where} label")


def _open_array_record(path: Path, split: str) -> ArrayRecordSegDataset:
    meta_path = path / split / "meta.json"
    if not meta_path.is_file():
        found = sorted(p.parent.name for p in path.glob("*/meta.json"))
        raise DatasetError(f"packed dataset not found: {meta_path} (splits found: {', '.join(found) or 'none'}); "
                           "write one with `python -m dcp_jax.data.datasets SPEC --split SPLIT --pack OUT`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _PACK_FORMAT:
        raise DatasetError(f"{meta_path}: not a dcp_jax packed dataset (format {meta.get('format')!r})")
    return ArrayRecordSegDataset(meta["name"], meta["split"], meta["class_names"], meta["num_label_classes"],
                                 np.asarray(meta["pred_to_label"], np.int32), meta["ignore_label"],
                                 str(path / split), meta["files"], meta["num_records"])


# --------------------------------------------------------------------------------------------
# command line: summarise, check every sample, or pack


def main(argv=None) -> None:
    import argparse

    from tqdm import tqdm

    parser = argparse.ArgumentParser(
        prog="python -m dcp_jax.data.datasets",
        description="Open a dataset spec and print a summary; optionally read every sample (--check) "
                    "or pack the split into ArrayRecord shards (--pack OUT, read back as arrayrecord:OUT).")
    parser.add_argument("spec", help=f"{', '.join(BENCHMARKS)}, folder:PATH or arrayrecord:PATH")
    parser.add_argument("--split", default="val", help="split (default val)")
    parser.add_argument("--data-root", default="", help="benchmark root (default $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--check", action="store_true", help="decode every sample and list every bad one")
    parser.add_argument("--pack", default="", metavar="OUT", help="write ArrayRecord shards to OUT/<split>/")
    args = parser.parse_args(argv)
    try:
        ds = open_dataset(args.spec, args.split, args.data_root or None)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{ds!r}: {len(ds)} samples, {len(ds.class_names)} class names, "
          f"{ds.num_label_classes} scored classes, ignore {ds.ignore_label}")
    if args.check:
        bad = []
        for i in tqdm(range(len(ds)), desc="checking"):
            try:
                ds[i]
            except DatasetError as e:
                bad.append(str(e))
        print("\n".join(bad) if bad else "every sample reads cleanly")
        print(f"{len(bad)} bad of {len(ds)}")
    if args.pack:
        print(f"packed into {pack_array_record(ds, args.pack)} (open as arrayrecord:{args.pack})")


if __name__ == "__main__":
    main()
