"""`python -m dcp_jax.predict` and the `Segmenter` Python API on a trained tiny workdir."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dcp_jax import predict
from dcp_jax import visualize
from dcp_jax.segmenter import Segmenter
from test_evaluate import TINY_CONFIG, VAL_STEMS, dataset_classes, predicted, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def segmenter(run):
    return Segmenter.from_workdir(run[0])


def val_image(data_dir, stem) -> np.ndarray:
    return np.asarray(Image.open(data_dir / "images" / "val" / f"{stem}.png").convert("RGB"))


def without_backend_line(err: str) -> str:
    """stderr less the one line runtime.start prints first (jax version and devices)."""
    lines = err.splitlines(keepends=True)
    return "".join(lines[1:]) if lines and lines[0].startswith("[dcp_jax] jax ") else err


def run_predict(capsys, *args):
    """predict.main(args) -> (exit code, stdout, stderr less the backend line)."""
    code = predict.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, without_backend_line(err)


def check_outputs(out_dir, stem, image, class_names) -> np.ndarray:
    """The three files of one image are consistent with each other and with the image; returns the labels."""
    h, w = image.shape[:2]
    with Image.open(out_dir / f"{stem}_labels.png") as im:
        assert im.mode == ("L" if len(class_names) <= 255 else "I;16")
        labels = np.asarray(im).astype(np.int64)
    assert labels.shape == (h, w)
    assert labels.min() >= 0 and labels.max() < len(class_names)

    summary = json.loads((out_dir / f"{stem}.json").read_text())
    assert (summary["height"], summary["width"]) == (h, w) and summary["vocabulary"] == class_names
    ids, counts = np.unique(labels, return_counts=True)
    listed = summary["classes"]
    assert sorted(c["id"] for c in listed) == ids.tolist()  # only the classes present
    assert all(c["name"] == class_names[c["id"]] for c in listed)
    assert sum(c["fraction"] for c in listed) == pytest.approx(1.0, abs=1e-9)
    expected_fraction = dict(zip(ids.tolist(), counts / labels.size))
    assert all(c["fraction"] == pytest.approx(expected_fraction[c["id"]], abs=1e-12) for c in listed)
    assert [c["fraction"] for c in listed] == sorted((c["fraction"] for c in listed), reverse=True)

    with Image.open(out_dir / f"{stem}_overlay.png") as im:
        assert im.mode == "RGB"
        overlay = np.asarray(im).astype(np.int64)
    assert overlay.shape[0] >= h and overlay.shape[1] > w  # the image plus a legend on the right
    # Left part: the 50/50 blend of the image and each pixel's class colour (rounding: off by at most 1).
    colors = visualize.class_colors(class_names).astype(np.int64)  # by name, as the page colours
    blend = 0.5 * image + 0.5 * colors[labels]
    assert np.abs(overlay[:h, :w] - blend).max() <= 1
    legend = overlay[:, w:]
    for c in listed:  # each present class has its colour swatch in the legend
        assert (legend == colors[c["id"]]).all(-1).any(), c["name"]
    return labels


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def test_a_directory_of_images_gives_three_files_each(run, tmp_path_factory):
    _, data_dir = run
    out_dir = predicted(tmp_path_factory, "whole")  # --image VAL_DIR --classes-file classes.json (a JSON list)
    classes = dataset_classes(data_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in VAL_STEMS for suffix in ("_labels.png", "_overlay.png", ".json"))
    for stem in VAL_STEMS:
        check_outputs(out_dir, stem, val_image(data_dir, stem), classes)
        summary = json.loads((out_dir / f"{stem}.json").read_text())
        assert summary["zero_shot"] is False and summary["step"] == 4


def test_one_image_with_classes_from_the_command_line(run, tmp_path, capsys):
    workdir, data_dir = run
    image = data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png"
    # The dataset's classes in reverse order (a vocabulary of the same size shares the compiled programs).
    vocabulary = dataset_classes(data_dir)[::-1]
    code, out, err = run_predict(capsys, "--workdir", workdir, "--image", image, "--classes", " ,".join(vocabulary),
                                 "--out-dir", tmp_path / "out", "--checkpoint", 2)
    assert code == 0, err
    check_outputs(tmp_path / "out", VAL_STEMS[0], val_image(data_dir, VAL_STEMS[0]), vocabulary)
    summary = json.loads((tmp_path / "out" / f"{VAL_STEMS[0]}.json").read_text())
    assert summary["step"] == 2
    assert str(image) in out and "%" in out  # a one-line summary per image
    # A few of the 28 classes selected, all within the run's cap of 8: nothing dropped, no warning.
    assert 0 < summary["selected_classes"] <= summary["num_slots"] == 8 and summary["dropped_classes"] == 0
    assert "warning" not in err


def test_more_than_255_classes_give_16_bit_labels(run, segmenter, tmp_path, capsys):
    """300 names from a one-per-line file: the label PNG is 16-bit and holds exactly the API's labels."""
    workdir, data_dir = run
    vocabulary = [f"thing number {i}" for i in range(291)] + dataset_classes(data_dir)  # real classes at 291+
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("\n".join(vocabulary) + "\n\n")
    image = data_dir / "images" / "val" / f"{VAL_STEMS[1]}.png"
    code, _, err = run_predict(capsys, "--workdir", workdir, "--image", image, "--classes-file", classes_file,
                               "--out-dir", tmp_path)
    assert code == 0, err
    labels = check_outputs(tmp_path, VAL_STEMS[1], val_image(data_dir, VAL_STEMS[1]), vocabulary)
    segmenter.set_vocabulary(vocabulary)
    np.testing.assert_array_equal(labels, segmenter.segment([val_image(data_dir, VAL_STEMS[1])])[0])


