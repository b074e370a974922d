"""The workdir: everything a training run writes, and how to read a trained model back.

A workdir W holds:
  W/config.json               the run's config (earlier versions kept as config.<n>.json when it changes)
  W/train_classes.json        the training vocabulary (tag validation tells seen classes with it)
  W/tokenizer/, W/clip_config.json   the CLIP tokenizer and architecture: W alone suffices for inference
  W/checkpoints/<step>/       Orbax: model/, opt/, meta/ (step, global data position)
  W/metrics.jsonl             one JSON object per logged step
  W/tensorboard/              the same metrics (and evaluation mIoU) as TensorBoard event files
  W/eval/<dataset>.json       evaluation results (W/eval/zero_shot/ for the zero-shot baseline)
  W/tiny_clip/                the random CLIP a config with clip.checkpoint == "" starts from
  W/.train.lock               held by the running trainer, so a second one is refused

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save never leaves a half-written checkpoint that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from dcp_jax import distributed, files

CONFIG_NAME = "config.json"
TRAIN_CLASSES_NAME = "train_classes.json"
TOKENIZER_DIR = "tokenizer"
CLIP_CONFIG_NAME = "clip_config.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
TINY_CLIP_DIR = "tiny_clip"
TOY_CLIP_DIR = "toy_clip"  # the toy CLIP, when the cache cannot hold it (a read-only $DCP_JAX_CACHE)
LOCK_NAME = ".train.lock"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "bpe_simple_vocab_16e6.txt.gz")


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; never deleted or replaced automatically."""


class WorkdirLockedError(RuntimeError):
    """Another trainer is running on the same workdir."""


# ---------------------------------------------------------------------------------------------
# Config, vocabulary, inference assets
# ---------------------------------------------------------------------------------------------

