"""Built-in vocabularies: equal to CAT-Seg's class lists name for name, guarded by checksums."""

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest

from dcp_jax.data import classnames

# CAT-Seg's datasets/*.json (MIT), as shipped in ../shared/reference/catseg_datasets/ beside the repo.
REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/catseg_datasets"
REFERENCE_FILE = {"coco_stuff_171": "coco.json", "ade150": "ade150.json", "ade847": "ade847.json",
                  "pc59": "pc59.json", "pc459": "pc459.json", "voc20": "voc20.json", "voc20b": "voc20b.json"}


def test_all_seven_benchmarks_are_built_in():
    assert set(classnames.BUILTIN) == set(REFERENCE_FILE)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference/catseg_datasets is not beside the repo")
@pytest.mark.parametrize("name", sorted(REFERENCE_FILE))
def test_equal_to_catseg_reference_name_for_name(name):
    reference = json.loads((REFERENCE / REFERENCE_FILE[name]).read_text(encoding="utf-8"))
    assert classnames.load(name) == reference


@pytest.mark.parametrize("name", classnames.BUILTIN)
def test_json_matches_recorded_sha256(name):
    # An accidental edit of a JSON list changes the vocabulary a model is scored with.
    stored = resources.files("dcp_jax.data").joinpath("classnames", f"{name}.json").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == classnames.SHA256[name]


@pytest.mark.parametrize("name, size", [("coco_stuff_171", 171), ("ade150", 150), ("ade847", 847), ("pc59", 59),
                                        ("pc459", 459), ("voc20", 20), ("voc20b", 59)])
def test_sizes_and_unique(name, size):
    names = classnames.load(name)
    assert len(names) == size == len(set(names))
    assert all(isinstance(n, str) and n.strip() for n in names)


def test_entries_the_issue_names():
    # Checked by hand against CAT-Seg's files: PC-59 index 49 is 'diningtable' (not 'table'), PC-459 spells
    # names without spaces, ADE-150 keeps detectron2's trailing space, voc20b's background names are not sorted.
    assert classnames.load("pc59")[49] == "diningtable"
    assert classnames.load("pc459")[:3] == ["accordion", "aeroplane", "airconditioner"]
    assert classnames.load("pc459")[7] == "babycarriage" and classnames.load("pc459")[430] == "unknown"
    assert classnames.load("ade150")[7] == "bed "
    assert classnames.load("ade847")[:2] == ["wall", "building, edifice"]
    voc20b = classnames.load("voc20b")
    assert voc20b[:20] == classnames.load("voc20")
    assert voc20b[20:24] == ["bag", "bed", "bench", "book"] and voc20b[41] == "curtain"
    assert set(voc20b[20:]) == set(classnames.load("pc59")) - set(classnames.load("voc20"))
    coco = classnames.load("coco_stuff_171")
    assert coco[0] == "person" and coco[79] == "toothbrush" and coco[80] == "banner" and coco[-1] == "wood"


def test_unknown_name_and_edited_file(monkeypatch):
    with pytest.raises(KeyError, match="built-in lists: ade150, ade847"):
        classnames.load("nope")
    monkeypatch.setitem(classnames.SHA256, "voc20", "0" * 64)
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        classnames.load("voc20")
