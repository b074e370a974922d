"""`python -m dcp_jax.serve` in a real browser: one server on a free port with the trained tiny workdir, driven by
headless Chromium (Debian's chromium and chromium-driver, through selenium; nothing is downloaded), plus the
page's input checks and the per-pixel top classes without a browser.

    python tests/test_serve.py --workdir runs/demo --out docs/serve.png     # the README's screenshots
    DCP_JAX_CACHE=$(mktemp -d) python tests/test_serve.py --workdir runs/demo --times   # docs/serve.md's times
"""

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcp_jax import inference, serve, visualize
from test_evaluate import VAL_STEMS, dataset_classes, predicted, trained_run

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    for module, package in (("selenium", "selenium"), ("nicegui", "nicegui")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed: pip install -e \".[test]\""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"no {' or '.join(missing)}: the browser test needs Debian's chromium and chromium-driver packages "
                "(apt-get install -y chromium chromium-driver)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(workdir, log_path: Path, timeout: float = 240.0):
    """`python -m dcp_jax.serve --workdir W --port P` in a subprocess; yields (url, process)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # NiceGUI reads it as "in a test"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dcp_jax.serve", "--workdir", str(workdir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no page after {timeout} s: {log_path.read_text()[-3000:]}"
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def chromium(width: int = 1280, height: int = 800):
    """Headless Chromium whose viewport is exactly width x height (emulated: a window cannot be under 500 px)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={max(width, 500)},{height + 150}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    set_viewport(driver, width, height)
    return driver


def set_viewport(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


class Page:
    """The page's stable hooks: #image (upload), #classes (vocabulary box), #run, #overlay, #legend, #download-*;
    messages next to their control: #image-message, #vocabulary-message, #message; #status, #stale, #pixel."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By
        self.driver, self.by, self.url = driver, By, url
        driver.get(url)
        self.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), 60)

    def wait(self, condition, timeout: float = 180):
        from selenium.webdriver.support.ui import WebDriverWait
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(lambda _: condition())

    def text(self, element_id: str) -> str:
        return self.driver.find_element(self.by.ID, element_id).text

    def upload(self, path) -> None:
        self.driver.find_element(self.by.CSS_SELECTOR, "#image input[type=file]").send_keys(str(Path(path).resolve()))

    def type_classes(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys
        box = self.driver.find_element(self.by.ID, "classes")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)

    def download_href(self, kind: str = "labels") -> str:
        found = self.driver.find_elements(self.by.ID, f"download-{kind}")
        return found[0].get_attribute("href") if found else ""

    def press_run(self) -> str:
        """Press Run; returns the label download's address before (each result has its own)."""
        before = self.download_href()
        self.driver.find_element(self.by.ID, "run").click()
        return before

    def new_result(self, before: str) -> dict:
        """Wait for a result other than `before`; its downloads: {"labels": int array, "overlay": RGB array,
        "json": dict, "names": file names}."""
        self.wait(lambda: (h := self.download_href()) != before and h)
        out = {"names": []}
        for kind in ("labels", "overlay", "json"):
            href = self.download_href(kind)
            with urllib.request.urlopen(href, timeout=30) as response:
                data = response.read()
                out["names"].append(response.headers.get_filename())
            out[kind] = json.loads(data) if kind == "json" else np.asarray(Image.open(io.BytesIO(data)))
        return out

    def run(self) -> dict:
        return self.new_result(self.press_run())

    def final_status(self) -> str:
        """The status line once it reports the finished request (a browser may apply the result's update a
        moment before the status's)."""
        self.wait(lambda: "programs compiled" in self.text("status"), 30)
        return self.text("status")

    def legend(self) -> dict[str, tuple[tuple[int, int, int], float]]:
        """The HTML legend: class name -> (swatch colour, share in %)."""
        rows = self.driver.execute_script(
            "return [...document.querySelectorAll('#legend .row-item')].map(r => [r.innerText, "
            "getComputedStyle(r.querySelector('.swatch')).backgroundColor])")
        legend = {}
        for text, color in rows:
            name, share = text.rsplit("\n", 1)
            legend[name.strip()] = (tuple(int(v) for v in color[4:-1].split(",")), float(share.rstrip("%")))
        return legend

    def mask(self) -> np.ndarray:
        """The colour mask laid over the original in the result (RGBA)."""
        href = self.driver.find_element(self.by.CSS_SELECTOR, "#overlay image").get_attribute("href")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))))

    def in_viewport(self, element_id: str) -> bool:
        return self.driver.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
            "return r.height > 0 && r.top >= -1 && r.bottom <= window.innerHeight + 1 && r.right <= window.innerWidth",
            element_id)

    def overflow(self) -> int:
        """How far the page scrolls sideways (0: not at all)."""
        return self.driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")

    def click_overlay(self, x: int, y: int, natural_width: int) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        img = self.driver.find_element(self.by.CSS_SELECTOR, "#overlay img")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
        scale = img.size["width"] / natural_width
        ActionChains(self.driver).move_to_element_with_offset(
            img, int((x + 0.5) * scale - img.size["width"] / 2), int((y + 0.5) * scale - img.size["height"] / 2)
        ).click().perform()


