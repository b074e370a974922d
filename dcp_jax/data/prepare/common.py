"""What every benchmark's conversion shares: the error, the run's options, reading raw files (a truncated one is an
error that names it), writing outputs atomically, placing images, the per-sample label task of COCO, ADE-150 and
VOC, the worker pool, and the per-split report with the official image counts.

Per-sample tasks are top-level functions so that a multiprocessing pool can pickle them; each returns a dict of
outcome counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dcp_jax import files


class PrepareError(ValueError):
    """A raw input is missing or malformed, or (with strict=True) an image count is off: bad input, so a ValueError,
    which the command line shows as one line."""


@dataclasses.dataclass(frozen=True)
class Options:
    raw: Path
    out: Path
    overwrite: bool
    workers: int
    image_mode: str
    progress: bool


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


def lut_uint8(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def as_uint8(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"expected a single-channel 8-bit label map, got {label.dtype} of shape {label.shape}")
    return label


def read_array(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, SyntaxError) as err:
        raise PrepareError(f"cannot read {path}: {err}. The file is truncated or corrupt: download or "
                           "extract it again") from err


def read_label_png(path: Path) -> np.ndarray:
    label = read_array(path)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise PrepareError(f"{path}: expected a single-channel 8-bit label PNG, got {label.dtype} "
                           f"of shape {label.shape}")
    return label


def load_pickle(path: Path, download: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # the official index is a pickle; load only the file from the download
    except (EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise PrepareError(f"cannot read {path}: {err!r}. The file is truncated or corrupt: extract it again "
                           f"from {download}") from err


def load_json(path: Path, download: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepareError(f"cannot read {path}: {err}. The file is truncated or corrupt: download it again "
                           f"({download})") from err


def save_label(array: np.ndarray, dst: Path) -> None:
    """Atomically save a uint8 PNG or a uint16 TIFF (PIL mode I;16), as CAT-Seg's scripts do."""
    fmt = "TIFF" if dst.suffix.lower() in (".tif", ".tiff") else "PNG"
    expected = np.uint16 if fmt == "TIFF" else np.uint8
    if array.dtype != expected or array.ndim != 2:
        raise ValueError(f"{dst}: a {fmt} label must be a 2-D {np.dtype(expected).name} array, got {array.dtype}")
    files.atomic_write(dst, lambda tmp: Image.fromarray(array).save(tmp, format=fmt))


def place_image(src: Path, dst: Path, mode: str, overwrite: bool) -> str:
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


Outcome = dict


def outcome(**counts: int) -> Outcome:
    return {k: v for k, v in counts.items() if v}


def finish_image(src: Path | None, dst: Path | None, mode: str, overwrite: bool) -> Outcome:
    if src is None or dst is None:
        return {}
    if not src.is_file():
        return outcome(missing_image=1)
    return outcome(images_placed=int(place_image(src, dst, mode, overwrite) == "placed"))


def simple_label_task(task: tuple, *, converters: Sequence[Callable], mode: str, overwrite: bool) -> Outcome:
    """One label PNG -> one converted label file per converter (top level, so picklable), plus its image placed in the
    output tree."""
    src, dsts, img_src, img_dst = task
    if not overwrite and all(d.exists() for d in dsts):
        return {**finish_image(img_src, img_dst, mode, overwrite), "skipped": 1}
    if not src.is_file():
        return {"missing_raw": 1}
    out = finish_image(img_src, img_dst, mode, overwrite)
    label = read_label_png(src)
    converted = [convert(label) for convert in converters]
    written = 0
    for array, dst in zip(converted, dsts):
        if overwrite or not dst.exists():
            save_label(array, dst)
            written += 1
    return {**out, "written": 1, "files_written": written}


def map_tasks(fn: Callable, items: list, opts: Options, desc: str) -> list:
    """fn over items, in order, in opts.workers processes, with a progress bar."""
    workers = max(1, min(opts.workers, len(items)))
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            results: Iterable = map(fn, items)
        else:
            # spawn, not fork: the caller may have JAX (threads) loaded.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (8 * workers))))
        return list(tqdm(results, total=len(items), desc=desc, unit="img", disable=not opts.progress,
                         dynamic_ncols=True))


def run_tasks(fn: Callable, tasks: list, opts: Options, desc: str) -> Counter:
    counts: Counter = Counter()
    for result in map_tasks(fn, tasks, opts, desc):
        counts.update(result)
    return counts


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


def _count_pairs(ann_dir: Path, ann_ext: str, img_dir: Path, img_ext: str) -> tuple[int, int]:
    """(annotation files with an image, annotation files without one); hidden temp files are ignored."""
    if not ann_dir.is_dir():
        return 0, 0
    stems = [e.name[: -len(ann_ext)] for e in os.scandir(ann_dir)
             if e.name.endswith(ann_ext) and not e.name.startswith(".")]
    images = {e.name for e in os.scandir(img_dir)} if img_dir.is_dir() else set()
    paired = sum(stem + img_ext in images for stem in stems)
    return paired, len(stems) - paired


def split_report(benchmark: str, split: str, counts: Counter, opts: Options, ann_rel: str, ann_ext: str,
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
