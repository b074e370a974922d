"""Every on-disk layout, label mapping against hand-made arrays, unseen classes, and every bad-input error.

Tiny fake prepared datasets are written into tmp_path in each benchmark's layout (including
uint16 TIFF labels for ade847/pc459), then fed through a training batch and an eval item.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcp_jax.data import classnames
from dcp_jax.data.datasets import BENCHMARKS, DatasetError, open_dataset, read_label
from dcp_jax.data.pipeline import eval_dataset, train_dataset

H, W = 20, 28


def _write_image(path: Path, seed: int, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _write_label(path: Path, raw: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(path)  # uint8 -> 'L' PNG; uint16 -> 'I;16' TIFF


def _raw_label(spec: str, seed: int) -> np.ndarray:
    """A label map with every kind of value the benchmark's files hold."""
    layout = BENCHMARKS[spec]["val"]
    rng = np.random.default_rng(seed)
    num_values = 21 if spec == "voc20b" else len(classnames.load(spec))
    dtype = np.uint16 if layout.label_suffix == ".tif" else np.uint8
    raw = rng.integers(0, num_values, (H, W)).astype(dtype)
    raw[0, :4] = layout.ignore_label
    raw[1, :2] = (0, num_values - 1)
    return raw


def make_benchmark(root: Path, spec: str, split: str = "val", stems=("a1", "b2", "c3")) -> dict:
    """Write a tiny fake prepared benchmark; returns {stem: raw label}."""
    layout = BENCHMARKS[spec][split]
    raws = {}
    for i, stem in enumerate(stems):
        _write_image(root / layout.images / f"{stem}.jpg", i)
        raws[stem] = _raw_label(spec, i)
        _write_label(root / layout.annotations / f"{stem}{layout.label_suffix}", raws[stem])
    if not layout.images_exclusive:  # VOC's JPEGImages holds images of other splits too
        _write_image(root / layout.images / "zz_other_split.jpg", 99)
    return raws


def make_folder(path: Path, splits=("train", "val"), ignore_label=None, num_classes=5, name=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "classes.json").write_text(json.dumps([f"thing{i}" for i in range(num_classes)]))
    meta = {}
    if ignore_label is not None:
        meta["ignore_label"] = ignore_label
    if name:
        meta["name"] = name
    if meta:
        (path / "meta.json").write_text(json.dumps(meta))
    raws = {}
    for split in splits:
        sub = split if split else ""
        for i in range(2):
            raw = np.random.default_rng(i).integers(0, num_classes, (H, W)).astype(np.uint8)
            raw[0, 0] = 255 if ignore_label is None else ignore_label
            stem = f"{split or 'x'}{i}"
            _write_image(path / "images" / sub / f"{stem}.png", i)
            _write_label(path / "annotations" / sub / f"{stem}.png", raw)
            raws[stem] = raw
    return raws


def _expected(raw: np.ndarray, ignore: int) -> np.ndarray:
    out = raw.astype(np.int32)
    out[raw == ignore] = -1
    return out


# ------------------------------------------------------------------------------------------
# every layout feeds a training batch and an eval item


@pytest.mark.parametrize("spec", ["coco_stuff_171", "ade150", "ade847", "pc59", "pc459", "voc20", "voc20b"])
def test_benchmark_layout_feeds_pipelines(tmp_path, spec):
    split = "train" if spec == "coco_stuff_171" else "val"
    raws = make_benchmark(tmp_path, spec, split)
    ds = open_dataset(spec, split, str(tmp_path))
    assert ds.name == spec and len(ds) == 3
    assert ds.ignore_label == BENCHMARKS[spec][split].ignore_label
    item = ds[1]
    assert item["name"] == "b2"
    assert item["image"].dtype == np.uint8 and item["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(item["label"], _expected(raws["b2"], ds.ignore_label))
    assert item["label"].dtype == np.int32

    batch = next(iter(train_dataset(ds, crop_size=16, global_batch_size=2, seed=0, shard_index=0, shard_count=1)))
    assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2, 16, 16) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= -1 and batch["label"].max() < ds.num_label_classes
    np.testing.assert_array_equal(batch["bad"], [0, 0])

    ev = eval_dataset(ds, short_side=40)[0]
    assert ev["name"] == "a1" and ev["image"].shape == (40, 56, 3)  # 20x28 -> short side 40
    np.testing.assert_array_equal(ev["label"], _expected(raws["a1"], ds.ignore_label))


