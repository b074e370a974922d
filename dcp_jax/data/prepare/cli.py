"""The command line of `prepare`: `main(argv)`, which `python -m dcp_jax.data.prepare BENCHMARK --raw DIR ...` runs
(`__main__`)."""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from dcp_jax import cli
from dcp_jax.data.prepare.run import BENCHMARKS, prepare

_USAGE = f"""\
python -m dcp_jax.data.prepare BENCHMARK --raw DIR [--out DIR] [--split val] [--categories FILE] [--overwrite]

Convert official benchmark downloads into the dataset layout of CAT-Seg's prepare scripts.
BENCHMARK is one of {", ".join(BENCHMARKS)}.

"""


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


def main(argv: Sequence[str] | None = None) -> int:
    cmd = cli.Command("python -m dcp_jax.data.prepare", _USAGE + _EPILOG, argv, positional=("BENCHMARK",))
    f = cmd.flags
    flags.DEFINE_string("raw", None, "directory holding the unpacked official downloads: the folder that holds "
                        "ADEChallengeData2016/, VOCdevkit/, coco-stuff/, ...", flag_values=f)
    flags.DEFINE_string("out", None, "dataset root to write (default: --raw, i.e. in place)", flag_values=f)
    flags.DEFINE_multi_string("split", None, "train and/or val (repeat or comma-separate); default: val (train and "
                              "val for coco_stuff_171)", flag_values=f)
    flags.DEFINE_string("categories", None, "ade847 only: CAT-Seg's datasets/prepare_ade20k_full.py or a JSON list "
                        "of {name, id, trainId}", flag_values=f)
    flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "parallel worker processes", flag_values=f)
    flags.DEFINE_enum("images", "hardlink", ["hardlink", "symlink", "copy"], "how unconverted images reach --out "
                      "when it differs from --raw (hardlink copies across file systems)", flag_values=f)
    flags.DEFINE_bool("overwrite", False, "replace outputs that already exist", flag_values=f)
    flags.DEFINE_bool("count-check", True, "compare the image counts with the official ones (--nocount-check: "
                      "do not)", flag_values=f)
    flags.DEFINE_bool("strict", False, "fail when an image count differs from the official one", flag_values=f)
    flags.DEFINE_bool("progress", True, "show progress bars (--noprogress: hide them)", flag_values=f)
    cmd.required("raw")
    args = cmd.parse()
    (benchmark,) = cmd.args

    def body():  # prepare prints its summary; a PrepareError or an OSError (an unwritable --out) is one line
        prepare(benchmark, args.raw, args.out, splits=args.split, overwrite=args.overwrite, workers=args.workers,
                image_mode=args.images, categories=args.categories, count_check=args["count-check"].value,
                strict=args.strict, progress=args.progress)

    return cmd.run(body, errors=cli.INPUT_ERRORS)
