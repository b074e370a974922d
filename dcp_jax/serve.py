r"""The interactive page: open-vocabulary segmentation you can click on, with the selection and its cost shown.

  python -m dcp_jax.serve [--workdir runs/demo] [--port 7860] [--host 127.0.0.1] [--checkpoint STEP]

Give an image (upload one, or pick one of the workdir's own dataset) and a vocabulary (free text: commas, or
one class per line; a built-in list; the workdir's training or dataset vocabulary) and press Run. The page
shows the original and the segmentation side by side with an opacity slider, an HTML legend (each class's
colour, a function of its name as in predict's overlays, and its share; pointing at a row shows that class
alone), predict's three files as downloads, a switch to the zero-shot CLIP's result and one for tag
validation (before / after), the classes Dynamic Category Selection selected (and those it did not), the slot
bucket K the head ran on, the head's GFLOPs at K against decoding every class (XLA's cost analysis of the
compiled programs, as `bench`; cached per vocabulary and K), a theta slider that re-runs the selection, and
each clicked pixel's top-5 classes with scores. Errors appear next to the control that caused them, progress
names its stage, and the layout is one column below 1024 px. docs/serve.md shows it.

This module owns the page (NiceGUI) and the model side of it (`Engine`). The inference is the Segmenter's
(`Segmenter.segment_details`: predict's labels, with what made them). The compiled programs live in this
process and serve every request and every browser tab (one compile per slot bucket, as `evaluate`, and per padded
vocabulary size: 16, 64, 256 or 1024 classes, so a new class count compiles nothing); a lock
serializes the model work, which runs in a thread so the page stays live. GFLOPs are counted in a worker
process, because bench's cost analysis re-traces the model with its loops unrolled and clears JAX's caches.
Without --workdir it serves the CPU demo's workdir, runs/demo. It binds to 127.0.0.1 unless --host says
otherwise, fetches nothing from the network, and needs `pip install -e ".[serve]"` (NiceGUI).

Why NiceGUI and not Gradio: every current Gradio (6.x) requires pillow < 13 or huggingface-hub < 2, and this
project pins pillow 13 and huggingface-hub 2 (transformers 5); NiceGUI installs beside them, serves all its
scripts and fonts itself, puts ids on elements, and reports image clicks in image pixels.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import html
import ipaddress
import multiprocessing
import json
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

from dcp_jax import cli, files, inference, runtime, visualize, vocabulary
from dcp_jax import text as text_lib
from dcp_jax import checkpoint as ckpt_lib
from dcp_jax.data import classnames
from dcp_jax.data import datasets as datasets_lib

DEMO_WORKDIR = "runs/demo"
MAX_CLASSES = 1000  # ADE-847, the largest built-in list, fits; each class is 80 prompts to embed
MAX_UPLOAD_BYTES = 25 * 2**20
MAX_PIXELS = 100_000_000
MAX_ASPECT = 10  # the model sees an image stretched to a square: a 10000 x 50 strip would be noise
MAX_SIDE = 2048  # larger images are shown downscaled: the per-pixel results of a 12 MP photo would take GBs
EXAMPLES = 4
TOP = 5
RESULTS_KEPT = 64  # results whose downloads stay available (all tabs together)
LEGEND_ROWS = 60


def log(message: str) -> None:
    print(f"[dcp_jax.serve] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Input checks: each bad input is a ValueError whose text the page shows and the log names
# ---------------------------------------------------------------------------------------------

def parse_vocabulary(text: str) -> list[str]:
    """Class names from the vocabulary box, by the rules every vocabulary follows (dcp_jax/vocabulary.py: a JSON
    list, one per line when it has several lines, else comma-separated; stripped; a repeat is an error)."""
    return check_vocabulary(vocabulary.parse(text or "", where="the vocabulary"))


def check_vocabulary(names: list[str]) -> list[str]:
    names = vocabulary.check(list(names), where="the vocabulary")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"the vocabulary has {len(names)} classes; this page takes at most {MAX_CLASSES} "
                         "(ade847, the largest built-in list, has 847)")
    return names


def decode_image(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """An uploaded file -> (uint8 RGB as predict reads it, a note), refusing what the model cannot use and
    downscaling an image larger than MAX_SIDE (the note says so)."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.0f} MiB; the page takes images up to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        image = datasets_lib.read_image(data, what=repr(name), max_pixels=MAX_PIXELS)
    except datasets_lib.DatasetError as e:  # PIL names the bytes object it read from; the user knows the file
        raise ValueError(re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", repr(name), str(e))) from None
    h, w = image.shape[:2]
    if h * w > MAX_PIXELS:
        raise ValueError(f"{name} is {w} x {h} pixels; the page takes up to {MAX_PIXELS // 10**6} megapixels")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise ValueError(f"{name} is {w} x {h} pixels: one side is more than {MAX_ASPECT} times the other, and "
                         "the model sees the image stretched to a square; crop it first")
    if max(h, w) <= MAX_SIDE:
        return image, ""
    scale = MAX_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), f"downscaled from {w} x {h}"


# ---------------------------------------------------------------------------------------------
# The model side, shared by every tab
# ---------------------------------------------------------------------------------------------

