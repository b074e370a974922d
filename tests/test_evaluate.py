"""`python -m dcp_jax.evaluate` end to end on a trained tiny workdir.

The key check (issue 5's done-criterion): the mIoU that evaluate reports equals one computed here with plain
numpy from predict's label PNGs and the ground-truth annotation PNGs.
"""

import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import tiny_run_config
from dcp_jax import evaluate
from dcp_jax import predict
from dcp_jax import train
from dcp_jax.data.toy_world import write_benchmark

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "tiny.py")


# --------------------------------------------------------------------------------------------------
# A trained tiny workdir and predict's outputs on its val images, built once per session
# (test_predict.py imports these helpers)
# --------------------------------------------------------------------------------------------------

def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, data_dir): 12 toy-world 64-px images (9 train, 3 val), 4 training steps, checkpoints 2 and 4.

    3 val images hold a few of the 28 classes, so "classes without ground truth" is exercised.

    The training settings are test_train.py's (same compiled programs: a full test session compiles them once).
    Small test-time geometry so that slide mode is cheap: short side 64, canvas 96, crop 64, stride 32 gives
    2 x 2 crops + the global view (CAT-Seg's 640/384/256 layout, scaled).
    """
    return _trained_run(tmp_path_factory.getbasetemp())


@functools.lru_cache(maxsize=None)
def _trained_run(basetemp: Path) -> tuple[Path, Path]:
    root = basetemp / "eval_predict_run"
    root.mkdir()
    data_dir = write_benchmark(root / "synth", num_images=12, seed=1, size=64)
    # test_train's settings, so a full run reuses its compiled training programs.
    c = tiny_run_config(data_dir, **{"checkpoint_every_steps": 2, "eval.short_side": 64,
                                     "eval.slide_canvas": 96, "eval.slide_stride": 32})
    workdir = root / "workdir"
    train.train_and_evaluate(c, workdir)
    return workdir, data_dir


def predicted(tmp_path_factory, mode: str) -> Path:
    """The output directory of `predict --workdir W --image VAL_DIR --classes-file classes.json --mode MODE`."""
    return _predicted(tmp_path_factory.getbasetemp(), mode)


@functools.lru_cache(maxsize=None)
def _predicted(basetemp: Path, mode: str) -> Path:
    workdir, data_dir = _trained_run(basetemp)
    out_dir = basetemp / f"predict_{mode}"
    # classes.json is the dataset's class list (a JSON list), in label order.
    code = predict.main(["--workdir", str(workdir), "--image", str(data_dir / "images" / "val"),
                         "--classes-file", str(data_dir / "classes.json"), "--out-dir", str(out_dir),
                         f"--config.eval.mode={mode}"])
    assert code == 0
    return out_dir


VAL_STEMS = ("000000", "000001", "000002")  # the 3 val images of the 12


def dataset_classes(data_dir) -> list[str]:
    return json.loads((Path(data_dir) / "classes.json").read_text())


def ground_truth(data_dir, stem) -> np.ndarray:
    """The annotation PNG as int64 with the dataset's ignore value (meta.json, default 255) as -1."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    raw = np.asarray(Image.open(Path(data_dir) / "annotations" / "val" / f"{stem}.png")).astype(np.int64)
    return np.where(raw == meta.get("ignore_label", 255), -1, raw)


def reference_metrics(pairs, num_classes):
    """mIoU / fwIoU / pixel and mean accuracy / per-class IoU and accuracy (percent) from (prediction, ground
    truth) maps, in plain numpy.

    Ignored pixels (-1) count nowhere; a class enters the means only if it has ground-truth pixels; fwIoU weighs
    each class's IoU by its share of the labelled pixels.
    """
    confusion = np.zeros((num_classes, num_classes), np.int64)  # [gt, pred]
    for pred, gt in pairs:
        keep = gt >= 0
        np.add.at(confusion, (gt[keep], pred[keep]), 1)
    tp = np.diag(confusion)
    gt_pixels, pred_pixels = confusion.sum(1), confusion.sum(0)
    has_gt = gt_pixels > 0
    iou = [100.0 * tp[c] / (gt_pixels[c] + pred_pixels[c] - tp[c]) if has_gt[c] else None for c in range(num_classes)]
    acc = [100.0 * tp[c] / gt_pixels[c] if has_gt[c] else None for c in range(num_classes)]
    return dict(mIoU=float(np.mean([v for v in iou if v is not None])),
                fwIoU=sum(v * gt_pixels[c] for c, v in enumerate(iou) if v is not None) / gt_pixels.sum(),
                mean_acc=float(np.mean([v for v in acc if v is not None])),
                pixel_acc=100.0 * tp.sum() / gt_pixels.sum(), per_class_iou=iou, per_class_acc=acc)


def without_backend_line(err: str) -> str:
    """stderr less the one line runtime.start prints first (jax version and devices)."""
    lines = err.splitlines(keepends=True)
    return "".join(lines[1:]) if lines and lines[0].startswith("[dcp_jax] jax ") else err


def run_evaluate(capsys, *args):
    """evaluate.main(args) -> (exit code, stdout, stderr less the backend line)."""
    code = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, without_backend_line(err)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def results(run):
    """evaluate.main in both modes on the 3 val images: {mode: (exit code, stdout, result JSON)}."""
    workdir, data_dir = run
    out = {}
    for mode in ("whole", "slide"):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = evaluate.main(["--workdir", str(workdir), f"--config.eval.datasets=folder:{data_dir}",
                                  f"--config.eval.mode={mode}"])
        # Parsed now: later tests write eval/toy_world.json again.
        out[mode] = code, stdout.getvalue(), json.loads((workdir / "eval" / "toy_world.json").read_text())
    return out


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_writes_the_result_json_and_prints_the_table(run, results, mode):
    workdir, data_dir = run
    code, stdout, result = results[mode]
    assert code == 0
    for key in ("mIoU", "pixel_acc", "per_class_iou", "num_images", "mode", "step", "command"):
        assert key in result, key
    assert result["mode"] == mode and result["num_images"] == 3 and result["step"] == 4  # the latest checkpoint
    assert result["zero_shot"] is False
    assert result["checkpoint"].endswith(str(Path("checkpoints") / "4"))
    assert result["command"] == (f"python -m dcp_jax.evaluate --workdir {workdir} "
                                 f"--config.eval.datasets=folder:{data_dir} --config.eval.mode={mode}")
    assert 0.0 <= result["mIoU"] <= 100.0 and 0.0 <= result["pixel_acc"] <= 100.0
    # per_class_iou: one entry per class, None exactly for the classes without ground truth in the 3 images.
    classes = dataset_classes(data_dir)
    present = set(np.unique(np.concatenate([ground_truth(data_dir, stem).ravel() for stem in VAL_STEMS])))
    assert len(result["per_class_iou"]) == len(classes)
    assert [v is not None for v in result["per_class_iou"]] == [c in present for c in range(len(classes))]
    assert len(present - {-1}) < len(classes)  # the check above sees both kinds
    # The markdown table: a header with the dataset's name (and its seen / unseen / hIoU columns: the toy
    # world declares unseen classes) and a row with the step and the rounded numbers.
    lines = stdout.splitlines()
    header = lines.index("| step | toy_world | toy_world seen | toy_world unseen | toy_world hIoU |")
    assert lines[header + 1] == "|---|---|---|---|---|"
    cells = [f"{result['mIoU']:.1f}"] + ["-" if result[k] is None else f"{result[k]:.1f}"
                                         for k in ("mIoU_seen", "mIoU_unseen", "hIoU")]
    assert lines[header + 2] == "| 4 | " + " | ".join(cells) + " |"
    # detectron2's keys (issue 34): one IoU-/ACC-<class> per class name, the same numbers as the project's keys.
    names = result["class_names"]
    assert names == classes
    assert [result[f"IoU-{n}"] for n in names] == result["per_class_iou"]
    assert [result[f"ACC-{n}"] for n in names] == result["per_class_acc"]
    scored = [result[f"IoU-{n}"] for n in names if result[f"IoU-{n}"] is not None]
    assert result["mIoU"] == pytest.approx(np.mean(scored))
    assert (result["mACC"], result["pACC"]) == (result["mean_acc"], result["pixel_acc"])
    # ... and printed as detectron2 prints them: a table, then its copypaste lines.
    sem_seg = lines.index("detectron2 SemSegEvaluator (%)")
    assert lines[sem_seg + 1:sem_seg + 4] == [
        "| dataset | mIoU | fwIoU | mACC | pACC |", "|---|---|---|---|---|",
        "| toy_world | " + " | ".join(f"{result[k]:.1f}" for k in ("mIoU", "fwIoU", "mACC", "pACC")) + " |"]
    assert lines[sem_seg + 4:sem_seg + 8] == [
        "Evaluation results for toy_world in csv format:", "copypaste: Task: sem_seg",
        "copypaste: mIoU,fwIoU,mACC,pACC",
        "copypaste: " + ",".join(f"{result[k]:.4f}" for k in ("mIoU", "fwIoU", "mACC", "pACC"))]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_miou_equals_numpy_miou_from_predict_label_maps(run, results, mode, tmp_path_factory):
    """Issue 5's done-criterion: the same labels through predict, mIoU recomputed independently, equal to 1e-9."""
    _, data_dir = run
    out_dir = predicted(tmp_path_factory, mode)
    assert sorted(p.stem for p in (data_dir / "annotations" / "val").glob("*.png")) == list(VAL_STEMS)
    pairs = []
    for stem in VAL_STEMS:
        with Image.open(out_dir / f"{stem}_labels.png") as im:
            assert im.mode == "L"  # 9 classes: 8-bit
            pred = np.asarray(im).astype(np.int64)
        gt = ground_truth(data_dir, stem)
        assert pred.shape == gt.shape
        pairs.append((pred, gt))
    num_classes = len(dataset_classes(data_dir))
    assert any((gt == -1).any() for _, gt in pairs)  # ignore pixels (the rings around things) ...
    assert len(np.unique(np.concatenate([gt.ravel() for _, gt in pairs]))) - 1 < num_classes  # ... and absent classes
    expected = reference_metrics(pairs, num_classes)
    _, _, result = results[mode]
    assert result["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-9)
    assert result["pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-9)
    for key, want in (("pACC", "pixel_acc"), ("mACC", "mean_acc"), ("fwIoU", "fwIoU")):  # detectron2's keys
        assert result[key] == pytest.approx(expected[want], abs=1e-9), key
    for i, name in enumerate(dataset_classes(data_dir)):
        for got, want in ((result["per_class_iou"][i], expected["per_class_iou"][i]),
                          (result[f"IoU-{name}"], expected["per_class_iou"][i]),
                          (result[f"ACC-{name}"], expected["per_class_acc"][i])):
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, abs=1e-9)


def test_subprocess_with_a_chosen_checkpoint(run):
    workdir, data_dir = run
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "dcp_jax.evaluate", "--workdir", str(workdir),
                           f"--config.eval.datasets=folder:{data_dir}", "--config.eval.mode=whole",
                           "--config.eval.max_images=2", "--checkpoint", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((workdir / "eval" / "toy_world.json").read_text())
    assert result["step"] == 2 and result["checkpoint"].endswith(str(Path("checkpoints") / "2"))
    assert result["num_images"] == 2 and result["mode"] == "whole"
    assert result["command"].startswith("python -m dcp_jax.evaluate --workdir")
    assert "--checkpoint 2" in result["command"]
    assert "| step | toy_world |" in proc.stdout and f"| 2 | {result['mIoU']:.1f} |" in proc.stdout
    assert "eval toy_world" in proc.stderr  # the progress bar


def test_zero_shot_baseline(run, tmp_path, capsys):
    workdir, data_dir = run
    out_dir = tmp_path / "zero_shot_run"
    code, out, err = run_evaluate(capsys, "--workdir", out_dir, "--zero-shot", workdir / "tiny_clip",
                                  "--config", TINY_CONFIG, f"--config.eval.datasets=folder:{data_dir}",
                                  "--config.eval.max_images=1")
    assert code == 0, err
    result = json.loads((out_dir / "eval" / "zero_shot" / "toy_world.json").read_text())  # not the trained results
    assert not (out_dir / "eval" / "toy_world.json").exists()
    assert result["zero_shot"] is True and result["step"] == 0 and result["num_images"] == 1
    assert result["mode"] == "whole"  # configs/tiny.py's eval.mode
    assert 0.0 <= result["mIoU"] <= 100.0
    assert "| 0 | " in out


@pytest.mark.parametrize("case", ["bad_step", "no_checkpoints", "not_a_workdir", "unknown_dataset",
                                  "empty_datasets"])
def test_errors_are_clear_and_exit_2(run, tmp_path, capsys, case):
    workdir, data_dir = run
    args = ["--workdir", workdir, f"--config.eval.datasets=folder:{data_dir}"]
    expected = {
        "bad_step": "--checkpoint 7: no such step",
        "no_checkpoints": "no checkpoints in workdir",
        "not_a_workdir": "is not a dcp_jax workdir",
        "unknown_dataset": "unknown dataset 'ade9000'",
        "empty_datasets": "no dataset given",
    }[case]
    if case == "bad_step":
        args += ["--checkpoint", "7"]
    elif case == "no_checkpoints":  # the run's config, but no checkpoints/ directory
        (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
        args[1] = tmp_path
    elif case == "not_a_workdir":
        args[1] = tmp_path
    elif case == "unknown_dataset":
        args[2] = "--config.eval.datasets=ade9000"
    elif case == "empty_datasets":  # an explicit "" must not fall back to the config's (non-empty) datasets
        args[2] = "--config.eval.datasets="
    code, out, err = run_evaluate(capsys, *args)
    assert code == 2
    assert err.startswith("python -m dcp_jax.evaluate: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if case == "bad_step":
        assert "[2, 4]" in err  # lists the available steps


# --------------------------------------------------------------------------------------------------
# Evaluation keeps the device fed: shape buckets, reading threads, sharded views
# --------------------------------------------------------------------------------------------------

def _resized_copy(data_dir: Path, out: Path, sizes) -> Path:
    """data_dir's benchmark with one val image per (h, w) of `sizes` (its val images cycled and resized)."""
    shutil.copytree(data_dir, out)
    sources = sorted((data_dir / "images" / "val").glob("*.png"))
    for kind in ("images", "annotations"):
        for f in (out / kind / "val").glob("*.png"):
            f.unlink()
    for i, (h, w) in enumerate(sizes):
        name = sources[i % len(sources)].name
        image = Image.open(data_dir / "images" / "val" / name).resize((w, h), Image.BILINEAR)
        label = Image.open(data_dir / "annotations" / "val" / name).resize((w, h), Image.NEAREST)
        image.save(out / "images" / "val" / f"{i:06d}.png")
        label.save(out / "annotations" / "val" / f"{i:06d}.png")
    return out


def test_ten_image_sizes_compile_a_bounded_number_of_programs_read_off_the_main_thread(run, tmp_path, monkeypatch,
                                                                                        capsys):
    """10 different sizes, then 10 other sizes in the same shape buckets: the second dataset compiles nothing.
    Decoding and resizing happen in reader threads, and every stage gets the batch split over the 4 devices."""
    import threading

    import jax

    from dcp_jax import forward
    from dcp_jax.data import pipeline
    from dcp_jax.data.datasets import open_dataset
    from dcp_jax.segmenter import Segmenter

    workdir, data_dir = run
    # Originals up to 128 px (output bucket 128 x 128, or 128 x 256 for the widest), resized to a short side of
    # 64 (input bucket 128 x 128, or 128 x 256 past an aspect of 2); hand-picked to cover both buckets.
    first = [(40, 50), (50, 40), (64, 64), (90, 70), (70, 120), (100, 128), (33, 80), (45, 100), (128, 96), (60, 200)]
    second = [(41, 52), (52, 41), (66, 62), (88, 72), (71, 118), (99, 127), (34, 79), (46, 99), (127, 95), (61, 199)]
    threads, sharded = set(), []
    real_map, real_encode = pipeline._EvalResize.map, forward.encode_select

    def recording_map(self, element):
        threads.add(threading.current_thread() is threading.main_thread())
        return real_map(self, element)

    def recording_encode(graphdef, params, views, *args, **kwargs):
        sharded.append(len(views.sharding.device_set))
        return real_encode(graphdef, params, views, *args, **kwargs)

    monkeypatch.setattr(pipeline._EvalResize, "map", recording_map)
    monkeypatch.setattr(forward, "encode_select", recording_encode)
    segmenter = Segmenter.from_workdir(workdir)
    segmenter.config.eval.num_slots = 4  # one slot bucket: the counts below are about image sizes only
    segmenter.set_vocabulary(open_dataset(f"folder:{data_dir}", "val").class_names)  # embedded once, not counted
    counts = {}
    for name, sizes in (("one size", [(64, 64)] * 10), ("first", first), ("second", second)):
        if name != "second":
            jax.clear_caches()  # count from nothing: every program of the evaluation is built again
        folder = _resized_copy(data_dir, tmp_path / name.replace(" ", "_"), sizes)
        result = evaluate.evaluate_dataset(segmenter, f"folder:{folder}")
        assert result["image_sizes"] == len(set(sizes)) and result["num_images"] == 10
        counts[name] = result["programs_compiled"]
        assert f"10 images of {len(set(sizes))} size{'s' * (len(set(sizes)) != 1)} on this host; " \
               f"{counts[name]} programs built" in \
            capsys.readouterr().err
    # Hand-worked from the sizes (batches of 4 on 4 devices): the first set's batches need input buckets
    # 128x128 and 128x256 and output buckets 128x128 and 128x256, one size needs one of each: one more
    # view-cutting program (input) and one more combination and final tag validation (output); nothing
    # else depends on the image size.
    assert counts["first"] == counts["one size"] + 3, counts
    assert counts["second"] == 0, counts  # new sizes inside known buckets compile nothing
    assert threads == {False}  # every image was decoded and resized in a reader thread
    assert sharded and set(sharded) == {jax.device_count()}


def test_classes_beyond_the_slot_cap_are_counted_and_warned_about(run, capsys):
    """eval.num_slots below what images select: the JSON counts the classes left out and a warning names the
    key; with no cap (0) nothing is dropped and nothing is said."""
    from dcp_jax.segmenter import Segmenter

    workdir, data_dir = run
    segmenter = Segmenter.from_workdir(workdir)
    segmenter.config.eval.num_slots = 1
    capped = evaluate.evaluate_dataset(segmenter, f"folder:{data_dir}")
    err = capsys.readouterr().err
    assert capped["selected_mean"] > 1 and capped["images_with_dropped_classes"] >= 1
    assert capped["dropped_classes_mean"] > 0
    assert "more classes than eval.num_slots=1 decodes" in err and "Raise eval.num_slots" in err
    segmenter.config.eval.num_slots = 0
    uncapped = evaluate.evaluate_dataset(segmenter, f"folder:{data_dir}")
    assert uncapped["dropped_classes_mean"] == 0 and uncapped["images_with_dropped_classes"] == 0
    assert "warning" not in capsys.readouterr().err


def test_a_result_of_another_dataset_with_the_same_name_is_kept(tmp_path, capsys):
    """Two folders whose meta.json carry one name: the second evaluation keeps the first one's JSON beside it."""
    path = tmp_path / "toy_world.json"
    evaluate.write_result(path, {"spec": "folder:/a", "mIoU": 50.0, "num_images": 100})
    evaluate.write_result(path, {"spec": "folder:/a", "mIoU": 51.0, "num_images": 100})  # same data: replaced
    assert not (tmp_path / "toy_world.1.json").exists() and capsys.readouterr().err == ""
    evaluate.write_result(path, {"spec": "folder:/b", "mIoU": 20.0, "num_images": 6})
    assert json.loads((tmp_path / "toy_world.1.json").read_text())["num_images"] == 100
    assert json.loads(path.read_text())["spec"] == "folder:/b"
    assert "held the result of another dataset (folder:/a); kept as" in capsys.readouterr().err
