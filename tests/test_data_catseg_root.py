"""A data root that CAT-Seg's own scripts prepared evaluates as it is (ade847 and pc459).

The fake roots are laid out exactly as CAT-Seg's `datasets/prepare_ade20k_full.py` and
`datasets/prepare_pascal_context_459.py` leave them: their conversion steps are transcribed below
(not dcp_jax's prepare), raw downloads stay in place, and no class-name file exists.
"""

import pickle
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from dcp_jax.data import classnames
from dcp_jax.data.datasets import open_dataset
from dcp_jax.data.pipeline import eval_dataset

# ADE object ids -> trainIds, a few entries of CAT-Seg's ADE20K_SEM_SEG_FULL_CATEGORIES.
ID_MAP = {2978: 0, 312: 1, 2420: 2}
PX = {2978: (113, 162, 7), 312: (10, 56, 0), 2420: (99, 116, 3)}  # id = R // 10 * 256 + G


def _jpg(path: Path, shape, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)


def catseg_prepare_ade20k_full(dataset_dir: Path) -> None:
    """prepare_ade20k_full.py's __main__, step for step (validation only, as it ships)."""
    with open(dataset_dir / "ADE20K_2021_17_01" / "index_ade20k.pkl", "rb") as f:
        index = pickle.load(f)
    for name in ["training", "validation"]:
        (dataset_dir / "ADE20K_2021_17_01" / "images_detectron2" / name).mkdir(parents=True, exist_ok=True)
        (dataset_dir / "ADE20K_2021_17_01" / "annotations_detectron2" / name).mkdir(parents=True, exist_ok=True)
    for folder_name, file_name in zip(index["folder"], index["filename"]):
        split = "validation" if file_name.split("_")[1] == "val" else "training"
        if split == "training":
            continue
        img_name = str(dataset_dir / folder_name / file_name)
        with Image.open(img_name.replace(".jpg", "_seg.png")) as io:
            seg = np.array(io)
        lab = (seg[:, :, 0] / 10).astype(np.int32) * 256 + seg[:, :, 1].astype(np.int32)
        img = np.asarray(Image.open(img_name))
        h, w = img.shape[0], img.shape[1]
        resize = True
        if w >= h > 512:
            h_new, w_new = 512, round(w / float(h) * 512)
        elif h >= w > 512:
            h_new, w_new = round(h / float(w) * 512), 512
        else:
            resize = False
        if resize:
            img = cv2.resize(img, (w_new, h_new), interpolation=cv2.INTER_LINEAR)
            lab = cv2.resize(lab, (w_new, h_new), interpolation=cv2.INTER_NEAREST)
        output = np.zeros_like(lab, dtype=np.uint16) + 65535
        for obj_id in np.unique(lab):
            if obj_id in ID_MAP:
                output[lab == obj_id] = ID_MAP[obj_id]
        Image.fromarray(img).save(dataset_dir / "ADE20K_2021_17_01" / "images_detectron2" / split / file_name)
        Image.fromarray(output).save(dataset_dir / "ADE20K_2021_17_01" / "annotations_detectron2" / split
                                     / file_name.replace(".jpg", ".tif"))


