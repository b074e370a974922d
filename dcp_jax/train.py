"""Train DCP-CLIP: python -m dcp_jax.train --config configs/X.py[:args] --workdir W [--config.key=value ...]

Without --config it runs the built-in CPU demo (configs/demo.py): a tiny random CLIP and a synthetic
dataset written under W, a few minutes of training, then evaluation.

The run resumes automatically from W's latest checkpoint (model, optimizer and data-iterator state);
otherwise the CLIP weights come from `clip.checkpoint`. Data parallel over every device of every host
(a 1-D `data` mesh; params replicated). SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import distributed
from dcp_jax import segmenter
from dcp_jax import text as text_lib
from dcp_jax.data import datasets as datasets_lib
from dcp_jax.data import pipeline
from dcp_jax.models import dcp

DEFAULT_CONFIG = str(Path(__file__).with_name("default_config.py"))


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

def learning_rate_schedule(config) -> optax.Schedule:
    o = config.optim
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, max(1, config.total_steps - o.warmup_steps))
    elif o.schedule == "constant":
        decay = optax.constant_schedule(o.lr)
    else:
        raise ValueError(f"optim.schedule={o.schedule!r}: expected 'cosine' or 'constant'")
    if o.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), decay],
                                    [o.warmup_steps])
    return decay


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def make_optimizer(config, model: nnx.Module) -> nnx.Optimizer:
    """AdamW over the trainable params; CLIP params at lr x clip_lr_mult; full-model grad clipping.

    Norm layers get no weight decay (detectron2's WEIGHT_DECAY_NORM = 0); biases are decayed like
    detectron2's default.
    """
    schedule = learning_rate_schedule(config)
    o = config.optim
    trainable = dcp.trainable_filter(config)

    def adamw(lr):
        return optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=o.weight_decay,
                           mask=lambda params: jax.tree_util.tree_map_with_path(
                               lambda p, _: not _is_norm_param(_path_str(p)), params))

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "clip" if dcp.is_clip_param(_path_str(p)) else "head", params)

    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity(),
        optax.multi_transform({"head": adamw(schedule),
                               "clip": adamw(lambda s: schedule(s) * o.clip_lr_mult)}, labels))
    return nnx.Optimizer(model, tx, wrt=trainable)


def _is_norm_param(path: str) -> bool:
    """LayerNorm/GroupNorm scales and biases: every norm module's name contains "norm" (norm1,
    layer_norm1, pre_layrnorm, post_layernorm, guidance_norm, ...)."""
    parts = path.split("/")
    return len(parts) >= 2 and "norm" in parts[-2]


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------

def resolve_workdir_placeholders(config, workdir: Path) -> None:
    """Dataset specs may say {workdir}, e.g. the demo's synthetic data under W."""
    with config.unlocked():
        config.train.dataset = config.train.dataset.replace("{workdir}", str(workdir))
        config.eval.datasets = config.eval.datasets.replace("{workdir}", str(workdir))


def clip_checkpoint_path(config, workdir: Path, *, create: bool) -> Path:
    """The CLIP weights (and tokenizer) a run starts from; tiny configs write a random one into W."""
    if config.clip.checkpoint:
        path = Path(config.clip.checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"clip.checkpoint={config.clip.checkpoint!r} does not exist. Point it at "
                                    "an HF CLIP directory or an OpenAI .pt file on local disk.")
        return path
    path = workdir / "tiny_clip"
    if not (path / "config.json").exists():
        if not create:
            raise FileNotFoundError(f"{path} missing: the workdir's random tiny CLIP is gone; "
                                    "it is written by the trainer when clip.checkpoint is empty.")
        if ckpt_lib.is_primary():
            from dcp_jax.models.tiny_clip import write_tiny_clip
            write_tiny_clip(path, config.clip.tiny.to_dict(), seed=config.seed)
        _sync("tiny_clip")
    return path


