r"""Segment your own images with your own classes.

  python -m dcp_jax.predict --workdir runs/b16 --image photo.jpg --classes "cat, dog, grass" --out-dir out/
  python -m dcp_jax.predict --workdir runs/b16 --image photos/ --classes-file classes.txt --out-dir out/
  python -m dcp_jax.predict --zero-shot ~/models/clip-vit-base-patch16 --image photo.jpg --classes "cat, dog" \
      --out-dir out/ [--config configs/dcp_vitb16_coco_stuff.py]

For each image it writes <stem>_labels.png (class ids; 16-bit when the vocabulary has more than 255
classes), <stem>_overlay.png (colour overlay with a legend of the classes present) and <stem>.json
(the classes present with their pixel fractions, and how many classes category selection chose and
how many of those did not fit eval.num_slots: a warning names each image that lost some).
--classes separates classes with commas; use --classes-file (one class per line, or a JSON list)
for names with synonyms ("building, edifice").
An image that cannot be read is named and skipped; the others are still written, and the exit
status is then 1. The inference path is the evaluator's (dcp_jax.segmenter), so both give the same
labels. The workdir's config applies, with any --config.KEY=VALUE overrides (e.g.
--config.eval.mode=whole).
"""

from __future__ import annotations

import collections
import json
import stat
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dcp_jax import cli, files, runtime, visualize, vocabulary
from dcp_jax.data import datasets as datasets_lib
from dcp_jax.segmenter import Segmenter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_classes(classes: str | None, classes_file: str | None) -> list[str]:
    """The vocabulary from --classes ("a, b, c") or --classes-file (one class per line, or a JSON list), read by
    the rules every vocabulary follows (dcp_jax/vocabulary.py)."""
    if bool(classes) == bool(classes_file):
        raise ValueError("give exactly one of --classes \"cat, dog\" or --classes-file FILE")
    if classes:
        return vocabulary.parse(classes, where="--classes")
    return vocabulary.read_file(classes_file, where="--classes-file")


def list_images(image: str) -> list[Path]:
    """--image: a file, or a folder's files with an image suffix. Anything that is not a regular file is refused
    before any work, naming it: a FIFO named x.png would block the read forever, a symlink loop would fail
    deep inside."""
    path = Path(image)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"{path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        for p in found:
            _check_regular_file(p)
        counts = collections.Counter(p.stem for p in found)
        clashes = sorted(stem for stem, n in counts.items() if n > 1)
        if clashes:  # outputs are named by stem: a.jpg and a.png would overwrite each other
            raise ValueError(f"{path} holds several images with the same name stem {clashes[:10]}; "
                             "rename them or predict them separately")
        return found
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"--image {path}: no such file or directory")
    _check_regular_file(path)
    return [path]


def _check_regular_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as e:  # a symlink loop, a dangling link
        raise ValueError(f"--image: {path} cannot be read ({e.strerror or e}); remove or fix it") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise ValueError(f"--image: {path} is {kind}; predict reads image files only: move it out of the folder")


def check_out_dir(out_dir: Path, paths: list[Path]) -> None:
    """Refuse an output folder that holds the input images (outputs named by stem would mix with them and
    could overwrite a user's file), and one that cannot be written, before any inference (nothing is created)."""
    out = out_dir.expanduser().resolve()
    if any(p.resolve().parent == out for p in paths):
        raise ValueError(f"--out-dir {out_dir} is the folder of the input images: the outputs "
                         "(<stem>_labels.png, <stem>_overlay.png, <stem>.json) would mix with them and could "
                         "overwrite your files; choose another directory")
    files.check_writable_dir(out, "--out-dir")


WRITTEN_BY = "dcp_jax.predict"  # in every <stem>.json predict writes: the outputs it may replace on a rerun
_LEGACY_KEYS = {"image", "height", "width", "classes", "vocabulary", "zero_shot", "step"}  # before the marker


def output_names(path: Path) -> list[str]:
    """The files predict writes for an input image, in --out-dir."""
    return [f"{path.stem}_labels.png", f"{path.stem}_overlay.png", f"{path.stem}.json"]


def written_by_predict(summary_file: Path) -> bool:
    """Whether `summary_file` is a <stem>.json that predict wrote (its marker, or its keys before the marker)."""
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(summary, dict) and (summary.get("written_by") == WRITTEN_BY or set(summary) == _LEGACY_KEYS)


def check_outputs_free(out_dir: Path, paths: list[Path]) -> None:
    """Before any inference: predict never replaces a file it did not write. An image's outputs that exist
    are replaced only where its <stem>.json says predict wrote them (a rerun); otherwise a one-line error
    names the first such file."""
    for path in paths:
        names = output_names(path)
        present = [out_dir / n for n in names if (out_dir / n).exists() or (out_dir / n).is_symlink()]
        if present and not written_by_predict(out_dir / names[-1]):
            raise FileExistsError(f"--out-dir {out_dir}: {present[0]} exists and was not written by dcp_jax.predict "
                                  f"(for {path.name} it writes {', '.join(names)}); predict never replaces a file "
                                  "it did not write: move it, or choose another --out-dir")


