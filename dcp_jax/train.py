"""Train DCP-CLIP: python -m dcp_jax.train --config configs/X.py[:ARGS] --workdir W [--config.KEY=VALUE ...]

Without --config it runs the built-in CPU demo (configs/demo.py). The run resumes from W's latest
checkpoint (model, optimizer and data-iterator state); otherwise the CLIP weights come from
`clip.checkpoint`. The batch is split over every device of every host on a ("data", "fsdp") mesh;
`mesh.fsdp` > 1 also shards parameters and optimizer state (FSDP). `eval_every_steps` evaluates
`eval.during_training`; at the end the full `eval.datasets` table is evaluated. SIGTERM (a
preemption notice) to any one process stops every process after the same step with one checkpoint;
the same command resumes, on the same or another number of hosts. A second trainer on the same W
is refused. `--profile DIR` writes a jax.profiler trace of `--profile-steps` steps (from this invocation's
third on, after compilation and a warm-up step) for TensorBoard's profile plugin and Perfetto.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import cli, distributed, files, measure, runtime
from dcp_jax import config as config_lib
from dcp_jax import loss as loss_lib
from dcp_jax import optim
from dcp_jax import rules as rules_lib
from dcp_jax import text as text_lib
from dcp_jax.data import datasets as datasets_lib
from dcp_jax.data import pipeline
from dcp_jax.models import build, dcp
from dcp_jax.models import clip as clip_lib


class NonFiniteLossError(ValueError):
    """Training diverged (a non-finite loss, gradient norm or parameter): a one-line error, like bad input."""


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------

def clip_checkpoint_path(config, workdir: Path, *, create: bool) -> Path:
    """The CLIP weights (and tokenizer) a run starts from: clip.checkpoint; "toy:" = the toy CLIP pre-trained
    here (dcp_jax.toy_clip, cached under $DCP_JAX_CACHE, or in W/toy_clip when that cache is read-only); "" writes a random tiny CLIP into W."""
    if config.clip.checkpoint == "toy:":
        from dcp_jax import toy_clip
        root = toy_clip.root_for(workdir / ckpt_lib.TOY_CLIP_DIR)  # the cache, or W when the cache is read-only
        if distributed.is_primary():
            toy_clip.ensure_toy_clip(root=root)
        distributed.sync("toy_clip")
        return toy_clip.ensure_toy_clip(root=root)  # there by now
    if config.clip.checkpoint:
        path = Path(config.clip.checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"clip.checkpoint={config.clip.checkpoint!r} does not exist. Point it at "
                                    "an HF CLIP directory or an OpenAI .pt file on local disk.")
        return path
    path = workdir / ckpt_lib.TINY_CLIP_DIR
    if not (path / "config.json").exists():
        if not create:
            raise FileNotFoundError(f"{path} missing: the workdir's random tiny CLIP is gone; "
                                    "it is written by the trainer when clip.checkpoint is empty.")
        if distributed.is_primary():
            from dcp_jax.models.build import write_tiny_clip
            with files.atomic_directory(path, overwrite=True) as tmp:
                write_tiny_clip(tmp, config.clip.tiny.to_dict(), seed=config.seed)
        distributed.sync("tiny_clip")
    return path


def maybe_write_synthetic(config, workdir: Path) -> None:
    """train.synthetic_images > 0: write the toy world's seen/unseen benchmark at train.dataset if missing."""
    n = config.train.get("synthetic_images", 0)
    spec = config.train.dataset
    if not n or not spec.startswith("folder:"):
        return
    out = Path(spec[len("folder:"):])
    val = config.train.get("synthetic_val_images", n // 4)
    if not 0 < val < n:
        raise ValueError(f"config.train.synthetic_val_images={val} must be between 1 and train.synthetic_images - 1 "
                         f"= {n - 1}")
    if not (out / "meta.json").exists():
        if distributed.is_primary():
            from dcp_jax.data import toy_world
            _say(f"writing {n} toy-world images to {out}")
            with files.atomic_directory(out, overwrite=True) as tmp:
                toy_world.write_benchmark(tmp, num_images=n, seed=config.seed,
                                          size=config.train.get("synthetic_size", 96),
                                          val_fraction=val / n)
        distributed.sync("synthetic")


def _say(message: str) -> None:
    if distributed.is_primary():
        print(f"[dcp_jax.train] {message}", file=sys.stderr, flush=True)


class MetricWriter:
    """W/metrics.jsonl (one JSON line per logged step) and TensorBoard event files in W/tensorboard.

    TensorBoard through tensorboardX: a small, maintained writer of the event format that needs no
    TensorFlow (clu's writers need TensorFlow for TensorBoard). Primary process only.
    """

    def __init__(self, workdir: Path):
        self.enabled = distributed.is_primary()
        self.path = workdir / ckpt_lib.METRICS_NAME
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / ckpt_lib.TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        if prefix == "train":
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """SIGTERM (how Slurm, Kubernetes and TPU maintenance announce a preemption) -> stop after a step.

    One process: a Python handler sets a flag. Several processes: the flag must be the same on every
    host at the same step, or one host enters the collective checkpoint save while another starts the
    next step's collectives and both hang. jax.distributed's preemption sync manager does that: the
    SIGTERM reaching any one process is shared through the coordination service, and
    `reached_preemption_sync_point(step)` answers True on every process at the same step (a local
    check each step; the hosts agree only once a notice exists). `check(step)` must therefore be
    called by every process at every step.
    """

    def __init__(self):
        # jax's sync manager exists unless jax_enable_preemption_service was switched off; then the
        # hosts all-gather their own flags every step instead (a small collective that waits for the step).
        self.use_jax_sync = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        self._flag = False
        self.reason = "SIGTERM"
        self._previous = {}
        if os.name != "posix" or threading.current_thread() is not threading.main_thread():
            return
        # jax's sync manager listens with its own (C++) SIGTERM handler: no Python handler over it.
        if not self.use_jax_sync:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        # Ctrl-C stops the same way (a checkpoint, then the same command resumes); a second Ctrl-C aborts.
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, *_) -> None:
        self._flag = True

    def _on_sigint(self, *_) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag, self.reason = True, "Ctrl-C"
        print("\n[dcp_jax.train] Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort "
              "without one)", file=sys.stderr, flush=True)
        if self.use_jax_sync:  # through jax's handler, so that every process stops after the same step
            os.kill(os.getpid(), signal.SIGTERM)

    def check(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        if self.use_jax_sync:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return bool(np.any(multihost_utils.process_allgather(np.int32(self._flag))))

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------

def make_train_step(config, graphdef, state_shardings, num_classes: int) -> "TrainStep":
    """(state_leaves, batch, text_embeds, guidance_tokens[, cost_tokens]) -> (state_leaves, metrics), jitted.

    The state (model and optimizer, `nnx.split`) travels as the flat list of its arrays, `jax.tree.leaves(state)`,
    each kept in its sharding; `jax.tree.unflatten(jax.tree.structure(state), leaves)` gives the state back. jit
    flattens and rebuilds a state of nnx Variables in Python at every call (13.9 ms for the B/16 recipe's state,
    longer than a whole B/16 step at the accelerator target), a list of arrays in C++ (0.06 ms). cost_tokens: the
    vocabulary's template prompts (clip.text_finetune = "cost").

    With bfloat16 compute the weights that the model reads cast (compute_copy_indices) enter the step as bfloat16
    copies, and the parameters stay float32 (the masters that the optimizer updates and checkpoints hold): the
    step returns the trained weights' next copies, cast where the optimizer writes them, and the frozen ones are
    cast once. Converting each weight where it is used took a GPU kernel per weight and step (about 200 of the
    B/16 recipe's step); the arithmetic is the same, bit for bit (tests/test_compute.py)."""
    num_slots = int(config.model.dcs.num_slots)
    trainable = optim.trainable(config)
    rows = int(config.text.finetune_rows)
    state_def = jax.tree.structure(state_shardings)
    frozen, trained = compute_copy_indices(config, graphdef, state_shardings)
    cast, dtype = frozen + trained, dcp.compute_dtype(config)

    @functools.partial(jax.jit, donate_argnums=(0,),
                       out_shardings=(jax.tree.leaves(state_shardings), None, None))
    def train_step(state_leaves, copies, batch, text_embeds, guidance_tokens, cost_tokens=None):
        model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))
        compute_leaves = list(state_leaves)
        for i, copy in zip(cast, copies):
            compute_leaves[i] = copy
        compute_model, _ = nnx.merge(graphdef, jax.tree.unflatten(state_def, compute_leaves))

        def loss_fn(model):
            gt = loss_lib.gt_presence(batch["label"], num_classes) if config.model.dcs.include_gt else None
            out = model(batch["image"], text_embeds, num_slots=num_slots, gt_present=gt, train=True,
                        guidance_tokens=guidance_tokens, guidance_rows=rows, cost_tokens=cost_tokens)
            loss, metrics = loss_lib.dcp_loss(out, batch["label"], ignore_as_negative=config.train.ignore_as_negative)
            metrics = dict(metrics)
            for key in ("dcs_selected", "dcs_dropped", "guidance_dropped"):
                metrics[key] = jnp.mean(out[key].astype(jnp.float32))
            return loss, metrics

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (loss, metrics), grads = grad_fn(compute_model)
        # a copy's gradient, in the masters' dtype: what the cast's own backward pass gave before
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, nnx.state(model, trainable))
        optimizer.update(model, grads)
        grad_norm = optim.global_norm(grads)
        # Whether this step's loss, gradients and updated parameters are all finite: what the loop checks before
        # it logs or saves, so that a diverged state is never written over a good checkpoint (one reduction).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & optim.all_finite(nnx.state(model, trainable))
        metrics.update(loss=loss, grad_norm=grad_norm, finite=finite,
                       bad_samples=jnp.sum(batch["bad"]) if "bad" in batch else jnp.zeros((), jnp.int32))
        out = jax.tree.leaves(nnx.state((model, optimizer)))
        for i in frozen:
            out[i] = state_leaves[i]  # unchanged
        return out, tuple(out[i].astype(dtype) for i in trained), metrics

    return TrainStep(train_step, frozen, trained, dtype)


