"""ADE20K-150 (CAT-Seg's prepare_ade20k_150.py: label - 1, images linked) and ADE20K-847 (prepare_ade20k_full.py:
object ids -> the 847 trainIds of CAT-Seg's table, images and labels resized with OpenCV as there)."""

from __future__ import annotations

import ast
import functools
import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from dcp_jax import files
from dcp_jax.data.prepare.checks import Sample, compare_names, precheck, require, simple_samples
from dcp_jax.data.prepare.common import (OFFICIAL_COUNTS, Options, Outcome, PrepareError, SplitReport, as_uint8,
                                         load_pickle, outcome, read_array, run_tasks, save_label, simple_label_task,
                                         split_report)


ADE847_IGNORE = 65535
ADE847_MAX_SIZE = 512


def convert_ade150(label: np.ndarray) -> np.ndarray:
    """ADEChallengeData2016 annotation -> label - 1 in uint8, so 0 ("other") wraps to 255 (CAT-Seg)."""
    return as_uint8(label) - np.uint8(1)


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


def ade847_target_size(height: int, width: int, max_size: int = ADE847_MAX_SIZE) -> tuple[int, int] | None:
    """(h, w) after prepare_ade20k_full.py's short-side-to-512 rule, or None when the image is kept as is."""
    if width >= height > max_size:
        return max_size, round(width / float(height) * max_size)
    if height >= width > max_size:
        return round(height / float(width) * max_size), max_size
    return None


_ADE150_DL = "ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)"
_ADE847_DL = "ADE20K_2021_17_01.zip (https://ade20k.csail.mit.edu/, registration required)"
_ADE847_CATEGORIES_HELP = (
    "ADE-847 needs the table that maps ADE20K object ids to the 847 trainIds, which CAT-Seg hard-codes as "
    "ADE20K_SEM_SEG_FULL_CATEGORIES in datasets/prepare_ade20k_full.py "
    "(https://github.com/cvlab-kaist/CAT-Seg/blob/main/datasets/prepare_ade20k_full.py; the same list is in "
    "cat_seg/data/datasets/register_ade20k_847.py and in Mask2Former's datasets/prepare_ade20k_full.py). "
    "Pass that .py file as --categories (it is parsed, not run) or a JSON list of {\"name\", \"id\", \"trainId\"}. "
    "It cannot be rebuilt from index_ade20k.pkl: the trainIds follow a pixel-frequency order computed by the "
    "authors of the benchmark, which the index does not record.")


def prepare_ade150(opts: Options, split: str) -> SplitReport:
    split_dir = {"train": "training", "val": "validation"}[split]
    root = require(opts.raw / "ADEChallengeData2016", "the ADE20K-150 root", _ADE150_DL, is_dir=True, raw=opts.raw)
    img_src = require(root / "images" / split_dir, f"the {split_dir} images", _ADE150_DL, is_dir=True)
    ann_src = require(root / "annotations" / split_dir, f"the {split_dir} annotations", _ADE150_DL, is_dir=True)
    ann_rel = f"ADEChallengeData2016/annotations_detectron2/{split_dir}"
    img_rel = f"ADEChallengeData2016/images/{split_dir}"
    tasks = [(src, [opts.out / ann_rel / src.name], img_src / f"{src.stem}.jpg", opts.out / img_rel / f"{src.stem}.jpg")
             for src in sorted(ann_src.glob("*.png"))]
    if not tasks:
        raise PrepareError(f"no .png annotations in {ann_src}: unzip {_ADE150_DL} under --raw")
    precheck("ade150", split, simple_samples(tasks), opts, _ADE150_DL)
    fn = functools.partial(simple_label_task, converters=(convert_ade150,), mode=opts.image_mode,
                           overwrite=opts.overwrite)
    counts = run_tasks(fn, tasks, opts, f"ade150 {split_dir}")
    return split_report("ade150", split, counts, opts, ann_rel, ".png", img_rel,
                        OFFICIAL_COUNTS.get(("ade150", split)))


def load_ade847_categories(path: str | os.PathLike) -> list[dict]:
    """Read the ADE-847 table: a JSON list of {"name", "id", "trainId"}, or a .py file that assigns
    ADE20K_SEM_SEG_FULL_CATEGORIES (CAT-Seg's prepare_ade20k_full.py; parsed with ast, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"--categories {path}: no such file. {_ADE847_CATEGORIES_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PrepareError(f"cannot read --categories {path}: {err}. {_ADE847_CATEGORIES_HELP}") from err
    if path.suffix == ".py":
        categories = None
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as err:
            raise PrepareError(f"cannot parse {path}: {err}. Download prepare_ade20k_full.py again") from err
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "ADE20K_SEM_SEG_FULL_CATEGORIES" for t in node.targets):
                try:
                    categories = ast.literal_eval(node.value)
                except ValueError as err:  # computed, not written out
                    raise PrepareError(f"{path}: ADE20K_SEM_SEG_FULL_CATEGORIES is not a literal list ({err}). "
                                       f"{_ADE847_CATEGORIES_HELP}") from err
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
    class_mask = ade_full_class_mask(read_array(seg_src))
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
    return outcome(written=1, resized=int(size is not None))


def prepare_ade847(opts: Options, split: str, categories_path: str | None) -> SplitReport:
    split_dir = {"train": "training", "val": "validation"}[split]
    root = require(opts.raw / "ADE20K_2021_17_01", "the ADE20K full dataset root", _ADE847_DL, is_dir=True,
                   raw=opts.raw)
    index_path = require(root / "index_ade20k.pkl", "the ADE20K index", _ADE847_DL)
    if categories_path is None:
        raise PrepareError(_ADE847_CATEGORIES_HELP)
    categories = load_ade847_categories(categories_path)
    index = load_pickle(index_path, _ADE847_DL)
    if not isinstance(index, dict) or not {"filename", "folder"} <= index.keys():
        raise PrepareError(f"{index_path}: expected a dict with 'filename' and 'folder' lists; extract it again "
                           f"from {_ADE847_DL}")
    notes = compare_names("ade847", [c["name"] for c in categories], f"--categories {categories_path}")
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
    precheck("ade847", split, [Sample((img, seg), None, (img_dst, ann_dst)) for img, seg, img_dst, ann_dst in tasks],
             opts, _ADE847_DL)
    fn = functools.partial(_ade847_task, lut=ade847_lut(categories), overwrite=opts.overwrite)
    counts = run_tasks(fn, tasks, opts, f"ade847 {split_dir}")
    report = split_report("ade847", split, counts, opts, ann_rel, ".tif", img_rel,
                          OFFICIAL_COUNTS.get(("ade847", split)), notes)
    if counts.get("resized"):
        report.notes.append(f"{counts['resized']} images had a short side above {ADE847_MAX_SIZE} and were resized")
    return report
