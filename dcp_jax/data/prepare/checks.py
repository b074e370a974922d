"""The checks every benchmark runs on the unpacked downloads before anything is written.

`require` names a missing folder or file with its download (and where --raw should point when it is one level
off); `precheck` looks up every listed sample's raw files: a half-extracted download, a directory where a file
belongs, converted outputs older than their raw input (without --overwrite) and raw images that cannot be decoded
(a truncated JPEG would otherwise be linked or copied on unseen) stop the run naming the first file.
`compare_names` notes where class names in the raw data differ from the built-in list.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from PIL import Image

from dcp_jax.data import classnames
from dcp_jax.data.prepare.common import Options, PrepareError, map_tasks


def require(path: Path, what: str, download: str, is_dir: bool = False, raw: Path | None = None) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        kind = "directory" if is_dir else "file"
        hint = raw_level_hint(raw, path) if raw is not None else ""
        raise PrepareError(f"missing {kind} {path}: {what}. {hint or f'It comes from {download}. '}"
                           f"Run `python -m dcp_jax.data.prepare --help` for the expected layout.")
    return path


def raw_level_hint(raw: Path, path: Path) -> str:
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
class Sample:
    """What the pre-check looks at for one listed sample."""

    raws: tuple[Path, ...]  # raw files the outputs are converted from
    image: Path | None  # the raw image placed unchanged (None: the image is converted: raws[0])
    outputs: tuple[Path, ...]  # converted files
    image_out: Path | None = None  # where `image` is placed

    def pending(self, overwrite: bool) -> bool:
        """Whether this run writes or places anything for the sample."""
        return overwrite or not all(p.exists() for p in (*self.outputs, *([self.image_out] if self.image_out else [])))


def simple_samples(tasks: list) -> list[Sample]:
    """The samples of (raw label, outputs, raw image, placed image) tasks: one label converted, its image placed."""
    return [Sample((src,), img_src, tuple(dsts), img_dst) for src, dsts, img_src, img_dst in tasks]


def image_problem(path: Path) -> str | None:
    """Why the image at `path` cannot be decoded (truncated, corrupt), or None. JPEGs decode at 1/8 scale, which
    still reads every byte."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return str(err)
    return None


def precheck(benchmark: str, split: str, samples: Sequence[Sample], opts: Options, download: str,
             allowed_missing: int = 0, image_download: str | None = None) -> list[str]:
    """Stop before writing anything when raw files are missing (a half-extracted download) or are directories, when
    converted outputs are older than their raw input and would be kept (no --overwrite), or when a raw image this
    run converts or places cannot be decoded (a truncated download: linked or copied, it would pass on unseen).

    Returns notes; up to `allowed_missing` samples without raw files are tolerated and noted.
    """
    missing, stale, images = [], [], []
    for sample in samples:
        raws = (*sample.raws, *([sample.image] if sample.image else []))
        folder = next((p for p in raws if p.is_dir()), None)
        if folder is not None:
            raise PrepareError(f"{folder} is a directory, not a file: move it out of {folder.parent}. Nothing of "
                               f"{split} was written.")
        absent = [p for p in raws if not p.is_file()]
        if absent:
            missing.append(absent[0])
            continue
        if not opts.overwrite and all(p.exists() for p in sample.outputs):
            newest_raw = max(p.stat().st_mtime for p in sample.raws)
            oldest = min(sample.outputs, key=lambda p: p.stat().st_mtime)
            if newest_raw > oldest.stat().st_mtime:
                stale.append((oldest, max(sample.raws, key=lambda p: p.stat().st_mtime)))
        if sample.pending(opts.overwrite):
            images.append(sample.image or sample.raws[0])
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
    problems = map_tasks(image_problem, images, opts, f"checking {benchmark} {split} images")
    bad = sorted((str(path), problem) for path, problem in zip(images, problems) if problem)
    if bad:
        path, problem = bad[0]
        raise PrepareError(f"cannot read {path}: {problem}. The image is truncated or corrupt: extract it again from "
                           f"{image_download or download} ({len(bad)} of {len(images)} {benchmark} {split} images "
                           f"cannot be read). Nothing of {split} was written.")
    return [f"{len(missing)} listed sample(s) have no raw file ({missing[0]}) and are skipped, as CAT-Seg does"
            ] if missing else []


def compare_names(builtin: str, found: Sequence[str], source: str, normalize=lambda n: n) -> list[str]:
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