def _cost_worker(conn, workdir: str, config, checkpoint) -> None:
    """The GFLOPs worker process: loads the model, then answers (vocabulary, K) -> the head's GFLOPs."""
    try:
        from absl import logging as absl_logging

        from dcp_jax import bench
        from dcp_jax.segmenter import Segmenter
        absl_logging.set_verbosity(absl_logging.ERROR)
        segmenter = Segmenter.from_workdir(workdir, config, checkpoint=checkpoint)
        counter, error = bench.Bench(segmenter.config, segmenter.model(), mode=segmenter.config.eval.mode), None
    except Exception as e:  # noqa: BLE001 (answered to every request)
        error = f"the GFLOPs worker could not load the model: {type(e).__name__}: {e}"
    while True:
        try:
            names, k = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        try:
            if error:
                raise RuntimeError(error)
            segmenter.set_vocabulary(names)  # read from the text-embedding cache the server filled
            conn.send((True, counter.head_gflops(segmenter.text_embeddings, k)))
        except Exception as e:  # noqa: BLE001
            conn.send((False, f"{type(e).__name__}: {e}"))


class CostWorker:
    """A process of its own for bench's cost analysis, which re-traces the model with its loops unrolled and
    clears JAX's caches: in the server, that would throw away the compiled programs every tab uses."""

    def __init__(self, workdir: Path, config, checkpoint):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_cost_worker, args=(child, str(workdir), config, checkpoint),
                                        daemon=True, name="dcp_jax.serve GFLOPs")
        self._process.start()
        self._lock = threading.Lock()

    def head_gflops(self, names: list[str], k: int) -> float:
        """Blocking: the head's GFLOPs at K slots for this vocabulary."""
        with self._lock:
            try:
                self._conn.send((list(names), int(k)))
                ok, value = self._conn.recv()
            except (EOFError, OSError) as e:
                raise RuntimeError(f"the GFLOPs worker stopped ({type(e).__name__})") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:  # it may be compiling: stop it, do not wait for it
        self._process.terminate()
        self._process.join()


def zero_shot_clip(config, workdir: Path) -> tuple[Path | None, str]:
    """The CLIP checkpoint the workdir's run started from (the zero-shot baseline), or (None, why not)."""
    if config.clip.checkpoint == "toy:":
        from dcp_jax import toy_clip
        path = toy_clip.cache_root() / toy_clip.DEFAULT_RECIPE.key()
        found = (path / toy_clip.RECIPE_FILE).is_file()
        return (path, "") if found else (None, f"the toy CLIP is not in {toy_clip.cache_root()}; "
                                               "python -m dcp_jax.toy_clip trains it")
    path = Path(config.clip.checkpoint).expanduser() if config.clip.checkpoint else workdir / ckpt_lib.TINY_CLIP_DIR
    return (path, "") if path.exists() else (None, f"{path} (the CLIP the run started from) is missing")