def test_vocabulary_attributes(tmp_path):
    for spec in ("ade150", "voc20", "voc20b", "ade847", "pc459"):
        make_benchmark(tmp_path, spec)
    ade = open_dataset("ade150", "val", str(tmp_path))
    assert ade.class_names == classnames.load("ade150") and ade.num_label_classes == 150
    np.testing.assert_array_equal(ade.pred_to_label, np.arange(150))
    voc20b = open_dataset("voc20b", "val", str(tmp_path))
    assert voc20b.class_names == classnames.load("voc20b") and voc20b.num_label_classes == 21
    # every prediction >= 20 (a background name) is scored as label 20
    assert voc20b.pred_to_label.dtype == np.int32
    np.testing.assert_array_equal(voc20b.pred_to_label, list(range(20)) + [20] * 39)
    ade847 = open_dataset("ade847", "val", str(tmp_path))  # no classes.json: built in
    assert ade847.class_names == classnames.load("ade847") and ade847.num_label_classes == 847
    assert ade847.ignore_label == 65535
    pc459 = open_dataset("pc459", "val", str(tmp_path))
    assert pc459.class_names == classnames.load("pc459")
    assert pc459.num_label_classes == 459 and pc459.ignore_label == 459
    for ds in (ade, voc20b, ade847, pc459):
        assert ds.unseen_classes == [] and ds.notes() == []


def test_data_root_from_environment(tmp_path, monkeypatch):
    root = tmp_path / "root"
    make_benchmark(root, "voc20")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    assert len(open_dataset("voc20", "val")) == 3
    assert len(open_dataset("voc20", "val", "")) == 3  # "" (the config default) means the same
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)
    root.rename(tmp_path / "datasets")
    assert len(open_dataset("voc20", "val")) == 3  # ./datasets


def test_images_outside_the_annotation_list_are_ignored_for_voc(tmp_path):
    make_benchmark(tmp_path, "pc59")  # writes zz_other_split.jpg with no label
    ds = open_dataset("pc59", "val", str(tmp_path))
    assert [Path(p).stem for p in ds.image_paths] == ["a1", "b2", "c3"]


# ------------------------------------------------------------------------------------------
# label mapping against hand-made arrays


