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

The package: `run` (prepare: one benchmark end to end), one module per benchmark family (`coco`, `ade` for 150 and
847, `pascal_context` for 59 and 459, `voc`), `checks` (what is checked before anything is written), `common`
(what the families share), `cli` (the command line, `main(argv)`) and `__main__` (runs it). Everything public is
re-exported here.
"""

from dcp_jax.data.prepare.ade import (ADE847_IGNORE, ADE847_MAX_SIZE, ade847_lut, ade847_target_size,
                                      ade_full_class_mask, convert_ade150, convert_ade847, load_ade847_categories)
from dcp_jax.data.prepare.checks import image_problem
from dcp_jax.data.prepare.cli import main
from dcp_jax.data.prepare.coco import COCO_STUFF_171_IDS, convert_coco_stuff
from dcp_jax.data.prepare.common import OFFICIAL_COUNTS, Outcome, PrepareError, PrepareReport, SplitReport, save_label
from dcp_jax.data.prepare.pascal_context import (PC59_IDS, PC459_IGNORE, PC459_NUM_CLASSES, convert_pc59,
                                                 convert_pc459, read_pc459_labels, rle_decode, rle_string_to_counts)
from dcp_jax.data.prepare.run import BENCHMARKS, SPLITS, prepare
from dcp_jax.data.prepare.voc import convert_voc

__all__ = ["ADE847_IGNORE", "ADE847_MAX_SIZE", "BENCHMARKS", "COCO_STUFF_171_IDS", "OFFICIAL_COUNTS", "Outcome",
           "PC459_IGNORE", "PC459_NUM_CLASSES", "PC59_IDS", "PrepareError", "PrepareReport", "SPLITS", "SplitReport",
           "ade847_lut", "ade847_target_size", "ade_full_class_mask", "convert_ade150", "convert_ade847",
           "convert_coco_stuff", "convert_pc459", "convert_pc59", "convert_voc", "image_problem",
           "load_ade847_categories", "main", "prepare", "read_pc459_labels", "rle_decode", "rle_string_to_counts",
           "save_label"]
