"""Label PNGs, overlays, class colours and class summaries."""

import colorsys

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
    colors = visualize.class_colors(names)
    sky, long_class = colors[0].astype(int), colors[3].astype(int)
    np.testing.assert_array_equal(out[10, 10], np.rint(0.5 * 100 + 0.5 * sky).astype(np.uint8))
    np.testing.assert_array_equal(out[30, 10], np.rint(0.5 * 100 + 0.5 * long_class).astype(np.uint8))
    np.testing.assert_array_equal(out[10, 2], [100, 100, 100])
    # Legend: swatches of exactly the present classes (sky, then the long-named class), none for tree / road.
    legend = out[:, 30:].reshape(-1, 3)
    colours = {tuple(c) for c in legend}
    assert tuple(sky) in colours and tuple(long_class) in colours
    assert tuple(colors[1]) not in colours and tuple(colors[2]) not in colours
    # A longer class name widens the legend.
    short = visualize.overlay(image, np.zeros((60, 30), np.int32), names)
    assert short.shape[1] < out.shape[1]
    # Many classes present on a small image: the legend grows the canvas downwards instead of being cut.
    many = visualize.overlay(image[:8, :20], np.arange(160).reshape(8, 20) % 40, [f"c{i}" for i in range(40)])
    assert many.shape[0] > 40 * 10
    with pytest.raises(ValueError, match="labels shape"):
        visualize.overlay(image, labels[:10], names)


def delta_e(a, b) -> float:
    return float(np.linalg.norm(visualize._lab(a) - visualize._lab(b)))


def test_a_class_keeps_its_colour_whatever_the_order_or_the_rest_of_the_vocabulary():
    names = ["cat", "dog", "grass", "sky", "car", "bicycle", "person", "tree", "road", "building"]
    colors = {n: tuple(c) for n, c in zip(names, visualize.class_colors(names))}
    rng = np.random.default_rng(0)
    for _ in range(5):  # any order: the same colours, exactly
        shuffled = list(rng.permutation(names))
        assert {n: tuple(c) for n, c in zip(shuffled, visualize.class_colors(shuffled))} == colors
    # Case and spacing aside, a name is the same class.
    assert tuple(visualize.class_colors(["Cat ", "dog"])[0]) == tuple(visualize.class_colors(["cat", "dog"])[0])
    # Other vocabularies: each name's colour is its first choice unless an earlier name took it, so in a
    # vocabulary of names alone with it, mostly the same (a collision moves one name, not all of them).
    alone = {n: tuple(visualize.class_colors([n])[0]) for n in names}
    assert sum(alone[n] == colors[n] for n in names) >= 7
    bigger = names + ["lamp", "chair", "window", "door", "floor"]
    moved = [n for n, c in zip(bigger, visualize.class_colors(bigger)) if n in colors and tuple(c) != colors[n]]
    assert len(moved) <= 2, moved
    # Not the position: the first class of two vocabularies gets different colours.
    assert tuple(visualize.class_colors(["cat"])[0]) != tuple(visualize.class_colors(["building"])[0])


def test_colour_words_get_a_shade_of_their_colour():
    names = ["yellow ball", "purple ball", "red car", "green door", "blue sky", "dark grey wall", "cat"]
    colors = dict(zip(names, visualize.class_colors(names).astype(int)))
    for name, word in [("yellow ball", "yellow"), ("purple ball", "purple"), ("red car", "red"),
                       ("green door", "green"), ("blue sky", "blue"), ("dark grey wall", "grey")]:
        assert visualize.color_word(name) == word
        assert delta_e(colors[name], visualize.COLOR_WORDS[word]) < 1, name  # alone in its family: the plain shade
    r, g, b = colors["yellow ball"]
    assert r > 200 and g > 180 and b < 80
    # Several classes of one colour: distinct shades of it (lighter or darker, the same hue).
    for word in ("red", "purple", "yellow", "cyan"):
        family = [f"{word} {shape}" for shape in ("ball", "box", "ring", "triangle")]
        shades = visualize.class_colors(family)
        assert len({tuple(c) for c in shades}) == 4
        want = colorsys.rgb_to_hls(*np.divide(visualize.COLOR_WORDS[word], 255))[0]
        for c in shades:
            hue = colorsys.rgb_to_hls(*(c / 255))[0]
            assert min(abs(hue - want), 1 - abs(hue - want)) < 0.03, (word, c)
    assert visualize.color_word("bored cat") is None  # a colour word, not a substring ("red" in "bored")
    assert visualize.color_word("grass") == "grass" and visualize.color_word("white snow") == "white"


def test_classes_of_one_vocabulary_are_distinct_and_small_ones_well_separated():
    from dcp_jax.data import classnames, toy_world
    small = ["cat", "dog", "horse", "sheep", "cow", "bird", "person", "bottle", "chair", "table", "plant", "sofa"]
    for names, min_distance in [(small, visualize.MIN_PRIMARY_DISTANCE), (list(toy_world.CLASS_NAMES), 9.0)]:
        colors = visualize.class_colors(names)
        lab = visualize._lab(colors)
        distances = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.diag([np.inf] * len(names))
        assert distances.min() >= min_distance, (names, distances.min())
    ade = classnames.load("ade847")
    assert len({tuple(c) for c in visualize.class_colors(ade)}) == len(ade)  # 847 names, 847 colours
    # The names ADE-150 shares with ADE-847 (69): most keep their colour from one list to the other (48 do).
    inside = dict(zip(map(visualize.name_key, ade), map(tuple, visualize.class_colors(ade))))
    ade150 = classnames.load("ade150")
    shared = [(visualize.name_key(n), tuple(c)) for n, c in zip(ade150, visualize.class_colors(ade150))
              if visualize.name_key(n) in inside]
    assert len(shared) > 50 and sum(inside[n] == c for n, c in shared) >= 0.6 * len(shared)


def test_a_very_long_class_name_keeps_the_legend_narrow():
    """An 18,000-character class name (a pasted paragraph) made a 100,000-pixel-wide legend; names are cut."""
    image = np.zeros((20, 20, 3), np.uint8)
    labels = np.zeros((20, 20), np.int32)
    long_name = visualize.overlay(image, labels, ["x" * 18000])
    short_name = visualize.overlay(image, labels, ["x" * (visualize.LEGEND_NAME_CHARS - 3) + "..."])
    assert long_name.shape == short_name.shape and long_name.shape[1] < 1000