# --------------------------------------------------------------------------------------------------
# The browser (one server for the module; each test a browser of its own)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    if (why := browser_missing()) is not None:
        pytest.skip(why)
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with serving(run[0], log_path) as (url, proc):
        yield url, proc, log_path


@pytest.fixture
def page(server):  # a browser of its own per test: xdist may run the tests on different workers
    driver = chromium()
    try:
        yield Page(driver, server[0])
    finally:
        driver.quit()


def test_the_page_shows_and_downloads_what_predict_writes(run, server, page, tmp_path_factory):
    workdir, data_dir = run
    vocabulary = dataset_classes(data_dir)
    stem = VAL_STEMS[0]
    image_path = data_dir / "images" / "val" / f"{stem}.png"
    image = np.asarray(Image.open(image_path).convert("RGB"))
    page.upload(image_path)
    page.wait(lambda: "64 x 64 pixels" in page.text("image-info"))
    page.type_classes(", ".join(vocabulary))
    result = page.run()

    # The downloads are predict's three files for this image: names, label ids, overlay, JSON.
    out_dir = predicted(tmp_path_factory, "whole")
    assert result["names"] == [f"{stem}_labels.png", f"{stem}_overlay.png", f"{stem}.json"]
    expected = visualize.load_label_png(out_dir / f"{stem}_labels.png")
    labels = result["labels"].astype(np.int64)
    agree = (labels == expected).mean()
    assert agree >= 0.999, f"the page's labels agree with predict's on {100 * agree:.2f}% of the pixels"
    np.testing.assert_array_equal(result["overlay"], visualize.overlay(image, labels, vocabulary))
    want = json.loads((out_dir / f"{stem}.json").read_text())
    assert {k: v for k, v in result["json"].items() if k not in ("image", "classes")} == {
        k: v for k, v in want.items() if k not in ("image", "classes")}
    assert result["json"]["image"] == f"{stem}.png"
    assert result["json"]["classes"] == visualize.class_summary(labels, vocabulary)

    # What a person sees: the mask over the original has each pixel's class colour; the HTML legend lists every
    # class present, with its colour and its share of the image.
    colors = visualize.class_colors(vocabulary)
    np.testing.assert_array_equal(page.mask()[..., :3], colors[labels])
    legend = page.legend()
    ids, counts = np.unique(labels, return_counts=True)
    assert set(legend) == {vocabulary[i] for i in ids}
    for i, n in zip(ids, counts):
        color, share = legend[vocabulary[i]]
        assert color == tuple(colors[i]) and share == pytest.approx(100 * n / labels.size, abs=0.051)

    selection = page.text("selection")
    assert "Dynamic Category Selection" in selection and "K = " in selection and "Not selected" in selection
    assert "whatever theta is" in page.text("theta-note")
    page.click_overlay(10, 40, image.shape[1])  # its top-5 classes; the first line names the pixel's label
    page.wait(lambda: "Pixel (" in page.text("pixel"), 30)
    first = page.text("pixel").split("\n")[0]
    x, y = (int(n) for n in first.split("(")[1].split(")")[0].split(","))
    assert abs(x - 10) <= 1 and abs(y - 40) <= 1, first
    assert first.startswith(f"Pixel ({x}, {y}): {vocabulary[labels[y, x]]}. Top-"), first

    # The same names in another order: the same colours; and a class count within the same padded size (64)
    # compiles nothing. A new vocabulary greys the old result out until Run.
    unselected = selection.split("Not selected (")[1].split("): ", 1)[1].split("\n")[0].split(", ")
    page.type_classes("\n".join(vocabulary[::-1]))
    page.wait(lambda: "press Run" in page.text("stale"), 30)
    assert "dcp-stale" in page.driver.find_element(page.by.ID, "result").get_attribute("class")
    page.run()
    assert page.legend() == legend and page.text("stale") == ""
    assert page.final_status().endswith("(0 to segment)"), page.text("status")  # the text encoder may compile
    fewer = [n for n in vocabulary if n != unselected[0]]
    page.type_classes(", ".join(fewer))
    again = page.run()
    assert page.final_status().endswith("(0 to segment)"), page.text("status")  # the text encoder may compile
    assert again["labels"].max() < len(fewer)
    page.wait(lambda: "for this image" in page.text("cost"), 300)  # counted in the server's worker process
    cost = page.text("cost")
    assert "GFLOPs at K = " in cost and f"decoding all {len(fewer)} classes (K = {len(fewer)})" in cost