def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Write W/config.json; if a different config is already there, keep it as config.<n>.json."""
    path = Path(workdir) / CONFIG_NAME
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if path.exists():
        if path.read_text() == text:
            return
        n = 1
        while (backup := path.with_name(f"config.{n}.json")).exists():
            n += 1
        os.replace(path, backup)
    files.write_text(path, text)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a dcp_jax workdir (the trainer writes config.json "
            "there). Pass --config to give the config explicitly.")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from a backup, or pass --config") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a config; restore it, or pass --config")
    check_saved_types(saved, path)
    return ml_collections.ConfigDict(_lists_to_tuples(saved))


# Keys whose type changed, and the type configs saved before still hold (their readers take both).
LEGACY_TYPES = {"clip.scan_layers": (bool,), "clip.text_finetune": (bool,), "model.remat": (bool,)}


def check_saved_types(saved: dict, path: Path) -> None:
    """A ValueError naming the first key of a saved config whose value has another type than the recipe's
    (configs/dcp_vitb16_coco_stuff.py, which every config extends): a hand-edited "total_steps": "10" would
    otherwise fail deep inside a command. Integers pass for floats; keys the recipe lacks are not checked."""
    from dcp_jax.configs import dcp_vitb16_coco_stuff

    def walk(value, reference, key):
        if isinstance(reference, ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {key} is {value!r}, expected a group of keys; restore it, or pass --config")
            for name, ref in reference.items():
                if name in value:
                    walk(value[name], ref, f"{key}.{name}" if key else name)
            return
        if reference is None or value is None:
            return
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (list, tuple),
                 list: (list, tuple)}.get(type(reference), (object,)) + LEGACY_TYPES.get(key, ())
        if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(reference, bool)):
            raise ValueError(f"{path}: {key} is {value!r} ({type(value).__name__}), expected type "
                             f"{type(reference).__name__} as in the recipe; fix it, or pass --config")

    walk(saved, dcp_vitb16_coco_stuff.get_config(), "")


def _lists_to_tuples(obj):
    # JSON turns the config's tuples into lists; ConfigDict field types must round-trip.
    if isinstance(obj, dict):
        return {k: _lists_to_tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj


def save_train_classes(workdir: str | os.PathLike, class_names) -> None:
    files.write_json(Path(workdir) / TRAIN_CLASSES_NAME, list(class_names))


def load_train_classes(workdir: str | os.PathLike) -> list[str] | None:
    """The training vocabulary the trainer saved in W (None if absent: tag validation is then skipped)."""
    path = Path(workdir) / TRAIN_CLASSES_NAME
    return json.loads(path.read_text()) if path.exists() else None


def save_inference_assets(workdir: str | os.PathLike, clip_path: Path, clip_config) -> None:
    """Copy the tokenizer files and the CLIP architecture into W, so W alone suffices for inference."""
    workdir = Path(workdir)
    files.write_json(workdir / CLIP_CONFIG_NAME, clip_config.to_hf())
    source = clip_path if clip_path.is_dir() else clip_path.parent
    for name in _TOKENIZER_FILES:
        if (source / name).exists() and not (workdir / TOKENIZER_DIR / name).exists():
            files.atomic_write(workdir / TOKENIZER_DIR / name, lambda tmp: shutil.copyfile(source / name, tmp))


def load_clip_config(workdir: str | os.PathLike):
    from dcp_jax.models.clip import CLIPConfig

    path = Path(workdir) / CLIP_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {workdir} was not written by dcp_jax.train (it saves the "
                                "CLIP architecture there at start).")
    return CLIPConfig.from_hf(json.loads(path.read_text()))


def tokenizer_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / TOKENIZER_DIR


@contextlib.contextmanager
def train_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Hold W/.train.lock while training (primary process only). The lock is the kernel's (flock), so a
    run that crashed or was killed never leaves it held."""
    if not distributed.is_primary():
        yield
        return
    path = Path(workdir) / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            owner = f.read().strip() or "unknown"
            raise WorkdirLockedError(f"another trainer (pid {owner}) is running on {workdir}; wait for it to finish "
                                     "or stop it, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints
# ---------------------------------------------------------------------------------------------

class Checkpointer:
    """Orbax CheckpointManager over W/checkpoints with the items model, opt and meta.

    The data stream's position is a number in meta (samples trained on, the same on every host),
    not a per-host iterator state: a checkpoint resumes on any number of hosts. Checkpoints of
    earlier versions also hold a "data" item (grain iterator states); it is ignored.
    """

    ITEMS = ("model", "opt", "data", "meta")  # "data": read-compatibility with older checkpoints

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet (orbax saves async)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict) -> None:
        args = dict(model=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
                    opt=ocp.args.StandardSave(nnx.state(optimizer)),
                    meta=ocp.args.JsonSave(meta))
        self.wait()  # the previous save finished and sealed: orbax waits for it before starting this one anyway
        self._unsealed.append(step)
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types
            self._save_failed(e)

    def wait(self) -> None:
        """Wait for the saves in flight, then write their checksums (`seal`)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an asynchronous write failed
            self._save_failed(e)
        for step in self._unsealed:
            if distributed.is_primary() and (self.directory / str(step)).is_dir():  # not removed by keep
                seal(self.directory / str(step))
        self._unsealed.clear()

    def _save_failed(self, error: Exception) -> None:
        """A CheckpointError for a failed save: which step, why in one line, and which checkpoint is intact (an
        unfinished save stays in a temporary folder that orbax never reads as a checkpoint)."""
        steps, self._unsealed = self._unsealed, []
        done = [s for s in self.all_steps() if s not in steps]
        intact = f"the checkpoint of step {done[-1]} is intact" if done else "no earlier checkpoint exists"
        if files.disk_full(error):
            why = "the disk is full, or a file-size limit was reached: free space or raise the limit, then"
        else:
            detail = " ".join(str(error).split())
            why = f"{type(error).__name__}: {detail if len(detail) <= 240 else detail[:240] + ' ...'};"
        raise CheckpointError(f"saving the checkpoint of step {steps[-1] if steps else '?'} into {self.directory} "
                              f"failed ({why} run the same command to resume); {intact}") from error

    def restore_train(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer, mesh,
                      mesh_config) -> dict:
        """Restore model and optimizer in place, each array read straight into its sharding on `mesh`
        (distributed.tree_shardings): every process builds only its own shards, so a checkpoint restores
        onto any number of processes and devices, whatever topology saved it. (Restored onto the arrays'
        current placement instead, a process's optimizer moments land on its own first device, which no
        later step can move onto a mesh that spans processes.) Returns the meta dict."""
        def target(state):
            shardings = distributed.tree_shardings(state, mesh, mesh_config)
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)

        args = dict(model=ocp.args.StandardRestore(target(nnx.state(model, nnx.Param))),
                    opt=ocp.args.StandardRestore(target(nnx.state(optimizer))),
                    meta=ocp.args.JsonRestore())
        restored = self._restore(step, args)
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["opt"])
        return dict(restored["meta"])

    def restore_params(self, step: int, target) -> tuple:
        """Restore the model parameters into `target` (a Param state of ShapeDtypeStructs that carry
        their shardings: Orbax reads each array straight into it, whatever topology saved it)."""
        restored = self._restore(step, dict(model=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["model"], dict(restored["meta"])

    def _restore(self, step: int, args: dict):
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps or 'none'}")
        damage = check_seal(self.directory / str(step))
        if damage:
            earlier = [s for s in steps if s < step]
            advice = (f"move it out of the way to resume from step {earlier[-1]}, the previous checkpoint, or "
                      f"restore that one with --checkpoint {earlier[-1]}" if earlier else
                      "no earlier checkpoint is left: train again, or restore a backup of it")
            raise CheckpointError(f"checkpoint {self.directory / str(step)} is damaged: {damage} since it was saved. "
                                  f"It was left untouched; {advice}.")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax raises many types for damaged files
            detail = " ".join(str(e).split())  # one line: orbax's messages embed multi-line TensorStore specs
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} exists but could not be restored "
                f"({type(e).__name__}: {detail}). It was left untouched. If it is damaged, "
                "move it out of the way to resume from an earlier step, or restore another step "
                "explicitly; if the config changed, the model no longer matches the checkpoint.") from e

    def close(self) -> None:
        self.manager.close()


CHECKSUMS_NAME = "dcp_jax_checksums.json"  # in each step directory: the size and CRC-32 of every file a save wrote
_CHUNK = 8 << 20


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def seal(step_dir: Path) -> None:
    """Write step_dir/CHECKSUMS_NAME: the size and CRC-32 of every file the save wrote (a flipped bit, a truncated
    or a missing file then fails the restore instead of loading silently changed weights). CRC-32 (zlib): it
    catches every burst of errors up to 32 bits and runs at disk speed, which a cryptographic hash would not."""
    found = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)]
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS_NAME}
    files.write_json(step_dir / CHECKSUMS_NAME, {"algorithm": "crc32", "files": found})


def check_seal(step_dir: Path) -> str:
    """What differs in step_dir from its checksums ("" when nothing does, or for a checkpoint saved before
    checksums were written, which is restored unchecked)."""
    manifest = step_dir / CHECKSUMS_NAME
    if not manifest.is_file():
        return ""
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its checksum file {CHECKSUMS_NAME} cannot be read"
    for name, (size, crc) in recorded.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} changed size ({path.stat().st_size} bytes, {size} when saved)"
        if _crc32(path) != crc:
            return f"{name} changed (its CRC-32 differs)"
    return ""


def resolve_checkpoint(workdir: str | os.PathLike, checkpoint: str | int | None = None) -> tuple[Path, int]:
    """Turn `--checkpoint` (None = latest in W, a step number, or a step directory) into (dir, step)."""
    if checkpoint is not None and not str(checkpoint).isdigit():
        path = Path(checkpoint).absolute()
        if not path.is_dir() or not path.name.isdigit():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a step number or a step "
                                    "directory such as W/checkpoints/5000")
        return path.parent, int(path.name)
    directory = Path(workdir).absolute() / CHECKPOINTS_DIR
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


def restore_model(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                  checkpoint: str | int | None = None, *, mesh=None):
    """The trained model of a workdir: (model, config, step, checkpoint dir). `checkpoint`: None
    (latest), a step or a step dir. The parameters land in their shardings on `mesh` (default: this
    host's devices, FSDP as config.mesh.fsdp allows), whatever topology saved them."""
    from dcp_jax.models import build

    workdir = Path(workdir)
    config = load_config(workdir) if config is None else config
    directory, step = resolve_checkpoint(workdir, checkpoint)
    mesh = distributed.local_mesh(config.mesh.fsdp) if mesh is None else mesh
    abstract = build.abstract_model(config, load_clip_config(workdir))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = distributed.tree_shardings(params, mesh, config.mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        restored, _ = checkpointer.restore_params(step, target)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, restored, rest), config, step, directory / str(step)
