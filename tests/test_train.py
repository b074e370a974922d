"""The trainer: data parallelism, resume, multi-process, checkpoint safety, failure modes, the demo config."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import xla_flags
from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import train
from dcp_jax.configs import demo, tiny
from dcp_jax.data.toy_world import write_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_benchmark(out, num_images=16, seed=0, size=64)
    return out


def tiny_run_config(data_dir, **overrides):
    c = tiny.get_config()
    c.train.dataset = f"folder:{data_dir}"
    c.eval.datasets = ""
    c.eval.during_training = ""
    c.train.batch_size = 4
    c.total_steps = 4
    c.log_every_steps = 1
    c.checkpoint_every_steps = 100
    c.optim.lr = 1e-3
    c.optim.grad_clip_norm = 1.0
    c.update_from_flattened_dict(overrides)
    return c


def losses(summary):
    return np.array([summary["losses"][s] for s in sorted(summary["losses"])])


@pytest.fixture(scope="module")
def four_device_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("four")
    return workdir, train.train_and_evaluate(tiny_run_config(data_dir), workdir)


def test_one_and_four_devices_give_the_same_losses(data_dir, four_device_run, tmp_path):
    assert jax.device_count() == 4
    _, four = four_device_run
    one = train.train_and_evaluate(tiny_run_config(data_dir), tmp_path, devices=jax.devices()[:1])
    assert sorted(four["losses"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(losses(one), losses(four), rtol=1e-4)
    assert losses(four)[-1] < losses(four)[0]  # it learns


def test_workdir_contents(four_device_run):
    workdir, _ = four_device_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "dcs_selected", "dcs_dropped", "images_per_sec"):
        assert all(np.isfinite(m[key]) for m in lines), key
    saved = ckpt_lib.load_config(workdir)
    assert saved.total_steps == 4 and saved.train.dataset.startswith("folder:")
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [4]
    assert (workdir / "tokenizer").is_dir() and (workdir / "clip_config.json").exists()
    assert json.loads((workdir / "train_classes.json").read_text())[0] == "grass"


def test_stop_and_resume_matches_an_uninterrupted_run(data_dir, four_device_run, tmp_path):
    _, full = four_device_run
    first = train.train_and_evaluate(tiny_run_config(data_dir), tmp_path, stop_after_steps=2)
    assert first["stopped_early"] and sorted(first["losses"]) == [1, 2]
    second = train.train_and_evaluate(tiny_run_config(data_dir), tmp_path)
    assert second["start_step"] == 2 and sorted(second["losses"]) == [3, 4]
    resumed = np.array([first["losses"][1], first["losses"][2], second["losses"][3], second["losses"][4]])
    np.testing.assert_allclose(resumed, losses(full), rtol=1e-5, atol=1e-7)


def test_a_damaged_checkpoint_is_reported_not_replaced(data_dir, tmp_path):
    config = tiny_run_config(data_dir, total_steps=1)
    train.train_and_evaluate(config, tmp_path)
    step_dir = tmp_path / "checkpoints" / "1"
    for f in (step_dir / "model").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    config.total_steps = 2
    with pytest.raises(ckpt_lib.CheckpointError, match=str(step_dir)) as error:
        train.train_and_evaluate(config, tmp_path)
    assert "\n" not in str(error.value) and len(str(error.value)) < 1000  # one line, however orbax words it
    assert step_dir.is_dir()  # left for the user to inspect
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [1]


def test_a_config_that_does_not_fit_a_trained_workdir_changes_none_of_its_files(data_dir, tmp_path):
    """Another model shape on a trained workdir: the restore fails, naming the checkpoint, before config.json,
    clip_config.json or the vocabulary are written, so the workdir still predicts as before."""
    train.train_and_evaluate(tiny_run_config(data_dir, total_steps=1), tmp_path)
    before = {f.relative_to(tmp_path): f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    with pytest.raises(ckpt_lib.CheckpointError, match="could not be restored"):
        train.train_and_evaluate(tiny_run_config(data_dir, total_steps=2, **{"model.hidden_dim": 16}), tmp_path)
    after = {f.relative_to(tmp_path): f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    assert after == before


def test_non_finite_loss_stops_naming_the_step(data_dir, tmp_path, monkeypatch):
    real_loss = train.loss_lib.dcp_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * np.float32("nan"), metrics

    monkeypatch.setattr(train.loss_lib, "dcp_loss", poisoned)
    with pytest.raises(train.NonFiniteLossError, match="at step 1"):
        train.train_and_evaluate(tiny_run_config(data_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_batch_not_divisible_by_devices_is_an_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
        train.train_and_evaluate(tiny_run_config(data_dir, **{"train.batch_size": 6}), tmp_path)


def test_demo_config_runs_a_few_steps_and_evaluates(tmp_path, toy_clip_checkpoint, monkeypatch, capsys):
    """The demo's recipe end to end, on the tests' quicker toy CLIP (clip.checkpoint "toy:" resolves to it)."""
    from dcp_jax import toy_clip

    monkeypatch.setattr(toy_clip, "ensure_toy_clip", lambda **_: toy_clip_checkpoint)
    config = demo.get_config()
    config.total_steps = 2
    config.train.synthetic_images = 24
    config.train.synthetic_val_images = 4
    config.eval.max_images = 2
    summary = train.train_and_evaluate(config, tmp_path)
    result = json.loads((tmp_path / "eval" / "toy_world.json").read_text())
    baseline = json.loads((tmp_path / "eval" / "zero_shot" / "toy_world.json").read_text())
    assert 0 <= result["mIoU"] <= 100 and result["num_images"] == 2 == baseline["num_images"]
    assert summary["eval"]["toy_world"]["mIoU"] == result["mIoU"]
    assert result["unseen_classes"] and "hIoU" in result and "hIoU" in baseline
    assert json.loads((tmp_path / "train_classes.json").read_text()) == [
        n for n in toy_world_classes() if n not in result["unseen_classes"]]  # trained on the seen classes only
    out = capsys.readouterr().out
    assert "| model | toy_world | toy_world seen | toy_world unseen | toy_world hIoU |" in out
    assert "| DCP-CLIP, step 2 |" in out and "| zero-shot CLIP |" in out
    # the ablation's Table VII cost of this row: its config names "toy:", no architecture (this once failed)
    from dcp_jax import ablate, config as config_lib
    cost = ablate.train_step_cost(config_lib.resolve_workdir(config, tmp_path), tmp_path)
    assert cost["train_memory_gib"] > 0 and cost["train_step_s"] > 0


@pytest.mark.parametrize("overrides", [{"model.guidance.prompt": "context", "clip.text_finetune": "guidance"},
                                       {"clip.text_finetune": "cost", "text.templates": "imagenet80"},
                                       {"model.guidance.prompt": "none"}],
                         ids=["context_text_finetune", "cost_text_finetune", "no_prompt"])
def test_guidance_variants_train_and_evaluate(data_dir, tmp_path, overrides):
    """Each textual-guidance variant through the trainer (slots' text re-encoded in the step) and evaluation
    (the vocabulary's guidance re-encoded once; the cost volume from the frozen text q/v)."""
    config = tiny_run_config(data_dir, total_steps=2, **{"eval.datasets": f"folder:{data_dir}",
                                                         "eval.max_images": 1, **overrides})
    summary = train.train_and_evaluate(config, tmp_path)
    assert np.isfinite(losses(summary)).all() and 0 <= summary["eval"]["toy_world"]["mIoU"] <= 100
    if overrides.get("clip.text_finetune"):
        metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(m["guidance_dropped"] == 0 for m in metrics)  # text.finetune_rows held every slot's class


def toy_world_classes():
    from dcp_jax.data import toy_world
    return list(toy_world.CLASS_NAMES)


# --------------------------------------------------------------------------------------------------
# Subprocesses: the command line, SIGTERM, two processes
# --------------------------------------------------------------------------------------------------

def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _train_cmd(workdir, data_dir, *extra):
    return [sys.executable, "-m", "dcp_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), f"--config.train.dataset=folder:{data_dir}", "--config.eval.datasets=",
            "--config.log_every_steps=1", *extra]


def test_config_typo_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--workdir", str(tmp_path), "--config.train.batchsize=2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "batchsize" in err and 'Did you mean "batch_size"' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("signum, named", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_saves_and_exits_cleanly(data_dir, tmp_path, signum, named):
    """A preemption notice, or Ctrl-C (a traceback without a checkpoint before; issue 32 item 6): the run stops
    after the step with one checkpoint and exit status 0, and says how to resume."""
    proc = subprocess.Popen(_train_cmd(tmp_path, data_dir, "--config.total_steps=100000"),
                            env=_env(XLA_FLAGS=xla_flags(4)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert f"({named}); checkpoint saved, run the same command to resume" in err and "Traceback" not in err
    steps = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 1


def test_a_second_run_reads_its_programs_from_the_compilation_cache(data_dir, tmp_path):
    """runtime.start switches the persistent cache on before anything compiles: a restarted run (here: the
    same tiny training in a second workdir) loads its programs, the train step included, instead of compiling."""
    env = _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    stats = []
    for run in ("first", "second"):
        proc = subprocess.run(_train_cmd(tmp_path / run, data_dir, "--config.total_steps=1"), env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = re.search(r"compiled: (\d+) programs built in ([\d.]+) s; persistent cache: (\d+) hits, (\d+) misses",
                          proc.stderr)
        assert found, proc.stderr[-3000:]
        stats.append(dict(zip(("programs", "seconds", "hits", "misses"), map(float, found.groups()))))
    first, second = stats
    assert first["hits"] == 0 and first["misses"] >= 5
    assert second["hits"] >= first["misses"] - 2 and second["misses"] <= 2
    assert second["seconds"] < 0.5 * first["seconds"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_env(port, i):
    return _env(XLA_FLAGS=xla_flags(2), DCP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                DCP_NUM_PROCESSES="2", DCP_PROCESS_ID=str(i))


def test_two_processes_train_together(data_dir, four_device_run, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on 127.0.0.1) = the 4-device run, step for step."""
    port = _free_port()
    procs = [subprocess.Popen(
        _train_cmd(tmp_path, data_dir, "--config.total_steps=2", "--config.train.batch_size=4",
                   "--config.optim.lr=0.001", "--config.optim.grad_clip_norm=1.0"),
        env=_two_process_env(port, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # written once, by process 0
    _, four = four_device_run
    np.testing.assert_allclose([m["loss"] for m in lines], losses(four)[:2], rtol=1e-4)
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [2]


def _two_processes_until_sigterm(workdir, data_dir, args, after_step: int) -> tuple[int, list]:
    """Train on 2 processes x 2 devices; once metrics.jsonl has a step past `after_step`, SIGTERM to process 1
    only. Both must stop after the same step with a checkpoint of it: returns that step and their (stdout, stderr)."""
    port = _free_port()
    procs = [subprocess.Popen(_train_cmd(workdir, data_dir, *args), env=_two_process_env(port, i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    metrics = workdir / "metrics.jsonl"

    def last_step():
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    deadline = time.time() + 300
    while last_step() <= after_step and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in procs]  # within a minute or two, not a hang
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    stopped = re.search(r"stopping at step (\d+) \(SIGTERM\)", outputs[0][1])
    assert stopped, outputs[0][1][-3000:]
    step = int(stopped.group(1))
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps()[-1] == step
    return step, outputs


def test_two_processes_stop_resume_on_two_then_on_one(data_dir, tmp_path):
    """A preemption notice to process 1 only: both processes stop after the same step with one checkpoint.
    The same two-process command resumes from it (each process reads only its own shards: issue 32's
    'does not support cross-host device transfers') and is stopped again; then ONE process with 4 devices
    resumes and finishes. Every step's loss equals the uninterrupted run's."""
    total = 40
    args = (f"--config.total_steps={total}", "--config.train.batch_size=4", "--config.optim.lr=0.001",
            "--config.optim.grad_clip_norm=1.0", "--config.checkpoint_every_steps=1000")
    workdir = tmp_path / "run"
    first, _ = _two_processes_until_sigterm(workdir, data_dir, args, after_step=0)
    assert 1 <= first < total
    second, outputs = _two_processes_until_sigterm(workdir, data_dir, args, after_step=first + 1)
    assert f"at step {first} (data position {4 * first}, 2 process(es))" in outputs[0][1]
    assert first < second < total

    resumed = subprocess.run(_train_cmd(workdir, data_dir, *args), capture_output=True, text=True, timeout=400,
                             env=_env(XLA_FLAGS=xla_flags(4)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {second} (data position {4 * second}, 1 process(es))" in resumed.stderr
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, total + 1))
    reference = train.train_and_evaluate(
        tiny_run_config(data_dir, total_steps=total, checkpoint_every_steps=1000), tmp_path / "reference")
    np.testing.assert_allclose([m["loss"] for m in lines], losses(reference), rtol=1e-4)


def test_diverged_training_never_saves_over_a_good_checkpoint(data_dir, tmp_path):
    """lr = 1e30: step 1 leaves finite (huge) parameters, step 2 diverges. With a checkpoint every step and a log
    every 5, the run stops at step 2 before saving it, with one line naming the step and the intact checkpoint;
    every saved checkpoint is finite and metrics.jsonl is strict JSON (issue 32 item 4: NaN checkpoints were
    saved and called intact)."""
    workdir = tmp_path / "run"
    run = subprocess.run(_train_cmd(workdir, data_dir, "--config.total_steps=6", "--config.optim.lr=1e30",
                                    "--config.checkpoint_every_steps=1", "--config.log_every_steps=5"),
                         capture_output=True, text=True, timeout=400, env=_env(XLA_FLAGS=xla_flags(4)))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert ("training diverged at step 2: the loss and the gradient norm not finite" in run.stderr
            or "training diverged at step 2: the gradient norm not finite" in run.stderr), run.stderr[-2000:]
    assert "the last checkpoint (step 1) is intact, and the same command resumes from it" in run.stderr
    assert ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [1]
    model = ckpt_lib.restore_model(workdir)[0]
    from flax import nnx
    assert all(bool(np.all(np.isfinite(np.asarray(p)))) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

    def strict(token):
        raise ValueError(f"metrics.jsonl holds {token}")

    metrics = workdir / "metrics.jsonl"
    for line in (metrics.read_text().splitlines() if metrics.exists() else []):
        json.loads(line, parse_constant=strict)


def test_optimizer_lr_groups_weight_decay_and_freezing(tmp_path):
    """One AdamW step with unit gradients: every trainable param moves by lr (head) or lr x 0.01 (CLIP),
    plus decoupled weight decay except on norm layers; frozen params are not in the optimizer."""
    from flax import nnx

    from dcp_jax import optim
    from dcp_jax.models import build
    from dcp_jax.models.build import write_tiny_clip
    from dcp_jax.rules import flat_params

    config = tiny.get_config()
    config.optim.schedule = "constant"
    config.optim.grad_clip_norm = 0.0  # unclipped, so Adam's first step is exactly lr-sized
    config.clip.text_finetune = "guidance"
    clip_dir = write_tiny_clip(tmp_path / "clip", config.clip.tiny.to_dict(), seed=0)
    model, _, _ = build.model_from_clip_checkpoint(config, clip_dir)
    optimizer = optim.make_optimizer(config, model)
    trainable = optim.trainable(config)
    before = {p: np.asarray(v[...]) for p, v in flat_params(model)}
    grads = jax.tree.map(jax.numpy.ones_like, nnx.state(model, trainable))
    optimizer.update(model, grads)
    after = {p: np.asarray(v[...]) for p, v in flat_params(model)}
    lr, wd = config.optim.lr, config.optim.weight_decay
    trained = {p for p, _ in flat_params(nnx.state(model, trainable))}
    checked = {"head": 0, "clip": 0, "norm": 0, "text": 0}
    for name, old in before.items():
        if name not in trained:
            np.testing.assert_array_equal(after[name], old, err_msg=name)  # frozen
            continue
        group_lr = lr * (config.optim.clip_lr_mult if name.startswith("clip/") else 1.0)
        decay = 0.0 if "norm" in name.split("/")[-2] else wd
        # Adam's first step with a constant gradient is -lr (bias-corrected m / sqrt(v) = 1).
        np.testing.assert_allclose(after[name], old - group_lr * (1.0 + decay * old), rtol=1e-4, atol=1e-7,
                                   err_msg=name)
        kind = ("norm" if not decay else "text" if name.startswith("clip/text_model") else
                "clip" if name.startswith("clip/") else "head")
        checked[kind] += 1
    assert all(checked.values()), checked
    # q/v as CAT-Seg trains them: the projection weights of both towers, not their biases
    assert {p for p in trained if p.startswith("clip/text")} == {
        f"clip/text_model/encoder/layers/{i}/self_attn/{proj}/kernel" for i in range(2) for proj in ("q_proj", "v_proj")}
    image_layers = {p.split("/")[4] for p in before if p.startswith("clip/vision_model/encoder/layers/")}
    assert {p for p in trained if p.startswith("clip/vision")} == {
        f"clip/vision_model/encoder/layers/{i}/self_attn/{proj}/kernel" for i in image_layers
        for proj in ("q_proj", "v_proj")}


# --------------------------------------------------------------------------------------------------
# FSDP, the workdir lock, TensorBoard, training-time evaluation
# --------------------------------------------------------------------------------------------------

FSDP = {"mesh.fsdp": 4, "mesh.min_shard_size": 0}


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp")
    return workdir, train.train_and_evaluate(tiny_run_config(data_dir, **FSDP), workdir)


def test_fsdp_gives_the_same_losses_with_a_fraction_of_the_memory(four_device_run, fsdp_run):
    _, replicated = four_device_run
    _, sharded = fsdp_run
    np.testing.assert_allclose(losses(sharded), losses(replicated), rtol=1e-4)
    assert sharded["param_bytes_per_device"] <= 0.3 * replicated["param_bytes_per_device"]


def _evaluate_in_subprocess(workdir, data_dir, devices, *extra):
    proc = subprocess.run([sys.executable, "-m", "dcp_jax.evaluate", "--workdir", str(workdir),
                           f"--config.eval.datasets=folder:{data_dir}", "--config.eval.max_images=2", *extra],
                          capture_output=True, text=True, timeout=300,
                          env=_env(XLA_FLAGS=xla_flags(devices)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "eval" / "toy_world.json").read_text())


def test_a_sharded_checkpoint_evaluates_on_one_device_and_the_reverse(data_dir, fsdp_run, tmp_path):
    workdir, _ = fsdp_run  # saved under fsdp=4 on 4 devices
    one = _evaluate_in_subprocess(workdir, data_dir, 1, "--config.mesh.fsdp=1")
    assert one["num_images"] == 2 and 0 <= one["mIoU"] <= 100
    # Saved on 1 device, restored with fsdp=4 over 4 devices, same labels.
    single = tmp_path / "single"
    train.train_and_evaluate(tiny_run_config(data_dir, total_steps=1), single, devices=jax.devices()[:1])
    a = _evaluate_in_subprocess(single, data_dir, 1)
    b = _evaluate_in_subprocess(single, data_dir, 4, "--config.mesh.fsdp=4", "--config.mesh.min_shard_size=0")
    as_array = lambda r: np.array([np.nan if v is None else v for v in r["per_class_iou"]])  # noqa: E731
    np.testing.assert_allclose(as_array(a), as_array(b), atol=1e-9)
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-9)


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(data_dir, tmp_path):
    with ckpt_lib.train_lock(tmp_path):
        with pytest.raises(ckpt_lib.WorkdirLockedError, match=f"pid {os.getpid()}"):
            train.train_and_evaluate(tiny_run_config(data_dir, total_steps=1), tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path / ckpt_lib.LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with ckpt_lib.train_lock(tmp_path):  # the kernel released the dead process's lock
        pass


def _tensorboard_tags(directory):
    """Scalar tags in TensorBoard event files (TFRecord framing, Event protos from tensorboardX)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + length + 4
    return tags


def test_periodic_evaluation_compiles_nothing_new_and_metrics_reach_tensorboard(data_dir, tmp_path, monkeypatch):
    from jax import monitoring

    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    per_round = []
    real = train._evaluate

    def counted(*args, **kwargs):
        before = len(compiles)
        result = real(*args, **kwargs)
        per_round.append(len(compiles) - before)
        return result

    monkeypatch.setattr(train, "_evaluate", counted)
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # count real compiles, not cache hits
    try:
        config = tiny_run_config(data_dir, total_steps=4, eval_every_steps=1, **{
            "eval.during_training": f"folder:{data_dir}", "eval.during_training_images": 2, "eval.num_slots": 4})
        train.train_and_evaluate(config, tmp_path)
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
    assert len(per_round) == 4 and per_round[0] > 0  # rounds at steps 1, 2, 3, and the (empty) final table
    assert per_round[1:] == [0, 0, 0], per_round
    assert (tmp_path / "eval" / "during_training" / "toy_world.json").exists()
    tags = _tensorboard_tags(tmp_path / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/toy_world/mIoU"} <= tags


# --------------------------------------------------------------------------------------------------
# --profile
# --------------------------------------------------------------------------------------------------

def _perfetto_events(trace_dir):
    """The events of the one Perfetto file under a --profile folder, and that folder's xplane.pb files."""
    (perfetto,) = trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz")
    import gzip
    with gzip.open(perfetto) as f:
        return json.load(f)["traceEvents"], list(perfetto.parent.glob("*.xplane.pb"))


def test_profile_traces_the_steps_asked_for_and_changes_no_loss(data_dir, four_device_run, tmp_path, capsys):
    """--profile traces steps 3 and 4 (the first compiles, the second warms up) of the run of four_device_run,
    as TensorBoard's xplane.pb and Perfetto's JSON; the losses are those of the run without it."""
    _, plain = four_device_run
    summary = train.train_and_evaluate(tiny_run_config(data_dir), tmp_path / "w", profile=tmp_path / "trace",
                                       profile_steps=2)
    np.testing.assert_array_equal(losses(summary), losses(plain))
    assert summary["profile"]["steps"] == [3, 4]
    events, xplanes = _perfetto_events(tmp_path / "trace")
    assert len(xplanes) == 1 and xplanes[0].stat().st_size > 0
    assert summary["profile"]["perfetto"] == str(next((tmp_path / "trace").rglob("perfetto_trace.json.gz")))
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and e.get("ph") == "X")
    assert steps == [3, 4]  # StepTraceAnnotation: one event per traced step, no other step
    assert any("train_step" in e.get("name", "") for e in events)  # the jitted step ran inside the trace
    err = capsys.readouterr().err
    assert "tensorboard --logdir" in err and "ui.perfetto.dev" in err and "training step(s) 3-4" in err


def test_profile_of_a_run_stopped_inside_its_traced_steps_writes_what_it_traced(data_dir, tmp_path):
    """Stopped (as by SIGTERM) after step 3 of steps 3-4 to trace: the trace of step 3 is written."""
    summary = train.train_and_evaluate(tiny_run_config(data_dir), tmp_path / "w", stop_after_steps=3,
                                       profile=tmp_path / "trace", profile_steps=2)
    assert summary["stopped_early"] and summary["profile"]["steps"] == [3]
    events, _ = _perfetto_events(tmp_path / "trace")
    assert [e["args"]["step_num"] for e in events if e.get("name") == "train" and e.get("ph") == "X"] == ["3"]


def test_profile_window_skips_compilation_and_warm_up():
    assert train.profile_window(0, 100, 3) == range(3, 6)
    assert train.profile_window(10, 14, 5) == range(13, 15)  # a resumed run: its own first steps are skipped
    with pytest.raises(ValueError, match="needs at least 3"):
        train.profile_window(0, 2, 3)


def test_profile_folder_errors_are_one_line(tmp_path, capsys):
    """A --profile that is a file, or no step to trace, stops the command before any work, in one line."""
    file = tmp_path / "not_a_folder"
    file.write_text("")
    for extra, message in ((["--profile", str(file)], "is a file; give a directory"),
                           (["--profile", str(tmp_path / "t"), "--profile-steps", "0"], "trace at least 1 step"),
                           (["--profile", str(tmp_path / "t"), "--config.total_steps=2"], "needs at least 3")):
        code = train.main(["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(tmp_path / "w"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "t").exists()


def test_a_flipped_bit_in_a_checkpoint_is_caught_not_used(data_dir, tmp_path, capsys):
    """Each save records the size and CRC-32 of the files it wrote; one flipped bit in a model data file makes
    every restore (train's resume, evaluate, predict, export, serve: all restore through the Checkpointer) fail
    with one line naming the step and the previous checkpoint, where it used to load the changed weight
    (issue 32 item 3). The previous checkpoint still restores."""
    from dcp_jax import predict

    workdir = tmp_path / "run"
    config = tiny_run_config(data_dir, total_steps=2, checkpoint_every_steps=1)
    train.train_and_evaluate(config, workdir)
    for step in (1, 2):
        assert (workdir / "checkpoints" / str(step) / ckpt_lib.CHECKSUMS_NAME).is_file()
    data = max((p for p in (workdir / "checkpoints" / "2" / "model").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))

    with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoint .*/checkpoints/2 is damaged: model/.* changed"):
        ckpt_lib.restore_model(workdir)
    assert ckpt_lib.restore_model(workdir, checkpoint=1)[2] == 1
    image = data_dir / "images" / "val" / sorted(p.name for p in (data_dir / "images" / "val").iterdir())[0]
    capsys.readouterr()  # the training's output
    code = predict.main(["--workdir", str(workdir), "--image", str(image), "--classes", "a,b",
                         "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[dcp_jax] jax ")]
    assert code == 2 and len(lines) == 1, err
    assert "checkpoints/2 is damaged" in lines[0] and "resume from step 1, the previous checkpoint" in lines[0]
    assert "--checkpoint 1" in lines[0]
    resumed = subprocess.run(_train_cmd(workdir, data_dir, "--config.total_steps=3"), capture_output=True,
                             text=True, timeout=400, env=_env(XLA_FLAGS=xla_flags(4)))
    assert resumed.returncode == 2 and "checkpoints/2 is damaged" in resumed.stderr, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert data.read_bytes() == bytes(raw)  # left untouched