def test_errors_are_in_view_next_to_their_control_and_narrow_screens_do_not_scroll_sideways(run, server, page,
                                                                                               tmp_path):
    _, data_dir = run
    _, proc, log_path = server
    assert "no image yet" in page.text("image-info")  # a tab of its own
    page.driver.find_element(page.by.ID, "run").click()  # a fresh tab: nothing to segment yet
    page.wait(lambda: "choose an image first" in page.text("image-message"), 60)
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png")
    page.wait(lambda: f"{VAL_STEMS[0]}.png" in page.text("image-info"), 60)

    for width in (1280, 400):
        set_viewport(page.driver, width, 800)
        page.driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # the error must come into view
        corrupt = tmp_path / "holiday.png"  # refused; the tab keeps the image it had
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
        page.upload(corrupt)
        page.wait(lambda: "holiday.png" in page.text("image-message"), 60)
        assert "cannot read image" in page.text("image-message")
        page.wait(lambda: page.in_viewport("image-message"), 10)

        page.type_classes(" ,  , ")
        page.driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        page.driver.find_element(page.by.ID, "run").click()
        page.wait(lambda: "the vocabulary is empty" in page.text("vocabulary-message"), 30)
        page.wait(lambda: page.in_viewport("vocabulary-message"), 10)
        assert f"{VAL_STEMS[0]}.png" in page.text("image-info") and page.overflow() <= 0, width

    # The next request, at 400 px: another image, the vocabulary one per line with a comma and unicode in names.
    vocabulary = ["water, or sea" if c == "water" else "ciel ☁ (sky)" if c == "sky" else c
                  for c in dataset_classes(data_dir)[::-1]]
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[1]}.png")
    page.wait(lambda: f"{VAL_STEMS[1]}.png" in page.text("image-info"), 30)
    page.type_classes("\n".join(vocabulary))
    result = page.run()
    assert result["labels"].shape == (64, 64) and page.text("message") == ""
    assert page.overflow() <= 0  # the result, legend and panels fit 400 px
    widths = page.driver.execute_script("return ['overlay', 'original'].map(i => "
                                        "document.getElementById(i).getBoundingClientRect().right)")
    assert max(widths) <= 400
    assert proc.poll() is None
    log = log_path.read_text()
    assert "upload refused: cannot read image 'holiday.png': cannot identify image file 'holiday.png'" in log
    assert "the vocabulary is empty" in log and f"on {VAL_STEMS[1]}.png (64 x 64), 24 classes" in log


def test_two_tabs_each_get_their_own_result(run, server, page):
    _, data_dir = run
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[1]}.png")
    page.wait(lambda: f"{VAL_STEMS[1]}.png" in page.text("image-info"), 60)
    page.type_classes(", ".join(dataset_classes(data_dir)))
    first = page.driver.current_window_handle
    page.driver.switch_to.new_window("tab")
    second_handle = page.driver.current_window_handle
    second = Page(page.driver, server[0])
    assert "no image yet" in second.text("image-info")  # a tab of its own
    second.upload(data_dir / "images" / "val" / f"{VAL_STEMS[2]}.png")
    second.wait(lambda: f"{VAL_STEMS[2]}.png" in second.text("image-info"), 30)
    second.type_classes(", ".join(dataset_classes(data_dir)))
    before_second = second.press_run()
    page.driver.switch_to.window(first)  # both requests at once: the server queues one behind the other
    assert f"{VAL_STEMS[1]}.png" in page.text("image-info")  # what this tab had
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png")
    page.wait(lambda: f"{VAL_STEMS[0]}.png" in page.text("image-info"), 30)
    mine = page.run()
    page.driver.switch_to.window(second_handle)
    theirs = second.new_result(before_second)
    assert second.text("message") == ""
    assert mine["json"]["image"] == f"{VAL_STEMS[0]}.png" and theirs["json"]["image"] == f"{VAL_STEMS[2]}.png"
    page.driver.close()
    page.driver.switch_to.window(first)
    assert server[1].poll() is None


# --------------------------------------------------------------------------------------------------
# Without a browser
# --------------------------------------------------------------------------------------------------