class Engine:
    """The workdir's model for every tab: one Segmenter per theta (built on first use, sharing the
    parameters and so the compiled head), the zero-shot CLIP (on first use), GFLOPs from a worker process.
    Every Segmenter pads the vocabulary (16, 64, 256 or 1024 rows), so a new class count reuses the compiled
    programs. Segmenters keep per-call state, so one lock serializes the model work; other tabs wait their turn."""

    def __init__(self, workdir: Path, config, checkpoint=None):
        from dcp_jax.segmenter import Segmenter
        self.workdir, self.checkpoint = workdir, checkpoint
        self.base = Segmenter.from_workdir(workdir, config, checkpoint=checkpoint, pad_classes=True)
        self.config = self.base.config
        self.theta = round(float(self.config.model.dcs.theta), 2)
        self._by_theta = {self.theta: self.base}
        self._zero_shot = None
        self.zero_shot_path, self.zero_shot_missing = zero_shot_clip(self.config, workdir)
        self.lock = threading.Lock()
        self._gflops: dict = {}  # (vocabulary, K) -> future of the head's GFLOPs
        self._cost = None  # the GFLOPs worker, started by the first request
        self._warm: set = set()  # (model, padded rows, image bucket) that have run: their programs are compiled
        self._first_seconds = 15.0  # the last first request's time: the estimate for the next one
        self.results: collections.OrderedDict = collections.OrderedDict()  # token -> result, for the downloads
        self.examples, self.vocabularies = self._examples_and_vocabularies()
        # The words the demo's toy CLIP read in training (its BPE merges and captions): anything else is noise to it.
        self.known_words = None
        if self.config.clip.checkpoint == "toy:":
            from dcp_jax.data import toy_world
            self.known_words = set(toy_world.corpus_words())

    def _examples_and_vocabularies(self) -> tuple[list[Path], dict[str, list[str]]]:
        vocabularies = {}
        examples = []
        spec = (self.config.eval.datasets or self.config.train.dataset or "").split(",")[0].strip()
        try:  # a workdir whose dataset moved still serves; it only has no examples
            ds = datasets_lib.open_dataset(spec, "val", self.config.eval.data_root or None)
            vocabularies[f"dataset {ds.name} ({len(ds.class_names)})"] = list(ds.class_names)
            examples = [Path(p) for p in getattr(ds, "image_paths", [])[:EXAMPLES]]
        except (ValueError, OSError) as e:
            log(f"no example images: {spec or 'no dataset'}: {e}")
        if self.base.train_classes:  # the dataset's first: it names the classes training never saw as well
            vocabularies[f"training vocabulary ({len(self.base.train_classes)})"] = self.base.train_classes
        for name in classnames.BUILTIN:
            vocabularies[f"{name} ({len(classnames.load(name))})"] = classnames.load(name)
        return examples, vocabularies

    def notes(self, names: list[str]) -> list[str]:
        return vocabulary_notes(names, self.known_words, self.base.train_classes)

    def _segmenter(self, theta: float | None, zero_shot: bool):
        from dcp_jax.segmenter import Segmenter
        if zero_shot:
            if self.zero_shot_path is None:
                raise ValueError(f"no zero-shot CLIP: {self.zero_shot_missing}")
            if self._zero_shot is None:
                self._zero_shot = Segmenter.from_clip(self.zero_shot_path, self.config, pad_classes=True)
            return self._zero_shot
        theta = self.theta if theta is None else round(float(theta), 2)
        if theta not in self._by_theta:  # theta is static in the compiled selection: a model per value
            config = self.config.copy_and_resolve_references()
            with config.unlocked():
                config.model.dcs.theta = theta
            model = self.base.model()
            model.theta = theta
            self._by_theta[theta] = Segmenter(model, config, self.base.tokenizer, train_classes=self.base.train_classes,
                                              step=self.base.step, checkpoint_dir=self.base.checkpoint_dir,
                                              pad_classes=True)
        return self._by_theta[theta]

    def segment(self, image: np.ndarray, names: list[str], *, theta: float | None = None, zero_shot: bool = False,
                progress=lambda text: None) -> dict:
        """One request (blocking; the page runs it in a thread): segment_details and what the page shows.
        `progress(text)` names each stage as it starts."""
        from dcp_jax import predict
        from dcp_jax.segmenter import padded_count
        with self.lock:
            start, compiles = time.perf_counter(), runtime.compile_stats()["compiles"]
            segmenter = self._segmenter(theta, zero_shot)
            if segmenter.class_names != list(names):
                progress(f"embedding {len(names)} classes (kept on disk for the next time)")
                segmenter.set_vocabulary(names)
            embedded = runtime.compile_stats()["compiles"]  # the text encoder may compile for a new prompt count
            rows = padded_count(len(names))
            key = (id(segmenter), rows, inference.bucket_shape(image.shape[:2]))
            first = key not in self._warm
            progress(f"compiling for {rows} classes, about {self._first_seconds:.0f} s the first time" if first
                     else "segmenting")
            result = segmenter.segment_details(image, top=TOP)
            # predict's <stem>.json for the download ("image" is set once the tab names it)
            result["summary"] = predict.summary_of(segmenter, "", result["labels"], list(names))
            seconds = time.perf_counter() - start
            self._warm.add(key)
            if first:
                self._first_seconds = seconds
            done = runtime.compile_stats()["compiles"]
            result.update(seconds=seconds, compiled=done - compiles, compiled_segmenting=done - embedded)
        # What a click reads, kept small per tab: class ids fit int16 (MAX_CLASSES), scores are shown to 3 digits.
        result.update(top_classes=result["top_classes"].astype(np.int16),
                      top_scores=result["top_scores"].astype(np.float16))
        result.update(names=list(names), zero_shot=zero_shot, step=segmenter.step,
                      theta=None if zero_shot else segmenter.config.model.dcs.theta, rows=rows,
                      colors=visualize.class_colors(names), token=secrets.token_urlsafe(12))
        return result

    def keep(self, result: dict, image: np.ndarray, name: str) -> None:
        """Keep a result for its downloads (the last RESULTS_KEPT of all tabs)."""
        result.update(image=image, image_name=name)
        self.results[result["token"]] = result
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)

    async def head_gflops(self, names: list[str], k: int) -> float:
        """The head's GFLOPs at K slots for this vocabulary, counted once, in the worker process."""
        key = (tuple(names), int(k))
        if key not in self._gflops:
            if self._cost is None:
                self._cost = CostWorker(self.workdir, self.config, self.checkpoint)
            self._gflops[key] = asyncio.ensure_future(asyncio.to_thread(self._cost.head_gflops, names, k))
        try:
            return await asyncio.shield(self._gflops[key])
        except Exception:
            self._gflops.pop(key, None)  # a later request tries again
            raise

    def close(self) -> None:
        if self._cost is not None:
            self._cost.close()


def vocabulary_notes(names: list[str], known_words: set[str] | None, train_classes: list[str] | None) -> list[str]:
    """What the model cannot know about a vocabulary: words its text encoder never read (`known_words`: the toy
    CLIP's; None for a real CLIP, whose byte-level BPE reads any text), and classes outside its training
    vocabulary (open vocabulary: tag validation re-checks their regions)."""
    notes = []
    if known_words is not None:
        unknown = sorted({w for n in names for w in re.findall(r"[a-z]+", n.lower())} - known_words)
        if unknown:
            notes.append(f"The demo's toy CLIP never read {_some(unknown)}: it knows only the toy world's words, "
                         "so these classes are scored on noise.")
    if train_classes:
        unseen = [n for n, s in zip(names, text_lib.seen_mask(names, train_classes)) if not s]
        if unseen:
            notes.append(f"{len(unseen)} of {len(names)} classes are not among the model's {len(train_classes)} "
                         f"training classes ({_some(unseen)}): tag validation re-checks their regions.")
    return notes


