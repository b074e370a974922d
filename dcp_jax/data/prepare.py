"""Convert the official benchmark downloads into the layout CAT-Seg's prepare scripts produce.

`python -m dcp_jax.data.prepare <benchmark> --raw DIR --out DIR` reads the unpacked official downloads under
--raw and writes, under --out, exactly what CAT-Seg's `datasets/prepare_*.py` write under
`$DETECTRON2_DATASETS`, so a root prepared for CAT-Seg or SED works for dcp_jax and the other way round.
--out defaults to --raw (CAT-Seg converts in place). The label conversions follow CAT-Seg's scripts, and
ADE-847's images are resized with OpenCV as there (`cv2.resize`, INTER_LINEAR; labels INTER_NEAREST) and
saved with PIL's JPEG defaults, so they are byte-identical to CAT-Seg's. The one deliberate difference:

* PC-459: a 0 in a LabelMap becomes the ignore value 459 instead of wrapping to 65535 in uint16 (CAT-Seg's
  `LabelMap - 1`), and is counted. (Reading a CAT-Seg-written root treats 65535 as ignore too.)

No vocabulary is written: all seven are built in (`dcp_jax.data.classnames`); where the raw data carries
names (labels.txt, the ADE-847 categories) they are compared with the built-in list and differences noted.

Before anything is written every listed sample's raw files are looked up: half-extracted downloads (labels
without images, an empty folder) and converted outputs older than their raw input (without --overwrite)
stop the run with the first files named. Every output file is written to a temporary name and renamed, so an
interrupted run never leaves a half-written file; existing outputs are skipped unless --overwrite. At the end
the number of image/label pairs is checked against the official count (a warning, or an error with --strict).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import pickle
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from dcp_jax import files
from dcp_jax.data import classnames

BENCHMARKS = ("coco_stuff_171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")


class PrepareError(Exception):
    """A raw input is missing or malformed, or (with strict=True) an image count is off."""


# ----------------------------------------------------------------------------------------------------------------
# Label conversions (pure numpy; one function per CAT-Seg script)
# ----------------------------------------------------------------------------------------------------------------

# COCO ids 1..90 that are not categories (detectron2's COCO_CATEGORIES skips them); stuff ids are 92..182.
_COCO_UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_STUFF_171_IDS = tuple([i for i in range(1, 91) if i not in _COCO_UNUSED_THING_IDS] + list(range(92, 183)))

# The 59 Pascal-Context classes as ids of the 459-class labels.txt, sorted (= alphabetical order of pc59 names).
PC59_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
            144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349,
            354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
PC459_NUM_CLASSES = 459
PC459_IGNORE = 459
ADE847_IGNORE = 65535
ADE847_MAX_SIZE = 512


def _lut_uint8(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


# stuffthingmaps pixels hold COCO id - 1 (255 = unlabeled).
_COCO_LUT = _lut_uint8({coco_id - 1: train_id for train_id, coco_id in enumerate(COCO_STUFF_171_IDS)})
_VOC_LUT = _lut_uint8({0: 255, **{i: i - 1 for i in range(1, 21)}, 255: 255})
_VOC_BG_LUT = _lut_uint8({0: 20, **{i: i - 1 for i in range(1, 21)}, 255: 255})


def convert_coco_stuff(label: np.ndarray) -> np.ndarray:
    """stuffthingmaps PNG (COCO id - 1) -> trainIds 0..170 (things 0-79, stuff 80-170), everything else 255."""
    return _COCO_LUT[_as_uint8(label)]


def convert_ade150(label: np.ndarray) -> np.ndarray:
    """ADEChallengeData2016 annotation -> label - 1 in uint8, so 0 ("other") wraps to 255 (CAT-Seg)."""
    return _as_uint8(label) - np.uint8(1)


def convert_voc(label: np.ndarray, background: bool = False) -> np.ndarray:
    """SegmentationClassAug PNG -> 1..20 to 0..19; 0 to 255 (voc20) or 20 (voc20b); anything else 255."""
    return (_VOC_BG_LUT if background else _VOC_LUT)[_as_uint8(label)]


def convert_pc59(full_mask: np.ndarray) -> np.ndarray:
    """459-space id map (0 = background) -> the 59 sorted ids to 0..58, everything else 255."""
    lut = np.full(max(int(full_mask.max(initial=0)), PC59_IDS[-1]) + 1, 255, np.uint8)
    lut[list(PC59_IDS)] = np.arange(len(PC59_IDS), dtype=np.uint8)
    return lut[full_mask]


def convert_pc459(label_map: np.ndarray) -> tuple[np.ndarray, int]:
    """Pascal-Context LabelMap (1..459) -> LabelMap - 1 as uint16; returns (labels, number of ignored pixels).

    Deviation from CAT-Seg: values outside 1..459 (in practice a 0) become the ignore value 459 instead of
    wrapping around in uint16 (0 - 1 = 65535), which the evaluator would count as a wrong prediction.
    """
    label_map = np.asarray(label_map).astype(np.int64)
    valid = (label_map >= 1) & (label_map <= PC459_NUM_CLASSES)
    labels = np.where(valid, label_map - 1, PC459_IGNORE).astype(np.uint16)
    return labels, int(valid.size - np.count_nonzero(valid))


def ade_full_class_mask(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K full *_seg.png (RGB) -> object class ids, R/10*256 + G (the ADE20K toolkit's loadAde20K)."""
    seg_rgb = np.asarray(seg_rgb)
    if seg_rgb.ndim != 3 or seg_rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB *_seg.png, got an array of shape {seg_rgb.shape}")
    red, green = seg_rgb[..., 0].astype(np.int32), seg_rgb[..., 1].astype(np.int32)
    return red // 10 * 256 + green


def ade847_lut(categories: Sequence[dict]) -> np.ndarray:
    """{"id", "trainId"} list -> uint16 lookup table from ADE object id to trainId (65535 when unmapped)."""
    max_class_mask = 25 * 256 + 255  # R // 10 <= 25
    size = max([max_class_mask] + [int(c["id"]) for c in categories]) + 1
    lut = np.full(size, ADE847_IGNORE, np.uint16)
    for cat in categories:
        lut[int(cat["id"])] = int(cat["trainId"])
    return lut


