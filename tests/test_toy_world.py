"""The toy world: determinism, the benchmark's folder layout and seen/unseen split, captions, command line."""

import json

import numpy as np
import pytest
from PIL import Image

from dcp_jax.data import toy_world as w


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes():
    assert len(w.CLASS_NAMES) >= 24 and len(set(w.CLASS_NAMES)) == len(w.CLASS_NAMES)
    assert set(w.UNSEEN_CLASSES) <= set(w.CLASS_NAMES)
    seen_objects = [n for n in w.OBJECTS if n not in w.UNSEEN_CLASSES]
    unseen_objects = [n for n in w.UNSEEN_CLASSES if n in w.OBJECTS]
    assert unseen_objects and any(n in w.STUFF for n in w.UNSEEN_CLASSES)
    for name in unseen_objects:  # compositional: the colour and the shape are each seen in other objects
        colour, shape = name.split()
        assert any(s.startswith(colour + " ") for s in seen_objects)
        assert any(s.endswith(" " + shape) for s in seen_objects)


def test_benchmark_layout(tmp_path):
    out = w.write_benchmark(tmp_path / "bench", num_images=40, seed=1, size=48)
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "classes.json", "images", "meta.json"]
    classes = json.loads((out / "classes.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert classes == list(w.CLASS_NAMES)
    assert meta["ignore_label"] == 255 and meta["name"] == "toy_world"
    assert meta["unseen_classes"] and set(meta["unseen_classes"]) <= set(classes)
    counts = {}
    for split in ("train", "val"):
        images = sorted(p.name for p in (out / "images" / split).iterdir())
        assert images == sorted(p.name for p in (out / "annotations" / split).iterdir())
        counts[split] = len(images)
        values = set()
        for name in images:
            image, label = Image.open(out / "images" / split / name), Image.open(out / "annotations" / split / name)
            assert image.mode == "RGB" and label.mode == "L" and image.size == label.size == (48, 48)
            values |= set(np.unique(np.asarray(label)).tolist())
        assert values - {255} <= set(range(len(classes))) and 255 in values  # the ignore ring around objects
        # both splits hold the true labels of every class, unseen ones included
        assert values & {classes.index(n) for n in meta["unseen_classes"]}
    assert counts == {"train": 30, "val": 10}


def test_open_dataset_trains_on_the_seen_classes_and_evaluates_on_all(tmp_path):
    from dcp_jax.data import datasets

    out = w.write_benchmark(tmp_path / "bench", num_images=24, seed=2, size=48)
    train, val = (datasets.open_dataset(f"folder:{out}", split) for split in ("train", "val"))
    seen = [n for n in w.CLASS_NAMES if n not in w.UNSEEN_CLASSES]
    assert train.class_names == seen and val.class_names == list(w.CLASS_NAMES)
    assert list(val.unseen_classes) == list(w.UNSEEN_CLASSES)
    for i in range(len(train)):  # training labels: seen classes remapped to their index, unseen ones ignored
        raw = np.asarray(Image.open(out / "annotations" / "train" / f"{i:06d}.png")).astype(np.int64)
        want = np.full(raw.shape, -1)
        for index, name in enumerate(w.CLASS_NAMES):
            if name in seen:
                want[raw == index] = seen.index(name)
        np.testing.assert_array_equal(train[i]["label"], want)


def test_deterministic_for_a_seed(tmp_path):
    a = _files(w.write_benchmark(tmp_path / "a", num_images=6, seed=7, size=32))
    b = _files(w.write_benchmark(tmp_path / "b", num_images=6, seed=7, size=32))
    c = _files(w.write_benchmark(tmp_path / "c", num_images=6, seed=8, size=32))
    assert a == b and a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))
    x, y = w.caption_batch(3, 5, 8, 32), w.caption_batch(3, 5, 8, 32)
    assert np.array_equal(x[0], y[0]) and x[1] == y[1] and np.array_equal(x[2], y[2])
    assert not np.array_equal(x[0], w.caption_batch(3, 6, 8, 32)[0])


def test_captions_name_the_classes():
    images, captions, present = w.caption_batch(0, 0, 64, 64)
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8 and present.shape == (64, len(w.CLASS_NAMES))
    assert len(set(captions)) > 20  # varied templates and contents
    for caption, classes in zip(captions, present):
        names = [w.CLASS_NAMES[i] for i in np.flatnonzero(classes)]
        assert names and all(n in caption for n in names), (caption, names)
        # no other class is named (stuff names are not substrings of one another)
        assert not [n for n in w.CLASS_NAMES if n in caption and n not in names], caption


def test_render_scene_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown class"):
        w.render_scene(rng, 32, stuff=["lava"])
    with pytest.raises(ValueError, match="at least one stuff"):
        w.render_scene(rng, 32, stuff=[], objects=["red ball"])
    image, label, visible = w.render_scene(rng, 32, stuff=["sky"], objects=["red ball"], radius=(0.3, 0.3))
    assert visible == [w.CLASS_NAMES.index("sky"), w.CLASS_NAMES.index("red ball")]


def test_command_line(tmp_path, capsys):
    w.main(["--out", str(tmp_path / "cli"), "--num-images", "4", "--seed", "1", "--size", "32"])
    assert "folder:" in capsys.readouterr().out
    assert len(list((tmp_path / "cli/annotations/train").iterdir())) == 3
    # an existing dataset is not overwritten by accident
    assert w.main(["--out", str(tmp_path / "cli"), "--num-images", "4"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert w.main(["--out", str(tmp_path / "bad"), "--num-images", "1"]) == 2
    assert "num_images >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        w.main(["--help"])
    assert e.value.code == 0 and "unseen" in capsys.readouterr().out


def test_ignore_ring_dilation_matches_scipy():
    """The object's ignore ring comes from a 3x3 binary dilation (scipy's is the reference), also at the
    border of the array: render_scene dilates the object's box plus one pixel, cut by the canvas."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 6), (6, 1), (7, 9), (64, 64)]:
        for density in (0.03, 0.3):
            mask = rng.random(shape) < density
            want = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
            np.testing.assert_array_equal(w._dilate(mask), want)


def test_objects_keep_their_ignore_ring_where_they_are_cut():
    """A wide triangle reaches past the box it is drawn in, and a close-up past the canvas: where they are cut, the
    ignore ring still separates them from the rest (no object pixel touches a stuff pixel)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for radius in [(0.25, 0.35)] * 30 + [(0.5, 0.8)] * 10:
        _, label, _ = w.render_scene(rng, 96, stuff=["sand"], objects=["red triangle", "cyan ball"], radius=radius)
        objects = (label != w.CLASS_NAMES.index("sand")) & (label != w.IGNORE_LABEL)
        stuff = label == w.CLASS_NAMES.index("sand")
        assert not (ndimage.binary_dilation(objects, structure=np.ones((3, 3), bool)) & stuff).any()