def test_predict_reports_selection_and_warns_when_classes_are_dropped(run, segmenter, tmp_path, capsys,
                                                                      tmp_path_factory):
    """Each <stem>.json counts the classes category selection chose and those beyond eval.num_slots, equal to
    what the Segmenter reports for the page (segment_details: the decoded ids and the dropped count). A cap of 1
    drops classes: one warning line per image that lost some, naming it and the key to raise. The run's own cap
    (8) drops none here (the silent case: test_one_image_with_classes_from_the_command_line)."""
    workdir, data_dir = run
    classes = dataset_classes(data_dir)
    code, _, err = run_predict(capsys, "--workdir", workdir, "--image", data_dir / "images" / "val",
                               "--classes-file", data_dir / "classes.json", "--out-dir", tmp_path,
                               "--config.eval.num_slots=1")
    assert code == 0, err
    default_cap = segmenter.config.eval.num_slots
    segmenter.set_vocabulary(classes)
    written = {}
    for cap, out in ((1, tmp_path), (default_cap, predicted(tmp_path_factory, "whole"))):
        summaries = written[cap] = [json.loads((out / f"{stem}.json").read_text()) for stem in VAL_STEMS]
        segmenter.config.eval.num_slots = cap
        try:
            details = [segmenter.segment_details(val_image(data_dir, stem)) for stem in VAL_STEMS]
        finally:
            segmenter.config.eval.num_slots = default_cap
        for summary, detail in zip(summaries, details):
            assert summary["num_slots"] == cap
            assert summary["dropped_classes"] == detail["dropped"]
            assert summary["selected_classes"] == len(detail["selected"]) + detail["dropped"]
            assert summary["dropped_classes"] == max(0, summary["selected_classes"] - cap)
        if cap == default_cap:
            assert not any(s["dropped_classes"] for s in summaries)
    dropping = [s for s in written[1] if s["dropped_classes"]]
    assert dropping, "a cap of 1 must drop classes for this test to mean anything"
    warned = [line for line in err.splitlines() if "warning" in line]
    assert warned == [predict.dropped_warning(s) for s in dropping]
    for s, line in zip(dropping, warned):
        assert f"{s['image']}: {s['dropped_classes']} of the {s['selected_classes']} classes selected" in line
        assert "eval.num_slots=1" in line and "Raise --config.eval.num_slots (0 = every class)" in line


def test_zero_shot_baseline(run, tmp_path, capsys):
    workdir, data_dir = run
    image = data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png"
    code, _, err = run_predict(capsys, "--zero-shot", workdir / "tiny_clip", "--config", TINY_CONFIG,
                               "--image", image, "--classes-file", data_dir / "classes.json", "--out-dir", tmp_path)
    assert code == 0, err
    check_outputs(tmp_path, VAL_STEMS[0], val_image(data_dir, VAL_STEMS[0]), dataset_classes(data_dir))
    summary = json.loads((tmp_path / f"{VAL_STEMS[0]}.json").read_text())
    assert summary["zero_shot"] is True and summary["step"] == 0
    assert summary["selected_classes"] is None and summary["dropped_classes"] is None  # no selection to count