# Modules that read each of their parameters through promote_dtype(..., dtype=self.dtype): cast beforehand, the
# same values reach the same arithmetic (CLIP's logit scale and class embedding are read otherwise: not cast).
CAST_MODULES = (nnx.Linear, nnx.Conv, nnx.Embed, nnx.LayerNorm, nnx.GroupNorm)
TEXT_TOWER = re.compile(r"^(clip/text_model/|clip/text_projection/|frozen_text_qv/)")


def compute_copy_indices(config, graphdef, state_shardings) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(frozen, trained): positions in the flat train state of the parameters that the model only ever reads cast
    to its compute dtype (the parameters of CAST_MODULES), which the train step takes as copies in that dtype;
    none in float32. The text tower is left out where the step never runs it (its copies would only take
    memory)."""
    if jnp.dtype(dcp.compute_dtype(config)) == jnp.float32:
        return (), ()
    rules = optim.parameter_rules(config)
    model = nnx.merge(graphdef, state_shardings)[0]  # the modules' types and dtypes; values are shardings
    castable = {rules_lib.path_str(path) + "/" + name
                for path, node in nnx.iter_graph(model)
                if isinstance(node, CAST_MODULES) and jnp.dtype(node.dtype or jnp.float32).itemsize < 4
                for name in ("kernel", "bias", "embedding", "scale") if isinstance(getattr(node, name, None), nnx.Param)}
    text_used = dcp.reencodes_text(config)
    flat, _ = jax.tree_util.tree_flatten_with_path(state_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    frozen, trained = [], []
    for i, (path, _) in enumerate(flat):
        name = rules_lib.path_str(path[1:])
        if rules_lib.path_str(path[:1]) == "0" and name in castable and (text_used or not TEXT_TOWER.match(name)):
            (frozen if optim.group_of(rules, name) is None else trained).append(i)
    return tuple(frozen), tuple(trained)


class TrainStep:
    """The jitted train step with its compute-dtype weight copies kept between calls: calls take and return the
    state's flat leaves as make_train_step says. All copies are made afresh on the first call and whenever the
    arrays passed are not the ones the previous call returned (a restored or another state)."""

    def __init__(self, jitted, frozen: tuple[int, ...], trained: tuple[int, ...], dtype):
        self.jitted, self.frozen, self.trained, self.dtype = jitted, frozen, trained, dtype
        self.cast = frozen + trained
        self._copies, self._returned, self._compiled = (), None, None
        self._cast_fn = jax.jit(lambda leaves: tuple(a.astype(dtype) for a in leaves))

    def _current_copies(self, state_leaves) -> tuple:
        arrays = [state_leaves[i] for i in self.cast]
        if self._returned is None or any(a is not b for a, b in zip(arrays, self._returned)):
            self._copies = self._cast_fn(tuple(arrays)) if arrays else ()
        return self._copies

    def lower(self, state_leaves, *args):
        """jax's Lowered step for these (concrete or abstract) leaves and arguments."""
        copies = tuple(jax.ShapeDtypeStruct(state_leaves[i].shape, self.dtype, sharding=state_leaves[i].sharding)
                       for i in self.cast)
        return self.jitted.lower(state_leaves, copies, *args)

    def compile(self, state_leaves, *args):
        """Compile ahead of time (later calls run this executable): the compiled step, for its analyses."""
        self._compiled = self.lower(state_leaves, *args).compile()
        return self._compiled

    def __call__(self, state_leaves, *args):
        copies = self._current_copies(state_leaves)
        state_leaves, trained_copies, metrics = (self._compiled or self.jitted)(state_leaves, copies, *args)
        self._copies = copies[:len(self.frozen)] + tuple(trained_copies)
        self._returned = [state_leaves[i] for i in self.cast]
        return state_leaves, metrics


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       devices=None, stop_after_steps: int | None = None, profile: str | os.PathLike | None = None,
                       profile_steps: int = measure.PROFILE_STEPS) -> dict:
    """Train until config.total_steps (resuming from W), evaluate, return a summary dict.

    `devices`: restrict the mesh (tests compare 1 and 4 devices); `stop_after_steps`: save and stop
    after this many steps of this invocation, as if preempted (tests of resume). `profile`: a folder for a
    jax.profiler trace of `profile_steps` steps (`profile_window`), summary["profile"] saying which.
    """
    workdir = Path(workdir).absolute()
    files.check_writable_dir(workdir, "--workdir")
    check_profile(profile, profile_steps, config)
    config_lib.check_finetune_rows(config)  # too few re-encoded text rows for a batch's slots: before any work
    workdir.mkdir(parents=True, exist_ok=True)
    config = config_lib.resolve_workdir(config, workdir)
    optim.parameter_rules(config)  # a bad rule fails before any work
    with ckpt_lib.train_lock(workdir):
        return _train(config, workdir, devices, stop_after_steps, profile, profile_steps)


