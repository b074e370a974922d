"""Hostile input through the real command lines: each case ends in exit status 2 and one line of stderr that
names the thing and the fix, and leaves nothing behind (issue 22's fault suite, growing)."""

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