def test_class_lists(tmp_path):
    assert predict.read_classes("cat, dog ,grass", None) == ["cat", "dog", "grass"]
    assert predict.read_classes(" cat,, dog , ", None) == ["cat", "dog"]
    lines = tmp_path / "classes.txt"
    lines.write_text("building, edifice\n\n  sky \n")  # one class per line: commas stay inside a name
    assert predict.read_classes(None, str(lines)) == ["building, edifice", "sky"]
    as_json = tmp_path / "classes.json"
    as_json.write_text('\n  ["building, edifice", " sky"]\n')
    assert predict.read_classes(None, str(as_json)) == ["building, edifice", "sky"]
    with pytest.raises(ValueError, match="exactly one of"):
        predict.read_classes("cat", str(lines))
    with pytest.raises(ValueError, match="exactly one of"):
        predict.read_classes(None, None)


@pytest.mark.parametrize("case", ["empty_classes", "empty_classes_file", "missing_classes_file", "missing_image",
                                  "no_images_in_dir", "no_checkpoints", "duplicate_classes", "non_string_classes",
                                  "binary_classes_file", "out_dir_is_the_image_folder", "out_dir_is_a_file",
                                  "out_dir_read_only"])
def test_errors_are_clear_and_exit_2(run, tmp_path, capsys, case):
    workdir, data_dir = run
    image = data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png"
    args = {"--workdir": workdir, "--image": image, "--classes": "cat, dog", "--out-dir": tmp_path / "out"}
    expected = {
        "empty_classes": "--classes is empty: give at least one class name",
        "empty_classes_file": "is empty: give at least one class name",
        "missing_classes_file": "no such file",
        "missing_image": "no such file or directory",
        "no_images_in_dir": "contains no images",
        "no_checkpoints": "no checkpoints in workdir",
        "duplicate_classes": "names a class more than once (ignoring case and spaces): ['Snow', 'snow']",
        "non_string_classes": "entries that are not class names: [1, None, {'a': 1}]",
        "binary_classes_file": "not UTF-8 text",
        "out_dir_is_the_image_folder": "is the folder of the input images",
        "out_dir_is_a_file": "is a file; give a directory",
        "out_dir_read_only": "cannot be written",
    }[case]
    if case == "empty_classes":
        args["--classes"] = " , ,"
    elif case in ("empty_classes_file", "missing_classes_file"):
        del args["--classes"]
        args["--classes-file"] = tmp_path / "classes.txt"
        if case == "empty_classes_file":
            args["--classes-file"].write_text("\n  \n")
    elif case == "missing_image":
        args["--image"] = tmp_path / "nowhere.jpg"
    elif case == "no_images_in_dir":
        args["--image"] = tmp_path
    elif case == "no_checkpoints":
        (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
        args["--workdir"] = tmp_path
    elif case == "duplicate_classes":
        args["--classes"] = "snow, snow, Snow , sky"
    elif case in ("non_string_classes", "binary_classes_file"):
        del args["--classes"]
        args["--classes-file"] = tmp_path / "classes.json"
        if case == "non_string_classes":
            args["--classes-file"].write_text('["sky", 1, null, {"a": 1}]')
        else:
            args["--classes-file"].write_bytes(b"\xff\xfe\x00\x81binary")
    elif case == "out_dir_is_the_image_folder":
        folder = tmp_path / "photos"
        folder.mkdir()
        (folder / "photo.png").write_bytes(image.read_bytes())
        (folder / "photo_overlay.png").write_bytes(b"the user's own file")
        args["--image"], args["--out-dir"] = folder, folder
        before = {f.name: f.read_bytes() for f in folder.iterdir()}
    elif case == "out_dir_is_a_file":
        args["--out-dir"] = tmp_path / "out"
        args["--out-dir"].write_text("a file")
    elif case == "out_dir_read_only":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        args["--out-dir"] = locked / "out"
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as a user who can write anywhere")
    code, _, err = run_predict(capsys, *[x for kv in args.items() for x in kv])
    assert code == 2
    assert err.startswith("python -m dcp_jax.predict: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if case == "out_dir_is_the_image_folder":  # the user's files byte for byte
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    elif case != "out_dir_is_a_file":
        assert not (tmp_path / "out").exists()


def test_a_model_is_required(run, tmp_path, capsys):
    _, data_dir = run
    code, _, err = run_predict(capsys, "--image", data_dir / "images" / "val", "--classes", "cat",
                               "--out-dir", tmp_path)
    assert code == 2
    assert "give --workdir (a trained run) or --zero-shot CLIP_DIR" in err and "Traceback" not in err


def test_a_corrupt_image_is_named_and_the_others_are_written(run, tmp_path, capsys):
    workdir, data_dir = run
    images = tmp_path / "images"
    images.mkdir()
    for stem in VAL_STEMS[:2]:
        (images / f"{stem}.png").write_bytes((data_dir / "images" / "val" / f"{stem}.png").read_bytes())
    broken = images / "broken.png"
    broken.write_bytes((images / f"{VAL_STEMS[0]}.png").read_bytes()[:60])  # a truncated download
    code, out, err = run_predict(capsys, "--workdir", workdir, "--image", images, "--classes-file",
                                 data_dir / "classes.json", "--out-dir", tmp_path / "out")
    assert code == 1
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{stem}{suffix}" for stem in VAL_STEMS[:2]
                             for suffix in ("_labels.png", "_overlay.png", ".json"))
    assert err.count("error:") == 1 and str(broken) in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------------

def test_segment_requires_a_vocabulary(run):
    seg = Segmenter.from_workdir(run[0], checkpoint=2)
    assert seg.step == 2
    with pytest.raises(RuntimeError, match="set_vocabulary"):
        seg.segment([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        seg.set_vocabulary([])
    with pytest.raises(ValueError, match="empty"):
        seg.set_vocabulary(["cat", "  "])


def test_segment_returns_labels_at_each_image_size(run, segmenter, tmp_path_factory):
    _, data_dir = run
    classes = dataset_classes(data_dir)
    segmenter.set_vocabulary(classes)
    assert segmenter.step == 4
    full = val_image(data_dir, VAL_STEMS[0])
    small = np.ascontiguousarray(val_image(data_dir, VAL_STEMS[1])[5:42, 3:50])  # an odd size
    assert small.shape == (37, 47, 3)
    labels = segmenter.segment([full, small])
    assert [lab.shape for lab in labels] == [full.shape[:2], (37, 47)]
    for lab in labels:
        assert np.issubdtype(lab.dtype, np.integer) and lab.min() >= 0 and lab.max() < len(classes)
    # An image's labels do not depend on the other images of its batch ...
    np.testing.assert_array_equal(segmenter.segment([small])[0], labels[1])
    # ... and are the labels predict wrote for it (the run's mode, "whole").
    written = visualize.load_label_png(predicted(tmp_path_factory, "whole") / f"{VAL_STEMS[0]}_labels.png")
    np.testing.assert_array_equal(labels[0], written)
    with pytest.raises(ValueError, match="original_sizes"):
        segmenter.segment([full], resized=True)


def test_predict_never_replaces_a_file_it_did_not_write(run, tmp_path, capsys):
    """A user's own <stem>.json (an annotation tool's) in --out-dir: refused before any inference with one line
    naming it, and kept byte for byte; predict's own outputs of an earlier run are replaced (issue 32 item 2)."""
    workdir, data_dir = run
    image = data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png"
    vocabulary = dataset_classes(data_dir)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / f"{VAL_STEMS[0]}.json"
    mine.write_text('{"annotations": [1, 2, 3]}')
    args = ("--workdir", workdir, "--image", image, "--classes", ",".join(vocabulary), "--out-dir", out)
    code, _, err = run_predict(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{mine} exists and was not written by dcp_jax.predict" in err and "move it" in err
    assert mine.read_text() == '{"annotations": [1, 2, 3]}'
    assert sorted(p.name for p in out.iterdir()) == [mine.name]  # nothing else written
    mine.unlink()
    for _ in range(2):  # the second run replaces what the first wrote
        code, _, err = run_predict(capsys, *args)
        assert code == 0, err
        assert json.loads(mine.read_text())["written_by"] == "dcp_jax.predict"
    (out / f"{VAL_STEMS[0]}.json").unlink()  # its overlay and labels remain, now without predict's marker
    code, _, err = run_predict(capsys, *args)
    assert code == 2 and f"{VAL_STEMS[0]}_labels.png exists and was not written by dcp_jax.predict" in err


def test_a_full_disk_during_predict_is_one_line_and_leaves_no_partial_file(run, tmp_path, capsys):
    """A file-size limit (RLIMIT_FSIZE, as a full disk fails a write; Python ignores SIGXFSZ) while predict writes
    its outputs: exit 2 with one line that says what to do, no traceback, and no partial or temporary file left in
    --out-dir (each output is written to a temporary name and renamed)."""
    import resource

    workdir, data_dir = run
    image = data_dir / "images" / "val" / f"{VAL_STEMS[0]}.png"
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, hard))  # smaller than any of the three outputs
    try:
        code, _, err = run_predict(capsys, "--workdir", workdir, "--image", image, "--classes",
                                   ",".join(dataset_classes(data_dir)), "--out-dir", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("python -m dcp_jax.predict: error: the disk is full, or a "
                                                   "file-size limit was reached"), err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written, under any name
