"""Built-in class-name lists: stored hashes, sizes, the known quirks of the CAT-Seg lists."""

import pytest

from dcp_jax.data import classnames


@pytest.mark.parametrize("name", classnames.BUILTIN)
def test_json_matches_recorded_sha256(name):
    # An accidental edit of a JSON list changes the vocabulary a model is scored with.
    assert classnames.file_sha256(name) == classnames.SHA256[name]


@pytest.mark.parametrize("name, size", [("coco_stuff_171", 171), ("ade150", 150), ("pc59", 59), ("voc20", 20),
                                        ("voc20b", 59)])
def test_sizes_and_unique(name, size):
    names = classnames.load(name)
    assert len(names) == size
    assert len(set(names)) == size
    assert all(isinstance(n, str) and n.strip() for n in names)


def test_known_entries():
    coco = classnames.load("coco_stuff_171")
    assert coco[0] == "person" and coco[79] == "toothbrush"  # 80 things first
    assert coco[80] == "banner" and coco[-1] == "wood"  # then 91 stuff, alphabetical
    assert coco[80:] == sorted(coco[80:])
    assert "building-other" in coco
    ade = classnames.load("ade150")
    assert ade[7] == "bed "  # the trailing space is part of CAT-Seg's / detectron2's list
    assert ade[:3] == ["wall", "building", "sky"] and ade[-1] == "flag"
    pc59 = classnames.load("pc59")
    assert pc59 == sorted(pc59)


def test_voc20b_is_voc20_plus_pc59_background():
    voc20, voc20b, pc59 = classnames.load("voc20"), classnames.load("voc20b"), classnames.load("pc59")
    assert voc20b[:20] == voc20
    background = voc20b[20:]
    assert len(background) == 39 and background == sorted(background)
    assert set(background) < set(pc59)
    # the PC-59 classes left out are the VOC classes ('table' is VOC's 'diningtable')
    assert set(pc59) - set(background) == (set(voc20) - {"diningtable"}) | {"table"}


def test_unknown_name_error_mentions_classes_json():
    with pytest.raises(KeyError, match="classes.json"):
        classnames.load("ade847")
    with pytest.raises(KeyError, match="built-in lists: ade150"):
        classnames.load("nope")