def test_catseg_prepared_ade847_root_evaluates_as_it_is(tmp_path):
    scene = tmp_path / "ADE20K_2021_17_01/images/ADE/validation/abbey"
    small = np.array([[PX[2978], PX[312], PX[2420], (0, 5, 0)], [(0, 0, 0), PX[2978], PX[312], PX[2420]]], np.uint8)
    _jpg(scene / "ADE_val_00000001.jpg", (2, 4), 0)
    Image.fromarray(small).save(scene / "ADE_val_00000001_seg.png")
    large = np.zeros((520, 530, 3), np.uint8)  # short side 520 > 512: resized to 512 x 522
    large[:, :300] = PX[2978]
    large[:, 300:] = PX[2420]
    _jpg(scene / "ADE_val_00000002.jpg", (520, 530), 1)
    Image.fromarray(large).save(scene / "ADE_val_00000002_seg.png")
    _jpg(tmp_path / "ADE20K_2021_17_01/images/ADE/training/abbey/ADE_train_00000001.jpg", (2, 2), 2)
    index = {"filename": ["ADE_val_00000001.jpg", "ADE_train_00000001.jpg", "ADE_val_00000002.jpg"],
             "folder": ["ADE20K_2021_17_01/images/ADE/validation/abbey", "ADE20K_2021_17_01/images/ADE/training/abbey",
                        "ADE20K_2021_17_01/images/ADE/validation/abbey"]}
    with open(tmp_path / "ADE20K_2021_17_01/index_ade20k.pkl", "wb") as f:
        pickle.dump(index, f)
    catseg_prepare_ade20k_full(tmp_path)
    assert not list(tmp_path.rglob("*.json"))  # CAT-Seg writes no class-name file

    ds = open_dataset("ade847", "val", str(tmp_path))
    assert ds.class_names == classnames.load("ade847") and len(ds) == 2
    items = list(eval_dataset(ds, short_side=32))
    assert [x["name"] for x in items] == ["ADE_val_00000001", "ADE_val_00000002"]
    np.testing.assert_array_equal(items[0]["label"], [[0, 1, 2, -1], [-1, 0, 1, 2]])  # 65535 -> ignore
    # nearest: output column x reads source column floor(x * 530 / 522); x = 295 -> 299 (wall), 296 -> 300 (sky)
    assert items[1]["label"].shape == (512, 522)
    assert (items[1]["label"][:, :296] == 0).all() and (items[1]["label"][:, 296:] == 2).all()
    assert ds.notes() == []


def catseg_prepare_pascal_context_459(dataset_dir: Path) -> None:
    """prepare_pascal_context_459.py's __main__, step for step."""
    pc_path = dataset_dir / "VOCdevkit/VOC2010"
    pc459_dir = pc_path / "annotations_detectron2" / "pc459_val"
    pc459_dir.mkdir(parents=True, exist_ok=True)
    for line in open(pc_path / "pascalcontext_val.txt").readlines():
        fileid = line.strip()
        ori_mask = pc_path / "trainval" / f"{fileid}.mat"
        if ori_mask.exists():
            mask = scipy.io.loadmat(ori_mask)["LabelMap"]
            mask = mask - 1  # uint16: a 0 wraps to 65535
            assert np.amin(mask) >= 0
            Image.fromarray(mask).save(pc459_dir / f"{fileid}.tif", "TIFF")


def test_catseg_prepared_pc459_root_evaluates_as_it_is_and_notes_the_wrap(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2010"
    maps = {"2008_000001": np.array([[1, 2, 459], [431, 0, 0]], np.uint16),  # two 0s: CAT-Seg writes 65535
            "2008_000002": np.array([[5, 0, 7]], np.uint16),
            "2008_000003": np.array([[3, 3, 3]], np.uint16)}
    (voc / "trainval").mkdir(parents=True)
    for stem, label_map in maps.items():
        scipy.io.savemat(voc / "trainval" / f"{stem}.mat", {"LabelMap": label_map})
        _jpg(voc / "JPEGImages" / f"{stem}.jpg", label_map.shape, 0)
    _jpg(voc / "JPEGImages/2008_000099.jpg", (2, 2), 1)  # a train image: JPEGImages holds every split
    (voc / "pascalcontext_val.txt").write_text("2008_000001\n2008_000002\n2008_000007\n")  # 7: no .mat
    (voc / "labels.txt").write_text("1: accordion\n2: aeroplane\n3: air conditioner\n")
    catseg_prepare_pascal_context_459(tmp_path)
    assert np.array(Image.open(voc / "annotations_detectron2/pc459_val/2008_000001.tif"))[1, 1] == 65535

    ds = open_dataset("pc459", "val", str(tmp_path))
    assert ds.class_names == classnames.load("pc459") and len(ds) == 2
    items = list(eval_dataset(ds, short_side=0))
    np.testing.assert_array_equal(items[0]["label"], [[0, 1, 458], [430, -1, -1]])  # 430 'unknown' is scored
    np.testing.assert_array_equal(items[1]["label"], [[4, -1, 6]])
    assert ds.notes() == [
        "pc459: 3 label pixels in 2 images held 65535, CAT-Seg's uint16 wrap of a LabelMap 0; they were read as "
        f"ignore. `python -m dcp_jax.data.prepare pc459 --raw {tmp_path} --overwrite` writes them the dcp_jax way "
        "(459)."]
