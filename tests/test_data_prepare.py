"""Tests for `python -m dcp_jax.data.prepare` on tiny fake copies of the official downloads.

Expected label values are worked out by hand from CAT-Seg's conversion rules (catseg_sed.md section 6) and the
official id tables (COCO category ids, the Pascal-Context 459-class ids), not computed with the module's tables.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from dcp_jax.data import classnames
from dcp_jax.data import prepare as prep
from dcp_jax.data.prepare import PrepareError, prepare

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _png(path: Path, array, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, np.uint8))
    if mode == "P":  # the official VOC SegmentationClass PNGs are palette images
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        image.putdata(np.asarray(array, np.uint8).ravel().tolist())
    image.save(path)


def _jpg(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Independent forward RLE: column-major runs, starting with a (possibly empty) run of zeros."""
    flat = mask.T.ravel().tolist()
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def _rle_to_string(counts: list[int]) -> str:
    """A port of pycocotools maskApi.c rleToString (the encoder; the module only has the decoder)."""
    out = []
    for i, count in enumerate(counts):
        x = count - (counts[i - 2] if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# fake raw downloads
# ----------------------------------------------------------------------------------------------------------------

# stuffthingmaps pixel = COCO id - 1. Hand-worked trainIds: id 1 person -> 0, id 11 fire hydrant -> 10, id 12 is
# not a COCO category -> 255, id 13 stop sign -> 11, id 90 toothbrush -> 79, id 91 unused -> 255, id 92 banner
# (first stuff) -> 80, id 182 wood (last stuff) -> 170, id 183 "other" -> 255, id 124 -> 80 + (124 - 92) = 112.
COCO_RAW = [[0, 10, 11, 12], [89, 90, 91, 181], [182, 255, 200, 123]]
COCO_EXPECTED = [[0, 10, 255, 11], [79, 255, 80, 170], [255, 255, 255, 112]]


def make_coco(raw: Path) -> None:
    base = raw / "coco-stuff"
    for split, stems in (("val2017", ["000000000139", "000000000285"]), ("train2017", ["000000000009"])):
        for k, stem in enumerate(stems):
            _jpg(base / "images" / split / f"{stem}.jpg", 3, 4, seed=k)
            _png(base / "annotations" / split / f"{stem}.png", np.roll(COCO_RAW, k, axis=1))


def make_ade150(raw: Path) -> None:
    base = raw / "ADEChallengeData2016"
    _jpg(base / "images/validation/ADE_val_00000001.jpg", 2, 3)
    _png(base / "annotations/validation/ADE_val_00000001.png", [[0, 1, 2], [150, 151, 255]])


# ADE object ids (objectnames index + 1) and the pixels that encode them: id = R // 10 * 256 + G.
WALL, BUILDING, SKY = 2978, 312, 2420  # 11*256+162, 1*256+56, 9*256+116
CATEGORIES = [{"name": "sky", "id": SKY, "trainId": 2}, {"name": "wall", "id": WALL, "trainId": 0},
              {"name": "building, edifice", "id": BUILDING, "trainId": 1}]
PX_WALL, PX_BUILDING, PX_SKY = (113, 162, 7), (10, 56, 0), (99, 116, 3)  # R remainders test the floor of R / 10


def make_ade847(raw: Path) -> Path:
    base = raw / "ADE20K_2021_17_01"
    val_dir = base / "images/ADE/validation/abbey"
    small = np.array([[PX_WALL, PX_BUILDING, PX_SKY, (0, 5, 0), (0, 0, 0)],
                      [(19, 56, 9), PX_WALL, (0, 0, 0), PX_SKY, (255, 255, 255)]], np.uint8)
    _jpg(val_dir / "ADE_val_00000001.jpg", 2, 5)
    Image.fromarray(small).save(val_dir / "ADE_val_00000001_seg.png")
    # 520 x 600: short side above 512 -> 512 x round(600 / 520 * 512) = 512 x 591.
    large = np.zeros((520, 600, 3), np.uint8)
    large[:100] = PX_SKY
    large[100:, :300] = PX_WALL
    large[100:, 300:] = PX_BUILDING
    _jpg(val_dir / "ADE_val_00000002.jpg", 520, 600, seed=1)
    Image.fromarray(large).save(val_dir / "ADE_val_00000002_seg.png")
    names = [f"object{i}" for i in range(3000)]
    for cat in CATEGORIES:
        names[cat["id"] - 1] = cat["name"]
    index = {"filename": ["ADE_val_00000001.jpg", "ADE_train_00000001.jpg", "ADE_val_00000002.jpg"],
             "folder": ["ADE20K_2021_17_01/images/ADE/validation/abbey",
                        "ADE20K_2021_17_01/images/ADE/training/abbey",
                        "ADE20K_2021_17_01/images/ADE/validation/abbey"],
             "objectnames": names}
    with open(base / "index_ade20k.pkl", "wb") as f:
        pickle.dump(index, f)
    categories = raw / "ade847_categories.json"
    categories.write_text(json.dumps(CATEGORIES))
    return categories


# Pascal-Context 459-space ids: 2 aeroplane -> pc59 0, 284 person -> 36, 458 wood -> 58, 1 accordion -> 255.
M_AEROPLANE = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.uint8)
M_PERSON = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], np.uint8)
M_ACCORDION = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
M_WOOD = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], np.uint8)
PC59_EXPECTED = [[0, 0, 36, 36], [0, 255, 255, 36], [58, 58, 255, 255]]


