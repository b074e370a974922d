"""Label PNGs, overlays and class summaries."""

import numpy as np
import pytest
from PIL import Image

from dcp_jax import visualize


@pytest.mark.parametrize("num_classes,mode,max_value", [(255, "L", 255), (256, "I;16", 65535), (847, "I;16", 65535)])
def test_label_png_round_trip(tmp_path, num_classes, mode, max_value):
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, num_classes, (9, 14)).astype(np.int32)
    labels[0, :3] = [num_classes - 1, 0, -1]
    path = tmp_path / "labels.png"
    visualize.save_label_png(labels, path, num_classes)
    with Image.open(path) as image:  # 8-bit up to 255 classes (ids 0..254), 16-bit beyond
        assert image.mode == mode
        stored = np.asarray(image)
    assert stored[0, 2] == max_value  # -1 is written as the file's maximum value
    np.testing.assert_array_equal(visualize.load_label_png(path), labels)


def test_label_png_rejects_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        visualize.save_label_png(np.array([[0, 4]]), tmp_path / "x.png", 4)
    with pytest.raises(ValueError, match="2-D integer"):
        visualize.save_label_png(np.zeros((2, 2)), tmp_path / "x.png", 4)


def test_class_summary_lists_present_classes_by_fraction():
    names = ["sky", "tree", "road", "car"]
    labels = np.array([[2, 2, 2, 0], [0, 2, -1, -1]])  # tree and car absent, two unlabelled pixels
    summary = visualize.class_summary(labels, names)
    assert summary == [dict(id=2, name="road", fraction=4 / 6), dict(id=0, name="sky", fraction=2 / 6)]
    with pytest.raises(ValueError, match="no name"):
        visualize.class_summary(np.array([[4]]), names)


def test_overlay_blends_and_draws_a_legend_of_present_classes():
    names = ["sky", "tree", "road", "a class with a rather long name"]
    image = np.full((60, 30, 3), 100, np.uint8)
    labels = np.zeros((60, 30), np.int32)
    labels[20:] = 3
    labels[:, :5] = -1
    out = visualize.overlay(image, labels, names, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape[0] == 60 and out.shape[1] > 30 and out.shape[2] == 3
    # Blend: 50/50 with the class colour; unlabelled pixels keep the image.
    sky, long_class = np.array(visualize.palette_color(0)), np.array(visualize.palette_color(3))
    np.testing.assert_array_equal(out[10, 10], np.rint(0.5 * 100 + 0.5 * sky).astype(np.uint8))
    np.testing.assert_array_equal(out[30, 10], np.rint(0.5 * 100 + 0.5 * long_class).astype(np.uint8))
    np.testing.assert_array_equal(out[10, 2], [100, 100, 100])
    # Legend: swatches of exactly the present classes (sky, then the long-named class), none for tree / road.
    legend = out[:, 30:].reshape(-1, 3)
    colours = {tuple(c) for c in legend}
    assert tuple(sky) in colours and tuple(long_class) in colours
    assert tuple(visualize.palette_color(1)) not in colours and tuple(visualize.palette_color(2)) not in colours
    # A longer class name widens the legend.
    short = visualize.overlay(image, np.zeros((60, 30), np.int32), names)
    assert short.shape[1] < out.shape[1]
    # Many classes present on a small image: the legend grows the canvas downwards instead of being cut.
    many = visualize.overlay(image[:8, :20], np.arange(160).reshape(8, 20) % 40, [f"c{i}" for i in range(40)])
    assert many.shape[0] > 40 * 10
    with pytest.raises(ValueError, match="labels shape"):
        visualize.overlay(image, labels[:10], names)


def test_palette_is_deterministic_and_distinct():
    colours = [visualize.palette_color(i) for i in range(1000)]
    assert len(set(colours)) == 1000
    assert colours == [visualize.palette_color(i) for i in range(1000)]


def test_a_very_long_class_name_keeps_the_legend_narrow():
    """An 18,000-character class name (a pasted paragraph) made a 100,000-pixel-wide legend; names are cut."""
    image = np.zeros((20, 20, 3), np.uint8)
    labels = np.zeros((20, 20), np.int32)
    long_name = visualize.overlay(image, labels, ["x" * 18000])
    short_name = visualize.overlay(image, labels, ["x" * (visualize.LEGEND_NAME_CHARS - 3) + "..."])
    assert long_name.shape == short_name.shape and long_name.shape[1] < 1000