def test_vocabulary_box():
    assert serve.parse_vocabulary("cat, dog ,grass") == ["cat", "dog", "grass"]
    assert serve.parse_vocabulary("building, edifice\nsky\n\n") == ["building, edifice", "sky"]
    assert serve.parse_vocabulary("chat noir, 猫, ☕ café") == ["chat noir", "猫", "☕ café"]
    for text, words in [("", "empty"), (" , , ", "empty"), ("cat, Cat", "more than once .*'Cat', 'cat'"),
                        (", ".join(f"class {i}" for i in range(2000)), "2000 classes")]:
        with pytest.raises(ValueError, match=words):
            serve.parse_vocabulary(text)


def test_the_page_notes_words_the_toy_clip_never_read_and_classes_training_never_saw():
    from dcp_jax.data import toy_world
    known, train = set(toy_world.corpus_words()), ["grass", "sky", "red ball"]
    assert serve.vocabulary_notes(["grass", "Sky", "red ball"], known, train) == []
    notes = serve.vocabulary_notes(["grass", "circuit board", "lake", "purple ball"], known, train)
    assert len(notes) == 2
    assert "never read 'board', 'circuit', 'lake'" in notes[0]  # "purple" and "ball" are toy-world words
    assert notes[1].startswith("3 of 4 classes are not among the model's 3 training classes ('circuit board', "
                               "'lake', 'purple ball')")
    assert serve.vocabulary_notes(["circuit board"], None, None) == []  # a real CLIP reads any word


def test_image_checks():
    def png(array) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()

    ok = np.zeros((30, 40, 3), np.uint8)
    image, note = serve.decode_image(png(ok), "ok.png")
    np.testing.assert_array_equal(image, ok)
    assert note == ""
    image, note = serve.decode_image(png(np.zeros((3000, 4000, 3), np.uint8)), "photo.png")
    assert image.shape == (1536, 2048, 3) and note == "downscaled from 4000 x 3000"
    with pytest.raises(ValueError, match="cannot read image 'notes.txt'"):
        serve.decode_image(b"just some text", "notes.txt")
    with pytest.raises(ValueError, match="10000 x 50 pixels: one side is more than 10 times the other"):
        serve.decode_image(png(np.zeros((50, 10000, 3), np.uint8)), "strip.png")


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_top_classes_rank_what_combine_views_argmaxes(mode):
    rng = np.random.default_rng(0)
    geometry = dict(mode=mode, crop=16, stride=8, canvas=24)
    v = inference.num_views(**geometry)
    logits = rng.normal(size=(2, v, 6, 8, 8)).astype(np.float32)
    slot_class = rng.integers(0, 9, (2, v, 6)).astype(np.int32)
    slot_valid = rng.random((2, v, 6)) < 0.7
    out_hw = np.array([[20, 13], [7, 30]])
    labels = np.asarray(inference.combine_views(logits, slot_class, slot_valid, out_hw=out_hw, out_shape=(20, 30),
                                                **geometry))
    classes, scores = (np.asarray(a) for a in inference.top_classes(
        logits, slot_class, slot_valid, out_hw=out_hw, out_shape=(20, 30), top=5, **geometry))
    assert classes.shape == scores.shape == (2, 20, 30, 5)
    np.testing.assert_array_equal(classes[..., 0], labels)  # -1 outside each image in both
    inside = labels >= 0
    assert (scores[inside][:, :-1] >= scores[inside][:, 1:]).all()  # best first
    assert ((classes[inside] >= 0) == np.isfinite(scores[inside])).all()
    for b in range(2):  # ranks past an image's candidates are empty
        candidates = len(np.unique(slot_class[b][slot_valid[b]]))
        assert ((classes[b][inside[b]] >= 0).sum(-1) == min(5, candidates)).all()


def test_without_a_workdir_it_names_the_demo_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert serve.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "python -m dcp_jax.train --workdir runs/demo" in err


# --------------------------------------------------------------------------------------------------
# The README's screenshot: python tests/test_serve.py --workdir runs/demo --out docs/serve.png
# --------------------------------------------------------------------------------------------------

