"""Hostile input through the real command lines: each case ends in exit status 2 and one line of stderr that
names the thing and the fix, and leaves nothing behind (issue 22's fault suite, growing)."""

from pathlib import Path

import pytest

from dcp_jax import bench, evaluate, predict, train


def _one_line_error(capsys, code, *needles):
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    # less the backend line every command prints first once its config is read (runtime.start)
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[dcp_jax] jax ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("--config.total_steps=-5", "config.total_steps=-5: must be >= 1"),
    ("--config.model.dcs.theta=1.5", "config.model.dcs.theta=1.5: must be between 0.0 and 1.0"),
    ("--config.eval.max_images=-3", "config.eval.max_images=-3: must be >= 0"),
    ("--config.train.batch_size=0", "config.train.batch_size=0: must be >= 1"),
    # nan passes every comparison: refused as not finite (issue 32 item 4)
    ("--config.optim.lr=nan", "config.optim.lr=nan: must be a finite number"),
    ("--config.model.dcs.theta=nan", "config.model.dcs.theta=nan: must be a finite number"),
    ("--config.optim.weight_decay=-1", "config.optim.weight_decay=-1.0: must be >= 0.0"),
])
def test_out_of_range_config_values_stop_train_before_anything_is_written(tmp_path, capsys, override, needle):
    workdir = tmp_path / "w"
    _one_line_error(capsys, train.main(["--config", "configs/tiny.py", "--workdir", str(workdir), override]), needle)
    assert not workdir.exists() or not any(workdir.iterdir())


def test_out_of_range_values_stop_evaluate_and_predict(tmp_path, capsys):
    _one_line_error(capsys, evaluate.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                                           "--zero-shot", str(tmp_path), "--config.eval.max_images=-3"]),
                    "config.eval.max_images=-3")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    _one_line_error(capsys, predict.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path),
                                          "--image", str(image), "--classes", "a,b", "--out-dir", str(tmp_path / "o"),
                                          "--config.model.tv.k=0"]), "config.model.tv.k=0: must be >= 1")


@pytest.mark.parametrize("args, needle", [
    (["--thetas", "1.5"], "--thetas 1.5: give thresholds between 0 and 1"),
    (["--runs", "0"], "--runs 0: at least 1"),
    (["--vocab-sizes", "0"], "--vocab-sizes 0: every vocabulary size must be >= 1"),
])
def test_bench_rejects_meaningless_sweeps(tmp_path, capsys, args, needle):
    _one_line_error(capsys, bench.main(["--config", "configs/tiny.py", "--out", str(tmp_path), *args]), needle)


@pytest.mark.parametrize("config, needle", [
    ("/nowhere/x.py", "--config /nowhere/x.py: no such file"),
    ("README.md", "--config README.md: not a Python config file"),
    ("configs", "--config configs: not a file"),
    ("configs/tiny.py:bogus=1", "config arg 'bogus': unknown; known keys are ['templates', 'num_slots']"),
])
def test_a_bad_config_file_is_named_on_one_line(tmp_path, capsys, config, needle):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--workdir", str(tmp_path / "w"), "--config", config])
    line = _one_line_error(capsys, exit_.value.code, needle)
    assert "Traceback" not in line and not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_stops_train_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "w"
    blocker.write_text("a file the user made")
    code = train.main(["--config", "configs/tiny.py", "--workdir", str(blocker)])
    _one_line_error(capsys, code, f"--workdir {blocker} is a file; give a directory")
    assert blocker.read_text() == "a file the user made"


# ---------------------------------------------------------------------------------------------
# SIGKILL in the middle of writing: a resume or a rerun completes and nothing is lost
# ---------------------------------------------------------------------------------------------

