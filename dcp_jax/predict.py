"""Segment your own images with your own classes.

  python -m dcp_jax.predict --workdir runs/b16 --image photo.jpg --classes "cat, dog, grass" --out-dir out/
  python -m dcp_jax.predict --workdir runs/b16 --image photos/ --classes-file classes.txt --out-dir out/

For each image it writes <stem>_labels.png (class ids; 16-bit when the vocabulary has more than 255
classes), <stem>_overlay.png (colour overlay with a legend of the classes present) and <stem>.json
(the classes present with their pixel fractions). --classes separates classes with commas; use
--classes-file (one class per line, or a JSON list) for names with synonyms ("building, edifice").
The inference path is the evaluator's (dcp_jax.segmenter), so both give the same labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import config as config_lib
from dcp_jax import visualize
from dcp_jax.data import datasets as datasets_lib
from dcp_jax.evaluate import load_config_file
from dcp_jax.segmenter import Segmenter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_classes(classes: str | None, classes_file: str | None) -> list[str]:
    """The vocabulary from --classes ("a, b, c") or --classes-file (JSON list or one class per line)."""
    if bool(classes) == bool(classes_file):
        raise ValueError("give exactly one of --classes \"cat, dog\" or --classes-file FILE")
    if classes:
        names = [c.strip() for c in classes.split(",")]
    else:
        path = Path(classes_file)
        if not path.is_file():
            raise FileNotFoundError(f"--classes-file {path} not found")
        text = path.read_text()
        names = json.loads(text) if text.lstrip().startswith("[") else text.splitlines()
        names = [str(c).strip() for c in names]
    names = [c for c in names if c]
    if not names:
        raise ValueError("the class list is empty: give at least one class name")
    return names


def list_images(image: str) -> list[Path]:
    path = Path(image)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        stems = [p.stem for p in files]
        clashes = sorted({s for s in stems if stems.count(s) > 1})
        if clashes:  # outputs are named by stem: a.jpg and a.png would overwrite each other
            raise ValueError(f"{path} holds several images with the same name stem {clashes}; "
                             "rename them or predict them separately")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file or directory")
    return [path]


def predict_files(segmenter: Segmenter, files: list[Path], class_names: list[str], out_dir: Path) -> list[dict]:
    """Segment each file and write its three outputs; returns the per-image summaries."""
    segmenter.set_vocabulary(class_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for file in tqdm(files, desc="predict", unit="img", disable=len(files) < 2):
        image = datasets_lib.read_image(file)
        labels = segmenter.segment([image])[0]
        visualize.save_label_png(labels, out_dir / f"{file.stem}_labels.png", len(class_names))
        _save_png(visualize.overlay(image, labels, class_names), out_dir / f"{file.stem}_overlay.png")
        summary = {"image": str(file), "height": int(labels.shape[0]), "width": int(labels.shape[1]),
                   "classes": visualize.class_summary(labels, class_names), "vocabulary": class_names,
                   "zero_shot": segmenter.zero_shot, "step": int(getattr(segmenter, "step", 0))}
        ckpt_lib.write_json(out_dir / f"{file.stem}.json", summary)
        summaries.append(summary)
    return summaries


def _save_png(image, path: Path) -> None:
    from PIL import Image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dcp_jax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="trained run directory (its latest checkpoint is used)")
    parser.add_argument("--zero-shot", metavar="CLIP", help="use the zero-shot CLIP baseline from this CLIP "
                        "checkpoint instead of a trained workdir")
    parser.add_argument("--image", required=True, help="an image file or a directory of images")
    parser.add_argument("--classes", help='comma-separated class names, e.g. "cat, dog, grass"')
    parser.add_argument("--classes-file", help="a file of class names: one per line, or a JSON list")
    parser.add_argument("--out-dir", required=True, help="where <stem>_labels.png, <stem>_overlay.png and "
                        "<stem>.json are written")
    parser.add_argument("--config", help="config file (configs/X.py[:args]) instead of WORKDIR/config.json; "
                        "with --zero-shot it sets the CLIP input size and the test-time protocol (default: "
                        "the ViT-B/16 base config)")
    parser.add_argument("--checkpoint", help="step number or step directory (default: the latest)")
    parser.add_argument("--mode", choices=["slide", "whole"], help="inference mode (default: the run's eval.mode)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        class_names = read_classes(args.classes, args.classes_file)
        files = list_images(args.image)
        # As in evaluate: --config replaces the run's config, and sets the zero-shot baseline's protocol.
        config = load_config_file(args.config) if args.config else None
        if args.zero_shot:
            segmenter = Segmenter.from_clip(args.zero_shot, config or config_lib.base_config())
        elif args.workdir:
            segmenter = Segmenter.from_workdir(args.workdir, config, checkpoint=args.checkpoint)
        else:
            parser.error("give --workdir (a trained run) or --zero-shot CLIP_DIR")
    except (ValueError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.mode:
        with segmenter.config.unlocked():
            segmenter.config.eval.mode = args.mode
    for s in predict_files(segmenter, files, class_names, Path(args.out_dir)):
        present = ", ".join(f"{c['name']} {100 * c['fraction']:.1f}%" for c in s["classes"][:8])
        print(f"{s['image']}: {present}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