def predict_files(segmenter: Segmenter, paths: list[Path], class_names: list[str], out_dir: Path
                  ) -> tuple[list[dict], list[str]]:
    """Segment each file and write its three outputs. Returns (per-image summaries, one error line per
    unreadable image); an unreadable image does not stop the others."""
    segmenter.set_vocabulary(class_names)
    summaries, errors = [], []
    for path in tqdm(paths, desc="predict", unit="img", disable=len(paths) < 2):
        try:
            image = datasets_lib.read_image(path)
        except datasets_lib.DatasetError as e:
            errors.append(str(e))
            continue
        labels = segmenter.segment([image])[0]
        labels_png, overlay_png, summary_json = (out_dir / n for n in output_names(path))
        visualize.save_label_png(labels, labels_png, len(class_names))
        visualize.save_png(visualize.overlay(image, labels, class_names), overlay_png)
        summary = summary_of(segmenter, str(path), labels, class_names)
        files.write_json(summary_json, summary)
        summaries.append(summary)
    return summaries, errors


def summary_of(segmenter: Segmenter, image: str, labels: np.ndarray, class_names: list[str]) -> dict:
    """<stem>.json for the image the segmenter ran last (one image per call; the page's download too): the
    classes present, and the selection as evaluate counts it: the classes selected and those beyond the slot cap
    (None for zero-shot: no selection)."""
    slots = segmenter.last_slots
    return {"written_by": WRITTEN_BY, "image": image, "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "classes": visualize.class_summary(labels, class_names), "vocabulary": class_names,
            "zero_shot": segmenter.zero_shot, "step": segmenter.step,
            "selected_classes": None if slots is None else int(slots["selected"]),
            "dropped_classes": None if slots is None else int(slots["dropped"][0]),
            "num_slots": int(segmenter.config.eval.num_slots)}


def dropped_warning(summary: dict) -> str:
    """The line predict prints for an image whose selected classes did not all fit eval.num_slots."""
    return (f"[dcp_jax.predict] warning: {summary['image']}: {summary['dropped_classes']} of the "
            f"{summary['selected_classes']} classes selected were not decoded, beyond "
            f"eval.num_slots={summary['num_slots']} (those with the fewest patch votes); they cannot appear in "
            "its labels. Raise --config.eval.num_slots (0 = every class) to decode them.")


def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.predict", __doc__, argv, config=cli.default_config(),
                      config_help="config file instead of WORKDIR/config.json; with --zero-shot it sets the CLIP "
                                  "input size and the test-time protocol (default: the ViT-B/16 recipe)")
    f = cmd.flags
    flags.DEFINE_string("workdir", None, "trained run directory (its latest checkpoint is used)", flag_values=f)
    flags.DEFINE_string("zero-shot", None, "use the zero-shot CLIP baseline of this CLIP checkpoint instead of a "
                        "trained workdir", flag_values=f)
    flags.DEFINE_string("image", None, "an image file or a directory of images", flag_values=f)
    flags.DEFINE_string("classes", None, 'comma-separated class names, e.g. "cat, dog, grass"', flag_values=f)
    flags.DEFINE_string("classes-file", None, "a file of class names: one per line, or a JSON list", flag_values=f)
    flags.DEFINE_string("out-dir", None, "where <stem>_labels.png, <stem>_overlay.png and <stem>.json go",
                        flag_values=f)
    flags.DEFINE_string("checkpoint", None, "step number or step directory (default: the latest)", flag_values=f)
    cmd.required("image", "out-dir")
    args = cmd.parse()

    def body():
        class_names = read_classes(args.classes, args["classes-file"].value)
        paths = list_images(args.image)
        check_out_dir(Path(args["out-dir"].value), paths)
        check_outputs_free(Path(args["out-dir"].value), paths)
        if not (args["zero-shot"].value or args.workdir):
            raise ValueError("give --workdir (a trained run) or --zero-shot CLIP_DIR")
        config = cmd.config() if args["zero-shot"].value else cmd.config(args.workdir)
        runtime.start(config)
        if args["zero-shot"].value:
            segmenter = Segmenter.from_clip(args["zero-shot"].value, config)
        else:
            segmenter = Segmenter.from_workdir(args.workdir, config, checkpoint=args.checkpoint)
        for name in class_names:  # CLIP reads 77 tokens per prompt, the template's included
            tokens = len(segmenter.tokenizer(name, add_special_tokens=False)["input_ids"])
            if tokens > 60:
                print(f"[dcp_jax.predict] warning: class {name[:40]!r}... is {tokens} tokens long; CLIP reads at "
                      "most 77 per prompt, template included, so its end is cut", file=sys.stderr)
        summaries, errors = predict_files(segmenter, paths, class_names, Path(args["out-dir"].value))
        for s in summaries:
            present = ", ".join(f"{c['name']} {100 * c['fraction']:.1f}%" for c in s["classes"][:8])
            print(f"{s['image']}: {present}")
            if s["dropped_classes"]:
                print(dropped_warning(s), file=sys.stderr)
        for error in errors:
            print(f"{cmd.prog}: error: {error}; skipped", file=sys.stderr)
        return 1 if errors else 0

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