def check_profile(profile: str | os.PathLike | None, steps: int, config) -> None:
    """A --profile folder that cannot be written, or no step to trace: an error before any work. (A resumed
    run with too few steps left is found once its checkpoint is read.)"""
    if profile:
        files.check_writable_dir(profile, "--profile")
        if steps < 1:
            raise ValueError(f"--profile-steps {steps}: trace at least 1 step")
        profile_window(0, config.total_steps, steps)


PROFILE_SKIP = 2  # steps of an invocation before --profile traces: the first compiles, the second still pays
# one-time costs (jit's first call through its fast path, the data workers' start-up)


def profile_window(start_step: int, total_steps: int, steps: int) -> range:
    """The steps --profile traces in a run from start_step to total_steps: `steps` of them, after PROFILE_SKIP,
    or as many as remain. A run with no step past the skipped ones is an error, before training."""
    first = start_step + 1 + PROFILE_SKIP
    if first > total_steps:
        raise ValueError(f"--profile: this run trains {total_steps - start_step} step(s) (steps {start_step + 1} to "
                         f"total_steps={total_steps}); it traces steps after the first {PROFILE_SKIP} (compilation "
                         f"and a warm-up), so it needs at least {PROFILE_SKIP + 1}")
    return range(first, min(first + steps, total_steps + 1))