def maybe_write_synthetic(config, workdir: Path) -> None:
    n = config.train.get("synthetic_images", 0)
    spec = config.train.dataset
    if not n or not spec.startswith("folder:"):
        return
    out = Path(spec[len("folder:"):])
    if not (out / "classes.json").exists():
        if ckpt_lib.is_primary():
            from dcp_jax.data.synthetic import write_synthetic_dataset
            _say(f"writing {n} synthetic images to {out}")
            write_synthetic_dataset(out, num_images=n, seed=config.seed,
                                    size=config.train.get("synthetic_size", 128))
        _sync("synthetic")


def _say(message: str) -> None:
    if ckpt_lib.is_primary():
        print(f"[dcp_jax.train] {message}", file=sys.stderr, flush=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------

def make_train_step(config, graphdef, num_classes: int):
    num_slots = int(config.model.dcs.num_slots)
    trainable = dcp.trainable_filter(config)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state, batch, text_embeds):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            gt = dcp.gt_presence(batch["label"], num_classes) if config.model.dcs.include_gt else None
            out = model(batch["image"], text_embeds, num_slots=num_slots, gt_present=gt, train=True)
            loss, metrics = dcp.dcp_loss(out, batch["label"],
                                         ignore_as_negative=config.train.ignore_as_negative)
            metrics = dict(metrics)
            metrics["dcs_selected"] = jnp.mean(out["dcs_selected"].astype(jnp.float32))
            metrics["dcs_dropped"] = jnp.mean(out["dcs_dropped"].astype(jnp.float32))
            return loss, metrics

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        optimizer.update(model, grads)
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                       bad_samples=jnp.sum(batch["bad"]) if "bad" in batch else jnp.zeros((), jnp.int32))
        return nnx.state((model, optimizer)), metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       devices=None, stop_after_steps: int | None = None) -> dict:
    """Train until config.total_steps (resuming from W), evaluate, return a summary dict.

    `devices`: restrict the mesh (tests compare 1 and 4 devices); `stop_after_steps`: save and stop
    after this many steps of this invocation, as if preempted (tests of resume).
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config = ml_collections.ConfigDict(config.to_dict())  # private copy; placeholders resolved below
    resolve_workdir_placeholders(config, workdir)
    if ckpt_lib.is_primary():
        ckpt_lib.save_config(workdir, config)

    # --- Mesh ---
    mesh = distributed.data_mesh() if devices is None else jax.sharding.Mesh(np.array(devices), ("data",))
    data_sharding = distributed.batch_sharding(mesh)
    repl = distributed.replicated(mesh)
    num_devices = mesh.devices.size
    if config.train.batch_size % num_devices:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                         f"{num_devices} devices; use a multiple of {num_devices}.")

    # --- Data ---
    maybe_write_synthetic(config, workdir)
    train_ds = datasets_lib.open_dataset(config.train.dataset, "train", config.train.data_root or None)
    class_names = list(train_ds.class_names)
    if ckpt_lib.is_primary():
        ckpt_lib.write_json(workdir / ckpt_lib.TRAIN_CLASSES_NAME, class_names)
    train_iter = iter(pipeline.train_dataset(
        train_ds, crop_size=config.train.crop_size, global_batch_size=config.train.batch_size,
        seed=config.seed, num_workers=config.train.num_workers,
        skip_bad_samples=config.train.skip_bad_samples))

    # --- Model, text embeddings, optimizer ---
    clip_path = clip_checkpoint_path(config, workdir, create=True)
    model, clip_config = dcp.build_model_from_checkpoint(config, clip_path)
    if ckpt_lib.is_primary():
        segmenter.save_inference_assets(workdir, clip_path, clip_config)
    tokenizer = text_lib.load_tokenizer(clip_path)
    text_embeds = text_lib.embed_vocabulary(model.clip, tokenizer, class_names, config.text.templates,
                                            batch_size=config.text.batch_size)
    optimizer = make_optimizer(config, model)

    # --- Resume ---
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        meta = checkpointer.restore_train(latest, model=model, optimizer=optimizer, data_iter=train_iter)
        start_step = int(meta["step"])
        _say(f"resumed from {checkpointer.directory / str(latest)} at step {start_step}")

    # --- Shard and transfer ---
    graphdef, state = nnx.split((model, optimizer))
    state = jax.device_put(state, repl)
    text_embeds = jax.device_put(jnp.asarray(text_embeds), repl)
    train_step = make_train_step(config, graphdef, len(class_names))
    schedule = learning_rate_schedule(config)

    def save(step: int) -> None:
        nnx.update((model, optimizer), state)
        checkpointer.save(step, model=model, optimizer=optimizer, data_iter=train_iter,
                          meta={"step": step, "time": time.time()})

    # --- SIGTERM: save at the next step boundary and exit ---
    stop_requested = {"flag": False}
    previous_handler = None
    if os.name == "posix" and _in_main_thread():
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.update(flag=True))

    # --- Train loop ---
    metrics_path = workdir / "metrics.jsonl"
    progress = _progress(start_step, config.total_steps)
    summary = {"start_step": start_step, "losses": {}}
    window_start, window_images = time.time(), 0
    step = start_step
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step + 1, config.total_steps + 1):
                batch = pipeline.make_global_batch(next(train_iter), data_sharding)
                state, metrics = train_step(state, batch, text_embeds)
                window_images += config.train.batch_size
                progress.update(1)
                is_last = step == config.total_steps
                if step % config.log_every_steps == 0 or is_last:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not all(np.isfinite(v) for v in (m["loss"], m["grad_norm"])):
                        raise NonFiniteLossError(
                            f"loss or gradient norm is not finite at step {step} (loss={m['loss']}, "
                            f"grad_norm={m['grad_norm']}). Stopped without saving; the last checkpoint "
                            "is intact. Lower optim.lr or check the data.")
                    now = time.time()
                    m.update(step=step, lr=float(schedule(step - 1)),
                             images_per_sec=window_images / max(now - window_start, 1e-9))
                    window_start, window_images = now, 0
                    summary["losses"][step] = m["loss"]
                    if ckpt_lib.is_primary():
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps({"step": step, **{k: v for k, v in m.items() if k != "step"}}) + "\n")
                    progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                stopping = stop_requested["flag"] or (
                    stop_after_steps is not None and step - start_step >= stop_after_steps)
                if step % config.checkpoint_every_steps == 0 or is_last or stopping:
                    save(step)
                if stopping:
                    _say(f"stopping at step {step} ({'SIGTERM' if stop_requested['flag'] else 'stop_after_steps'}); "
                         "checkpoint saved, run the same command to resume")
                    summary["stopped_early"] = True
                    break
                if config.eval_every_steps and step % config.eval_every_steps == 0 and not is_last:
                    nnx.update((model, optimizer), state)
                    _evaluate(config, workdir, model, step, clip_path)
    finally:
        progress.close()
        checkpointer.wait()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    summary["step"] = step
    if not summary.get("stopped_early"):
        nnx.update((model, optimizer), state)
        summary["eval"] = _evaluate(config, workdir, model, config.total_steps, clip_path)
    checkpointer.close()
    return summary


def _evaluate(config, workdir: Path, model, step: int, clip_path: Path) -> dict:
    if not config.eval.datasets:
        return {}
    from dcp_jax import evaluate
    return evaluate.evaluate_model(model, config, workdir=workdir, step=step, clip_path=clip_path)


def _progress(start: int, total: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=not ckpt_lib.is_primary())


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _define_flags() -> None:
    # Defined only when run as a program, so importing dcp_jax.train defines no global absl flags.
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Training config file (configs/*.py[:args]); default: the CPU demo.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, eval results.")
    flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    distributed.initialize()
    summary = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    if ckpt_lib.is_primary() and summary.get("eval"):
        print(json.dumps({name: round(r["mIoU"], 2) for name, r in summary["eval"].items()}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
