r"""The interactive page: open-vocabulary segmentation you can click on, with the selection and its cost shown.

  python -m dcp_jax.serve [--workdir runs/demo] [--port 7860] [--host 127.0.0.1] [--checkpoint STEP]

Give an image (upload one, or pick one of the workdir's own dataset) and a vocabulary (free text: commas, or
one class per line; a built-in list; the workdir's training or dataset vocabulary) and press Run. The page
shows the overlay with its legend (predict's palette and labels), the per-class pixel fractions, a switch to
the zero-shot CLIP's result on the same input, the classes Dynamic Category Selection selected (and those it
did not), the slot bucket K the head ran on, the head's GFLOPs at K against decoding every class (XLA's cost
analysis of the compiled programs, as `bench`; cached per vocabulary and K), a theta slider that re-runs the
selection, each clicked pixel's top-5 classes with scores, and the regions tag validation relabelled.

This module owns the page (NiceGUI) and the model side of it (`Engine`). The inference is the Segmenter's
(`Segmenter.segment_details`: predict's labels, with what made them). The compiled programs live in this
process and serve every request and every browser tab (one compile per slot bucket, as `evaluate`); a lock
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
import html
import ipaddress
import multiprocessing
import re
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

from dcp_jax import cli, files, runtime, visualize, vocabulary
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
    Segmenters keep per-call state, so one lock serializes the model work; other tabs wait their turn."""

    def __init__(self, workdir: Path, config, checkpoint=None):
        from dcp_jax.segmenter import Segmenter
        self.workdir, self.checkpoint = workdir, checkpoint
        self.base = Segmenter.from_workdir(workdir, config, checkpoint=checkpoint)
        self.config = self.base.config
        self.theta = round(float(self.config.model.dcs.theta), 2)
        self._by_theta = {self.theta: self.base}
        self._zero_shot = None
        self.zero_shot_path, self.zero_shot_missing = zero_shot_clip(self.config, workdir)
        self.lock = threading.Lock()
        self._gflops: dict = {}  # (vocabulary, K) -> future of the head's GFLOPs
        self._cost = None  # the GFLOPs worker, started by the first request
        self.examples, self.vocabularies = self._examples_and_vocabularies()

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

    def _segmenter(self, theta: float | None, zero_shot: bool):
        from dcp_jax.segmenter import Segmenter
        if zero_shot:
            if self.zero_shot_path is None:
                raise ValueError(f"no zero-shot CLIP: {self.zero_shot_missing}")
            if self._zero_shot is None:
                self._zero_shot = Segmenter.from_clip(self.zero_shot_path, self.config)
            return self._zero_shot
        theta = self.theta if theta is None else round(float(theta), 2)
        if theta not in self._by_theta:  # theta is static in the compiled selection: a model per value
            config = self.config.copy_and_resolve_references()
            with config.unlocked():
                config.model.dcs.theta = theta
            model = self.base.model()
            model.theta = theta
            self._by_theta[theta] = Segmenter(model, config, self.base.tokenizer, train_classes=self.base.train_classes,
                                              step=self.base.step, checkpoint_dir=self.base.checkpoint_dir)
        return self._by_theta[theta]

    def segment(self, image: np.ndarray, names: list[str], *, theta: float | None = None,
                zero_shot: bool = False) -> dict:
        """One request (blocking; the page runs it in a thread): segment_details and what the page shows."""
        with self.lock:
            start, compiles = time.perf_counter(), runtime.compile_stats()["compiles"]
            segmenter = self._segmenter(theta, zero_shot)
            segmenter.set_vocabulary(names)
            result = segmenter.segment_details(image, top=TOP)
            result.update(seconds=time.perf_counter() - start,
                          compiled=runtime.compile_stats()["compiles"] - compiles)
        # What a click reads, kept small per tab: class ids fit int16 (MAX_CLASSES), scores are shown to 3 digits.
        result.update(top_classes=result["top_classes"].astype(np.int16),
                      top_scores=result["top_scores"].astype(np.float16))
        result.update(names=names, zero_shot=zero_shot, theta=None if zero_shot else segmenter.config.model.dcs.theta,
                      overlay=visualize.overlay(image, result["labels"], names),
                      fractions=visualize.class_summary(result["labels"], names))
        return result

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


