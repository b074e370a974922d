"""Pascal VOC 2012 (CAT-Seg's prepare_voc.py): SegmentationClassAug -> voc20 (background ignored) and voc20b
(background 20), written together, images linked."""

from __future__ import annotations

import functools

import numpy as np

from dcp_jax.data.prepare.checks import precheck, require, simple_samples
from dcp_jax.data.prepare.common import (OFFICIAL_COUNTS, Options, SplitReport, as_uint8, lut_uint8, run_tasks,
                                         simple_label_task, split_report)


_VOC_LUT = lut_uint8({0: 255, **{i: i - 1 for i in range(1, 21)}, 255: 255})
_VOC_BG_LUT = lut_uint8({0: 20, **{i: i - 1 for i in range(1, 21)}, 255: 255})


def convert_voc(label: np.ndarray, background: bool = False) -> np.ndarray:
    """SegmentationClassAug PNG -> 1..20 to 0..19; 0 to 255 (voc20) or 20 (voc20b); anything else 255."""
    return (_VOC_BG_LUT if background else _VOC_LUT)[as_uint8(label)]


_VOC2012_DL = "VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)"
_VOC_AUG_DL = ("SegmentationClassAug.zip (the SBD-augmented VOC labels used by DeepLab; see CAT-Seg's "
               "datasets/README.md)")


def prepare_voc(opts: Options, split: str) -> list[SplitReport]:
    root = require(opts.raw / "VOCdevkit/VOC2012", "the PASCAL VOC 2012 root", _VOC2012_DL, is_dir=True,
                   raw=opts.raw)
    img_src = require(root / "JPEGImages", "the VOC 2012 images", _VOC2012_DL, is_dir=True)
    aug = require(root / "SegmentationClassAug", "the VOC label PNGs", _VOC_AUG_DL, is_dir=True)
    id_list = require(root / "ImageSets/Segmentation" / f"{split}.txt", f"the VOC {split} id list", _VOC2012_DL)
    ids = [line.strip() for line in id_list.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    ann_rel = f"VOCdevkit/VOC2012/annotations_detectron2/{split}"
    bg_rel = f"VOCdevkit/VOC2012/annotations_detectron2_bg/{split}"
    img_rel = "VOCdevkit/VOC2012/JPEGImages"
    tasks = [(aug / f"{i}.png", [opts.out / ann_rel / f"{i}.png", opts.out / bg_rel / f"{i}.png"],
              img_src / f"{i}.jpg", opts.out / img_rel / f"{i}.jpg") for i in ids]
    precheck("voc20/voc20b", split, simple_samples(tasks), opts, f"{_VOC2012_DL} and {_VOC_AUG_DL}",
             image_download=_VOC2012_DL)
    both = (convert_voc, functools.partial(convert_voc, background=True))  # voc20 and voc20b
    fn = functools.partial(simple_label_task, converters=both, mode=opts.image_mode, overwrite=opts.overwrite)
    counts = run_tasks(fn, tasks, opts, f"voc {split}")
    expected = OFFICIAL_COUNTS.get(("voc", split))
    return [split_report("voc20", split, counts, opts, ann_rel, ".png", img_rel, expected),
            split_report("voc20b", split, counts, opts, bg_rel, ".png", img_rel, expected)]