# Runs a command with one function wrapped to print a line when it starts, so that the test knows
# when to kill: the kill lands while that function (and the writes it starts) is under way.
_ANNOUNCE = """
import importlib, sys
module, name, command = sys.argv[1:4]
owner = importlib.import_module(module)
cls, _, attr = name.rpartition(".")
holder = getattr(owner, cls) if cls else owner
original = getattr(holder, attr)
def announced(*args, **kwargs):
    print("writing", flush=True)
    return original(*args, **kwargs)
setattr(holder, attr, announced)
sys.exit(importlib.import_module(command).main(sys.argv[4:]))
"""


def _kill_while_writing(module, name, command, argv, *, nth: int, delay: float) -> str:
    """Start `python -m command argv`, SIGKILL it `delay` s after the `nth` call of module.name began."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the suite's 4 CPU devices, as in the test's own process
    proc = subprocess.Popen([sys.executable, "-c", _ANNOUNCE, module, name, command, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += line.strip() == "writing"
        if seen == nth:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]  # killed, not finished
    return proc.stderr.read()


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_during_checkpoint_saves_and_exports_loses_nothing(tmp_path):
    """Training killed at random points of its second and third checkpoint saves resumes each time, ends at
    the last step, and every step's loss equals the loss the killed runs logged for that step (training is
    deterministic, so any lost or corrupted state would show). Then an export killed while it writes leaves
    the previous export byte-identical and no temporary behind once the rerun completes."""
    import json
    import random

    from dcp_jax import checkpoint as ckpt_lib
    from dcp_jax import export
    from dcp_jax.data.toy_world import write_benchmark

    data = write_benchmark(tmp_path / "data", num_images=8, seed=0, size=64)
    workdir = tmp_path / "run"
    argv = ["--config", str(Path(train.__file__).parents[1] / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.train.dataset=folder:{data}", "--config.eval.datasets=", "--config.eval.during_training=",
            "--config.train.batch_size=4", "--config.total_steps=8", "--config.checkpoint_every_steps=2",
            "--config.log_every_steps=1", "--config.optim.lr=1e-3"]
    rng = random.Random(0)
    for nth in (2, 3):  # the checkpoints of steps 4 and 6 (step 2's is the first)
        _kill_while_writing("dcp_jax.checkpoint", "Checkpointer.save", "dcp_jax.train", argv, nth=nth,
                            delay=rng.uniform(0.0, 0.05))
    assert train.main(argv) == 0
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).latest_step() == 8
    logged = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            logged.setdefault(record["step"], []).append(record["loss"])
    assert sorted(logged) == list(range(1, 9))
    assert any(len(v) > 1 for v in logged.values())  # some steps ran again after a kill ...
    for step, values in logged.items():  # ... and gave the losses they gave before it
        assert values == pytest.approx([values[0]] * len(values), rel=1e-6), (step, values)

    out = tmp_path / "export"
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
    before = _files(out)
    for delay in (0.0, rng.uniform(0.0, 0.5)):
        _kill_while_writing("dcp_jax.export", "write_export", "dcp_jax.export",
                            ["--workdir", str(workdir), "--out", str(out), "--overwrite"], nth=1, delay=delay)
        assert _files(out) == before  # the old export, untouched
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "export", "run"]  # no temporary left
    assert _files(out).keys() == before.keys()


# -- issue 32 item 6: tracebacks for user errors ------------------------------------------------------------------

def _code(main, argv) -> int:
    """A command's exit status, whether it returned it or exited with it (flag errors exit while parsing)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code

@pytest.mark.parametrize("source, needle", [
    ('raise RuntimeError("boom")\n', "(RuntimeError): boom"),
    ("x = 1\n", "the file has no get_config() function"),
    ("def get_config():\n    return 5\n", "get_config() returned int, not an ml_collections.ConfigDict"),
    ("import no_such_module_here\n", "(ModuleNotFoundError): No module named 'no_such_module_here'"),
])
def test_a_config_file_that_fails_is_one_line(tmp_path, capsys, source, needle):
    config = tmp_path / "mine.py"
    config.write_text(source)
    _one_line_error(capsys, _code(train.main, ["--config", str(config), "--workdir", str(tmp_path / "w")]), needle)