def _some(items: list[str], n: int = 8) -> str:
    shown = ", ".join(f"'{i}'" for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# A result's files: what `predict` writes for the image (downloads), and the mask the page lays over it
# ---------------------------------------------------------------------------------------------

def result_files(result: dict) -> dict[str, bytes]:
    """{file name: bytes}: <stem>_labels.png, <stem>_overlay.png and <stem>.json, as `predict` writes them for
    the same image, vocabulary and model (the final labels, after tag validation)."""
    labels, names, image = result["labels"], result["names"], result["image"]
    stem = Path(result["image_name"]).stem or "image"
    summary = dict(result["summary"], image=result["image_name"])
    return {f"{stem}_labels.png": visualize.png_bytes(visualize.label_image(labels, len(names))),
            f"{stem}_overlay.png": visualize.png_bytes(visualize.overlay(image, labels, names)),
            f"{stem}.json": (json.dumps(summary, indent=2) + "\n").encode()}


def mask_png(labels: np.ndarray, colors: np.ndarray, highlight: int | None = None) -> bytes:
    """RGBA PNG of the class colours (transparent where unlabelled), laid over the original at the page's
    opacity; with `highlight`, that class alone in colour and the rest darkened."""
    rgba = np.zeros((*labels.shape, 4), np.uint8)
    inside = labels >= 0
    rgba[..., :3] = np.asarray(colors)[np.where(inside, labels, 0)]
    rgba[..., 3] = np.where(inside, 255, 0)
    if highlight is not None:
        other = inside & (labels != highlight)
        rgba[other] = (0, 0, 0, 190)
    return visualize.png_bytes(rgba)


# ---------------------------------------------------------------------------------------------
# The page (one Tab per browser tab): input, vocabulary, result, research panel
# ---------------------------------------------------------------------------------------------

THETA_NOTE = ("theta gates one route of Dynamic Category Selection: a class is selected when CLIP's whole-image "
              "probability for it is above theta. A class that is some patch's best match (after damping the "
              "image's dominant classes) is selected whatever theta is, so that no patch loses its label; theta "
              "therefore adds or drops only classes that win no patch, and 0 decodes every class.")
STALE = "dcp-stale"  # a result whose image or vocabulary has since changed
# One column up to 1023 px (a phone, a narrow window), the inputs beside the result above; the original and the
# segmentation side by side from 560 px. Nothing may be wider than the window.
LAYOUT_CSS = """
html, body { overflow-x: hidden; }
.dcp-main { display: flex; flex-direction: column; gap: 1.5rem; align-items: flex-start; }
.dcp-inputs, .dcp-results { width: 100%; min-width: 0; }
@media (min-width: 1024px) {
  .dcp-main { flex-direction: row; }
  .dcp-inputs { width: 20rem; flex-shrink: 0; }
  .dcp-results { flex: 1 1 0; }
}
.dcp-pair { display: grid; grid-template-columns: minmax(0, 1fr); gap: .5rem; }
.dcp-pair > * { max-width: 62vh; }  /* a square image fits the window's height with its legend in view */
@media (min-width: 560px) { .dcp-pair { grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); } }
.dcp-below { display: flex; flex-wrap: wrap; gap: 1rem; }
.dcp-stale { opacity: .35; filter: grayscale(1); }
#image .q-uploader__list { min-height: 0; padding: 0; }
#legend .row-item:hover { background: #e8ecff; }
"""


def _swatch(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    return (f'<span class="swatch" style="display:inline-block;width:.9em;height:.9em;border:1px solid #333;'
            f'vertical-align:middle;background:rgb({r},{g},{b});margin-right:.35em"></span>')


def selection_html(result: dict, tv_enabled: bool) -> str:
    names, colors = result["names"], result["colors"]
    if result["zero_shot"]:
        return ("<b>Zero-shot CLIP</b>: no selection and no head; CLIP's dense features are scored against "
                f"all {len(names)} classes (the floor the trained model must beat).")
    selected = result["selected"]
    present = set(np.unique(result["labels"][result["labels"] >= 0]).tolist())
    chips = " ".join(f"<span style='white-space:nowrap'>{_swatch(colors[c]) if c in present else ''}"
                     f"{html.escape(names[c])}</span>;" for c in selected)
    chosen = set(selected)
    rest = [names[c] for c in range(len(names)) if c not in chosen]
    shown = ", ".join(html.escape(n) for n in rest[:60]) + (f", ... and {len(rest) - 60} more" if rest[60:] else "")
    dropped = (f"<br>{result['dropped']} more selected classes did not fit the largest bucket and were not "
               "decoded." if result["dropped"] else "")
    if not tv_enabled:
        tv = "off in this workdir's config"
    elif result["relabels"]:
        tv = "; ".join(f"{html.escape(names[a])} &rarr; {html.escape(names[b])} ({n} px)"
                       for a, b, n in result["relabels"])
    else:
        tv = "changed no region"
    return (f"<b>Dynamic Category Selection</b> at theta {result['theta']:.2f} selected <b>{len(selected)}</b> of "
            f"{len(names)} classes; the head ran on <b>K = {result['bucket']}</b> slots.{dropped}"
            f"<br>Selected: {chips}<br><span style='color:#666'>Not selected ({len(rest)}): {shown or '-'}</span>"
            f"<br><b>Tag validation</b>: {tv}")


def pixel_html(result: dict, labels: np.ndarray, x: int, y: int) -> str:
    names, colors, label = result["names"], result["colors"], int(labels[y, x])
    ranked = [(int(c), float(s)) for c, s in zip(result["top_classes"][y, x], result["top_scores"][y, x]) if c >= 0]
    rows = "".join(f"<tr><td>{_swatch(colors[c])}{html.escape(names[c])}</td><td style='padding-left:1em'>{s:.3f}"
                   "</td></tr>" for c, s in ranked)
    return (f"<b>Pixel ({x}, {y})</b>: {_swatch(colors[label])}{html.escape(names[label])}. Top-{len(ranked)} by "
            f"combined score{'' if result['zero_shot'] else ' (before tag validation)'}:<table>{rows}</table>")


class Tab:
    """One browser tab's page and state. Each part builds its own controls: `input_part` (the image),
    `vocabulary_part`, `result_part` (images, legend, downloads, a pixel's classes) and `research_part`
    (the selection and its cost)."""

    def __init__(self, engine: Engine):
        from nicegui import ui
        self.engine, self.ui = engine, ui
        self.image, self.name, self.preset, self.inputs = None, "", None, None
        self.results = {"dcp": None, "zs": None}
        self.requests = self.moves = 0
        self.progress_text = ""  # written by the model thread, shown by a timer
        self.id = ui.context.client.id[:8]
        self.highlight = None

    # -- layout -----------------------------------------------------------------------------------
    def build(self) -> None:
        ui, engine = self.ui, self.engine
        ui.page_title("dcp_jax: open-vocabulary segmentation")
        ui.add_css(LAYOUT_CSS)
        with ui.column().classes("w-full max-w-screen-2xl mx-auto gap-2 p-2 sm:p-4"):
            with ui.row().classes("w-full items-baseline gap-x-4 gap-y-0"):
                ui.label("DCP-CLIP open-vocabulary segmentation").classes("text-xl font-bold")
                ui.label(f"{engine.workdir} · step {engine.base.step} · {engine.config.eval.mode} mode · "
                         f"{len(engine.base.train_classes or [])} training classes").classes(
                    "text-gray-600 break-all")
            # One column on narrow screens; the inputs beside the result from 1024 px on.
            with ui.element("div").classes("dcp-main w-full"):
                with ui.column().classes("dcp-inputs gap-1"):
                    self.input_part()
                    self.vocabulary_part()
                with ui.column().classes("dcp-results gap-2"):
                    self.result_part()
                    self.research_part()
        ui.timer(0.25, self.show_progress)
        self.lists.set_value(next(iter(engine.vocabularies)))  # the workdir's dataset's, or its training vocabulary

    def input_part(self) -> None:
        ui = self.ui
        ui.label("Image").classes("font-bold")
        self.upload = ui.upload(label="upload an image", auto_upload=True, max_file_size=MAX_UPLOAD_BYTES,
                                on_upload=self.on_upload,
                                on_rejected=lambda: self.fail(self.image_message, f"the file was rejected: over "
                                                              f"{MAX_UPLOAD_BYTES // 2**20} MiB")
                                ).props("id=image flat bordered").classes("w-full")
        self.image_message = ui.label().classes("text-negative text-sm").props("id=image-message role=alert")
        with ui.row().classes("gap-1 items-center"):
            for path in self.engine.examples:
                ui.image(path).classes("w-12 h-12 cursor-pointer").style("image-rendering:pixelated").on(
                    "click", lambda p=path: self.set_image(datasets_lib.read_image(p), p.name)).tooltip(path.name)
        self.image_info = ui.label("no image yet: upload one or click an example").classes("text-sm").props(
            "id=image-info")

    def vocabulary_part(self) -> None:
        ui = self.ui
        ui.label("Vocabulary").classes("font-bold mt-2")
        self.lists = ui.select(list(self.engine.vocabularies), label="a list", on_change=lambda e: self.use_preset(
            e.value)).classes("w-full").props("for=vocabulary dense")
        self.classes = ui.textarea(label="class names: commas, or one per line",
                                   on_change=lambda: self.vocabulary_changed()).props(
            "for=classes outlined rows=4 dense").classes("w-full")
        self.vocabulary_message = ui.label().classes("text-negative text-sm").props("id=vocabulary-message role=alert")
        self.notes = ui.html().classes("text-sm text-amber-900").props("id=notes")
        with ui.row().classes("items-center gap-2 no-wrap"):
            self.run_button = ui.button("Run", on_click=self.on_run).props("id=run")
            self.spinner = ui.spinner(size="md").props("id=busy")
            self.spinner.visible = False
            self.status = ui.label().classes("text-sm text-gray-700").props("id=status aria-live=polite")
        self.message = ui.label().classes("text-negative text-sm").props("id=message role=alert")

    def result_part(self) -> None:
        ui, engine = self.ui, self.engine
        with ui.row().classes("w-full items-center gap-x-6 gap-y-1"):
            with ui.row().classes("items-center gap-2 no-wrap"):
                ui.label("opacity").classes("text-sm")
                self.opacity = ui.slider(min=0, max=1, step=0.05, value=0.6,
                                         on_change=lambda e: self.overlay.style(f"--mask-opacity:{e.value}")
                                         ).props("id=opacity").classes("w-28")
            with ui.row().classes("items-center gap-2 no-wrap"):
                ui.label("theta").classes("text-sm")
                self.theta = ui.slider(min=0, max=1, step=0.05, value=engine.theta).props(
                    "id=theta label-always").classes("w-28")
                self.theta.on("change", self.rerun_theta)
            self.zero_shot = ui.switch("zero-shot CLIP", on_change=self.toggle_zero_shot).props("id=zero_shot")
            self.tv = ui.switch("tag validation", value=True, on_change=lambda: self.show()).props("id=tv")
            self.tv.set_visibility(bool(engine.config.model.tv.enabled))
        ui.label(THETA_NOTE).classes("text-xs text-gray-600").props("id=theta-note")
        self.stale = ui.label().classes("text-sm text-amber-900 font-bold").props("id=stale")
        with ui.element("div").classes("dcp-pair w-full").props("id=result") as self.box:
            with ui.column().classes("min-w-0 gap-0"):
                ui.label("original").classes("text-xs text-gray-600")
                self.original = ui.image().classes("w-full").style("image-rendering:pixelated").props(
                    "id=original fit=contain no-spinner no-transition")
            with ui.column().classes("min-w-0 gap-0"):
                ui.label("segmentation (click a pixel for its top classes)").classes("text-xs text-gray-600")
                self.overlay = ui.interactive_image(on_mouse=self.on_click, events=["click"], sanitize=False).props(
                    "id=overlay").classes("w-full cursor-crosshair").style(
                    "image-rendering:pixelated;--mask-opacity:0.6")
        with ui.element("div").classes("dcp-below w-full"):
            with ui.column().classes("gap-1 min-w-0"):
                self.legend = ui.column().classes("gap-0").props("id=legend")
                self.downloads = ui.html().classes("text-sm").props("id=downloads")
            self.pixel = ui.html("").classes("text-sm min-w-0").props("id=pixel")

    def research_part(self) -> None:
        ui = self.ui
        with ui.column().classes("w-full gap-1 text-sm break-words"):
            self.selection = ui.html().props("id=selection").classes("w-full")
            self.cost = ui.html().props("id=cost").classes("w-full")

    # -- feedback -----------------------------------------------------------------------------------
    def fail(self, where, text: str) -> None:
        """A one-line message next to the control that caused it, scrolled into view."""
        where.set_text(text)
        log(f"tab {self.id}: {text}")
        self.ui.run_javascript(f"document.getElementById('{where.props['id']}')"
                               ".scrollIntoView({block: 'nearest'})")

    def clear_messages(self) -> None:
        for label in (self.image_message, self.vocabulary_message, self.message):
            label.set_text("")

    def show_progress(self) -> None:
        if self.status.text != self.progress_text:
            self.status.set_text(self.progress_text)

    def mark_stale(self, why: str) -> None:
        if self.results["dcp"] is not None or self.results["zs"] is not None:
            self.box.classes(add=STALE)
            self.stale.set_text(f"{why}: press Run for a new result.")

    # -- inputs ----------------------------------------------------------------------------------
    def use_preset(self, name) -> None:
        if name in self.engine.vocabularies:
            names = self.engine.vocabularies[name]
            self.preset = ("\n".join(names), names)  # exact names (ade150's "bed " keeps its space)
            self.classes.set_value(self.preset[0])

    def vocabulary(self) -> list[str]:
        if self.preset and self.classes.value == self.preset[0]:
            return check_vocabulary(list(self.preset[1]))
        return parse_vocabulary(self.classes.value)

    def vocabulary_changed(self) -> None:
        try:
            names = self.vocabulary()
        except ValueError:
            self.notes.set_content("")
        else:
            self.notes.set_content("<br>".join(html.escape(n) for n in self.engine.notes(names)))
            if self.inputs is not None and names != self.inputs[1]:
                self.mark_stale("The vocabulary has changed since this result")
        self.vocabulary_message.set_text("")

    def set_image(self, image: np.ndarray, name: str, note: str = "") -> None:
        self.image, self.name = image, name
        self.original.set_source(Image.fromarray(image))
        self.image_info.set_text(f"{name}: {image.shape[1]} x {image.shape[0]} pixels" + (f" ({note})" if note else ""))
        self.clear_messages()
        self.mark_stale(f"This result is for {self.inputs[2]}, not {name}" if self.inputs else "")

    async def on_upload(self, e) -> None:
        from nicegui import run
        data = await e.file.read()
        self.upload.reset()
        try:  # in a worker thread: decoding a large upload on the event loop stalled every other tab
            image, note = await run.io_bound(decode_image, data, e.file.name)
        except ValueError as err:
            return self.fail(self.image_message, f"upload refused: {err}")
        self.set_image(image, e.file.name, note)

    # -- requests ----------------------------------------------------------------------------------
    async def segment(self, zero: bool, inputs=None) -> dict | None:
        """One request of this tab; None (and a message where the eye is) when it fails."""
        from nicegui import run
        engine = self.engine
        if inputs is None:
            if self.image is None:
                return self.fail(self.image_message, "choose an image first: upload one or click an example")
            try:
                inputs = self.image, self.vocabulary(), self.name
            except ValueError as err:
                return self.fail(self.vocabulary_message, str(err))
        self.requests += 1
        n = self.requests
        self.clear_messages()
        self.spinner.visible = True
        self.run_button.props("loading")
        self.progress_text = "waiting for another tab's request..." if engine.lock.locked() else "starting..."
        image, names, name = inputs
        what = (f"{'zero-shot' if zero else 'theta %.2f' % self.theta.value} on {name} ({image.shape[1]} x "
                f"{image.shape[0]}), {len(names)} classes")

        def progress(text: str) -> None:
            self.progress_text = text + "..."

        try:
            result = await run.io_bound(engine.segment, image, names, theta=self.theta.value, zero_shot=zero,
                                        progress=progress)
        except ValueError as err:
            self.progress_text = ""
            return self.fail(self.message, f"{err}")
        except Exception as err:  # a bug, not bad input: the page says so, the log has the traceback
            log(traceback.format_exc())
            self.progress_text = ""
            return self.fail(self.message, f"internal error ({type(err).__name__}: {err}); the server log has the "
                             "details")
        finally:
            self.spinner.visible = False
            self.run_button.props(remove="loading")
        if result is None or n != self.requests:  # shutting down, or a newer request of this tab superseded it
            return None
        self.progress_text = (f"{result['seconds']:.2f} s, {result['compiled']} programs compiled "
                              f"({result['compiled_segmenting']} to segment)")
        self.show_progress()  # now, with the result, not at the progress timer's next tick (a lag the page showed)
        log(f"tab {self.id}: {what}: {result['seconds']:.2f} s, K = {result['bucket']}, "
            f"{result['compiled']} programs compiled ({result['compiled_segmenting']} to segment; vocabulary padded "
            f"to {result['rows']})")
        engine.keep(result, image, name)
        self.inputs = inputs
        self.results["zs" if zero else "dcp"] = result
        return result

    def shown(self) -> dict | None:
        return self.results["zs"] if self.zero_shot.value and self.results["zs"] else self.results["dcp"]

    def shown_labels(self, result: dict) -> np.ndarray:
        return result["labels"] if self.tv.value else result["before_tv"]

    def show(self) -> None:
        """The shown result (zero-shot or not, tag validation on or off) in the images, legend and panels."""
        result = self.shown()
        if result is None:
            return
        self.box.classes(remove=STALE)
        self.stale.set_text("")
        labels = self.shown_labels(result)
        self.highlight = None
        self.overlay.set_source(Image.fromarray(result["image"]))
        self.set_mask(result, labels)
        self.pixel.set_content("")
        self.show_legend(result, labels)
        token, stem = result["token"], Path(result["image_name"]).stem or "image"
        links = " · ".join(f'<a class="text-primary underline" id="download-{kind}" download href="/result/{token}/'
                           f'{stem}{suffix}">{label}</a>' for kind, suffix, label in (
                               ("labels", "_labels.png", "label PNG"), ("overlay", "_overlay.png", "overlay"),
                               ("json", ".json", "JSON")))
        self.downloads.set_content(f"Download what <code>predict</code> writes: {links}"
                                   + ("" if self.tv.value else " (with tag validation, as predict)"))
        self.selection.set_content(selection_html(result, bool(self.engine.config.model.tv.enabled)))
        self.cost.set_content(result.get("cost_html", ""))

    def set_mask(self, result: dict, labels: np.ndarray, highlight: int | None = None) -> None:
        h, w = labels.shape
        data = base64.b64encode(mask_png(labels, result["colors"], highlight)).decode()
        opacity = "0.9" if highlight is not None else "var(--mask-opacity)"
        self.mask_svg = (f'<image href="data:image/png;base64,{data}" x="0" y="0" width="{w}" height="{h}" '
                         f'preserveAspectRatio="none" style="image-rendering:pixelated;opacity:{opacity}"/>')
        self.overlay.content = self.mask_svg

    def show_legend(self, result: dict, labels: np.ndarray) -> None:
        ui, names, colors = self.ui, result["names"], result["colors"]
        summary = visualize.class_summary(labels, names)
        self.legend.clear()
        with self.legend:
            ui.label(f"{len(summary)} classes in the result, by share of the image").classes("text-sm font-bold")
            for c in summary[:LEGEND_ROWS]:
                with ui.row().classes("row-item items-center gap-1 no-wrap px-1 rounded cursor-default").props(
                        f"data-id={c['id']}") as row:
                    ui.html(_swatch(colors[c["id"]]))
                    ui.label(c["name"]).classes("text-sm break-all")
                    ui.label(f"{100 * c['fraction']:.1f}%").classes("text-sm text-gray-600 ml-auto pl-2")
                row.on("mouseenter", lambda i=c["id"]: self.set_highlight(i))
                row.on("mouseleave", lambda: self.set_highlight(None))
            if len(summary) > LEGEND_ROWS:
                ui.label(f"... and {len(summary) - LEGEND_ROWS} more, each under "
                         f"{100 * summary[LEGEND_ROWS - 1]['fraction']:.1f}%").classes("text-sm")

    def set_highlight(self, class_id: int | None) -> None:
        result = self.shown()
        if result is not None and class_id != self.highlight:
            self.highlight = class_id
            self.set_mask(result, self.shown_labels(result), class_id)

    async def show_cost(self, result: dict) -> None:
        names, k, c = result["names"], result["bucket"], len(result["names"])
        result["cost_html"] = f"<b>Head cost</b>: counting the GFLOPs at K = {k} and K = {c}..."
        if self.shown() is result:
            self.cost.set_content(result["cost_html"])
        try:
            at_k, at_all = await self.engine.head_gflops(names, k), await self.engine.head_gflops(names, c)
        except Exception as err:
            log(traceback.format_exc())
            text = f"<b>Head cost</b>: not available ({html.escape(type(err).__name__)}: {html.escape(str(err))})"
        else:
            text = (f"<b>Head cost</b> for this image: <b>{at_k:.3f} GFLOPs</b> at K = {k}, against "
                    f"{at_all:.3f} GFLOPs decoding all {c} classes (K = {c}): {at_all / at_k:.1f}x "
                    "(XLA's cost analysis of the compiled head)")
        result["cost_html"] = text
        if self.shown() is result:
            self.cost.set_content(text)

    async def on_run(self) -> None:
        result = await self.segment(False)
        if result is None:
            return
        self.results["zs"] = None
        if self.zero_shot.value:
            await self.segment(True, self.inputs)
        self.show()
        await self.show_cost(result)

    async def rerun_theta(self) -> None:
        self.moves += 1
        move = self.moves
        await asyncio.sleep(0.5)  # each keyboard step ends in a change: run for the last one only
        if self.inputs is not None and move == self.moves:
            result = await self.segment(False, self.inputs)
            if result is not None:
                self.show()
                await self.show_cost(result)

    async def toggle_zero_shot(self) -> None:
        if self.zero_shot.value and self.results["zs"] is None and self.inputs is not None:
            await self.segment(True, self.inputs)
        self.show()

    def on_click(self, e) -> None:
        result = self.shown()
        if result is None:
            return
        labels = self.shown_labels(result)
        x, y = int(e.image_x), int(e.image_y)
        h, w = labels.shape
        if not (0 <= x < w and 0 <= y < h):
            return
        radius = max(1.5, min(h, w) / 40)
        self.overlay.content = self.mask_svg + (
            f'<circle cx="{x + 0.5}" cy="{y + 0.5}" r="{radius}" fill="none" stroke="white" '
            f'stroke-width="{radius / 3}"/>')
        self.pixel.set_content(pixel_html(result, labels, x, y))


def add_page(engine: Engine) -> None:
    from fastapi import Response
    from nicegui import app, ui

    @ui.page("/")
    def page():
        Tab(engine).build()

    @app.get("/result/{token}/{filename}")
    def download(token: str, filename: str):
        """A kept result's files, as `predict` writes them."""
        result = engine.results.get(token)
        files_ = result_files(result) if result is not None else {}
        if filename not in files_:
            return Response("no such result (results are kept for the last few requests): run it again\n",
                            status_code=404, media_type="text/plain")
        kind = "application/json" if filename.endswith(".json") else "image/png"
        return Response(files_[filename], media_type=kind,
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import os

    from absl import flags
    cmd = cli.Command("python -m dcp_jax.serve", __doc__, argv, config=cli.default_config(),
                      config_help="config file instead of WORKDIR/config.json; overrides: --config.KEY=VALUE "
                                  "(e.g. --config.eval.mode=slide)")
    f = cmd.flags
    flags.DEFINE_string("workdir", None, f"trained run directory (default: {DEMO_WORKDIR}, the CPU demo's)",
                        flag_values=f)
    flags.DEFINE_integer("port", 7860, "port to serve on", lower_bound=1, upper_bound=65535, flag_values=f)
    flags.DEFINE_string("host", "127.0.0.1", "address to bind; 0.0.0.0 serves every network interface",
                        flag_values=f)
    flags.DEFINE_string("checkpoint", None, "step number or step directory (default: the latest)", flag_values=f)
    args = cmd.parse()

    def body():
        workdir = Path(args.workdir or DEMO_WORKDIR)
        if args.workdir is None and not (workdir / ckpt_lib.CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{DEMO_WORKDIR} holds no trained run: make the CPU demo's with "
                                    f"'python -m dcp_jax.train --workdir {DEMO_WORKDIR}' (README, The CPU demo), "
                                    "or pass --workdir W")
        # NiceGUI keeps its storage in ./.nicegui unless told; ours goes to the cache, never into a checkout.
        os.environ.setdefault("NICEGUI_STORAGE_PATH", str(files.cache_dir("nicegui")))
        try:
            from nicegui import app, ui
        except ImportError:
            raise ValueError('the page needs NiceGUI: pip install -e ".[serve]"') from None
        with socket.socket() as probe:  # a port in use is one line now, not a uvicorn traceback later
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                probe.bind((args.host, args.port))
            except OSError as e:
                raise ValueError(f"cannot serve on {args.host}:{args.port} ({e.strerror}); pass another --port "
                                 "or --host") from None
        config = cmd.config(workdir)
        runtime.start(config)
        engine = Engine(workdir, config, args.checkpoint)
        add_page(engine)
        app.on_shutdown(engine.close)
        log(f"serving {workdir} (step {engine.base.step}) at http://{args.host}:{args.port}")
        if not ipaddress.ip_address(socket.gethostbyname(args.host)).is_loopback:
            log(f"warning: --host {args.host} opens the page to the network: anyone who can reach this machine on "
                f"port {args.port} can use it (no login, no encryption); serve on 127.0.0.1 and use an SSH tunnel, "
                "or put an authenticating proxy in front")
        ui.run(host=args.host, port=args.port, title="dcp_jax serve", reload=False, show=False,
               show_welcome_message=False, uvicorn_logging_level="warning")
        return 0

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