def profile_directory(profile: str | os.PathLike) -> Path:
    """Where this process writes its trace: DIR with one process; DIR/process_K with several, since jax names
    a trace's files by host and its folder by the second, so that processes sharing a file system (or a
    host) would write over each other's."""
    directory = Path(profile).expanduser().absolute()
    return directory if jax.process_count() == 1 else directory / f"process_{jax.process_index()}"


def _train(config, workdir: Path, devices, stop_after_steps, profile=None,
           profile_steps=measure.PROFILE_STEPS) -> dict:
    mesh = distributed.make_mesh(config.mesh.fsdp, devices)
    if config.train.batch_size % mesh.devices.size:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                         f"{mesh.devices.size} devices; use a multiple of {mesh.devices.size}.")

    # --- Data ---
    maybe_write_synthetic(config, workdir)
    train_ds = datasets_lib.open_dataset(config.train.dataset, "train", config.train.data_root or None)
    class_names = list(train_ds.class_names)
    config_lib.check_finetune_rows(config, len(class_names))  # num_slots 0: every class is a slot

    # --- CLIP, text embeddings, model, optimizer ---
    clip_path = clip_checkpoint_path(config, workdir, create=True)
    model, clip_config, clip_params = build.model_from_clip_checkpoint(config, clip_path, mesh=mesh)
    tokenizer = text_lib.load_tokenizer(clip_path)
    # The (frozen) template embeddings, once, in float32, from a copy of the pretrained CLIP on this host
    # (whatever the model's sharding across hosts and compute dtype).
    text_model = clip_lib.model_from_params(clip_config, clip_params, jnp.float32)
    text_embeds = text_lib.embed_vocabulary(text_model, tokenizer, class_names, config.text.templates,
                                            batch_size=config.text.batch_size)
    del text_model, clip_params
    optimizer = optim.make_optimizer(config, model)

    # --- Resume ---
    checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINTS_DIR, keep=config.keep_checkpoints)
    start_step, data_position = 0, 0
    latest = checkpointer.latest_step()
    if latest is not None:
        meta = checkpointer.restore_train(latest, model=model, optimizer=optimizer, mesh=mesh,
                                          mesh_config=config.mesh)
        start_step = int(meta["step"])
        # Samples trained on so far, one number for all hosts (older checkpoints: step x batch, which
        # is what their fixed batch size made it).
        data_position = int(meta.get("data_position", start_step * config.train.batch_size))
        _say(f"resumed from {checkpointer.directory / str(latest)} at step {start_step} "
             f"(data position {data_position}, {jax.process_count()} process(es))")
    traced = profile_window(start_step, config.total_steps, profile_steps) if profile else range(0)
    last_traced = traced[-1] if traced else None
    # Only now, with the checkpoint (if any) restored into this config's model, are the workdir's config,
    # vocabulary and inference assets written: a config that does not fit a trained workdir fails above
    # and leaves every file of it as it was.
    if distributed.is_primary():
        ckpt_lib.save_config(workdir, config)
        ckpt_lib.save_train_classes(workdir, class_names)
        ckpt_lib.save_inference_assets(workdir, clip_path, clip_config)
    train_iter = iter(pipeline.train_dataset(
        train_ds, crop_size=config.train.crop_size, global_batch_size=config.train.batch_size,
        seed=config.seed, num_workers=config.train.num_workers, skip_bad_samples=config.train.skip_bad_samples,
        start_position=data_position))

    # --- Everything in its sharding ---
    param_bytes = distributed.bytes_per_device(nnx.state(model, nnx.Param))
    _say(f"parameters: {param_bytes / 2**20:.1f} MiB per device on a mesh of data={mesh.shape['data']} x "
         f"fsdp={mesh.shape['fsdp']} devices")
    graphdef, state = nnx.split((model, optimizer))
    state_shardings = distributed.tree_shardings(state, mesh, config.mesh)
    state = jax.device_put(state, state_shardings)
    state_def, state = jax.tree.structure(state), jax.tree.leaves(state)  # the train step's flat state
    replicated = distributed.replicated(mesh)
    text_embeds = distributed.put(text_embeds, replicated)
    guidance_tokens = None
    if dcp.reencodes_text(config):
        context = config.model.guidance.prompt_tokens if config.model.guidance.prompt == "context" else 0
        tokens = text_lib.guidance_tokens(tokenizer, class_names, num_context=context,
                                          context_length=clip_config.text.max_position_embeddings)
        guidance_tokens = tuple(distributed.put(a, replicated) for a in tokens)
    cost_tokens = None
    if config_lib.text_finetune(config) == "cost":
        tokens = text_lib.template_tokens(tokenizer, class_names, config.text.templates,
                                          context_length=clip_config.text.max_position_embeddings)
        cost_tokens = tuple(distributed.put(a, replicated) for a in tokens)
    train_step = make_train_step(config, graphdef, state_shardings, len(class_names))
    schedule = optim.learning_rate_schedule(config)
    data_sharding = distributed.batch_sharding(mesh)

    def save(step: int) -> None:
        nnx.update((model, optimizer), jax.tree.unflatten(state_def, state))
        position = data_position + (step - start_step) * config.train.batch_size
        checkpointer.save(step, model=model, optimizer=optimizer,
                          meta={"step": step, "data_position": position, "time": time.time(),
                                "processes": jax.process_count()})

    def evaluate(step: int, *, final: bool) -> dict:
        nnx.update((model, optimizer), jax.tree.unflatten(state_def, state))
        return _evaluate(config, workdir, model, step, tokenizer, writer, final=final, clip_path=clip_path)

    stop_signal = StopSignal()  # SIGTERM: every process saves after the same step and exits
    # --- Train loop ---
    writer = MetricWriter(workdir)
    progress = _progress(start_step, config.total_steps)
    summary = {"start_step": start_step, "losses": {}, "param_bytes_per_device": param_bytes}
    window_start, window_images = time.time(), 0
    step = start_step
    tracing = contextlib.ExitStack()  # the --profile trace: open from the first traced step through the last
    trace, traced_steps = None, []
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step + 1, config.total_steps + 1):
                if step in traced:
                    if trace is None:
                        trace = tracing.enter_context(measure.profile_trace(profile_directory(profile)))
                    annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
                    traced_steps.append(step)
                else:
                    annotation = contextlib.nullcontext()
                with annotation:
                    batch = pipeline.make_global_batch(next(train_iter), data_sharding)
                    state, metrics = train_step(state, batch, text_embeds, guidance_tokens, cost_tokens)
                    if step == last_traced:  # its device work inside the trace, which then stops
                        jax.block_until_ready((state, metrics))
                if step == last_traced:
                    writing = time.time()
                    tracing.close()
                    window_start += time.time() - writing  # images/s leaves out writing the trace
                    _profile_done(profile, trace, traced_steps, summary)
                window_images += config.train.batch_size
                progress.update(1)
                is_last = step == config.total_steps
                signalled = stop_signal.check(step)
                stopping = signalled or (stop_after_steps is not None and step - start_step >= stop_after_steps)
                saving = step % config.checkpoint_every_steps == 0 or is_last or stopping
                if saving or step % config.log_every_steps == 0 or is_last:
                    check_finite(step, jax.device_get(metrics), checkpointer.latest_step())
                if step % config.log_every_steps == 0 or is_last:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                    now = time.time()
                    m.update(lr=float(schedule(step - 1)), images_per_sec=window_images / max(now - window_start, 1e-9))
                    window_start, window_images = now, 0
                    summary["losses"][step] = m["loss"]
                    writer.write(step, m)
                    progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                if saving:
                    save(step)
                if stopping:
                    _say(f"stopping at step {step} ({stop_signal.reason if signalled else 'stop_after_steps'}); "
                         "checkpoint saved, run the same command to resume")
                    summary["stopped_early"] = True
                    break
                if config.eval_every_steps and step % config.eval_every_steps == 0 and not is_last:
                    evaluate(step, final=False)
        summary["step"] = step
        if not summary.get("stopped_early"):
            summary["eval"] = evaluate(config.total_steps, final=True)
        # What this process compiled: a restarted run reads its train step from the persistent cache.
        summary["compile"] = runtime.compile_stats()
        _say(f"compiled: {runtime.format_compile_stats(summary['compile'])}")
    finally:
        if trace is not None and trace.folder is None:  # stopped inside the traced steps: what was traced
            try:
                tracing.close()
                if trace.folder is not None:
                    _profile_done(profile, trace, traced_steps, summary)
            except Exception as e:  # the error that stopped the run is the one to see
                _say(f"profile: the trace of steps {traced_steps} could not be written ({type(e).__name__}: {e})")
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        stop_signal.close()
    return summary