def make_pc59(raw: Path, segments_key: str = "annos_segmentation", id_key: str = "image_id") -> None:
    voc = raw / "VOCdevkit/VOC2010"
    for stem, (h, w) in {"2008_000001": (3, 4), "2008_000002": (2, 3), "2008_000003": (2, 2)}.items():
        _jpg(voc / "JPEGImages" / f"{stem}.jpg", h, w)

    def seg(image_id, cat, mask, compressed):
        counts = _rle_counts(mask)
        return {"image_id": image_id, "category_id": cat, "id": cat,
                "segmentation": {"size": list(mask.shape),
                                 "counts": _rle_to_string(counts) if compressed else counts}}

    data = {"images": [{id_key: 1, "file_name": "2008_000001.jpg", "phase": "val", "height": 3, "width": 4},
                       {id_key: 2, "file_name": "2008_000002.jpg", "phase": "val", "height": 2, "width": 3},
                       {id_key: 3, "file_name": "2008_000003.jpg", "phase": "train", "height": 2, "width": 2}],
            segments_key: [seg(1, 2, M_AEROPLANE, True), seg(1, 284, M_PERSON, False),
                           seg(1, 1, M_ACCORDION, False), seg(1, 458, M_WOOD, True),
                           seg(3, 2, np.ones((2, 2), np.uint8), True)],
            "categories": [{"category_id": 2, "name": "aeroplane"}]}
    (voc / "trainval_merged.json").write_text(json.dumps(data))


PC459_NAMES = {1: "accordion", 2: "aeroplane", 430: "unknown", 459: "zebra"}


def make_pc459(raw: Path) -> None:
    voc = raw / "VOCdevkit/VOC2010"
    lines = [f"{i}: {PC459_NAMES.get(i, f'class{i}')}" for i in range(1, 460)]
    (voc / "trainval").mkdir(parents=True, exist_ok=True)
    (voc / "labels.txt").write_text("\n".join(lines) + "\n\n")
    (voc / "pascalcontext_val.txt").write_text("2008_000001\n2008_000002\n2008_000009\n")
    scipy.io.savemat(voc / "trainval/2008_000001.mat",
                     {"LabelMap": np.array([[1, 2, 459, 430], [0, 1, 1, 3], [2, 2, 0, 459]], np.uint16)})
    scipy.io.savemat(voc / "trainval/2008_000002.mat", {"LabelMap": np.array([[5, 6], [7, 8]], np.uint16)})
    _jpg(voc / "JPEGImages/2008_000001.jpg", 3, 4)
    _jpg(voc / "JPEGImages/2008_000002.jpg", 2, 2)


