"""Synthetic folder dataset: layout, determinism, content, and that classes are locally recoverable."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dcp_jax.data import synthetic
from dcp_jax.data.datasets import open_dataset


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_loading(tmp_path):
    out = synthetic.write_synthetic_dataset(tmp_path / "syn", num_images=10, seed=3, size=40, num_classes=6)
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "classes.json", "images", "meta.json"]
    assert json.loads((out / "classes.json").read_text()) == list(synthetic.CLASS_NAMES[:6])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ignore_label"] == 255 and meta["num_val"] == 2  # round(10 * 0.25) = 2 (banker's: 2.5 -> 2)
    train, val = open_dataset(f"folder:{out}", "train"), open_dataset(f"folder:{out}", "val")
    assert (len(train), len(val)) == (8, 2) and train.name == "syn"
    assert [p.split("/")[-1] for p in val.label_paths] == ["000008.png", "000009.png"]
    seen = set()
    for i in range(len(train)):
        item = train[i]
        h, w = item["label"].shape
        assert 30 <= h <= 50 and 30 <= w <= 50 and item["image"].shape == (h, w, 3)
        seen |= set(np.unique(item["label"]).tolist())
    assert -1 in seen  # the ignore ring around things
    assert seen - {-1} <= set(range(6)) and len(seen - {-1}) >= 4


def test_deterministic_for_a_seed(tmp_path):
    a = synthetic.write_synthetic_dataset(tmp_path / "a", num_images=6, seed=7, size=32)
    b = synthetic.write_synthetic_dataset(tmp_path / "b", num_images=6, seed=7, size=32)
    c = synthetic.write_synthetic_dataset(tmp_path / "c", num_images=6, seed=8, size=32)
    assert _files(a) == _files(b)
    fa, fc = _files(a), _files(c)
    assert fa.keys() == fc.keys()
    assert sum(fa[k] != fc[k] for k in fa if k.startswith("images/")) == 6


def test_overwrite_protection(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path / "s", num_images=2, seed=0, size=32)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.write_synthetic_dataset(tmp_path / "s", num_images=2, seed=0, size=32)
    synthetic.write_synthetic_dataset(tmp_path / "s", num_images=3, seed=0, size=32, overwrite=True,
                                      val_fraction=0)
    assert len(list((tmp_path / "s/images/train").iterdir())) == 3
    assert not list((tmp_path / "s/images/val").iterdir())
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.write_synthetic_dataset(tmp_path / "t", num_images=2, seed=0, num_classes=99)


def test_command_line(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--num-images", "4", "--seed", "1", "--size", "32"])
    assert "folder:" in capsys.readouterr().out
    assert len(list((tmp_path / "cli/annotations/train").iterdir())) == 3
    assert Image.open(tmp_path / "cli/annotations/val/000003.png").mode == "L"


def _local_features(image):
    x = image.astype(np.float32)
    mean = ndimage.uniform_filter(x, (5, 5, 1))
    std = np.sqrt(np.maximum(ndimage.uniform_filter(x * x, (5, 5, 1)) - mean * mean, 0))
    return np.concatenate([mean, std], -1).reshape(-1, 6)


def test_classes_are_recoverable_from_local_colour_and_texture(tmp_path):
    # A nearest-centroid classifier on 5x5 colour mean/std, fit on train and scored on val, already
    # reaches a good mIoU: the signal a tiny model must learn is local.
    out = synthetic.write_synthetic_dataset(tmp_path / "s", num_images=32, seed=0, size=64)
    feats, labels = {}, {}
    for split in ("train", "val"):
        ds = open_dataset(f"folder:{out}", split)
        items = [ds[i] for i in range(len(ds))]
        feats[split] = np.concatenate([_local_features(x["image"]) for x in items])
        labels[split] = np.concatenate([x["label"].ravel() for x in items])
    num_classes = len(synthetic.CLASS_NAMES)
    known = labels["train"] >= 0
    mu, sd = feats["train"][known].mean(0), feats["train"][known].std(0)
    z_train, z_val = (feats["train"] - mu) / sd, (feats["val"] - mu) / sd
    centroids = np.stack([z_train[labels["train"] == c].mean(0) for c in range(num_classes)])
    pred = ((z_val[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    scored = labels["val"] >= 0
    conf = np.bincount(labels["val"][scored] * num_classes + pred[scored],
                       minlength=num_classes**2).reshape(num_classes, num_classes)
    present = conf.sum(1) > 0
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert present.sum() >= 7
    assert iou[present].mean() >= 0.5