def check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
    """NonFiniteLossError, naming what diverged, where a step's metrics (the train step's `finite`) say its loss,
    gradient norm or updated parameters are not all finite: the run stops before it logs or saves the step."""
    if bool(metrics["finite"]):
        return
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    what = [name for name, v in (("the loss", loss), ("the gradient norm", grad_norm)) if not np.isfinite(v)]
    intact = (f"the last checkpoint (step {last_saved}) is intact, and the same command resumes from it"
              if last_saved is not None else "no checkpoint was saved")
    raise NonFiniteLossError(
        f"training diverged at step {step}: {' and '.join(what) or 'the updated parameters'} not finite "
        f"(loss={loss}, gradient norm={grad_norm}). Stopped without logging or saving this step; {intact}. "
        "Lower optim.lr or check the data.")


def _evaluate(config, workdir: Path, model, step: int, tokenizer, writer: MetricWriter, *, final: bool,
              clip_path: Path) -> dict:
    """The periodic evaluation (eval.during_training) or the final table (eval.datasets), then with
    eval.zero_shot_baseline the zero-shot CLIP the run started from, on the same images, beside it."""
    specs = config.eval.datasets if final else config.eval.during_training
    if not specs:
        return {}
    from dcp_jax import evaluate
    from dcp_jax.segmenter import Segmenter
    segmenter = Segmenter(model, config, tokenizer, train_classes=ckpt_lib.load_train_classes(workdir), step=step)
    common = dict(workdir=workdir, step=step, data_root=config.eval.data_root or None,
                  max_images=config.eval.max_images if final else config.eval.during_training_images)
    baseline = final and config.eval.get("zero_shot_baseline", False)
    results = evaluate.evaluate_datasets(
        segmenter, evaluate.parse_specs(specs), **common, print_table=not baseline,
        command=f"dcp_jax.train ({'final' if final else 'periodic'} evaluation, step {step})",
        out_dir=None if final else workdir / ckpt_lib.EVAL_DIR / "during_training")
    for name, result in results.items():
        writer.write(step, {f"{name}/mIoU": result["mIoU"]}, prefix="eval")
    if baseline:
        zero_shot = evaluate.evaluate_datasets(Segmenter.from_clip(clip_path, config), evaluate.parse_specs(specs),
                                               **common, print_table=False, command="dcp_jax.train (zero-shot baseline)")
        if distributed.is_primary():
            print(evaluate.format_table({f"DCP-CLIP, step {step}": results, "zero-shot CLIP": zero_shot},
                                        label="model"))
    return results