PC459_EXPECTED_1 = [[0, 1, 458, 429], [459, 0, 0, 2], [1, 1, 459, 458]]  # the two 0s -> 459, not 65535

VOC_RAW = [[0, 1, 2], [20, 21, 255]]
VOC_EXPECTED = [[255, 0, 1], [19, 255, 255]]
VOC_BG_EXPECTED = [[20, 0, 1], [19, 255, 255]]


def make_voc(raw: Path) -> None:
    voc = raw / "VOCdevkit/VOC2012"
    _jpg(voc / "JPEGImages/2007_000033.jpg", 2, 3)
    _jpg(voc / "JPEGImages/2007_000042.jpg", 2, 2)
    _jpg(voc / "JPEGImages/2007_000061.jpg", 2, 2)  # not in val.txt
    _png(voc / "SegmentationClassAug/2007_000033.png", VOC_RAW)
    _png(voc / "SegmentationClassAug/2007_000042.png", [[0, 0], [5, 255]], mode="P")
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000042\n")


# ----------------------------------------------------------------------------------------------------------------
# conversions per benchmark
# ----------------------------------------------------------------------------------------------------------------


def test_coco_stuff_labels_layout_and_hardlinks(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_coco(raw)
    report = prepare("coco_stuff_171", raw, out, progress=False)
    ann = out / "coco-stuff/annotations_detectron2"
    for k, stem in enumerate(["000000000139", "000000000285"]):
        label = _read(ann / "val2017" / f"{stem}.png")
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, np.roll(COCO_EXPECTED, k, axis=1))
        assert os.path.samefile(out / "coco-stuff/images/val2017" / f"{stem}.jpg",
                                raw / "coco-stuff/images/val2017" / f"{stem}.jpg")
    np.testing.assert_array_equal(_read(ann / "train2017/000000000009.png"), COCO_EXPECTED)
    assert sorted(p.name for p in ann.iterdir()) == ["train2017", "val2017"]
    assert [(s.split, s.pairs) for s in report.splits] == [("train", 1), ("val", 2)]
    # Tiny fakes: the count check warns (not an error) and names the official counts.
    assert not report.count_ok and len(report.warnings) == 2
    err = capsys.readouterr().err
    assert "official count is 118287" in err and "official count is 5000" in err


