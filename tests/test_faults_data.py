"""Hostile input to the data commands through their real command lines (issue 22's fault suite): each case ends
in exit status 2 with a last stderr line `error: ...` that names the file and the fix, stops before the work
starts, and leaves the user's files byte for byte as they were."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", f"dcp_jax.data.{module}", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


def _error_line(result: subprocess.CompletedProcess, *needles, only_line: bool = True) -> str:
    """The error line of a failed command: exit 2, no traceback, `error: ` and every needle in stderr's last line
    (its only line unless progress bars may come first)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and (len(lines) == 1 or not only_line), result.stderr
    assert "error: " in lines[-1], lines[-1]
    for needle in needles:
        assert str(needle) in lines[-1], lines[-1]
    return lines[-1]


def _snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for folders) and modification time."""
    return {p: (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _jpg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _ade150(raw: Path) -> Path:
    """ADEChallengeData2016 as unzipped, two validation images; returns the images' folder."""
    base = raw / "ADEChallengeData2016"
    for i in (1, 2):
        _jpg(base / f"images/validation/ADE_val_0000000{i}.jpg", seed=i)
        (base / "annotations/validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32), i, np.uint8)).save(base / f"annotations/validation/ADE_val_0000000{i}.png")
    return base / "images/validation"


def _folder(path: Path) -> Path:
    """A flat folder dataset of two 8x8 images and classes 'x', 'y'."""
    for stem in ("a", "b"):
        (path / "images").mkdir(parents=True, exist_ok=True)
        (path / "annotations").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path / "images" / f"{stem}.png")
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(path / "annotations" / f"{stem}.png")
    (path / "classes.json").write_text(json.dumps(["x", "y"]))
    return path


# -- prepare ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placing", [["--out", "OUT"], ["--out", "OUT", "--images", "copy"], []],
                         ids=["hardlink", "copy", "in-place"])
def test_prepare_stops_at_a_truncated_jpeg_before_writing(tmp_path, placing):
    raw, out = tmp_path / "raw", tmp_path / "out"
    bad = _ade150(raw) / "ADE_val_00000002.jpg"
    _truncate(bad)
    before = _snapshot(raw)
    args = [str(out) if a == "OUT" else a for a in placing]
    result = _run("prepare", "ade150", "--raw", raw, *args, "--noprogress", "--workers", "1")
    _error_line(result, f"cannot read {bad}", "truncated or corrupt: extract it again from ADEChallengeData2016.zip",
                "Nothing of val was written")
    assert _snapshot(raw) == before and not out.exists()


def test_prepare_names_a_directory_where_an_image_belongs(tmp_path):
    raw = tmp_path / "raw"
    image = _ade150(raw) / "ADE_val_00000001.jpg"
    image.unlink()
    image.mkdir()
    before = _snapshot(raw)
    result = _run("prepare", "ade150", "--raw", raw, "--out", tmp_path / "out", "--noprogress")
    _error_line(result, f"{image} is a directory, not a file: move it out of {image.parent}")
    assert _snapshot(raw) == before and not (tmp_path / "out").exists()


# -- datasets --pack and --check ----------------------------------------------------------------------------------


def test_pack_stops_at_a_label_out_of_range_and_leaves_nothing(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    folder = _folder(tmp_path / "mine")
    label = folder / "annotations/b.png"
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(label)
    before = _snapshot(folder)
    result = _run("datasets", f"folder:{folder}", "--pack", tmp_path / "tfds")
    _error_line(result, f"{label}: label value(s) 40 outside the vocabulary 0..1", "fix the label or the class list",
                only_line=False)
    assert _snapshot(folder) == before and not (tmp_path / "tfds").exists()


def test_pack_onto_an_existing_pack_is_refused_before_reading(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    folder = _folder(tmp_path / "mine")
    assert _run("datasets", f"folder:{folder}", "--pack", tmp_path / "tfds").returncode == 0
    before = _snapshot(tmp_path)
    result = _run("datasets", f"folder:{folder}", "--check", "--pack", tmp_path / "tfds")
    _error_line(result, f"{tmp_path / 'tfds/mine/1.0.0'} already exists; remove it or choose another --name")
    assert "checking" not in result.stderr and _snapshot(tmp_path) == before  # refused before --check read


def test_a_directory_named_like_an_image_is_called_a_directory(tmp_path):
    folder = _folder(tmp_path / "mine")
    (folder / "images/b.png").unlink()
    (folder / "images/b.png").mkdir()
    before = _snapshot(folder)
    result = _run("datasets", f"folder:{folder}", "--split", "val", "--check")
    line = _error_line(result, f"{folder / 'images/b.png'} is a directory, not a file; move it out of")
    assert "corrupt" not in line and _snapshot(folder) == before


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b'["x", "y"', b"", None],
                         ids=["binary", "malformed", "empty", "directory"])
def test_a_bad_classes_json_is_named(tmp_path, content):
    folder = _folder(tmp_path / "mine")
    classes = folder / "classes.json"
    classes.unlink()
    classes.mkdir() if content is None else classes.write_bytes(content)
    before = _snapshot(folder)
    line = _error_line(_run("datasets", f"folder:{folder}"), str(classes), "JSON list of class names")
    assert _snapshot(folder) == before
    if content is None:
        assert "is a directory" in line


# -- toy_world ----------------------------------------------------------------------------------------------------


def test_toy_world_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("the user's notes")
    _error_line(_run("toy_world", "--out", out, "--num-images", "4", "--size", "32"),
                f"{out} is a file, not a directory; give a new directory")
    assert out.read_text() == "the user's notes" and sorted(tmp_path.iterdir()) == [out]


def test_toy_world_overwrite_replaces_only_a_toy_world(tmp_path):
    folder = _folder(tmp_path / "mine")
    before = _snapshot(folder)
    _error_line(_run("toy_world", "--out", folder, "--num-images", "4", "--size", "32", "--overwrite"),
                f"{folder} holds files that are not a toy-world dataset", "choose another directory")
    assert _snapshot(folder) == before


# -- the command lines themselves ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module, args, needle", [
    ("prepare", ["--raw", "RAW"], "expected BENCHMARK, got none"),
    ("prepare", ["ade150", "--raw", "RAW", "--no-count-check"], "Unknown command line flag 'no-count-check'"),
    ("prepare", ["ade150", "--out", "RAW"], "Flag --raw must have a value"),
    ("prepare", ["ade151", "--raw", "RAW"], "unknown benchmark 'ade151'; choose from coco_stuff_171, ade150"),
    ("datasets", ["--split", "val"], "expected SPEC, got none"),
    ("toy_world", ["--num-images", "4"], "Flag --out must have a value"),
    ("benchmark", ["--workers", "0,x"], "--workers 0,x: give worker-process counts, comma-separated"),
])
def test_a_bad_command_line_is_one_line(tmp_path, module, args, needle):
    raw = _ade150(tmp_path / "raw").parents[2]
    before = _snapshot(tmp_path)
    _error_line(_run(module, *[str(raw) if a == "RAW" else a for a in args]), f"dcp_jax.data.{module}: error: ",
                needle)
    assert _snapshot(tmp_path) == before
