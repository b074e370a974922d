"""Workdir layout and Orbax checkpoints (model, optimizer and data-iterator state).

A workdir W holds:
  W/config.json               the run's config (earlier versions kept as config.<n>.json when it changes)
  W/train_classes.json        the training vocabulary (tag validation needs it to tell seen classes)
  W/checkpoints/<step>/       Orbax: model/, opt/, data/ (grain iterator), meta/
  W/metrics.jsonl             one JSON object per logged step
  W/eval/<dataset>.json       evaluation results
  W/tiny_clip/                the random CLIP written by tiny/demo configs (clip.checkpoint == "")

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save never leaves a half-written checkpoint that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
from absl import logging as absl_logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

# Replicated params: let one replica write each array whole. Orbax's default "replica-parallel" save
# slices every array across replicas with one compiled slice per shape (10 s of compiles for the
# tiny model on 4 CPU devices) to parallelise a device-to-host copy that is tiny next to a step.
_verbosity = absl_logging.get_verbosity()
absl_logging.set_verbosity(absl_logging.ERROR)  # registering an override logs a warning
try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
finally:
    absl_logging.set_verbosity(_verbosity)

CONFIG_NAME = "config.json"
TRAIN_CLASSES_NAME = "train_classes.json"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; never deleted or replaced automatically."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Write W/config.json; if a different config is already there, keep it as config.<n>.json."""
    path = Path(workdir) / CONFIG_NAME
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if path.exists():
        old = path.read_text()
        if old == text:
            return
        n = 1
        while (backup := path.with_name(f"config.{n}.json")).exists():
            n += 1
        os.replace(path, backup)
    _atomic_write_text(path, text)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a dcp_jax workdir (the trainer writes config.json "
            "there). Pass --config to give the config explicitly.")
    return ml_collections.ConfigDict(_lists_to_tuples(json.loads(path.read_text())))


def _lists_to_tuples(obj):
    # JSON turns the config's tuples into lists; ConfigDict field types must round-trip.
    if isinstance(obj, dict):
        return {k: _lists_to_tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj


def load_train_classes(workdir: str | os.PathLike) -> list[str] | None:
    """The training vocabulary the trainer saved in W (None if absent: tag validation is then skipped)."""
    path = Path(workdir) / TRAIN_CLASSES_NAME
    return json.loads(path.read_text()) if path.exists() else None


class Checkpointer:
    """Orbax CheckpointManager over W/checkpoints with the items model, opt, data and meta."""

    ITEMS = ("model", "opt", "data", "meta")

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer, data_iter,
             meta: dict) -> None:
        args = dict(model=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
                    opt=ocp.args.StandardSave(nnx.state(optimizer)),
                    meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_train(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer,
                      data_iter) -> dict:
        """Restore everything in place (onto the current shardings); returns the meta dict."""
        args = dict(model=ocp.args.StandardRestore(nnx.state(model, nnx.Param)),
                    opt=ocp.args.StandardRestore(nnx.state(optimizer)),
                    meta=ocp.args.JsonRestore())
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._restore(step, args)
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["opt"])
        return dict(restored["meta"])

    def restore_model(self, step: int, model: nnx.Module) -> dict:
        """Restore only the model parameters into `model` (evaluation, prediction, export)."""
        restored = self._restore(step, dict(model=ocp.args.StandardRestore(nnx.state(model, nnx.Param)),
                                            meta=ocp.args.JsonRestore()))
        nnx.update(model, restored["model"])
        return dict(restored["meta"])

    def _restore(self, step: int, args: dict):
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {self.all_steps() or 'none'}")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} exists but could not be restored "
                f"({type(e).__name__}: {str(e)[:500]}). It was left untouched. If it is damaged, "
                "move it out of the way to resume from an earlier step, or restore another step "
                "explicitly; if the config changed, the model no longer matches the checkpoint.") from e

    def close(self) -> None:
        self.manager.close()


def resolve_checkpoint(workdir: str | os.PathLike, checkpoint: str | int | None = None) -> tuple[Path, int]:
    """Turn `--checkpoint` (None = latest in W, a step number, or a step directory) into (dir, step)."""
    if checkpoint is not None and not str(checkpoint).isdigit():
        path = Path(checkpoint).absolute()
        if not path.is_dir() or not path.name.isdigit():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a step number or a step "
                                    "directory such as W/checkpoints/5000")
        return path.parent, int(path.name)
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found: no checkpoints in workdir {workdir}. "
                                "Train first (python -m dcp_jax.train) or pass --checkpoint.")
    steps = Checkpointer(directory, read_only=True).all_steps()
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint; train first or pass --checkpoint.")
    step = max(steps) if checkpoint is None else int(checkpoint)
    if step not in steps:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such step in {directory}; available: {steps}")
    return directory, step


def is_primary() -> bool:
    return jax.process_index() == 0