def test_a_config_typo_with_config_given_is_one_line(tmp_path, capsys):
    """The way the docs always show it (--config given), not only without it."""
    _one_line_error(capsys, _code(train.main, ["--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                                               "--config.train.batchsize=2"]), "batchsize", 'Did you mean "batch_size"')


def test_a_wrongly_typed_saved_config_is_named(tmp_path, capsys):
    import json

    from dcp_jax import checkpoint
    from dcp_jax.configs import tiny

    checkpoint.save_config(tmp_path, tiny.get_config())
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["train"]["batch_size"] = "4"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _one_line_error(capsys, evaluate.main(["--workdir", str(tmp_path)]),
                    "config.json: train.batch_size is '4' (str), expected type int")
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(capsys, evaluate.main(["--workdir", str(tmp_path)]), "config.json is not valid JSON")


def test_images_that_are_not_files_are_refused_before_any_work(tmp_path, capsys):
    """A symlink loop named loop.png (a traceback before) and a FIFO named x.png (predict blocked forever on
    it) in an image folder: one line naming the entry (issue 32 items 6 and 7)."""
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    args = ["--image", str(folder), "--classes", "a, b", "--out-dir", str(tmp_path / "out"), "--zero-shot", "x"]
    _one_line_error(capsys, predict.main(args), "loop.png cannot be read", "remove or fix it")
    (folder / "loop.png").unlink()
    os.mkfifo(folder / "x.png")
    _one_line_error(capsys, predict.main(args), "x.png is not a regular file")
    assert not (tmp_path / "out").exists()


def test_a_huge_image_is_refused_from_its_header(tmp_path):
    """A small PNG of 12000 x 12000 pixels (predict peaked at 13.4 GB on it): refused before decoding, naming the
    size and the cap (issue 32 item 7)."""
    import tracemalloc

    from PIL import Image

    from dcp_jax.data import datasets

    path = tmp_path / "huge.png"
    Image.new("L", (12000, 12000)).save(path, optimize=True)
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    with pytest.raises(datasets.DatasetError, match=r"12000 x 12000 = 144 megapixels, more than the 50 .*downscale"):
        datasets.read_image(path)
    assert tracemalloc.get_traced_memory()[1] < 50_000_000  # nothing decoded
    tracemalloc.stop()


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_resumable(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, as a full disk fails a write) while step 2's checkpoint is written: the
    run ends with one line naming the step and the intact checkpoint of step 1 (it was a raw TensorStore error),
    with no traceback before it,
    the unfinished save is not taken for a checkpoint, and the same command resumes once the limit is gone."""
    import os
    import resource
    import subprocess
    import sys

    from dcp_jax import checkpoint
    from dcp_jax.data.toy_world import write_benchmark

    write_benchmark(tmp_path / "data", 8, 0, size=64)
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "dcp_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
           f"--config.train.dataset=folder:{tmp_path / 'data'}", "--config.eval.datasets=",
           "--config.checkpoint_every_steps=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run([*cmd, "--config.total_steps=1"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300 << 10, 300 << 10))

    full = subprocess.run([*cmd, "--config.total_steps=3"], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited)
    assert full.returncode == 2, full.stderr[-2000:]
    # no echo of it before that line: Orbax's writer threads logged ~450 lines of tracebacks, TensorStore's
    # callbacks ~150 "Event loop is closed" reports
    assert "Traceback" not in full.stderr and "ERROR" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1] == (
        f"python -m dcp_jax.train: error: saving the checkpoint of step 2 into {workdir / 'checkpoints'} failed "
        "(the disk is full, or a file-size limit was reached: free space or raise the limit, then run the same "
        "command to resume); the checkpoint of step 1 is intact")
    assert checkpoint.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [1]
    again = subprocess.run([*cmd, "--config.total_steps=3"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-2000:]
