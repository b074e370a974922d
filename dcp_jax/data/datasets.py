"""Segmentation datasets by spec string, and `python -m dcp_jax.data.datasets` to inspect, check or pack one.

A dataset is named by one spec string:

  * a benchmark name (see `BENCHMARKS`), read from a root directory: `data_root`, else
    $DETECTRON2_DATASETS, else ./datasets (`dcp_jax.data.file_datasets`);
  * `folder:PATH`, a folder dataset (layout in `FOLDER_HELP`, `dcp_jax.data.file_datasets`);
  * `tfds:NAME[:SPLIT]`, a TFDS dataset under the TFDS data_dir `data_root` (`dcp_jax.data.tfds_data`).

`open_dataset(spec, split, data_root)` returns a random-access source whose items are

    {"image": uint8 [H, W, 3] RGB, "label": int32 [H, W] (ignore -> -1), "name": str}

and whose attributes are name, split, class_names, num_label_classes, pred_to_label, ignore_label,
unseen_classes and `notes()` (see `SegSource`). This module is the one import for all of that (the names live in
`dcp_jax.data.sources` and the modules of the kinds).

`python -m dcp_jax.data.datasets SPEC --check` reads every sample and lists the bad ones;
`--pack DIR` writes the spec as a TFDS dataset (see --help).
"""

from __future__ import annotations

import sys

from absl import flags
from tqdm import tqdm

from dcp_jax import cli
from dcp_jax.data import tfds_data
from dcp_jax.data.file_datasets import (BENCHMARKS, FOLDER_HELP, VOC20B_BACKGROUND, SegDataset, read_class_list,
                                        read_meta, resolve_root)
from dcp_jax.data.sources import (DatasetError, SegSource, open_dataset, read_image, read_label, split_vocabulary,
                                  to_rgb8, vocabulary_for_split)

__all__ = ["BENCHMARKS", "FOLDER_HELP", "VOC20B_BACKGROUND", "DatasetError", "SegDataset", "SegSource",
           "open_dataset", "read_class_list", "read_image", "read_label", "read_meta", "resolve_root",
           "split_vocabulary", "to_rgb8", "vocabulary_for_split"]


# --------------------------------------------------------------------------------------------
# command line: summarise, check every sample, or pack as a TFDS dataset

_USAGE = f"""\
python -m dcp_jax.data.datasets SPEC [--split val,train] [--data-root DIR] [--check] [--pack DIR]

Open a dataset spec and print a summary; optionally read every sample (--check) or write it as a TFDS dataset
(--pack DIR, read back as tfds:NAME --data-root DIR).

specs:
  {', '.join(BENCHMARKS)}
      benchmarks in the layout CAT-Seg's datasets/prepare_*.py write (python -m dcp_jax.data.prepare
      --help shows it), under --data-root, else $DETECTRON2_DATASETS, else ./datasets
  folder:PATH  a folder dataset (below)
  tfds:NAME[:SPLIT]  a TFDS dataset (NAME may be name[/config][:version]) under the TFDS data_dir
      --data-root, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; --pack writes one

{FOLDER_HELP}

--pack DIR writes DIR/NAME/VERSION/ with TFDS's array_record files (tfds.data_source(NAME,
data_dir=DIR) reads it, without TensorFlow): images as their encoded file bytes, labels as PNG
segmentation masks (ignore 255, or 65535 above 255 classes), the vocabulary in metadata.json.
Another TFDS dataset with an image and a segmentation-mask feature needs its class list: put a
dcp_jax.json into DATA_DIR/NAME/, e.g. {{"class_names": ["wall", ...] or a built-in list name,
"ignore_label": 0, "label_offset": -1, "label_key": "annotation", "label_channel": 0}}.
"""


def main(argv=None) -> int:
    cmd = cli.Command("python -m dcp_jax.data.datasets", _USAGE, argv, positional=("SPEC",))
    f = cmd.flags
    flags.DEFINE_string("split", "val", "split(s), comma-separated", flag_values=f)
    flags.DEFINE_string("data-root", "", "benchmark root, or the TFDS data_dir for tfds: specs", flag_values=f)
    flags.DEFINE_bool("check", False, "decode every sample and list every bad one (exit status 1 when there is one)",
                      flag_values=f)
    flags.DEFINE_string("pack", "", "write the split(s) as a TFDS dataset under this directory", flag_values=f)
    flags.DEFINE_string("name", "", "--pack: TFDS dataset name (default: from the dataset's name)", flag_values=f)
    flags.DEFINE_string("version", "1.0.0", "--pack: TFDS dataset version", flag_values=f)
    flags.DEFINE_bool("skip-bad", False, "--pack: leave unreadable samples out (listed) instead of stopping at the "
                      "first", flag_values=f)
    args = cmd.parse()
    (spec,) = cmd.args
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    data_root = args["data-root"].value or None

    def body() -> int:
        if args.pack:
            pack_args = dict(data_root=data_root, name=args.name or None, version=args.version)
            tfds_data.check_pack(spec, splits, args.pack, **pack_args)  # before --check reads every sample
        status = 0
        for split in splits:
            status |= _summarise(spec, split, data_root, args.check)
        if args.pack:
            report = tfds_data.pack(spec, splits, args.pack, skip_bad=args["skip-bad"].value, **pack_args)
            for line in report.lines():
                print(line)
        return status

    return cmd.run(body, errors=cli.INPUT_ERRORS)


def _summarise(spec: str, split: str, data_root: str | None, check: bool) -> int:
    ds = open_dataset(spec, split, data_root)
    unseen = f", {len(ds.unseen_classes)} unseen" if ds.unseen_classes else ""
    print(f"{ds.name} [{ds.split}]: {len(ds)} samples, {len(ds.class_names)} class names{unseen}, "
          f"{ds.num_label_classes} scored classes, ignore {ds.ignore_label}")
    if not check:
        return 0
    bad = []
    for i in tqdm(range(len(ds)), desc=f"checking {split}"):
        try:
            ds[i]
        except DatasetError as e:
            bad.append(str(e))
    print("\n".join(bad) if bad else "every sample reads cleanly")
    print(f"{len(bad)} bad of {len(ds)}")
    for note in ds.notes():
        print(f"note: {note}")
    return int(bool(bad))


if __name__ == "__main__":
    sys.exit(main())
