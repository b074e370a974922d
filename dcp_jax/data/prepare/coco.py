"""COCO-Stuff 171 (CAT-Seg's prepare_coco_stuff.py): stuffthingmaps label maps -> trainIds 0..170, images linked."""

from __future__ import annotations

import functools

import numpy as np

from dcp_jax.data.prepare.checks import precheck, require, simple_samples
from dcp_jax.data.prepare.common import (OFFICIAL_COUNTS, Options, PrepareError, SplitReport, as_uint8, lut_uint8,
                                         run_tasks, simple_label_task, split_report)


# COCO ids 1..90 that are not categories (detectron2's COCO_CATEGORIES skips them); stuff ids are 92..182.
_COCO_UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_STUFF_171_IDS = tuple([i for i in range(1, 91) if i not in _COCO_UNUSED_THING_IDS] + list(range(92, 183)))

# stuffthingmaps pixels hold COCO id - 1 (255 = unlabeled).
_COCO_LUT = lut_uint8({coco_id - 1: train_id for train_id, coco_id in enumerate(COCO_STUFF_171_IDS)})


def convert_coco_stuff(label: np.ndarray) -> np.ndarray:
    """stuffthingmaps PNG (COCO id - 1) -> trainIds 0..170 (things 0-79, stuff 80-170), everything else 255."""
    return _COCO_LUT[as_uint8(label)]


_COCO_STUFF_DL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip"


def prepare_coco(opts: Options, split: str) -> SplitReport:
    split_dir = {"train": "train2017", "val": "val2017"}[split]
    only_hint = " (to prepare only val2017, pass --split val)" if split == "train" else ""
    images_dl = f"http://images.cocodataset.org/zips/{split_dir}.zip, unzipped into coco-stuff/images/"
    img_src = require(opts.raw / "coco-stuff/images" / split_dir, f"the COCO {split_dir} images{only_hint}",
                      images_dl, is_dir=True, raw=opts.raw)
    ann_src = require(opts.raw / "coco-stuff/annotations" / split_dir,
                      f"the COCO-Stuff {split_dir} label maps{only_hint}",
                      f"stuffthingmaps_trainval2017.zip ({_COCO_STUFF_DL}), unzipped into coco-stuff/annotations/",
                      is_dir=True, raw=opts.raw)
    ann_rel, img_rel = f"coco-stuff/annotations_detectron2/{split_dir}", f"coco-stuff/images/{split_dir}"
    tasks = [(src, [opts.out / ann_rel / src.name], img_src / f"{src.stem}.jpg", opts.out / img_rel / f"{src.stem}.jpg")
             for src in sorted(ann_src.glob("*.png"))]
    if not tasks:
        raise PrepareError(f"no .png label maps in {ann_src}: unzip stuffthingmaps_trainval2017.zip there")
    precheck("coco_stuff_171", split, simple_samples(tasks), opts, f"{split_dir}.zip ({images_dl})")
    fn = functools.partial(simple_label_task, converters=(convert_coco_stuff,), mode=opts.image_mode,
                           overwrite=opts.overwrite)
    counts = run_tasks(fn, tasks, opts, f"coco_stuff_171 {split_dir}")
    return split_report("coco_stuff_171", split, counts, opts, ann_rel, ".png", img_rel,
                        OFFICIAL_COUNTS.get(("coco_stuff_171", split)))