def test_ade150_label_minus_one_and_symlinked_images(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_ade150(raw)
    report = prepare("ade150", raw, out, image_mode="symlink", count_check=False, progress=False)
    label = _read(out / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png")
    np.testing.assert_array_equal(label, [[255, 0, 1], [149, 150, 254]])
    image = out / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    assert image.is_symlink() and os.path.samefile(image, raw / "ADEChallengeData2016/images/validation"
                                                   / "ADE_val_00000001.jpg")
    assert report.warnings == [] and report.splits[0].expected is None and report.splits[0].pairs == 1


def _catseg_jpeg(array: np.ndarray) -> bytes:
    """CAT-Seg's image encode: Image.fromarray(img).save("x.jpg") (PIL's JPEG defaults)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("categories_format", ["json", "py"])
def test_ade847_ids_resize_tiff_and_no_classes_json(tmp_path, categories_format):
    raw, out = tmp_path / "raw", tmp_path / "out"
    categories = make_ade847(raw)
    if categories_format == "py":  # CAT-Seg's script is parsed, never run (the raise proves it)
        categories = raw / "prepare_ade20k_full.py"
        categories.write_text("raise SystemExit('executed')\nimport os\n"
                              f"ADE20K_SEM_SEG_FULL_CATEGORIES = {CATEGORIES!r}\n")
    report = prepare("ade847", raw, out, categories=categories, count_check=False, progress=False)
    root = out / "ADE20K_2021_17_01"
    assert not (root / "classes.json").exists()  # the vocabulary is built in

    small = Image.open(root / "annotations_detectron2/validation/ADE_val_00000001.tif")
    assert small.mode == "I;16"
    np.testing.assert_array_equal(np.array(small), [[0, 1, 2, 65535, 65535], [1, 0, 65535, 2, 65535]])
    assert Image.open(root / "images_detectron2/validation/ADE_val_00000001.jpg").size == (5, 2)

    # cv2 INTER_NEAREST picks source index floor(dst * src / dst_len): rows 0..98 come from source rows < 100
    # (98 * 520/512 = 99.5), columns 0..295 from source columns < 300 (295 * 600/591 = 299.5).
    large = np.array(Image.open(root / "annotations_detectron2/validation/ADE_val_00000002.tif"))
    expected = np.empty((512, 591), np.uint16)
    expected[:99] = 2
    expected[99:, :296] = 0
    expected[99:, 296:] = 1
    np.testing.assert_array_equal(large, expected)
    assert not list(root.glob("*_detectron2/training/*"))  # the train entry of the index is not converted
    assert report.splits[0].pairs == 2 and report.splits[0].counts["resized"] == 1
    assert not any("objectnames" in note for note in report.splits[0].notes)
    assert any("has 3 class names, ade847 has 847" in note for note in report.splits[0].notes)


def test_ade847_images_are_byte_identical_to_catseg(tmp_path):
    # CAT-Seg: img = np.asarray(Image.open(jpg)); cv2.resize(img, (w, h), INTER_LINEAR); Image.fromarray(img).save
    raw, out = tmp_path / "raw", tmp_path / "out"
    categories = make_ade847(raw)
    prepare("ade847", raw, out, categories=categories, count_check=False, progress=False)
    src_dir = raw / "ADE20K_2021_17_01/images/ADE/validation/abbey"
    dst_dir = out / "ADE20K_2021_17_01/images_detectron2/validation"
    source = np.asarray(Image.open(src_dir / "ADE_val_00000002.jpg"))  # 520 x 600: needs resizing
    resized = cv2.resize(source, (591, 512), interpolation=cv2.INTER_LINEAR)
    assert (dst_dir / "ADE_val_00000002.jpg").read_bytes() == _catseg_jpeg(resized)
    small = np.asarray(Image.open(src_dir / "ADE_val_00000001.jpg"))  # kept at its size, re-encoded
    assert (dst_dir / "ADE_val_00000001.jpg").read_bytes() == _catseg_jpeg(small)


def test_ade847_requires_categories_and_flags_mismatched_names(tmp_path):
    raw = tmp_path / "raw"
    categories = make_ade847(raw)
    with pytest.raises(PrepareError, match=r"ADE20K_SEM_SEG_FULL_CATEGORIES.*prepare_ade20k_full\.py"):
        prepare("ade847", raw, tmp_path / "out", progress=False)
    bad = raw / "bad.json"
    bad.write_text(json.dumps([{"name": "wall", "id": WALL, "trainId": 1}]))
    with pytest.raises(PrepareError, match="trainIds must be 0..0"):
        prepare("ade847", raw, tmp_path / "out", categories=bad, progress=False)
    renamed = [dict(c, name=c["name"] + "!") if c["id"] == SKY else c for c in CATEGORIES]
    categories.write_text(json.dumps(renamed))
    report = prepare("ade847", raw, tmp_path / "out2", categories=categories, count_check=False, progress=False)
    assert any("1 categories differ from index_ade20k.pkl's objectnames" in n for n in report.splits[0].notes)


@pytest.mark.parametrize("segments_key,id_key", [("annos_segmentation", "image_id"), ("annotations", "id")])
def test_pc59_rle_both_forms(tmp_path, segments_key, id_key):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_pc59(raw, segments_key, id_key)
    report = prepare("pc59", raw, out, image_mode="copy", count_check=False, progress=False)
    ann = out / "VOCdevkit/VOC2010/annotations_detectron2/pc59_val"
    np.testing.assert_array_equal(_read(ann / "2008_000001.png"), PC59_EXPECTED)
    np.testing.assert_array_equal(_read(ann / "2008_000002.png"), np.full((2, 3), 255))  # no segments: background
    assert sorted(p.name for p in ann.iterdir()) == ["2008_000001.png", "2008_000002.png"]  # train image skipped
    copied = out / "VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (raw / "VOCdevkit/VOC2010/JPEGImages"
                                                               / "2008_000001.jpg").read_bytes()
    assert report.splits[0].pairs == 2


def test_rle_decoding_matches_hand_worked_examples():
    # maskApi.c: "0X12mN" = runs 0, 40, 2, then a delta of -35 against runs[1] -> 5.
    assert prep.rle_string_to_counts("0X12mN") == [0, 40, 2, 5]
    assert prep.rle_string_to_counts(b"0X12mN") == [0, 40, 2, 5]
    # Column-major: [[0,1,1],[1,0,0]] reads 0,1 | 1,0 | 1,0 -> runs 1 zero, 2 ones, 1 zero, 1 one, 1 zero.
    mask = np.array([[0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(prep.rle_decode({"size": [2, 3], "counts": [1, 2, 1, 1, 1]}), mask)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((rng.integers(1, 30), rng.integers(1, 30))) < rng.random()).astype(np.uint8)
        counts = _rle_counts(mask)
        for form in (counts, _rle_to_string(counts)):
            np.testing.assert_array_equal(prep.rle_decode({"size": list(mask.shape), "counts": form}), mask)
    with pytest.raises(ValueError, match="sum to 5"):
        prep.rle_decode({"size": [2, 3], "counts": [1, 2, 2]})


def test_pc459_tiff_wrap_guard_and_no_classes_json(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_pc459(raw)
    report = prepare("pc459", raw, raw, progress=False)  # in place, as CAT-Seg does
    voc = raw / "VOCdevkit/VOC2010"
    tif = Image.open(voc / "annotations_detectron2/pc459_val/2008_000001.tif")
    assert tif.mode == "I;16"
    labels = np.array(tif)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, PC459_EXPECTED_1)
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2/pc459_val/2008_000002.tif"), [[4, 5], [6, 7]])
    assert not (voc / "classes_pc459.json").exists()
    split = report.splits[0]
    assert split.pairs == 2 and split.counts["missing_raw"] == 1 and split.counts["pc459_zero_pixels"] == 2
    out = capsys.readouterr().out
    assert "2 pixels in 1 LabelMaps were 0" in out and "5104" in out
    assert "expected 5105 or 5104: MISMATCH" in out
    assert "1 listed sample(s) have no raw file" in out and "2008_000009.mat" in out
    # labels.txt is only compared: the fake's names 'class4', ... differ from CAT-Seg's
    assert "class names in " in out and "differ from the built-in pc459 list" in out


def test_pc459_labels_txt_spelled_with_spaces_matches_and_is_optional(tmp_path):
    raw = tmp_path / "raw"
    make_pc459(raw)
    voc = raw / "VOCdevkit/VOC2010"
    names = classnames.load("pc459")
    spaced = {2: "air conditioner", 7: "baby carriage"}  # labels.txt style; CAT-Seg drops the spaces
    (voc / "labels.txt").write_text("".join(f"{i + 1}: {spaced.get(i, n)}\n" for i, n in enumerate(names)))
    report = prepare("pc459", raw, tmp_path / "out", count_check=False, progress=False)
    assert not any("differ" in note for note in report.splits[0].notes)
    (voc / "labels.txt").unlink()
    report = prepare("pc459", raw, tmp_path / "out2", count_check=False, progress=False)
    assert report.splits[0].pairs == 2


def test_voc_both_variants_in_place(tmp_path):
    raw = tmp_path / "raw"
    make_voc(raw)
    report = prepare("voc20b", raw, progress=False, count_check=False)  # --out defaults to --raw
    voc = raw / "VOCdevkit/VOC2012"
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2/val/2007_000033.png"), VOC_EXPECTED)
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2_bg/val/2007_000033.png"), VOC_BG_EXPECTED)
    # palette PNG: the indices are the labels
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2/val/2007_000042.png"), [[255, 255], [4, 255]])
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2_bg/val/2007_000042.png"), [[20, 20], [4, 255]])
    assert [(s.benchmark, s.pairs) for s in report.splits] == [("voc20", 2), ("voc20b", 2)]
    assert sorted(p.name for p in (voc / "annotations_detectron2/val").iterdir()) == ["2007_000033.png",
                                                                                      "2007_000042.png"]


# ----------------------------------------------------------------------------------------------------------------
# idempotence, user files, count check, errors
# ----------------------------------------------------------------------------------------------------------------


def test_second_run_skips_and_user_files_are_kept_unless_overwrite(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_voc(raw)
    user_file = out / "VOCdevkit/VOC2012/annotations_detectron2/val/2007_000033.png"
    user_file.parent.mkdir(parents=True)
    user_file.write_bytes(b"mine")
    first = prepare("voc20", raw, out, count_check=False, progress=False)
    assert user_file.read_bytes() == b"mine"  # never replaced silently
    assert first.splits[0].counts == {"written": 2, "files_written": 3, "images_placed": 2}
    written = out / "VOCdevkit/VOC2012/annotations_detectron2_bg/val/2007_000033.png"
    stat = written.stat()
    second = prepare("voc20", raw, out, count_check=False, progress=False)
    assert second.splits[0].counts == {"skipped": 2}
    assert written.stat().st_mtime_ns == stat.st_mtime_ns and written.stat().st_ino == stat.st_ino
    prepare("voc20", raw, out, overwrite=True, count_check=False, progress=False)
    np.testing.assert_array_equal(_read(user_file), VOC_EXPECTED)
    assert not list(out.rglob("*.part"))


def test_count_check_strict_and_disabled(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_voc(raw)
    report = prepare("voc20", raw, tmp_path / "out", progress=False)
    assert report.warnings and "2 image/label pairs, the official count is 1449" in report.warnings[0]
    assert "WARNING: voc20 val: 2 image/label pairs" in capsys.readouterr().err
    with pytest.raises(PrepareError, match=r"(?s)--strict.*official count is 1449"):
        prepare("voc20", raw, tmp_path / "out", strict=True, progress=False)
    assert prepare("voc20", raw, tmp_path / "out", count_check=False, strict=True, progress=False).warnings == []


@pytest.mark.parametrize("benchmark,make,match", [
    ("coco_stuff_171", None, r"coco-stuff/images/train2017.*train2017\.zip"),
    ("coco_stuff_171", lambda r: (r / "coco-stuff/images/train2017").mkdir(parents=True),
     r"coco-stuff/annotations/train2017.*--split val.*stuffthingmaps_trainval2017\.zip"),
    ("ade150", None, r"ADEChallengeData2016.*ADEChallengeData2016\.zip"),
    ("ade847", None, r"ADE20K_2021_17_01.*ade20k\.csail\.mit\.edu"),
    ("pc59", None, r"VOCdevkit/VOC2010.*VOCtrainval_03-May-2010\.tar"),
    ("pc59", lambda r: (r / "VOCdevkit/VOC2010/JPEGImages").mkdir(parents=True), r"trainval_merged\.json"),
    ("pc459", lambda r: (r / "VOCdevkit/VOC2010/JPEGImages").mkdir(parents=True), r"trainval\.tar\.gz"),
    ("voc20", lambda r: (r / "VOCdevkit/VOC2012/JPEGImages").mkdir(parents=True), r"SegmentationClassAug"),
])
def test_missing_raw_inputs_name_the_path_and_download(tmp_path, benchmark, make, match):
    raw = tmp_path / "raw"
    raw.mkdir()
    if make:
        make(raw)
    with pytest.raises(PrepareError, match=match):
        prepare(benchmark, raw, tmp_path / "out", progress=False)


def test_pc459_val_list_missing_and_bad_inputs(tmp_path):
    raw = tmp_path / "raw"
    make_pc459(raw)
    (raw / "VOCdevkit/VOC2010/pascalcontext_val.txt").unlink()
    with pytest.raises(PrepareError, match=r"pascalcontext_val\.txt.*CAT-Seg"):
        prepare("pc459", raw, progress=False)
    make_coco(raw)
    corrupt = raw / "coco-stuff/annotations/val2017/000000000285.png"
    corrupt.write_bytes(b"\x89PNG truncated")
    with pytest.raises(PrepareError, match=r"000000000285\.png"):
        prepare("coco_stuff_171", raw, tmp_path / "out", splits="val", progress=False)
    with pytest.raises(PrepareError, match="no split 'test'"):
        prepare("ade150", raw, splits=["test"], progress=False)
    with pytest.raises(PrepareError, match="only applies to ade847"):
        prepare("voc20", raw, categories="x.json", progress=False)


def test_ade847_target_size():
    assert prep.ade847_target_size(520, 600) == (512, 591)
    assert prep.ade847_target_size(600, 520) == (591, 512)
    assert prep.ade847_target_size(1000, 1000) == (512, 512)
    assert prep.ade847_target_size(512, 700) is None and prep.ade847_target_size(300, 400) is None


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dcp_jax.data.prepare", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli_with_worker_pool(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_voc(raw)
    result = _cli("voc20", "--raw", str(raw), "--out", str(out), "--workers", "2", "--nocount-check")
    assert result.returncode == 0, result.stderr
    voc = out / "VOCdevkit/VOC2012"
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2/val/2007_000033.png"), VOC_EXPECTED)
    np.testing.assert_array_equal(_read(voc / "annotations_detectron2_bg/val/2007_000033.png"), VOC_BG_EXPECTED)
    assert "voc20 val: 2 image/label pairs" in result.stdout and "voc20b val: 2" in result.stdout
    assert (voc / "JPEGImages/2007_000033.jpg").stat().st_nlink == 2  # hard link
    assert not (voc / "JPEGImages/2007_000061.jpg").exists()


def test_cli_help_and_errors(tmp_path):
    help_text = _cli("--help").stdout
    for needle in ("stuffthingmaps_trainval2017.zip", "ADEChallengeData2016.zip", "index_ade20k.pkl",
                   "trainval_merged.json", "trainval.tar.gz", "pascalcontext_val.txt", "SegmentationClassAug",
                   "--[no]count-check", "--[no]strict", "--[no]overwrite"):
        assert needle in help_text
    (tmp_path / "raw").mkdir()
    result = _cli("ade150", "--raw", str(tmp_path / "raw"), "--noprogress")
    assert result.returncode == 2 and "error: missing directory" in result.stderr
    assert "ADEChallengeData2016.zip" in result.stderr




# ----------------------------------------------------------------------------------------------------------------
# bad input as a new user meets it: one clear message naming the file and the fix, nothing of theirs overwritten
# ----------------------------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_ade847_jpg_is_named_and_user_files_kept(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    categories = make_ade847(raw)
    bad = raw / "ADE20K_2021_17_01/images/ADE/validation/abbey/ADE_val_00000002.jpg"
    _truncate(bad)
    mine = out / "ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_00000001.tif"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"mine")
    before = mine.stat().st_mtime_ns
    with pytest.raises(PrepareError, match=rf"cannot read {bad}.*truncated or corrupt: extract it again from "
                                           r"ADE20K_2021_17_01\.zip"):
        prepare("ade847", raw, out, categories=categories, count_check=False, progress=False)
    assert mine.read_bytes() == b"mine" and mine.stat().st_mtime_ns == before
    assert not (out / "ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_00000002.tif").exists()


@pytest.mark.parametrize("benchmark", ["ade847", "pc59"])
def test_truncated_index_or_json_is_named_with_the_fix(tmp_path, benchmark):
    raw, out = tmp_path / "raw", tmp_path / "out"
    kwargs = {}
    if benchmark == "ade847":
        kwargs["categories"] = make_ade847(raw)
        bad, fix = raw / "ADE20K_2021_17_01/index_ade20k.pkl", r"extract it again from ADE20K_2021_17_01\.zip"
    else:
        make_pc59(raw)
        bad, fix = raw / "VOCdevkit/VOC2010/trainval_merged.json", r"download it again \(trainval_merged\.json"
    _truncate(bad)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match=rf"cannot read {bad}: .*truncated or corrupt: {fix}") as info:
        prepare(benchmark, raw, out, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt"]


@pytest.mark.parametrize("benchmark, make, inner, holder", [
    ("ade150", make_ade150, "ADEChallengeData2016", "ADEChallengeData2016/"),
    ("voc20", make_voc, "VOCdevkit/VOC2012", "VOCdevkit/"),
])
def test_raw_one_level_too_deep_says_where_to_point(tmp_path, benchmark, make, inner, holder):
    raw = tmp_path / "raw"
    make(raw)
    with pytest.raises(PrepareError, match=rf"point --raw at the folder that holds {holder} \({raw}\)"):
        prepare(benchmark, raw / inner, tmp_path / "out", progress=False)
    with pytest.raises(PrepareError, match=rf"one level too high: point --raw at the folder that holds {holder} "
                                           rf"\({raw}\)"):
        prepare(benchmark, tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _empty_ade150_images(raw):
    make_ade150(raw)
    for p in (raw / "ADEChallengeData2016/images/validation").iterdir():
        p.unlink()
    return raw / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"


def _empty_trainval(raw):
    make_pc459(raw)
    for p in (raw / "VOCdevkit/VOC2010/trainval").iterdir():
        p.unlink()
    return raw / "VOCdevkit/VOC2010/trainval/2008_000001.mat"


def _empty_coco_val_images(raw):
    make_coco(raw)
    for p in (raw / "coco-stuff/images/val2017").iterdir():
        p.unlink()
    return raw / "coco-stuff/images/val2017/000000000139.jpg"


@pytest.mark.parametrize("benchmark, damage, count", [("ade150", _empty_ade150_images, "1 of 1"),
                                                      ("pc459", _empty_trainval, "3 of 3"),
                                                      ("coco_stuff_171", _empty_coco_val_images, "2 of 2")])
def test_half_extracted_download_stops_naming_the_first_missing_files(tmp_path, benchmark, damage, count):
    raw, out = tmp_path / "raw", tmp_path / "out"
    first_missing = damage(raw)
    with pytest.raises(PrepareError, match=rf"{count} listed samples lack a raw file, first {first_missing}.*"
                                           r"half-extracted: extract .* again.*Nothing of val was written"):
        prepare(benchmark, raw, out, splits="val", progress=False)
    assert not out.exists()


def test_half_extracted_cli_exits_non_zero_with_one_error_line(tmp_path):
    raw = tmp_path / "raw"
    first_missing = _empty_coco_val_images(raw)
    result = _cli("coco_stuff_171", "--raw", str(raw), "--out", str(tmp_path / "out"), "--split", "val",
                  "--noprogress")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "python -m dcp_jax.data.prepare: error: coco_stuff_171 val: 2 of 2")
    assert str(first_missing) in result.stderr and "Traceback" not in result.stderr


def test_raw_label_newer_than_its_output_is_reported_not_kept(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_voc(raw)
    prepare("voc20", raw, out, count_check=False, progress=False)
    src = raw / "VOCdevkit/VOC2012/SegmentationClassAug/2007_000042.png"
    _png(src, VOC_RAW[:2])  # the user fixed a raw label after converting
    later = os.stat(src).st_mtime + 100
    os.utime(src, (later, later))
    before = _snapshot(out)
    with pytest.raises(PrepareError, match=r"voc20/voc20b val: 1 converted files are older than their raw input, first "
                                           rf".*2007_000042\.png \(raw {src} is newer\)\. Rerun with --overwrite"):
        prepare("voc20", raw, out, count_check=False, progress=False)
    assert _snapshot(out) == before
    prepare("voc20", raw, out, overwrite=True, count_check=False, progress=False)
    np.testing.assert_array_equal(_read(out / "VOCdevkit/VOC2012/annotations_detectron2/val/2007_000042.png"),
                                  VOC_EXPECTED)