# ---------------------------------------------------------------------------------------------
# The page (one instance per browser tab)
# ---------------------------------------------------------------------------------------------

def _swatch(class_id: int) -> str:
    r, g, b = visualize.palette_color(class_id)
    return (f'<span style="display:inline-block;width:.8em;height:.8em;border:1px solid #333;'
            f'background:rgb({r},{g},{b});margin-right:.3em"></span>')


def fractions_html(result: dict) -> str:
    rows = "".join(f"<tr><td>{_swatch(c['id'])}{html.escape(c['name'])}</td>"
                   f"<td style='text-align:right;padding-left:1em'>{100 * c['fraction']:.1f}%</td></tr>"
                   for c in result["fractions"])
    return f"<b>Pixels per class</b><table>{rows}</table>"


def selection_html(result: dict, tv_enabled: bool) -> str:
    names = result["names"]
    if result["zero_shot"]:
        return ("<b>Zero-shot CLIP</b>: no selection and no head; CLIP's dense features are scored against "
                f"all {len(names)} classes (the floor the trained model must beat).")
    selected = result["selected"]
    present = {c["id"] for c in result["fractions"]}
    chips = " ".join(f"<span style='white-space:nowrap'>{_swatch(c) if c in present else ''}"
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
        tv = "changed no slot"
    return (f"<b>Dynamic Category Selection</b> at theta {result['theta']:.2f} selected <b>{len(selected)}</b> of "
            f"{len(names)} classes; the head ran on <b>K = {result['bucket']}</b> slots.{dropped}"
            f"<br>Selected: {chips}<br><span style='color:#666'>Not selected ({len(rest)}): {shown or '-'}</span>"
            f"<br><b>Tag validation</b>: {tv}")


def pixel_html(result: dict, x: int, y: int) -> str:
    names, label = result["names"], int(result["labels"][y, x])
    ranked = [(int(c), float(s)) for c, s in zip(result["top_classes"][y, x], result["top_scores"][y, x]) if c >= 0]
    rows = "".join(f"<tr><td>{_swatch(c)}{html.escape(names[c])}</td><td style='padding-left:1em'>{s:.3f}</td></tr>"
                   for c, s in ranked)
    return (f"<b>Pixel ({x}, {y})</b>: {_swatch(label)}{html.escape(names[label])}. Top-{len(ranked)} by combined "
            f"score{'' if result['zero_shot'] else ' (before tag validation)'}:<table>{rows}</table>")


def add_page(engine: Engine) -> None:
    from nicegui import events, run, ui

    config = engine.config
    about = (f"{engine.workdir} · step {engine.base.step} · {config.eval.mode} mode · "
             f"{len(engine.base.train_classes or [])} training classes")

    @ui.page("/")
    def page():
        tab = {"image": None, "name": "", "preset": None, "inputs": None, "dcp": None, "zs": None, "n": 0, "moves": 0,
               "id": ui.context.client.id[:8]}
        ui.page_title("dcp_jax: open-vocabulary segmentation")
        with ui.row().classes("w-full items-baseline"):
            ui.label("DCP-CLIP open-vocabulary segmentation").classes("text-xl font-bold")
            ui.label(about).classes("text-gray-600")
        with ui.row().classes("w-full no-wrap items-start gap-8"):
            with ui.column().classes("w-80 shrink-0 gap-2"):
                ui.label("Image").classes("font-bold")
                upload = ui.upload(label="upload an image", auto_upload=True, max_file_size=MAX_UPLOAD_BYTES,
                                   on_upload=lambda e: on_upload(e),
                                   on_rejected=lambda: fail(f"the file was rejected: over "
                                                            f"{MAX_UPLOAD_BYTES // 2**20} MiB")
                                   ).props("id=image flat bordered").classes("w-full")
                with ui.row().classes("gap-1"):
                    for path in engine.examples:
                        ui.image(path).classes("w-16 h-16 cursor-pointer").style("image-rendering:pixelated").on(
                            "click", lambda p=path: set_image(datasets_lib.read_image(p), p.name)).tooltip(path.name)
                preview = ui.image().classes("w-32").style("image-rendering:pixelated")
                image_info = ui.label("no image yet: upload one or click an example").classes("text-sm").props(
                    "id=image-info")
                ui.label("Vocabulary").classes("font-bold")
                lists = ui.select(list(engine.vocabularies), label="a list", on_change=lambda e: use_preset(e.value)
                                  ).classes("w-full").props("for=vocabulary dense")
                classes = ui.textarea(label="class names: commas, or one per line").props(
                    "for=classes outlined rows=6").classes("w-full")
                with ui.row().classes("items-center"):
                    run_button = ui.button("Run", on_click=lambda: on_run()).props("id=run")
                    spinner = ui.spinner(size="md").props("id=busy")
                    spinner.visible = False
                    status = ui.label().classes("text-sm text-gray-600").props("id=status")
                message = ui.label().classes("text-negative").props("id=message")
                ui.label("theta: DCS's selection threshold (0 decodes every class)").classes("text-sm")
                theta = ui.slider(min=0, max=1, step=0.05, value=engine.theta).props("id=theta label-always")
                theta.on("change", lambda: rerun_theta())
                zero_shot = ui.switch("show the zero-shot CLIP instead", on_change=lambda: toggle_zero_shot()
                                      ).props("id=zero_shot")
            with ui.column().classes("grow gap-2"):
                overlay = ui.interactive_image(on_mouse=lambda e: on_click(e), events=["click"]).props(
                    "id=overlay").classes("w-full max-w-2xl cursor-crosshair").style("image-rendering:pixelated")
                pixel = ui.html("Click a pixel of the result for its top classes.").props("id=pixel")
                with ui.row().classes("w-full no-wrap items-start gap-8"):
                    fractions = ui.html().props("id=fractions").classes("shrink-0")
                    with ui.column().classes("grow"):
                        selection = ui.html().props("id=selection")
                        cost = ui.html().props("id=cost")

        def fail(text: str) -> None:
            message.set_text(text)
            log(f"tab {tab['id']}: {text}")

        def use_preset(name) -> None:
            if name in engine.vocabularies:
                names = engine.vocabularies[name]
                tab["preset"] = ("\n".join(names), names)  # exact names (ade150's "bed " keeps its space)
                classes.set_value(tab["preset"][0])

        def vocabulary() -> list[str]:
            if tab["preset"] and classes.value == tab["preset"][0]:
                return check_vocabulary(list(tab["preset"][1]))
            return parse_vocabulary(classes.value)

        def set_image(image: np.ndarray, name: str, note: str = "") -> None:
            tab["image"], tab["name"] = image, name
            preview.set_source(Image.fromarray(image))
            image_info.set_text(f"{name}: {image.shape[1]} x {image.shape[0]} pixels" + (f" ({note})" if note else ""))
            message.set_text("")

        async def on_upload(e: events.UploadEventArguments) -> None:
            data = await e.file.read()
            upload.reset()
            try:
                image, note = decode_image(data, e.file.name)
            except ValueError as err:
                return fail(f"upload refused: {err}")
            set_image(image, e.file.name, note)

        async def segment(zero: bool, inputs=None) -> dict | None:
            """One request of this tab; None (and a message) when it fails."""
            if inputs is None:
                if tab["image"] is None:
                    return fail("choose an image first: upload one or click an example")
                try:
                    inputs = tab["image"], vocabulary(), tab["name"]
                except ValueError as err:
                    return fail(str(err))
            tab["n"] += 1
            n = tab["n"]
            spinner.visible = True
            run_button.props("loading")
            status.set_text("waiting for another request..." if engine.lock.locked() else "segmenting...")
            image, names, name = inputs
            what = (f"{'zero-shot' if zero else 'theta %.2f' % theta.value} on {name} ({image.shape[1]} x "
                    f"{image.shape[0]}), {len(names)} classes")
            try:
                result = await run.io_bound(engine.segment, image, names, theta=theta.value, zero_shot=zero)
            except ValueError as err:
                return fail(f"{err}")
            except Exception as err:  # a bug, not bad input: the page says so, the log has the traceback
                log(traceback.format_exc())
                return fail(f"internal error ({type(err).__name__}: {err}); the server log has the details")
            finally:
                spinner.visible = False
                run_button.props(remove="loading")
                status.set_text("")
            if result is None or n != tab["n"]:  # shutting down, or a newer request of this tab superseded it
                return None
            message.set_text("")
            status.set_text(f"{result['seconds']:.2f} s, {result['compiled']} programs compiled")
            log(f"tab {tab['id']}: {what}: {result['seconds']:.2f} s, K = {result['bucket']}, "
                f"{result['compiled']} programs compiled")
            tab["inputs"] = inputs
            tab["zs" if zero else "dcp"] = result
            return result

        def shown() -> dict | None:
            return tab["zs"] if zero_shot.value and tab["zs"] else tab["dcp"]

        def show() -> None:
            result = shown()
            if result is None:
                return
            overlay.set_source(Image.fromarray(result["overlay"]))
            overlay.content = ""
            pixel.set_content("Click a pixel of the result for its top classes.")
            fractions.set_content(fractions_html(result))
            selection.set_content(selection_html(result, bool(config.model.tv.enabled)))
            cost.set_content(result.get("cost_html", ""))

        async def show_cost(result: dict) -> None:
            names, k, c = result["names"], result["bucket"], len(result["names"])
            result["cost_html"] = f"<b>Head cost</b>: counting the GFLOPs at K = {k} and K = {c}..."
            if shown() is result:
                cost.set_content(result["cost_html"])
            try:
                at_k, at_all = await engine.head_gflops(names, k), await engine.head_gflops(names, c)
            except Exception as err:
                log(traceback.format_exc())
                text = f"<b>Head cost</b>: not available ({html.escape(type(err).__name__)}: {html.escape(str(err))})"
            else:
                text = (f"<b>Head cost</b> for this image: <b>{at_k:.3f} GFLOPs</b> at K = {k}, against "
                        f"{at_all:.3f} GFLOPs decoding all {c} classes (K = {c}): {at_all / at_k:.1f}x "
                        "(XLA's cost analysis of the compiled head)")
            result["cost_html"] = text
            if shown() is result:
                cost.set_content(text)

        async def on_run() -> None:
            tab["dcp"] = tab["zs"] = None
            result = await segment(False)
            if result is not None and zero_shot.value:
                await segment(True, tab["inputs"])
            show()
            if result is not None:
                await show_cost(result)

        async def rerun_theta() -> None:
            tab["moves"] += 1
            move = tab["moves"]
            await asyncio.sleep(0.5)  # each keyboard step ends in a change: run for the last one only
            if tab["inputs"] is not None and move == tab["moves"]:
                result = await segment(False, tab["inputs"])
                show()
                if result is not None:
                    await show_cost(result)

        async def toggle_zero_shot() -> None:
            if zero_shot.value and tab["zs"] is None and tab["inputs"] is not None:
                await segment(True, tab["inputs"])
            show()

        def on_click(e: events.MouseEventArguments) -> None:
            result = shown()
            if result is None:
                return
            x, y = int(e.image_x), int(e.image_y)
            h, w = result["labels"].shape
            if not (0 <= x < w and 0 <= y < h):
                pixel.set_content("Click inside the image (the legend is on its right).")
                return
            radius = max(1.5, min(h, w) / 40)
            overlay.content = (f'<circle cx="{x + 0.5}" cy="{y + 0.5}" r="{radius}" fill="none" stroke="white" '
                               f'stroke-width="{radius / 3}"/>')
            pixel.set_content(pixel_html(result, x, y))

        lists.set_value(next(iter(engine.vocabularies)))  # the workdir's dataset's, or its training vocabulary


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