def screenshot(workdir: Path, out: Path, image: Path, click: tuple[int, int]) -> None:
    """OUT at 1280 x 800 and OUT's stem + _400 at 400 x 800 (scrolled to the result)."""
    import tempfile
    narrow = out.with_name(f"{out.stem}_400{out.suffix}")
    with tempfile.TemporaryDirectory() as tmp, serving(workdir, Path(tmp) / "server.log") as (url, _):
        driver = chromium(1280, 800)
        try:
            page = Page(driver, url)
            page.upload(image)
            page.wait(lambda: "pixels" in page.text("image-info"), 60)
            page.run()
            page.wait(lambda: "GFLOPs</b>" in driver.page_source and "counting" not in page.text("cost"), 600)
            page.click_overlay(*click, Image.open(image).size[0])
            page.wait(lambda: "Pixel (" in page.text("pixel"), 30)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(out))
            set_viewport(driver, 400, 800)
            driver.execute_script("document.getElementById('theta-note').scrollIntoView({block: 'start'})")
            driver.save_screenshot(str(narrow))
        finally:
            driver.quit()
    for path in (out, narrow):
        Image.open(path).convert("RGB").save(path, optimize=True)  # a palette image would merge the class colours
        print(f"{path}: {path.stat().st_size // 1024} kB")


def request_times(workdir: Path, image: Path) -> None:
    """docs/serve.md's table: the page's model side (serve.Engine, vocabularies padded) on one image, the first
    and the repeat request for each class count, in this order (run it with a fresh DCP_JAX_CACHE for the
    first-time numbers)."""
    from dcp_jax import checkpoint, runtime
    from dcp_jax.data import classnames, datasets, toy_world
    config = checkpoint.load_config(workdir)
    runtime.start(config)
    engine = serve.Engine(workdir, config)
    picture = datasets.read_image(image)
    ade = classnames.load("ade847")
    keys = {visualize.name_key(n) for n in ade}
    extra = list(dict.fromkeys(n for n in classnames.load("pc459") + classnames.load("coco_stuff_171")
                               if visualize.name_key(n) not in keys))[:153]  # 847 + 153 = 1000 names
    toy = list(toy_world.CLASS_NAMES)
    vocabularies = {1: toy[:1], 5: toy[:5], 24: toy, 100: ade[:100], 847: ade, 1000: ade + extra}
    print("| classes | padded to | first request | of which embedding | programs compiled (text encoder included) "
          "| repeat (median of 3) |")
    print("|---|---|---|---|---|---|")
    for count in (24, 5, 1, 100, 847, 1000):
        stages = []
        result = engine.segment(picture, vocabularies[count], progress=lambda t: stages.append((time.perf_counter(), t)))
        embed = next((stages[i + 1][0] - t for i, (t, s) in enumerate(stages[:-1]) if s.startswith("embedding")), 0)
        repeats = []
        for _ in range(3):
            start = time.perf_counter()
            assert engine.segment(picture, vocabularies[count])["compiled"] == 0
            repeats.append(time.perf_counter() - start)
        print(f"| {count} | {result['rows']} | {result['seconds']:.2f} s | {embed:.2f} s | {result['compiled']} | "
              f"{np.median(repeats):.3f} s |", flush=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="the README's screenshot of the page")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--image", default="runs/demo/toy_world/images/val/000025.png")
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument("--times", action="store_true", help="print docs/serve.md's request times instead")
    args = parser.parse_args()
    if args.times:
        sys.exit(request_times(Path(args.workdir), Path(args.image)))
    if shutil.which(CHROMIUM) is None:
        sys.exit(browser_missing())
    screenshot(Path(args.workdir), Path(args.out), Path(args.image), click=(60, 30))


def test_an_upload_is_decoded_off_the_event_loop(monkeypatch):
    """Tab.on_upload decodes in a worker thread (decoding a large upload on the server's event loop stalled
    every other tab for seconds): the decode runs on another thread than the loop's, and its result reaches
    set_image; a refused upload reaches fail with its message."""
    import asyncio
    import threading
    import types

    threads, shown, failed = [], [], []

    def decode(data, name):
        threads.append(threading.get_ident())
        if data == b"bad":
            raise ValueError("not an image")
        return np.zeros((2, 3, 3), np.uint8), ""

    monkeypatch.setattr(serve, "decode_image", decode)
    tab = types.SimpleNamespace(upload=types.SimpleNamespace(reset=lambda: None), image_message="m",
                                set_image=lambda image, name, note: shown.append((image.shape, name)),
                                fail=lambda where, message: failed.append((where, message)))

    def upload(data):
        async def read():
            return data
        return types.SimpleNamespace(file=types.SimpleNamespace(read=read, name="x.png"))

    async def main():
        await serve.Tab.on_upload(tab, upload(b"png"))
        await serve.Tab.on_upload(tab, upload(b"bad"))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(threads) == 2 and loop_thread not in threads
    assert shown == [((2, 3, 3), "x.png")] and failed == [("m", "upload refused: not an image")]
