"""One benchmark end to end: `prepare(benchmark, raw, out, ...)` checks the arguments, converts each split with its
family's module, compares the image counts with the official ones and prints the summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from dcp_jax.data.prepare.ade import prepare_ade150, prepare_ade847
from dcp_jax.data.prepare.coco import prepare_coco
from dcp_jax.data.prepare.common import Options, PrepareError, PrepareReport, SplitReport
from dcp_jax.data.prepare.pascal_context import prepare_pc59, prepare_pc459
from dcp_jax.data.prepare.voc import prepare_voc


BENCHMARKS = ("coco_stuff_171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b")

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


def normalize_splits(benchmark: str, splits: Sequence[str] | str | None) -> list[str]:
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
        raise PrepareError(f"--raw {raw_path} is not a directory; give the folder that holds the unpacked downloads "
                           "(`python -m dcp_jax.data.prepare --help` shows the layout)")
    out_path = raw_path if out is None else Path(out).expanduser().absolute()
    opts = Options(raw_path, out_path, overwrite, max(1, int(workers)), image_mode, progress)

    reports: list[SplitReport] = []
    for split in normalize_splits(benchmark, splits):
        if benchmark == "coco_stuff_171":
            reports.append(prepare_coco(opts, split))
        elif benchmark == "ade150":
            reports.append(prepare_ade150(opts, split))
        elif benchmark == "ade847":
            reports.append(prepare_ade847(opts, split, None if categories is None else str(categories)))
        elif benchmark == "pc59":
            reports.append(prepare_pc59(opts, split))
        elif benchmark == "pc459":
            reports.append(prepare_pc459(opts, split))
        else:  # voc20 and voc20b are written together, as CAT-Seg's prepare_voc.py does
            reports.extend(prepare_voc(opts, split))

    warnings = []
    for report in reports:
        if count_check and report.count_ok is False:
            want = " or ".join(str(e) for e in report.expected)
            warnings.append(f"{report.benchmark} {report.split}: {report.pairs} image/label pairs, the official "
                            f"count is {want}. Check that the downloads are complete and unpacked as --help shows.")
    if not count_check:
        for report in reports:
            report.expected = None
    print_summary(benchmark, out_path, reports, warnings)
    if strict and warnings:
        raise PrepareError("image counts differ from the official ones (--strict): " + " ".join(warnings))
    return PrepareReport(benchmark, out_path, reports, warnings)


def print_summary(benchmark: str, out: Path, reports: list[SplitReport], warnings: list[str]) -> None:
    print(f"\n{benchmark}: prepared under {out}")
    for report in reports:
        print(report.summary())
        for note in report.notes:
            print(f"    note: {note}")
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