def _one_label_dataset(tmp_path, spec, raw):
    make_benchmark(tmp_path, spec, stems=("a1",))
    layout = BENCHMARKS[spec]["val"]
    img = np.zeros((*raw.shape, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / layout.images / "a1.jpg")
    _write_label(tmp_path / layout.annotations / f"a1{layout.label_suffix}", raw)
    return open_dataset(spec, "val", str(tmp_path))


def test_label_mapping_ade847_uint16_tiff(tmp_path):
    raw = np.array([[0, 846, 65535], [300, 65535, 5]], np.uint16)
    ds = _one_label_dataset(tmp_path, "ade847", raw)
    np.testing.assert_array_equal(ds[0]["label"], [[0, 846, -1], [300, -1, 5]])


def test_label_mapping_pc459_scores_unknown_class(tmp_path):
    raw = np.array([[430, 458, 0], [459, 1, 2]], np.uint16)  # 459 (never in real files) is the ignore value
    ds = _one_label_dataset(tmp_path, "pc459", raw)
    np.testing.assert_array_equal(ds[0]["label"], [[430, 458, 0], [-1, 1, 2]])


def test_label_mapping_voc20b_background(tmp_path):
    raw = np.array([[20, 0, 255], [19, 20, 3]], np.uint8)
    ds = _one_label_dataset(tmp_path, "voc20b", raw)
    np.testing.assert_array_equal(ds[0]["label"], [[20, 0, -1], [19, 20, 3]])


def test_label_mapping_ade150_png(tmp_path):
    raw = np.array([[0, 149, 255], [7, 255, 1]], np.uint8)
    ds = _one_label_dataset(tmp_path, "ade150", raw)
    np.testing.assert_array_equal(ds[0]["label"], [[0, 149, -1], [7, -1, 1]])


def test_pc459_catseg_wrap_65535_is_ignored_and_counted(tmp_path):
    raw = np.array([[65535, 0, 458], [65535, 459, 65535]], np.uint16)  # CAT-Seg's uint16 0 - 1 = 65535
    ds = _one_label_dataset(tmp_path, "pc459", raw)
    assert ds.notes() == []
    np.testing.assert_array_equal(ds[0]["label"], [[-1, 0, 458], [-1, -1, -1]])
    ds[0]
    (note,) = ds.notes()  # 3 pixels per read, read twice in this process
    assert note.startswith("pc459: 6 label pixels in 2 images held 65535, CAT-Seg's uint16 wrap of a LabelMap 0; "
                           "they were read as ignore.")
    assert f"`python -m dcp_jax.data.prepare pc459 --raw {tmp_path} --overwrite`" in note and "(459)" in note
    clone = pickle.loads(pickle.dumps(ds))  # a grain worker starts counting afresh
    assert clone.notes() == [] and clone[0]["label"][0, 0] == -1 and len(clone.notes()) == 1


@pytest.mark.parametrize("spec, raw, value", [
    ("voc20b", np.array([[21, 0]], np.uint8), "21"),  # 21 classes scored: 0..20
    ("voc20", np.array([[20, 0]], np.uint8), "20"),
    ("pc459", np.array([[65534, 0]], np.uint16), "65534"),
    ("ade847", np.array([[847, 0]], np.uint16), "847"),
])
def test_label_value_outside_vocabulary_is_an_error(tmp_path, spec, raw, value):
    ds = _one_label_dataset(tmp_path, spec, raw)
    with pytest.raises(DatasetError, match=rf"a1\.(png|tif): label value\(s\) {value} outside"):
        ds[0]


def test_folder_dataset_flat_and_split_layouts(tmp_path):
    raws = make_folder(tmp_path / "mydata", splits=("train", "val"))
    train = open_dataset(f"folder:{tmp_path / 'mydata'}", "train")
    val = open_dataset(f"folder:{tmp_path / 'mydata'}", "val")
    assert train.name == "mydata" and len(train) == 2 and len(val) == 2
    assert train.class_names == [f"thing{i}" for i in range(5)] and train.ignore_label == 255
    np.testing.assert_array_equal(val[1]["label"], _expected(raws["val1"], 255))
    with pytest.raises(DatasetError, match="no split 'test'.*train, val"):
        open_dataset(f"folder:{tmp_path / 'mydata'}", "test")

    make_folder(tmp_path / "flat", splits=("",), ignore_label=7, name="nice name", num_classes=8)
    flat_train, flat_val = (open_dataset(f"folder:{tmp_path / 'flat'}", s) for s in ("train", "val"))
    assert flat_train.name == "nice name" and flat_train.ignore_label == 7
    assert flat_train.label_paths == flat_val.label_paths  # flat dirs serve every split
    raw = np.array([[7, 0, 5]], np.uint8)
    Image.fromarray(np.zeros((1, 3, 3), np.uint8)).save(tmp_path / "flat/images/x0.png")
    _write_label(tmp_path / "flat/annotations/x0.png", raw)
    np.testing.assert_array_equal(flat_train[0]["label"], [[-1, 0, 5]])


def test_folder_dataset_16bit_tiff_labels(tmp_path):
    path = tmp_path / "big"
    (path / "classes.json").parent.mkdir()
    (path / "classes.json").write_text(json.dumps([str(i) for i in range(1000)]))
    (path / "meta.json").write_text(json.dumps({"ignore_label": 65535}))
    _write_image(path / "images" / "x0.png", 0, size=(2, 2))
    _write_label(path / "annotations" / "x0.tif", np.array([[999, 65535], [0, 512]], np.uint16))
    np.testing.assert_array_equal(open_dataset(f"folder:{path}")[0]["label"], [[999, -1], [0, 512]])


# ------------------------------------------------------------------------------------------
# bad input errors


def test_unknown_spec_lists_known_names():
    with pytest.raises(DatasetError, match=r"unknown dataset 'ade20k'.*coco_stuff_171.*voc20b.*folder:PATH"):
        open_dataset("ade20k")


def test_missing_directory_is_one_line_naming_it_and_the_prepare_command(tmp_path):
    with pytest.raises(DatasetError) as info:
        open_dataset("ade150", "val", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert f"directory not found: {tmp_path / 'ADEChallengeData2016/annotations_detectron2/validation'}" in message
    assert f"python -m dcp_jax.data.prepare ade150 --raw DOWNLOADS --out {tmp_path}" in message


def test_missing_split(tmp_path):
    make_benchmark(tmp_path, "ade150")
    with pytest.raises(DatasetError, match="no split 'train'; use val"):
        open_dataset("ade150", "train", str(tmp_path))


def test_label_without_image(tmp_path):
    make_benchmark(tmp_path, "voc20")
    _write_label(tmp_path / "VOCdevkit/VOC2012/annotations_detectron2/val/lonely.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"1 label\(s\) without an image.*lonely\.png"):
        open_dataset("voc20", "val", str(tmp_path))


@pytest.mark.parametrize("spec", ["ade150", "folder"])
def test_image_without_label(tmp_path, spec):
    if spec == "folder":
        make_folder(tmp_path / "f", splits=("",))
        _write_image(tmp_path / "f/images/orphan.jpg", 0)
        args = (f"folder:{tmp_path / 'f'}", "val")
    else:
        make_benchmark(tmp_path, spec)
        _write_image(tmp_path / "ADEChallengeData2016/images/validation/orphan.jpg", 0)
        args = (spec, "val", str(tmp_path))
    with pytest.raises(DatasetError, match=r"1 image\(s\) without a label.*orphan\.jpg"):
        open_dataset(*args)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_names_the_file(tmp_path, damage):
    make_benchmark(tmp_path, "ade150")
    path = tmp_path / "ADEChallengeData2016/images/validation/b2.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"definitely not a jpeg")
    ds = open_dataset("ade150", "val", str(tmp_path))
    ds[0]  # the others still read
    with pytest.raises(DatasetError, match=r"cannot read image .*b2\.jpg"):
        ds[1]


def test_corrupt_label_and_size_mismatch(tmp_path):
    make_benchmark(tmp_path, "ade150")
    ann = tmp_path / "ADEChallengeData2016/annotations_detectron2/validation"
    (ann / "a1.png").write_bytes(b"broken")
    _write_label(ann / "b2.png", np.zeros((H + 1, W), np.uint8))
    ds = open_dataset("ade150", "val", str(tmp_path))
    with pytest.raises(DatasetError, match=r"cannot read label .*a1\.png"):
        ds[0]
    with pytest.raises(DatasetError, match=r"b2\.png: label size 28x21 differs from image .*b2\.jpg size 28x20"):
        ds[1]


def test_colour_label_rejected(tmp_path):
    make_folder(tmp_path / "f", splits=("",))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "f/annotations/x0.png")
    with pytest.raises(DatasetError, match="one channel"):
        open_dataset(f"folder:{tmp_path / 'f'}")[0]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="folder dataset not found"):
        open_dataset(f"folder:{tmp_path / 'nope'}")
    make_folder(tmp_path / "f", splits=("",))
    (tmp_path / "f/classes.json").unlink()
    with pytest.raises(DatasetError, match=r"missing .*classes\.json"):
        open_dataset(f"folder:{tmp_path / 'f'}")
    (tmp_path / "f/classes.json").write_text('{"not": "a list"}')
    with pytest.raises(DatasetError, match="holds a JSON dict, not a list; give a JSON list of class names"):
        open_dataset(f"folder:{tmp_path / 'f'}")
    (tmp_path / "f/classes.json").write_text('["a", "b", "c", "d", "e"]')
    (tmp_path / "f/meta.json").write_text('{"ignore_label": "x"}')
    with pytest.raises(DatasetError, match="ignore_label must be an integer"):
        open_dataset(f"folder:{tmp_path / 'f'}")
    (tmp_path / "f/meta.json").unlink()
    _write_image(tmp_path / "f/images/x0.jpg", 0)  # x0.png exists too
    with pytest.raises(DatasetError, match="two files share the stem 'x0'"):
        open_dataset(f"folder:{tmp_path / 'f'}")


def test_index_out_of_range(tmp_path):
    make_benchmark(tmp_path, "voc20")
    with pytest.raises(IndexError):
        open_dataset("voc20", "val", str(tmp_path))[3]


@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_deflate", "packbits"])
def test_compressed_16bit_tiffs_read_exactly(tmp_path, compression):
    # OpenCV and other writers compress TIFFs (OpenCV uses LZW by default)
    raw = np.random.default_rng(0).integers(0, 847, (9, 11)).astype(np.uint16)
    raw[0, 0] = 65535
    path = tmp_path / "x.tif"
    Image.fromarray(raw).save(path, compression=compression)
    np.testing.assert_array_equal(read_label(str(path), 65535, 847), _expected(raw, 65535))


# ------------------------------------------------------------------------------------------
# seen / unseen classes (meta.json "unseen_classes")


def _unseen_folder(path: Path) -> dict:
    raws = make_folder(path, splits=("train", "val"), num_classes=5)
    (path / "meta.json").write_text(json.dumps({"unseen_classes": ["thing3", "thing1"]}))
    return raws


def test_train_split_leaves_unseen_classes_out(tmp_path):
    raws = _unseen_folder(tmp_path / "zs")
    train = open_dataset(f"folder:{tmp_path / 'zs'}", "train")
    assert train.class_names == ["thing0", "thing2", "thing4"]  # seen classes, original order
    assert train.num_label_classes == 3 and train.unseen_classes == ["thing3", "thing1"]
    np.testing.assert_array_equal(train.pred_to_label, [0, 1, 2])
    # hand-worked remap: 0 -> 0, 1 -> ignore, 2 -> 1, 3 -> ignore, 4 -> 2, 255 -> ignore
    lut = {0: 0, 1: -1, 2: 1, 3: -1, 4: 2, 255: -1}
    for i in range(2):
        expected = np.vectorize(lut.get)(raws[f"train{i}"]).astype(np.int32)
        np.testing.assert_array_equal(train[i]["label"], expected)
    batch = next(iter(train_dataset(train, crop_size=16, global_batch_size=2, seed=0, shard_index=0, shard_count=1)))
    assert batch["label"].max() < 3

    val = open_dataset(f"folder:{tmp_path / 'zs'}", "val")
    assert val.class_names == [f"thing{i}" for i in range(5)] and val.unseen_classes == ["thing3", "thing1"]
    np.testing.assert_array_equal(val[0]["label"], _expected(raws["val0"], 255))
    full = open_dataset(f"folder:{tmp_path / 'zs'}", "train", full_vocabulary=True)
    assert len(full.class_names) == 5
    np.testing.assert_array_equal(full[0]["label"], _expected(raws["train0"], 255))
    assert open_dataset(f"folder:{tmp_path / 'zs'}", "val").unseen_classes == ["thing3", "thing1"]


@pytest.mark.parametrize("meta, match", [
    ({"unseen_classes": ["nope"]}, r"unseen class 'nope' is not in the class list"),
    ({"unseen_classes": "thing1"}, r"unseen_classes must be a JSON list"),
    ({"unseen_classes": [f"thing{i}" for i in range(5)]}, r"holds every class"),
])
def test_bad_unseen_classes_name_meta_json(tmp_path, meta, match):
    make_folder(tmp_path / "f", splits=("",))
    (tmp_path / "f/meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=match) as info:
        open_dataset(f"folder:{tmp_path / 'f'}", "train")
    assert "meta.json" in str(info.value)


def test_errors_are_one_line(tmp_path):
    make_folder(tmp_path / "f", splits=("",))
    (tmp_path / "f/classes.json").unlink()
    for args in [("nope",), (f"folder:{tmp_path / 'nope'}",), (f"folder:{tmp_path / 'f'}",),
                 ("voc20", "val", str(tmp_path))]:
        with pytest.raises(DatasetError) as info:
            open_dataset(*args)
        assert "\n" not in str(info.value)


def _png_rgb16(path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one): IHDR bit depth 16, colour type 2."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per scanline
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_images_of_any_bit_depth_become_8_bit_rgb_by_their_real_range(tmp_path):
    """16-bit grey, 16-bit RGB, float32 (0..1 and any range) and 1-bit images against numpy references; PIL's
    convert("RGB") alone turned the 16-bit and float ones white or black."""
    from dcp_jax.data.datasets import read_image

    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png"),
                                  np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1))

    rgb16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    _png_rgb16(tmp_path / "rgb16.png", rgb16)
    got = read_image(tmp_path / "rgb16.png").astype(int)
    assert np.abs(got - np.rint(rgb16 / 257.0)).max() <= 1  # PIL keeps the high byte: v // 256

    unit = rng.uniform(0, 1, (5, 7)).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif")[..., 0], np.rint(unit * 255.0).astype(np.uint8))
    wide = rng.uniform(-2, 6, (5, 7)).astype(np.float32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    want = np.rint((wide.astype(np.float64) - wide.min()) / (wide.max() - wide.min()) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "wide.tif")[..., 1], want)

    bits = rng.integers(0, 2, (5, 7)).astype(bool)
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_image(tmp_path / "bits.png")[..., 2], np.where(bits, 255, 0).astype(np.uint8))