def convert_ade847(class_mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """ADE object ids -> 847 trainIds as uint16, unmapped ids (including 0 = unlabeled) 65535."""
    return lut[class_mask]


def _as_uint8(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"expected a single-channel 8-bit label map, got {label.dtype} of shape {label.shape}")
    return label


# ----------------------------------------------------------------------------------------------------------------
# COCO run-length encoding (pycocotools-compatible, numpy only)
# ----------------------------------------------------------------------------------------------------------------


def rle_string_to_counts(encoded: str | bytes) -> list[int]:
    """Decode pycocotools' compressed RLE string (maskApi.c rleFrString) into run lengths."""
    data = encoded.encode("ascii") if isinstance(encoded, str) else bytes(encoded)
    counts: list[int] = []
    pos = 0
    while pos < len(data) and data[pos] != 0:
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                raise ValueError(f"truncated RLE string {encoded!r}")
            chunk = data[pos] - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            pos += 1
            shift += 1
            if not more and chunk & 0x10:
                value |= -1 << (5 * shift)  # sign-extend
        if len(counts) > 2:
            value += counts[-2]  # runs after the second are stored as deltas
        counts.append(value)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """{"size": [h, w], "counts": list or compressed string} -> uint8 (h, w) mask; runs are column-major."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(f"RLE run lengths sum to {counts.sum()}, expected {height}*{width}")
    values = (np.arange(len(counts)) % 2).astype(np.uint8)  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape(width, height).T


# ----------------------------------------------------------------------------------------------------------------
# ADE-847 resize rule (prepare_ade20k_full.py)
# ----------------------------------------------------------------------------------------------------------------


def ade847_target_size(height: int, width: int, max_size: int = ADE847_MAX_SIZE) -> tuple[int, int] | None:
    """(h, w) after prepare_ade20k_full.py's short-side-to-512 rule, or None when the image is kept as is."""
    if width >= height > max_size:
        return max_size, round(width / float(height) * max_size)
    if height >= width > max_size:
        return round(height / float(width) * max_size), max_size
    return None


# ----------------------------------------------------------------------------------------------------------------
# File helpers: atomic writes, image placement, reading
# ----------------------------------------------------------------------------------------------------------------


def save_label(array: np.ndarray, dst: Path) -> None:
    """Atomically save a uint8 PNG or a uint16 TIFF (PIL mode I;16), as CAT-Seg's scripts do."""
    fmt = "TIFF" if dst.suffix.lower() in (".tif", ".tiff") else "PNG"
    expected = np.uint16 if fmt == "TIFF" else np.uint8
    if array.dtype != expected or array.ndim != 2:
        raise ValueError(f"{dst}: a {fmt} label must be a 2-D {np.dtype(expected).name} array, got {array.dtype}")
    files.atomic_write(dst, lambda tmp: Image.fromarray(array).save(tmp, format=fmt))


def _place_image(src: Path, dst: Path, mode: str, overwrite: bool) -> str:
    """Make dst hold src's image (hard link, symlink or copy). Returns 'same', 'existing' or 'placed'."""
    if dst.exists() or dst.is_symlink():
        if dst.exists() and os.path.samefile(src, dst):
            return "same"  # --out == --raw: the image is already in place
        if not overwrite:
            return "existing"

    def place(tmp: Path) -> None:
        if mode == "copy":
            shutil.copy2(src, tmp)
            return
        tmp.unlink()  # links need a free name
        if mode == "symlink":
            os.symlink(src.resolve(), tmp)
            return
        try:
            os.link(src, tmp)
        except OSError:  # another file system or no link support: copy instead
            shutil.copy2(src, tmp)

    files.atomic_write(dst, place)
    return "placed"


def _read_array(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, SyntaxError) as err:
        raise PrepareError(f"cannot read {path}: {err}. The file is truncated or corrupt: download or "
                           "extract it again") from err


def _read_label_png(path: Path) -> np.ndarray:
    label = _read_array(path)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise PrepareError(f"{path}: expected a single-channel 8-bit label PNG, got {label.dtype} "
                           f"of shape {label.shape}")
    return label


def _require(path: Path, what: str, download: str, is_dir: bool = False, raw: Path | None = None) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "directory" if is_dir else "file"
        hint = _raw_level_hint(raw, path) if raw is not None else ""
        raise PrepareError(f"missing {kind} {path}: {what}. {hint or f'It comes from {download}. '}"
                           f"Run `python -m dcp_jax.data.prepare --help` for the expected layout.")
    return path


def _raw_level_hint(raw: Path, path: Path) -> str:
    """When --raw points inside the expected tree (or one level above it), say where it should point."""
    try:
        parts = path.relative_to(raw).parts
    except ValueError:
        return ""
    top = parts[0]
    for depth in range(len(parts), 0, -1):  # raw ends with parts[:depth], e.g. .../ADEChallengeData2016
        if raw.parts[-depth:] == parts[:depth]:
            holder = raw.parents[depth - 1]
            return (f"--raw {raw} is {depth} level{'s' * (depth > 1)} too deep: point --raw at the folder that "
                    f"holds {top}/ ({holder}). ")
    if raw.is_dir():
        for child in sorted(raw.iterdir()):
            if child.is_dir() and (child / Path(*parts)).exists():
                return f"--raw {raw} is one level too high: point --raw at the folder that holds {top}/ ({child}). "
    return ""


@dataclasses.dataclass(frozen=True)
class _Sample:
    """What the pre-check looks at for one listed sample."""

    raws: tuple[Path, ...]  # raw files the outputs are converted from
    image: Path | None  # the raw image placed unchanged (None: the image is converted, so it is in raws)
    outputs: tuple[Path, ...]  # converted files


def _precheck(benchmark: str, split: str, samples: Sequence[_Sample], overwrite: bool, download: str,
              allowed_missing: int = 0) -> list[str]:
    """Stop before writing anything when raw files are missing (a half-extracted download) or when
    converted outputs are older than their raw input and would be kept (no --overwrite).

    Returns notes; up to `allowed_missing` samples without raw files are tolerated and noted.
    """
    missing, stale = [], []
    for sample in samples:
        absent = [p for p in (*sample.raws, *([sample.image] if sample.image else [])) if not p.is_file()]
        if absent:
            missing.append(absent[0])
            continue
        if not overwrite and all(p.exists() for p in sample.outputs):
            newest_raw = max(p.stat().st_mtime for p in sample.raws)
            oldest = min(sample.outputs, key=lambda p: p.stat().st_mtime)
            if newest_raw > oldest.stat().st_mtime:
                stale.append((oldest, max(sample.raws, key=lambda p: p.stat().st_mtime)))
    if len(missing) > allowed_missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise PrepareError(f"{benchmark} {split}: {len(missing)} of {len(samples)} listed samples lack a raw file, "
                           f"first {shown}. The download looks half-extracted: extract {download} again "
                           f"(`python -m dcp_jax.data.prepare --help` shows the layout). Nothing of {split} was "
                           "written.")
    if stale:
        out, src = stale[0]
        raise PrepareError(f"{benchmark} {split}: {len(stale)} converted files are older than their raw input, "
                           f"first {out} (raw {src} is newer). Rerun with --overwrite to convert them again. "
                           f"Nothing of {split} was written.")
    return [f"{len(missing)} listed sample(s) have no raw file ({missing[0]}) and are skipped, as CAT-Seg does"
            ] if missing else []


# ----------------------------------------------------------------------------------------------------------------
# Per-sample workers (top level so a multiprocessing pool can pickle them). Each returns a Counter of outcomes.
# ----------------------------------------------------------------------------------------------------------------

Outcome = dict


def _outcome(**counts: int) -> Outcome:
    return {k: v for k, v in counts.items() if v}


def _finish_image(src: Path | None, dst: Path | None, mode: str, overwrite: bool) -> Outcome:
    if src is None or dst is None:
        return {}
    if not src.is_file():
        return _outcome(missing_image=1)
    return _outcome(images_placed=int(_place_image(src, dst, mode, overwrite) == "placed"))


def _simple_label_task(task: tuple, *, kind: str, mode: str, overwrite: bool) -> Outcome:
    """One label file -> one or more converted label files, plus its image placed in the output tree."""
    src, dsts, img_src, img_dst = task
    if not overwrite and all(d.exists() for d in dsts):
        return {**_finish_image(img_src, img_dst, mode, overwrite), "skipped": 1}
    if not src.is_file():
        return {"missing_raw": 1}
    out = _finish_image(img_src, img_dst, mode, overwrite)
    label = _read_label_png(src)
    if kind == "coco":
        converted = [convert_coco_stuff(label)]
    elif kind == "ade150":
        converted = [convert_ade150(label)]
    elif kind == "voc":
        converted = [convert_voc(label), convert_voc(label, background=True)]
    else:
        raise ValueError(kind)
    written = 0
    for array, dst in zip(converted, dsts):
        if overwrite or not dst.exists():
            save_label(array, dst)
            written += 1
    return {**out, "written": 1, "files_written": written}


def _pc59_task(task: tuple, *, mode: str, overwrite: bool) -> Outcome:
    image_info, segments, dst, img_src, img_dst = task
    out = _finish_image(img_src, img_dst, mode, overwrite)
    if dst.exists() and not overwrite:
        return {**out, "skipped": 1}
    height, width = int(image_info["height"]), int(image_info["width"])
    full_mask = np.zeros((height, width), np.int64)  # 0 = background
    for category_id, rle in segments:
        mask = rle_decode(rle)
        if mask.shape != full_mask.shape:
            raise PrepareError(f"trainval_merged.json: a segment of {image_info['file_name']} is {mask.shape}, "
                               f"the image is {full_mask.shape}")
        full_mask[mask.astype(bool)] = int(category_id)  # later segments win on overlap (none in practice)
    save_label(convert_pc59(full_mask), dst)
    return {**out, "written": 1}


def _pc459_task(task: tuple, *, mode: str, overwrite: bool) -> Outcome:
    from scipy.io import loadmat  # scipy comes with jax; imported here so other benchmarks don't need it

    src, dst, img_src, img_dst = task
    if dst.exists() and not overwrite:
        return {**_finish_image(img_src, img_dst, mode, overwrite), "skipped": 1}
    if not src.is_file():
        return {"missing_raw": 1}  # CAT-Seg skips ids without a .mat file too
    out = _finish_image(img_src, img_dst, mode, overwrite)
    try:
        mat = loadmat(src)
    except Exception as err:  # scipy raises several types for bad files
        raise PrepareError(f"cannot read {src}: {err}. The file is truncated or corrupt: extract "
                           f"trainval.tar.gz again") from err
    if "LabelMap" not in mat:
        raise PrepareError(f"{src} has no 'LabelMap' variable (keys: {sorted(k for k in mat if k[0] != '_')})")
    labels, n_ignored = convert_pc459(mat["LabelMap"])
    save_label(labels, dst)
    return {**out, "written": 1, "pc459_zero_pixels": n_ignored, "pc459_zero_files": int(n_ignored > 0)}


def _ade847_task(task: tuple, *, lut: np.ndarray, overwrite: bool) -> Outcome:
    img_src, seg_src, img_dst, ann_dst = task
    need_img, need_ann = overwrite or not img_dst.exists(), overwrite or not ann_dst.exists()
    if not (need_img or need_ann):
        return {"skipped": 1}
    if not img_src.is_file() or not seg_src.is_file():
        return {"missing_raw": 1}
    try:  # as CAT-Seg: np.asarray(Image.open(...)), no EXIF rotation (other modes than RGB/L: RGB)
        with Image.open(img_src) as pil_image:
            image = np.asarray(pil_image if pil_image.mode in ("RGB", "L") else pil_image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise PrepareError(f"cannot read {img_src}: {err}. The image is truncated or corrupt: extract it again "
                           f"from {_ADE847_DL}") from err
    class_mask = ade_full_class_mask(_read_array(seg_src))
    if class_mask.shape != image.shape[:2]:
        raise PrepareError(f"{seg_src} is {class_mask.shape}, but {img_src} is {image.shape[:2]}")
    size = ade847_target_size(*image.shape[:2])
    if size is not None:  # prepare_ade20k_full.py: cv2.resize, bilinear image, nearest int32 class mask
        image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        class_mask = cv2.resize(class_mask.astype(np.int32), size[::-1], interpolation=cv2.INTER_NEAREST)
    if need_ann:
        save_label(convert_ade847(class_mask, lut), ann_dst)
    if need_img:  # CAT-Seg re-encodes every image: Image.fromarray(img).save(name.jpg), PIL's JPEG defaults
        files.atomic_write(img_dst, lambda tmp: Image.fromarray(image).save(tmp, format="JPEG"))
    return _outcome(written=1, resized=int(size is not None))


# ----------------------------------------------------------------------------------------------------------------
# Running tasks and reporting
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitReport:
    """What one split produced and how it compares with the official image count."""

    benchmark: str
    split: str
    annotation_dir: Path
    image_dir: Path
    pairs: int  # annotation files in annotation_dir whose image exists in image_dir
    counts: dict  # outcome counters: written, skipped, missing_raw, missing_image, ...
    expected: tuple[int, ...] | None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def count_ok(self) -> bool | None:
        return None if self.expected is None else self.pairs in self.expected

    def summary(self) -> str:
        c = self.counts
        line = (f"  {self.benchmark} {self.split}: {self.pairs} image/label pairs in {self.annotation_dir}  "
                f"(converted {c.get('written', 0)}, already there {c.get('skipped', 0)}, "
                f"raw label missing {c.get('missing_raw', 0)}, image missing {c.get('missing_image', 0)})")
        if self.expected is None:
            return line + "  [no official count to check]"
        want = " or ".join(str(e) for e in self.expected)
        return line + f"  expected {want}: " + ("OK" if self.count_ok else "MISMATCH")


@dataclasses.dataclass
class PrepareReport:
    benchmark: str
    out: Path
    splits: list[SplitReport]
    warnings: list[str]

    @property
    def count_ok(self) -> bool:
        return all(s.count_ok is not False for s in self.splits)


@dataclasses.dataclass(frozen=True)
class _Options:
    raw: Path
    out: Path
    overwrite: bool
    workers: int
    image_mode: str
    progress: bool


def _run_tasks(fn: Callable, tasks: list, opts: _Options, desc: str) -> Counter:
    counts: Counter = Counter()
    if not tasks:
        return counts
    workers = max(1, min(opts.workers, len(tasks)))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results: Iterable = map(fn, tasks)
        else:
            # spawn, not fork: the caller may have JAX (threads) loaded.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap_unordered(fn, tasks, chunksize=max(1, min(64, len(tasks) // (8 * workers))))
        for result in tqdm(results, total=len(tasks), desc=desc, unit="img", disable=not opts.progress,
                           dynamic_ncols=True):
            counts.update(result)
    return counts


def _count_pairs(ann_dir: Path, ann_ext: str, img_dir: Path, img_ext: str) -> tuple[int, int]:
    """(annotation files with an image, annotation files without one); hidden temp files are ignored."""
    if not ann_dir.is_dir():
        return 0, 0
    stems = [e.name[: -len(ann_ext)] for e in os.scandir(ann_dir)
             if e.name.endswith(ann_ext) and not e.name.startswith(".")]
    images = {e.name for e in os.scandir(img_dir)} if img_dir.is_dir() else set()
    paired = sum(stem + img_ext in images for stem in stems)
    return paired, len(stems) - paired


def _split_report(benchmark: str, split: str, counts: Counter, opts: _Options, ann_rel: str, ann_ext: str,
                  img_rel: str, expected: tuple[int, ...] | None, notes: Sequence[str] = ()) -> SplitReport:
    ann_dir, img_dir = opts.out / ann_rel, opts.out / img_rel
    pairs, unpaired = _count_pairs(ann_dir, ann_ext, img_dir, ".jpg")
    report = SplitReport(benchmark, split, ann_dir, img_dir, pairs, dict(counts), expected, list(notes))
    if counts.get("missing_raw"):
        report.notes.append(f"{counts['missing_raw']} listed samples have no raw label file; they were skipped")
    if counts.get("missing_image"):
        report.notes.append(f"{counts['missing_image']} labels have no raw image (see the layout in --help)")
    if unpaired:
        report.notes.append(f"{unpaired} annotation files in {ann_dir} have no image in {img_dir}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------------

_COCO_STUFF_DL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip"
_ADE150_DL = "ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)"
_ADE847_DL = "ADE20K_2021_17_01.zip (https://ade20k.csail.mit.edu/, registration required)"
_VOC2010_DL = "VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/)"
_PC59_DL = "trainval_merged.json (https://codalabuser.blob.core.windows.net/public/trainval_merged.json)"
_PC459_DL = "trainval.tar.gz and labels.txt (https://www.cs.stanford.edu/~roozbeh/pascal-context/)"
_PC459_LIST_DL = ("pascalcontext_val.txt, shipped in CAT-Seg's datasets/ folder "
                  "(https://github.com/cvlab-kaist/CAT-Seg/tree/main/datasets)")
_VOC2012_DL = "VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)"
_VOC_AUG_DL = ("SegmentationClassAug.zip (the SBD-augmented VOC labels used by DeepLab; see CAT-Seg's "
               "datasets/README.md)")
_ADE847_CATEGORIES_HELP = (
    "ADE-847 needs the table that maps ADE20K object ids to the 847 trainIds, which CAT-Seg hard-codes as "
    "ADE20K_SEM_SEG_FULL_CATEGORIES in datasets/prepare_ade20k_full.py "
    "(https://github.com/cvlab-kaist/CAT-Seg/blob/main/datasets/prepare_ade20k_full.py; the same list is in "
    "cat_seg/data/datasets/register_ade20k_847.py and in Mask2Former's datasets/prepare_ade20k_full.py). "
    "Pass that .py file as --categories (it is parsed, not run) or a JSON list of {\"name\", \"id\", \"trainId\"}. "
    "It cannot be rebuilt from index_ade20k.pkl: the trainIds follow a pixel-frequency order computed by the "
    "authors of the benchmark, which the index does not record.")

# Official image counts per (benchmark family, split).
OFFICIAL_COUNTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("coco_stuff_171", "val"): (5000,),
    ("coco_stuff_171", "train"): (118287,),
    ("ade150", "val"): (2000,),
    ("ade150", "train"): (20210,),
    ("ade847", "val"): (2000,),
    ("pc59", "val"): (5105,),
    ("pc59", "train"): (4998,),
    ("pc459", "val"): (5105, 5104),
    ("voc", "val"): (1449,),
    ("voc", "train"): (1464,),
}
_PC459_COUNT_NOTE = ("PC-459 val has 5105 ids in pascalcontext_val.txt; CAT-Seg#24's evaluation log reports 5104, "
                     "so both counts are accepted")


def _prepare_coco(opts: _Options, split: str) -> SplitReport:
    split_dir = {"train": "train2017", "val": "val2017"}[split]
    only_hint = " (to prepare only val2017, pass --split val)" if split == "train" else ""
    images_dl = f"http://images.cocodataset.org/zips/{split_dir}.zip, unzipped into coco-stuff/images/"
    img_src = _require(opts.raw / "coco-stuff/images" / split_dir, f"the COCO {split_dir} images{only_hint}",
                       images_dl, is_dir=True, raw=opts.raw)
    ann_src = _require(opts.raw / "coco-stuff/annotations" / split_dir,
                       f"the COCO-Stuff {split_dir} label maps{only_hint}",
                       f"stuffthingmaps_trainval2017.zip ({_COCO_STUFF_DL}), unzipped into coco-stuff/annotations/",
                       is_dir=True, raw=opts.raw)
    ann_rel, img_rel = f"coco-stuff/annotations_detectron2/{split_dir}", f"coco-stuff/images/{split_dir}"
    tasks = [(src, [opts.out / ann_rel / src.name], img_src / f"{src.stem}.jpg", opts.out / img_rel / f"{src.stem}.jpg")
             for src in sorted(ann_src.glob("*.png"))]
    if not tasks:
        raise PrepareError(f"no .png label maps in {ann_src}: unzip stuffthingmaps_trainval2017.zip there")
    _precheck("coco_stuff_171", split, _simple_samples(tasks), opts.overwrite, f"{split_dir}.zip ({images_dl})")
    fn = functools.partial(_simple_label_task, kind="coco", mode=opts.image_mode, overwrite=opts.overwrite)
    counts = _run_tasks(fn, tasks, opts, f"coco_stuff_171 {split_dir}")
    return _split_report("coco_stuff_171", split, counts, opts, ann_rel, ".png", img_rel,
                         OFFICIAL_COUNTS.get(("coco_stuff_171", split)))


def _simple_samples(tasks: list) -> list[_Sample]:
    return [_Sample((src,), img_src, tuple(dsts)) for src, dsts, img_src, _ in tasks]


def _prepare_ade150(opts: _Options, split: str) -> SplitReport:
    split_dir = {"train": "training", "val": "validation"}[split]
    root = _require(opts.raw / "ADEChallengeData2016", "the ADE20K-150 root", _ADE150_DL, is_dir=True, raw=opts.raw)
    img_src = _require(root / "images" / split_dir, f"the {split_dir} images", _ADE150_DL, is_dir=True)
    ann_src = _require(root / "annotations" / split_dir, f"the {split_dir} annotations", _ADE150_DL, is_dir=True)
    ann_rel = f"ADEChallengeData2016/annotations_detectron2/{split_dir}"
    img_rel = f"ADEChallengeData2016/images/{split_dir}"
    tasks = [(src, [opts.out / ann_rel / src.name], img_src / f"{src.stem}.jpg", opts.out / img_rel / f"{src.stem}.jpg")
             for src in sorted(ann_src.glob("*.png"))]
    if not tasks:
        raise PrepareError(f"no .png annotations in {ann_src}: unzip {_ADE150_DL} under --raw")
    _precheck("ade150", split, _simple_samples(tasks), opts.overwrite, _ADE150_DL)
    fn = functools.partial(_simple_label_task, kind="ade150", mode=opts.image_mode, overwrite=opts.overwrite)
    counts = _run_tasks(fn, tasks, opts, f"ade150 {split_dir}")
    return _split_report("ade150", split, counts, opts, ann_rel, ".png", img_rel,
                         OFFICIAL_COUNTS.get(("ade150", split)))


def load_ade847_categories(path: str | os.PathLike) -> list[dict]:
    """Read the ADE-847 table: a JSON list of {"name", "id", "trainId"}, or a .py file that assigns
    ADE20K_SEM_SEG_FULL_CATEGORIES (CAT-Seg's prepare_ade20k_full.py; parsed with ast, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"--categories {path}: no such file. {_ADE847_CATEGORIES_HELP}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        categories = None
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as err:
            raise PrepareError(f"cannot parse {path}: {err}. Download prepare_ade20k_full.py again") from err
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "ADE20K_SEM_SEG_FULL_CATEGORIES" for t in node.targets):
                categories = ast.literal_eval(node.value)
        if categories is None:
            raise PrepareError(f"{path} does not assign ADE20K_SEM_SEG_FULL_CATEGORIES. {_ADE847_CATEGORIES_HELP}")
    else:
        try:
            categories = json.loads(text)
        except json.JSONDecodeError as err:
            raise PrepareError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(categories, list) or not categories or not all(
            isinstance(c, dict) and {"name", "id", "trainId"} <= c.keys() for c in categories):
        raise PrepareError(f"{path}: expected a list of {{\"name\", \"id\", \"trainId\"}} entries")
    train_ids = sorted(int(c["trainId"]) for c in categories)
    if train_ids != list(range(len(categories))):
        raise PrepareError(f"{path}: the trainIds must be 0..{len(categories) - 1}, each once")
    ids = [int(c["id"]) for c in categories]
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise PrepareError(f"{path}: the ADE object ids must be distinct and non-negative")
    return sorted(categories, key=lambda c: int(c["trainId"]))


def _resolve_ade_folder(raw: Path, folder: str) -> Path:
    """index_ade20k.pkl folders read 'ADE20K_2021_17_01/images/ADE/...', relative to the dataset's parent."""
    path = Path(folder)
    if path.is_absolute() and path.is_dir():
        return path
    parts = path.parts
    if "ADE20K_2021_17_01" in parts:
        return raw.joinpath(*parts[parts.index("ADE20K_2021_17_01"):])
    return raw / path


def _compare_names(builtin: str, found: Sequence[str], source: str, normalize=lambda n: n) -> list[str]:
    """A note when raw-data class names differ from the built-in list (which is what gets scored)."""
    reference = classnames.load(builtin)
    diffs = [(i, f, r) for i, (f, r) in enumerate(zip(found, reference)) if normalize(f) != normalize(r)]
    if len(found) != len(reference):
        return [f"{source} has {len(found)} class names, {builtin} has {len(reference)}; the built-in list is used"]
    if not diffs:
        return []
    i, f, r = diffs[0]
    return [f"{len(diffs)} class names in {source} differ from the built-in {builtin} list (CAT-Seg's), first "
            f"index {i}: {f!r} vs {r!r}; labels are written by index, the built-in names are used for scoring"]


def _load_pickle(path: Path, download: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # the official index is a pickle; load only the file from the download
    except (EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise PrepareError(f"cannot read {path}: {err!r}. The file is truncated or corrupt: extract it again "
                           f"from {download}") from err


def _load_json(path: Path, download: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepareError(f"cannot read {path}: {err}. The file is truncated or corrupt: download it again "
                           f"({download})") from err


def _prepare_ade847(opts: _Options, split: str, categories_path: str | None) -> SplitReport:
    split_dir = {"train": "training", "val": "validation"}[split]
    root = _require(opts.raw / "ADE20K_2021_17_01", "the ADE20K full dataset root", _ADE847_DL, is_dir=True,
                    raw=opts.raw)
    index_path = _require(root / "index_ade20k.pkl", "the ADE20K index", _ADE847_DL)
    if categories_path is None:
        raise PrepareError(_ADE847_CATEGORIES_HELP)
    categories = load_ade847_categories(categories_path)
    index = _load_pickle(index_path, _ADE847_DL)
    if not isinstance(index, dict) or not {"filename", "folder"} <= index.keys():
        raise PrepareError(f"{index_path}: expected a dict with 'filename' and 'folder' lists; extract it again "
                           f"from {_ADE847_DL}")
    notes = _compare_names("ade847", [c["name"] for c in categories], f"--categories {categories_path}")
    names = list(index.get("objectnames", []))
    if names:  # objectnames[i] names class-mask value i + 1; a mismatch hints at another ADE20K release
        mismatched = [c for c in categories if not (0 < int(c["id"]) <= len(names) and
                                                     names[int(c["id"]) - 1] == c["name"])]
        if mismatched:
            notes.append(f"{len(mismatched)} categories differ from index_ade20k.pkl's objectnames "
                         f"(e.g. {mismatched[0]['name']!r} id {mismatched[0]['id']}); is this ADE20K_2021_17_01?")
    img_rel = f"ADE20K_2021_17_01/images_detectron2/{split_dir}"
    ann_rel = f"ADE20K_2021_17_01/annotations_detectron2/{split_dir}"
    tasks = []
    for folder, file_name in zip(index["folder"], index["filename"]):
        file_split = "validation" if file_name.split("_")[1] == "val" else "training"  # as CAT-Seg
        if file_split != split_dir:
            continue
        src = _resolve_ade_folder(opts.raw, folder) / file_name
        tasks.append((src, src.with_name(file_name.replace(".jpg", "_seg.png")), opts.out / img_rel / file_name,
                      opts.out / ann_rel / file_name.replace(".jpg", ".tif")))
    if not tasks:
        raise PrepareError(f"{index_path} lists no {split_dir} images; extract it again from {_ADE847_DL}")
    _precheck("ade847", split, [_Sample((img, seg), None, (img_dst, ann_dst)) for img, seg, img_dst, ann_dst in tasks],
              opts.overwrite, _ADE847_DL)
    fn = functools.partial(_ade847_task, lut=ade847_lut(categories), overwrite=opts.overwrite)
    counts = _run_tasks(fn, tasks, opts, f"ade847 {split_dir}")
    report = _split_report("ade847", split, counts, opts, ann_rel, ".tif", img_rel,
                           OFFICIAL_COUNTS.get(("ade847", split)), notes)
    if counts.get("resized"):
        report.notes.append(f"{counts['resized']} images had a short side above {ADE847_MAX_SIZE} and were resized")
    return report


def _voc2010_root(opts: _Options) -> Path:
    root = _require(opts.raw / "VOCdevkit/VOC2010", "the PASCAL VOC 2010 root", _VOC2010_DL, is_dir=True,
                    raw=opts.raw)
    _require(root / "JPEGImages", "the VOC 2010 images", _VOC2010_DL, is_dir=True)
    return root


def _prepare_pc59(opts: _Options, split: str) -> SplitReport:
    root = _voc2010_root(opts)
    json_path = _require(root / "trainval_merged.json", "the Pascal-Context annotations", _PC59_DL)
    data = _load_json(json_path, _PC59_DL)
    segments_key = next((k for k in ("annos_segmentation", "annotations") if k in data), None)
    if not isinstance(data, dict) or "images" not in data or segments_key is None:
        raise PrepareError(f"{json_path}: expected 'images' and 'annos_segmentation' (or 'annotations') lists; "
                           f"download it again ({_PC59_DL})")
    by_image: dict[int, list] = {}
    for ann in data[segments_key]:
        by_image.setdefault(ann["image_id"], []).append((ann["category_id"], ann["segmentation"]))
    ann_rel, img_rel = f"VOCdevkit/VOC2010/annotations_detectron2/pc59_{split}", "VOCdevkit/VOC2010/JPEGImages"
    tasks = []
    for info in data["images"]:
        if info.get("phase") != split:
            continue
        image_id = info.get("image_id", info.get("id"))
        if "file_name" not in info or "height" not in info or "width" not in info:
            raise PrepareError(f"{json_path}: image entry {image_id} lacks file_name, height or width")
        stem = Path(info["file_name"]).stem
        info = {k: info[k] for k in ("file_name", "height", "width")}
        tasks.append((info, by_image.get(image_id, []), opts.out / ann_rel / f"{stem}.png",
                      root / "JPEGImages" / f"{stem}.jpg", opts.out / img_rel / f"{stem}.jpg"))
    if not tasks:
        raise PrepareError(f"{json_path} has no images with phase == {split!r}")
    _precheck("pc59", split, [_Sample((json_path,), img, (dst,)) for _, _, dst, img, _ in tasks], opts.overwrite,
              _VOC2010_DL)
    fn = functools.partial(_pc59_task, mode=opts.image_mode, overwrite=opts.overwrite)
    counts = _run_tasks(fn, tasks, opts, f"pc59 {split}")
    return _split_report("pc59", split, counts, opts, ann_rel, ".png", img_rel, OFFICIAL_COUNTS.get(("pc59", split)))


def read_pc459_labels(path: Path) -> list[str]:
    """labels.txt ("id: name" lines, ids 1..459) -> names, index = id - 1."""
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if ":" not in line:
            continue
        index, name = line.split(":", 1)
        try:
            names[int(index.strip())] = name.strip()
        except ValueError as err:
            raise PrepareError(f"{path}: bad line {line!r}, expected 'id: name'") from err
    if sorted(names) != list(range(1, len(names) + 1)) or not names:
        raise PrepareError(f"{path}: the ids must run 1..N without gaps; found {len(names)} entries")
    return [names[i] for i in range(1, len(names) + 1)]


def _prepare_pc459(opts: _Options, split: str) -> SplitReport:
    root = _voc2010_root(opts)
    mat_dir = _require(root / "trainval", "the Pascal-Context .mat label maps", _PC459_DL, is_dir=True)
    val_list = _require(root / "pascalcontext_val.txt", "the PC-459 validation id list", _PC459_LIST_DL)
    ids = [line.strip() for line in val_list.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    notes = [_PC459_COUNT_NOTE]
    if (root / "labels.txt").is_file():  # optional: only compared (CAT-Seg spells the names without spaces)
        notes += _compare_names("pc459", read_pc459_labels(root / "labels.txt"), str(root / "labels.txt"),
                                normalize=lambda n: n.replace(" ", "").lower())
    ann_rel, img_rel = "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", "VOCdevkit/VOC2010/JPEGImages"
    tasks = [(mat_dir / f"{i}.mat", opts.out / ann_rel / f"{i}.tif", root / "JPEGImages" / f"{i}.jpg",
              opts.out / img_rel / f"{i}.jpg") for i in ids]
    # One id without a .mat is tolerated (CAT-Seg skips it; CAT-Seg#24's log counts 5104 of 5105).
    notes += _precheck("pc459", split, [_Sample((mat,), img, (dst,)) for mat, dst, img, _ in tasks],
                       opts.overwrite, f"trainval.tar.gz ({_PC459_DL})", allowed_missing=1)
    fn = functools.partial(_pc459_task, mode=opts.image_mode, overwrite=opts.overwrite)
    counts = _run_tasks(fn, tasks, opts, "pc459 val")
    if counts.get("pc459_zero_pixels"):
        notes.append(f"{counts['pc459_zero_pixels']} pixels in {counts['pc459_zero_files']} LabelMaps were 0 (or "
                     f"above {PC459_NUM_CLASSES}); they were set to the ignore value {PC459_IGNORE}, where "
                     f"CAT-Seg's uint16 'LabelMap - 1' would wrap 0 to 65535")
    return _split_report("pc459", split, counts, opts, ann_rel, ".tif", img_rel, OFFICIAL_COUNTS[("pc459", split)],
                         notes)


def _prepare_voc(opts: _Options, split: str) -> list[SplitReport]:
    root = _require(opts.raw / "VOCdevkit/VOC2012", "the PASCAL VOC 2012 root", _VOC2012_DL, is_dir=True,
                    raw=opts.raw)
    img_src = _require(root / "JPEGImages", "the VOC 2012 images", _VOC2012_DL, is_dir=True)
    aug = _require(root / "SegmentationClassAug", "the VOC label PNGs", _VOC_AUG_DL, is_dir=True)
    id_list = _require(root / "ImageSets/Segmentation" / f"{split}.txt", f"the VOC {split} id list", _VOC2012_DL)
    ids = [line.strip() for line in id_list.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    ann_rel = f"VOCdevkit/VOC2012/annotations_detectron2/{split}"
    bg_rel = f"VOCdevkit/VOC2012/annotations_detectron2_bg/{split}"
    img_rel = "VOCdevkit/VOC2012/JPEGImages"
    tasks = [(aug / f"{i}.png", [opts.out / ann_rel / f"{i}.png", opts.out / bg_rel / f"{i}.png"],
              img_src / f"{i}.jpg", opts.out / img_rel / f"{i}.jpg") for i in ids]
    _precheck("voc20/voc20b", split, _simple_samples(tasks), opts.overwrite, f"{_VOC2012_DL} and {_VOC_AUG_DL}")
    fn = functools.partial(_simple_label_task, kind="voc", mode=opts.image_mode, overwrite=opts.overwrite)
    counts = _run_tasks(fn, tasks, opts, f"voc {split}")
    expected = OFFICIAL_COUNTS.get(("voc", split))
    return [_split_report("voc20", split, counts, opts, ann_rel, ".png", img_rel, expected),
            _split_report("voc20b", split, counts, opts, bg_rel, ".png", img_rel, expected)]


# Allowed splits and the default for each benchmark ("train"/"val"; the directory names are accepted too).
SPLITS = {
    "coco_stuff_171": (("train", "val"), ("train", "val")),
    "ade150": (("val", "train"), ("val",)),
    "ade847": (("val", "train"), ("val",)),
    "pc59": (("val", "train"), ("val",)),
    "pc459": (("val",), ("val",)),
    "voc20": (("val", "train"), ("val",)),
    "voc20b": (("val", "train"), ("val",)),
}
_SPLIT_ALIASES = {"train2017": "train", "val2017": "val", "training": "train", "validation": "val"}


def _normalize_splits(benchmark: str, splits: Sequence[str] | str | None) -> list[str]:
    allowed, default = SPLITS[benchmark]
    if splits is None:
        return list(default)
    if isinstance(splits, str):
        splits = [splits]
    result = []
    for item in splits:
        for split in filter(None, (s.strip() for s in item.split(","))):
            split = _SPLIT_ALIASES.get(split, split)
            if split not in allowed:
                raise PrepareError(f"{benchmark} has no split {split!r}; choose from {', '.join(allowed)}")
            if split not in result:
                result.append(split)
    return result


def prepare(benchmark: str, raw: str | os.PathLike, out: str | os.PathLike | None = None, *,
            splits: Sequence[str] | str | None = None, overwrite: bool = False, workers: int = 1,
            image_mode: str = "hardlink", categories: str | os.PathLike | None = None, count_check: bool = True,
            strict: bool = False, progress: bool = True) -> PrepareReport:
    """Convert one benchmark's official downloads under `raw` into CAT-Seg's layout under `out` (default: raw).

    Args:
      benchmark: one of BENCHMARKS.
      splits: "train" and/or "val" (or the directory names, e.g. "val2017"); default: what CAT-Seg prepares.
      overwrite: replace existing outputs (otherwise they are skipped, so a rerun resumes an interrupted run).
      workers: processes converting labels in parallel.
      image_mode: how images that are copied unchanged reach `out` when it differs from `raw`:
        "hardlink" (falls back to a copy across file systems), "symlink" or "copy".
      categories: ADE-847 only: the ADE20K_SEM_SEG_FULL_CATEGORIES table (JSON, or CAT-Seg's .py file).
      count_check: compare the image/label pairs with the official counts; a mismatch is a warning, or a
        PrepareError when `strict`.
      progress: show tqdm bars.
    Returns a PrepareReport; the summary is also printed.
    """
    if benchmark not in BENCHMARKS:
        raise PrepareError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if image_mode not in ("hardlink", "symlink", "copy"):
        raise PrepareError(f"image_mode must be hardlink, symlink or copy, not {image_mode!r}")
    if categories is not None and benchmark != "ade847":
        raise PrepareError("--categories only applies to ade847")
    raw_path = Path(raw).expanduser().absolute()
    if not raw_path.is_dir():
        raise PrepareError(f"--raw {raw_path} is not a directory")
    out_path = raw_path if out is None else Path(out).expanduser().absolute()
    opts = _Options(raw_path, out_path, overwrite, max(1, int(workers)), image_mode, progress)

    reports: list[SplitReport] = []
    for split in _normalize_splits(benchmark, splits):
        if benchmark == "coco_stuff_171":
            reports.append(_prepare_coco(opts, split))
        elif benchmark == "ade150":
            reports.append(_prepare_ade150(opts, split))
        elif benchmark == "ade847":
            reports.append(_prepare_ade847(opts, split, None if categories is None else str(categories)))
        elif benchmark == "pc59":
            reports.append(_prepare_pc59(opts, split))
        elif benchmark == "pc459":
            reports.append(_prepare_pc459(opts, split))
        else:  # voc20 and voc20b are written together, as CAT-Seg's prepare_voc.py does
            reports.extend(_prepare_voc(opts, split))

    warnings = []
    for report in reports:
        if count_check and report.count_ok is False:
            want = " or ".join(str(e) for e in report.expected)
            warnings.append(f"{report.benchmark} {report.split}: {report.pairs} image/label pairs, the official "
                            f"count is {want}. Check that the downloads are complete and unpacked as --help shows.")
    if not count_check:
        for report in reports:
            report.expected = None
    _print_summary(benchmark, out_path, reports, warnings)
    if strict and warnings:
        raise PrepareError("image counts differ from the official ones (--strict):\n" + "\n".join(warnings))
    return PrepareReport(benchmark, out_path, reports, warnings)


def _print_summary(benchmark: str, out: Path, reports: list[SplitReport], warnings: list[str]) -> None:
    print(f"\n{benchmark}: prepared under {out}")
    for report in reports:
        print(report.summary())
        for note in report.notes:
            print(f"    note: {note}")
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

_EPILOG = """\
What to unpack under --raw (the layout of CAT-Seg's datasets/README.md; --out gets the converted files):

coco_stuff_171   (writes coco-stuff/annotations_detectron2/{train2017,val2017}/*.png, trainIds 0..170, 255)
  unzip train2017.zip -d RAW/coco-stuff/images/  -> RAW/coco-stuff/images/train2017/*.jpg
  unzip val2017.zip   -d RAW/coco-stuff/images/  -> RAW/coco-stuff/images/val2017/*.jpg
  unzip stuffthingmaps_trainval2017.zip -d RAW/coco-stuff/annotations/
                                                 -> RAW/coco-stuff/annotations/{train2017,val2017}/*.png
  from http://images.cocodataset.org/zips/ and http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/

ade150           (writes ADEChallengeData2016/annotations_detectron2/validation/*.png, label - 1, 0 -> 255)
  unzip ADEChallengeData2016.zip -d RAW/    -> RAW/ADEChallengeData2016/{images,annotations}/validation/
  from http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip

ade847           (writes ADE20K_2021_17_01/{images_detectron2,annotations_detectron2}/validation/)
  unzip ADE20K_2021_17_01.zip -d RAW/       -> RAW/ADE20K_2021_17_01/index_ade20k.pkl and images/ADE/validation/...
  from https://ade20k.csail.mit.edu/ (registration required). Also needs --categories: CAT-Seg's
  datasets/prepare_ade20k_full.py (parsed, not run) or a JSON list of {"name", "id", "trainId"}.
  Images with a short side above 512 are resized to 512 with OpenCV (cv2.resize INTER_LINEAR; labels
  INTER_NEAREST) and every image is saved with PIL's JPEG defaults, as CAT-Seg's script does.

pc59             (writes VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png, 59 classes, background 255)
  tar -xf VOCtrainval_03-May-2010.tar -C RAW/ -> RAW/VOCdevkit/VOC2010/JPEGImages/
  put trainval_merged.json into RAW/VOCdevkit/VOC2010/
  from http://host.robots.ox.ac.uk/pascal/VOC/voc2010/ and
  https://codalabuser.blob.core.windows.net/public/trainval_merged.json

pc459            (writes VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif; ignore 459)
  VOC 2010 as for pc59, then
  tar -xzf trainval.tar.gz -C RAW/VOCdevkit/VOC2010/ -> RAW/VOCdevkit/VOC2010/trainval/*.mat
  put pascalcontext_val.txt (and, optionally, labels.txt: its names are compared with the built-in list)
  into RAW/VOCdevkit/VOC2010/
  from https://www.cs.stanford.edu/~roozbeh/pascal-context/ ; pascalcontext_val.txt is in CAT-Seg's datasets/
  folder (https://github.com/cvlab-kaist/CAT-Seg/tree/main/datasets). A 0 in a LabelMap becomes 459 (ignored),
  where CAT-Seg's uint16 "LabelMap - 1" wraps it to 65535.

voc20, voc20b    (both write VOCdevkit/VOC2012/annotations_detectron2/val/*.png (0 -> 255, 1..20 -> 0..19)
                  and annotations_detectron2_bg/val/*.png (0 -> 20))
  tar -xf VOCtrainval_11-May-2012.tar -C RAW/ -> RAW/VOCdevkit/VOC2012/{JPEGImages,ImageSets/Segmentation/val.txt}
  unzip SegmentationClassAug.zip -d RAW/VOCdevkit/VOC2012/ -> RAW/VOCdevkit/VOC2012/SegmentationClassAug/*.png
  from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ ; SegmentationClassAug is linked in CAT-Seg's datasets/README.md

Images that are not converted (COCO, ADE-150, PC, VOC) are hard-linked into --out when it differs from --raw
(--images). Outputs that exist are skipped unless --overwrite. No class-name file is written: the seven
vocabularies are built in (CAT-Seg's lists). Before writing, every listed sample's raw files are looked up:
missing ones (a half-extracted download) or converted outputs older than their raw input (rerun with
--overwrite) stop the run, naming the first files. Official image counts checked at the end:
COCO val2017 5000 / train2017 118287, ADE-150 2000, ADE-847 2000, PC-59 5105, PC-459 5105 (or 5104), VOC 1449.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dcp_jax.data.prepare",
        description="Convert official benchmark downloads into the dataset layout of CAT-Seg's prepare scripts.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("--raw", required=True, help="directory holding the unpacked official downloads: the folder "
                                                     "that holds ADEChallengeData2016/, VOCdevkit/, coco-stuff/, ...")
    parser.add_argument("--out", default=None, help="dataset root to write (default: --raw, i.e. in place)")
    parser.add_argument("--split", action="append", default=None,
                        help="train and/or val (repeat or comma-separate); default: val "
                             "(train and val for coco_stuff_171)")
    parser.add_argument("--categories", default=None,
                        help="ade847 only: CAT-Seg's datasets/prepare_ade20k_full.py or a JSON list of "
                             "{name, id, trainId}")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel worker processes (default: %(default)s)")
    parser.add_argument("--images", dest="image_mode", choices=("hardlink", "symlink", "copy"), default="hardlink",
                        help="how unconverted images reach --out when it differs from --raw (default: hardlink, "
                             "copying across file systems)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--no-count-check", dest="count_check", action="store_false",
                        help="do not compare with the official image counts")
    parser.add_argument("--strict", action="store_true", help="fail when an image count differs from the official one")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args.benchmark, args.raw, args.out, splits=args.split, overwrite=args.overwrite,
                workers=args.workers, image_mode=args.image_mode, categories=args.categories,
                count_check=args.count_check, strict=args.strict, progress=args.progress)
    except (PrepareError, OSError) as err:  # OSError: e.g. an unwritable --out
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Re-import under the package name so pool workers unpickle dcp_jax.data.prepare.*, not __main__.*.
    from dcp_jax.data import prepare as _prepare_module

    sys.exit(_prepare_module.main())
