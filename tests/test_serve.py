"""`python -m dcp_jax.serve` in a real browser: one server on a free port with the trained tiny workdir, driven by
headless Chromium (Debian's chromium and chromium-driver, through selenium; nothing is downloaded), plus the
page's input checks and the per-pixel top classes without a browser.

    python tests/test_serve.py --workdir runs/demo --out docs/serve.png     # the README's screenshot
"""

import contextlib
import io
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


def chromium(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Page:
    """The page's stable hooks: #image (upload), #classes (vocabulary box), #run, #overlay; #message, #pixel."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By
        self.driver, self.by = driver, By
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

    def overlay_src(self) -> str:
        return self.driver.find_element(self.by.CSS_SELECTOR, "#overlay img").get_attribute("src") or ""

    def press_run(self) -> str:
        """Press Run; returns the overlay's source before."""
        before = self.overlay_src()
        self.driver.find_element(self.by.ID, "run").click()
        return before

    def new_overlay(self, before: str) -> np.ndarray:
        """Wait for an overlay other than `before` and return it as the browser got it."""
        src = self.wait(lambda: (s := self.overlay_src()) != before and s.startswith("http") and s)
        return np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())).convert("RGB"))

    def run(self) -> np.ndarray:
        return self.new_overlay(self.press_run())

    def click_overlay(self, x: int, y: int, natural_width: int) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        img = self.driver.find_element(self.by.CSS_SELECTOR, "#overlay img")
        scale = img.size["width"] / natural_width
        ActionChains(self.driver).move_to_element_with_offset(
            img, int((x + 0.5) * scale - img.size["width"] / 2), int((y + 0.5) * scale - img.size["height"] / 2)
        ).click().perform()


def overlay_labels(overlay: np.ndarray, image: np.ndarray, num_classes: int) -> np.ndarray:
    """Read the class of every pixel back from an overlay's colours: the nearest 50/50 blend of the image with a
    class's palette colour."""
    h, w = image.shape[:2]
    palette = np.array([visualize.palette_color(i) for i in range(num_classes)], np.float64)
    blends = 0.5 * image[None].astype(np.float64) + 0.5 * palette[:, None, None]  # [C,H,W,3]
    return np.abs(blends - overlay[None, :h, :w]).sum(-1).argmin(0)


# --------------------------------------------------------------------------------------------------
# The browser
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


def test_the_page_segments_as_predict_does(run, server, page, tmp_path_factory):
    workdir, data_dir = run
    vocabulary = dataset_classes(data_dir)
    stem = VAL_STEMS[0]
    image_path = data_dir / "images" / "val" / f"{stem}.png"
    image = np.asarray(Image.open(image_path).convert("RGB"))
    page.upload(image_path)
    page.wait(lambda: "64 x 64 pixels" in page.text("image-info"))
    page.type_classes(", ".join(vocabulary))
    overlay = page.run()

    expected = np.asarray(Image.open(predicted(tmp_path_factory, "whole") / f"{stem}_labels.png")).astype(np.int64)
    agree = (overlay_labels(overlay, image, len(vocabulary)) == expected).mean()
    assert agree >= 0.99, f"the overlay's colours agree with predict's labels on {100 * agree:.1f}% of the pixels"

    selection = page.text("selection")
    assert "Dynamic Category Selection" in selection and "K = " in selection and "Not selected" in selection
    page.click_overlay(10, 40, overlay.shape[1])  # its top-5 classes; the first line names the pixel's label
    page.wait(lambda: "Pixel (" in page.text("pixel"), 30)
    first = page.text("pixel").split("\n")[0]
    x, y = (int(n) for n in first.split("(")[1].split(")")[0].split(","))
    assert abs(x - 10) <= 1 and abs(y - 40) <= 1, first
    assert first.startswith(f"Pixel ({x}, {y}): {vocabulary[expected[y, x]]}. Top-"), first
    assert page.text("message") == ""
    page.wait(lambda: "for this image" in page.text("cost"), 300)  # counted in the server's worker process
    cost = page.text("cost")
    assert "GFLOPs at K = " in cost and f"decoding all {len(vocabulary)} classes (K = {len(vocabulary)})" in cost


def test_bad_input_gets_a_message_and_the_next_request_works(run, server, page, tmp_path):
    _, data_dir = run
    _, proc, log_path = server
    page.driver.find_element(page.by.ID, "run").click()  # a fresh tab: nothing to segment yet
    page.wait(lambda: "choose an image first" in page.text("message"), 60)
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png")
    page.wait(lambda: f"{VAL_STEMS[0]}.png" in page.text("image-info"), 60)

    corrupt = tmp_path / "holiday.png"  # refused; the tab keeps the image it had
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    page.upload(corrupt)
    page.wait(lambda: "holiday.png" in page.text("message"), 60)
    assert "cannot read image" in page.text("message")

    page.type_classes(" ,  , ")
    page.driver.find_element(page.by.ID, "run").click()
    page.wait(lambda: "the vocabulary is empty" in page.text("message"), 30)
    assert f"{VAL_STEMS[0]}.png" in page.text("image-info")

    # The next request: another image, the vocabulary one per line with a comma and unicode in names (as many
    # classes as before, so no new programs are compiled).
    vocabulary = ["water, or sea" if c == "water" else "ciel ☁ (sky)" if c == "sky" else c
                  for c in dataset_classes(data_dir)[::-1]]
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[1]}.png")
    page.wait(lambda: f"{VAL_STEMS[1]}.png" in page.text("image-info"), 30)
    page.type_classes("\n".join(vocabulary))
    overlay = page.run()
    assert overlay.shape[0] >= 64 and page.text("message") == ""
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
    assert f"{VAL_STEMS[1]}.png" in page.text("image-info")  # what this tab had; another image gives a new overlay
    page.upload(data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png")
    page.wait(lambda: f"{VAL_STEMS[0]}.png" in page.text("image-info"), 30)
    page.run()
    page.driver.switch_to.window(second_handle)
    second.new_overlay(before_second)
    assert second.text("message") == ""
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
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, serving(workdir, Path(tmp) / "server.log") as (url, _):
        driver = chromium(1280, 1040)
        try:
            page = Page(driver, url)
            page.upload(image)
            page.wait(lambda: "pixels" in page.text("image-info"), 60)
            overlay = page.run()
            page.wait(lambda: "GFLOPs</b>" in driver.page_source and "counting" not in page.text("cost"), 600)
            page.click_overlay(*click, overlay.shape[1])
            page.wait(lambda: "Pixel (" in page.text("pixel"), 30)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    Image.open(out).convert("RGB").save(out, optimize=True)  # a palette image would merge the class colours
    print(f"{out}: {out.stat().st_size // 1024} kB")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="the README's screenshot of the page")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--image", default="runs/demo/toy_world/images/val/000025.png")
    parser.add_argument("--out", default="docs/serve.png")
    args = parser.parse_args()
    if shutil.which(CHROMIUM) is None:
        sys.exit(browser_missing())
    screenshot(Path(args.workdir), Path(args.out), Path(args.image), click=(60, 30))
