"""Pascal Context 59 (CAT-Seg's prepare_pascal_context_59.py: the RLE segments of trainval_merged.json -> 59 classes)
and 459 (prepare_pascal_context_459.py: the .mat LabelMaps - 1, a 0 becoming the ignore value 459), images linked."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dcp_jax.data.prepare.checks import Sample, compare_names, precheck, require
from dcp_jax.data.prepare.common import (OFFICIAL_COUNTS, Options, Outcome, PrepareError, SplitReport, finish_image,
                                         load_json, run_tasks, save_label, split_report)


# The 59 Pascal-Context classes as ids of the 459-class labels.txt, sorted (= alphabetical order of pc59 names).
PC59_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
            144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349,
            354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
PC459_NUM_CLASSES = 459
PC459_IGNORE = 459


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


_VOC2010_DL = "VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/)"
_PC59_DL = "trainval_merged.json (https://codalabuser.blob.core.windows.net/public/trainval_merged.json)"
_PC459_DL = "trainval.tar.gz and labels.txt (https://www.cs.stanford.edu/~roozbeh/pascal-context/)"
_PC459_LIST_DL = ("pascalcontext_val.txt, shipped in CAT-Seg's datasets/ folder "
                  "(https://github.com/cvlab-kaist/CAT-Seg/tree/main/datasets)")
_PC459_COUNT_NOTE = ("PC-459 val has 5105 ids in pascalcontext_val.txt; CAT-Seg#24's evaluation log reports 5104, "
                     "so both counts are accepted")


def _pc59_task(task: tuple, *, mode: str, overwrite: bool) -> Outcome:
    image_info, segments, dst, img_src, img_dst = task
    out = finish_image(img_src, img_dst, mode, overwrite)
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
        return {**finish_image(img_src, img_dst, mode, overwrite), "skipped": 1}
    if not src.is_file():
        return {"missing_raw": 1}  # CAT-Seg skips ids without a .mat file too
    out = finish_image(img_src, img_dst, mode, overwrite)
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


def _voc2010_root(opts: Options) -> Path:
    root = require(opts.raw / "VOCdevkit/VOC2010", "the PASCAL VOC 2010 root", _VOC2010_DL, is_dir=True,
                   raw=opts.raw)
    require(root / "JPEGImages", "the VOC 2010 images", _VOC2010_DL, is_dir=True)
    return root


def prepare_pc59(opts: Options, split: str) -> SplitReport:
    root = _voc2010_root(opts)
    json_path = require(root / "trainval_merged.json", "the Pascal-Context annotations", _PC59_DL)
    data = load_json(json_path, _PC59_DL)
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
    precheck("pc59", split, [Sample((json_path,), img, (dst,), img_dst) for _, _, dst, img, img_dst in tasks], opts,
             _VOC2010_DL)
    fn = functools.partial(_pc59_task, mode=opts.image_mode, overwrite=opts.overwrite)
    counts = run_tasks(fn, tasks, opts, f"pc59 {split}")
    return split_report("pc59", split, counts, opts, ann_rel, ".png", img_rel, OFFICIAL_COUNTS.get(("pc59", split)))


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


def prepare_pc459(opts: Options, split: str) -> SplitReport:
    root = _voc2010_root(opts)
    mat_dir = require(root / "trainval", "the Pascal-Context .mat label maps", _PC459_DL, is_dir=True)
    val_list = require(root / "pascalcontext_val.txt", "the PC-459 validation id list", _PC459_LIST_DL)
    ids = [line.strip() for line in val_list.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    notes = [_PC459_COUNT_NOTE]
    if (root / "labels.txt").is_file():  # optional: only compared (CAT-Seg spells the names without spaces)
        notes += compare_names("pc459", read_pc459_labels(root / "labels.txt"), str(root / "labels.txt"),
                               normalize=lambda n: n.replace(" ", "").lower())
    ann_rel, img_rel = "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", "VOCdevkit/VOC2010/JPEGImages"
    tasks = [(mat_dir / f"{i}.mat", opts.out / ann_rel / f"{i}.tif", root / "JPEGImages" / f"{i}.jpg",
              opts.out / img_rel / f"{i}.jpg") for i in ids]
    # One id without a .mat is tolerated (CAT-Seg skips it; CAT-Seg#24's log counts 5104 of 5105).
    notes += precheck("pc459", split, [Sample((mat,), img, (dst,), img_dst) for mat, dst, img, img_dst in tasks],
                      opts, f"trainval.tar.gz ({_PC459_DL})", allowed_missing=1, image_download=_VOC2010_DL)
    fn = functools.partial(_pc459_task, mode=opts.image_mode, overwrite=opts.overwrite)
    counts = run_tasks(fn, tasks, opts, "pc459 val")
    if counts.get("pc459_zero_pixels"):
        notes.append(f"{counts['pc459_zero_pixels']} pixels in {counts['pc459_zero_files']} LabelMaps were 0 (or "
                     f"above {PC459_NUM_CLASSES}); they were set to the ignore value {PC459_IGNORE}, where "
                     f"CAT-Seg's uint16 'LabelMap - 1' would wrap 0 to 65535")
    return split_report("pc459", split, counts, opts, ann_rel, ".tif", img_rel, OFFICIAL_COUNTS[("pc459", split)],
                        notes)
