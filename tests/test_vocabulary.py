"""One reader for every vocabulary (dcp_jax/vocabulary.py) and each way a vocabulary enters: predict's --classes
and --classes-file, the page's box, a folder dataset's classes.json (issue 32 item 5)."""

import json

import pytest

from dcp_jax import predict, serve, vocabulary
from dcp_jax.data.datasets import DatasetError, read_class_list

BOM = "\ufeff".encode()


@pytest.mark.parametrize("raw, names", [
    (BOM + b'["cat", "dog"]', ["cat", "dog"]),  # Windows Notepad's UTF-8 with a byte-order mark
    (BOM + b"building, edifice\nsky\n", ["building, edifice", "sky"]),
    (b"cat, dog ,grass", ["cat", "dog", "grass"]),  # one line: commas
    (b"\n  [\"a b\", \" c \"]\n", ["a b", "c"]),
    ("chat noir\n猫\n".encode(), ["chat noir", "猫"]),
])
def test_files_and_the_box_read_the_same(tmp_path, raw, names):
    path = tmp_path / "classes.txt"
    path.write_bytes(raw)
    assert predict.read_classes(None, str(path)) == names
    assert serve.parse_vocabulary(raw.decode("utf-8-sig")) == names


@pytest.mark.parametrize("text, error", [
    ('{"cat": 0, "dog": 1}', "holds a JSON dict, not a list"),  # was one class named '{"cat": 0, "dog": 1}'
    ("[1, 2]", "entries that are not class names: [1, 2]"),
    ('["cat", "dog"', "not valid JSON"),
    ("cat, Cat", "names a class more than once (ignoring case and spaces): ['Cat', 'cat']"),
    (" , \n", "is empty: give at least one class name"),
])
def test_every_entry_point_refuses_the_same(tmp_path, text, error):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    for read in (lambda: predict.read_classes(None, str(path)), lambda: serve.parse_vocabulary(text),
                 lambda: vocabulary.parse(text, where="x")):
        with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            read()


@pytest.mark.parametrize("content, error", [
    (BOM + json.dumps(["sky", "cat"]).encode(), None),  # a BOM is fine
    (json.dumps(["sky", "cat", "Sky"]).encode(), r"names a class more than once .*\['Sky', 'sky'\]"),
    (json.dumps(["sky", " ", "cat"]).encode(), r"positions \[1\] are empty"),
    (json.dumps({"0": "sky"}).encode(), "holds a JSON dict, not a list"),
])
def test_classes_json_is_a_list_of_distinct_names(tmp_path, content, error):
    path = tmp_path / "classes.json"
    path.write_bytes(content)
    if error is None:
        assert read_class_list(path) == ["sky", "cat"]
    else:
        with pytest.raises(DatasetError, match=error):
            read_class_list(path)