def _profile_done(profile, trace: measure.Trace, steps: list[int], summary: dict) -> None:
    """Record (summary["profile"]) and print where the --profile trace went."""
    summary["profile"] = {"directory": str(trace.directory), "perfetto": str(trace.perfetto), "steps": steps}
    what = f"training step(s) {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"training step {steps[0]}"
    if jax.process_count() > 1:
        what += ", one folder per process"
    _say(measure.profile_note(profile, [trace.perfetto], what))


def _progress(start: int, total: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=not distributed.is_primary())


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    cmd = cli.Command("python -m dcp_jax.train", __doc__, argv, config=config_lib.config_file("demo"),
                      config_help="training config file (configs/X.py[:ARGS]); default: the CPU demo")
    from absl import flags
    flags.DEFINE_string("workdir", None, "run directory: config, checkpoints, metrics, evaluation results",
                        flag_values=cmd.flags)
    flags.DEFINE_string("profile", None, "write a jax.profiler trace of --profile-steps training steps to this "
                        "folder (TensorBoard's profile plugin, Perfetto); DIR/process_K with several processes",
                        flag_values=cmd.flags)
    flags.DEFINE_integer("profile-steps", measure.PROFILE_STEPS, "--profile: steps traced, from this invocation's "
                         f"step {PROFILE_SKIP + 1} on (the first compiles, the second warms up)", flag_values=cmd.flags)
    cmd.required("workdir")
    args = cmd.parse()

    def body():
        check_profile(args.profile, args["profile-steps"].value, args.config)  # before the backend starts
        runtime.start(args.config)
        summary = train_and_evaluate(args.config, args.workdir, profile=args.profile,
                                     profile_steps=args["profile-steps"].value)
        if distributed.is_primary() and summary.get("eval"):
            print(json.dumps({name: round(r["mIoU"], 2) for name, r in summary["eval"].items()}))

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
