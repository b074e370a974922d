"""The export format: a trained DCP-CLIP as files PyTorch reads, and its exact inverse.

`write_export(model, config, DIR)` writes:
  clip/                     the fine-tuned CLIP as a transformers CLIPModel directory (config.json at the
                            trained resolution, model.safetensors with the resized position embedding,
                            tokenizer files), loadable with `CLIPModel.from_pretrained(DIR/clip)`
  dcp_head.safetensors      every non-CLIP parameter in PyTorch layout (metadata format=pt)
  dcp_head_layout.json      exported name -> {flax_path, shape, kind}
  config.json               the run config
  train_classes.json        the training vocabulary (tag validation tells seen classes with it)
  README.md                 what each file is and how to load it

Head tensor names are our nnx paths joined with "." with `kernel`/`scale` renamed `weight`
(`decoder.layers.0.up.weight`). Layouts by kind:
  linear          nn.Linear weight [out, in]          (flax kernel [in, out], transposed)
  conv            nn.Conv2d weight [out, in, kh, kw]  (flax HWIO)
  conv_transpose  nn.ConvTranspose2d weight [in, out, kh, kw], spatially flipped: flax's ConvTranspose
                  (transpose_kernel=False) convolves the dilated input with the kernel as stored, torch's
                  is the gradient of a convolution, i.e. uses the kernel flipped
  norm            nn.LayerNorm / nn.GroupNorm weight and bias (flax scale and bias)
  param           stored as is (e.g. the guidance prompt vector)

`load_export(DIR)` is the exact inverse: it rebuilds the DCPCLIP the export came from.
The command that exports a workdir (and verifies the export in PyTorch) is dcp_jax/export.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import files
from dcp_jax.models import build, clip_convert, dcp
from dcp_jax.models import clip as clip_lib
from dcp_jax.rules import flat_params, path_str


CLIP_DIR = "clip"
HEAD_FILE = "dcp_head.safetensors"
LAYOUT_FILE = "dcp_head_layout.json"
README_FILE = "README.md"

# Which torch module each flax module type corresponds to (see the module docstring for the layouts).
_KINDS = ((nnx.ConvTranspose, "conv_transpose"), (nnx.Conv, "conv"), (nnx.Linear, "linear"),
          (nnx.LayerNorm, "norm"), (nnx.GroupNorm, "norm"))
_RENAMED_LEAVES = {"kernel": "weight", "scale": "weight"}


class ExportError(ValueError):
    """An export that cannot be written or read (bad paths, a model with no PyTorch equivalent)."""


# ---------------------------------------------------------------------------------------------
# Layout conversions
# ---------------------------------------------------------------------------------------------

def to_torch(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
    """One flax parameter -> its PyTorch layout (only kernels change; biases, norms and params do not)."""
    value = np.asarray(value)
    if leaf != "kernel":
        return value
    spatial = tuple(range(value.ndim - 2))
    if kind == "linear":
        return value.T  # [in, out] -> [out, in]
    if kind == "conv":
        return value.transpose(value.ndim - 1, value.ndim - 2, *spatial)  # HWIO -> OIHW
    if kind == "conv_transpose":
        flipped = np.flip(value, axis=spatial)
        return flipped.transpose(value.ndim - 2, value.ndim - 1, *spatial)  # HWIO -> IOHW
    raise ExportError(f"no PyTorch layout for a kernel of kind {kind!r}")


def from_torch(kind: str, leaf: str, value: np.ndarray) -> np.ndarray:
    """The exact inverse of `to_torch`."""
    value = np.asarray(value)
    if leaf != "kernel":
        return value
    n = value.ndim
    if kind == "linear":
        return value.T
    if kind == "conv":
        return value.transpose(*range(2, n), 1, 0)  # OIHW -> HWIO
    if kind == "conv_transpose":
        return np.flip(value.transpose(*range(2, n), 0, 1), axis=tuple(range(n - 2)))  # IOHW -> HWIO, unflip
    raise ExportError(f"no PyTorch layout for a kernel of kind {kind!r}")


def _module_kind(module) -> str | None:
    for klass, kind in _KINDS:
        if isinstance(module, klass):
            if kind == "conv_transpose":
                _check_conv_transpose(module)
            return kind
    return None


def _check_conv_transpose(module: nnx.ConvTranspose) -> None:
    # The flip rule is exact for these settings (checked against torch in tests/test_export.py);
    # anything else would need its own rule, so refuse rather than export something subtly wrong.
    k, s = tuple(module.kernel_size), module.strides
    s = tuple(s) if isinstance(s, (tuple, list)) else (s,) * len(k)
    if (module.padding != "VALID" or module.transpose_kernel or module.kernel_dilation not in (None, 1)
            or any(ki < si for ki, si in zip(k, s))):
        raise ExportError(f"ConvTranspose(kernel {k}, strides {s}, padding {module.padding!r}, transpose_kernel="
                          f"{module.transpose_kernel}) has no export rule; only VALID padding with "
                          "kernel >= stride maps onto nn.ConvTranspose2d(padding=0)")


def head_layout(model: dcp.DCPCLIP) -> dict[str, dict]:
    """Exported name -> {flax_path, shape (PyTorch layout), kind} for every non-CLIP parameter.

    Works on abstract models too (only module types and shapes are read)."""
    modules = {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    layout = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "clip":
            continue
        *parents, leaf = (str(p) for p in path)
        owner = modules.get(tuple(path[:-1]))
        kind = _module_kind(owner) or "param"
        if leaf == "kernel" and kind == "param":
            raise ExportError(f"{path_str(path)}: a kernel of a {type(owner).__name__} has no PyTorch "
                              "export rule; add its module type to dcp_jax.export._KINDS")
        name = ".".join([*parents, leaf if kind == "param" else _RENAMED_LEAVES.get(leaf, leaf)])
        shape = to_torch(kind, leaf, np.broadcast_to(np.float32(0), var.get_value().shape)).shape  # no copy
        layout[name] = {"flax_path": path_str(path), "shape": list(shape), "kind": kind}
    return layout


def head_tensors(model: dcp.DCPCLIP) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(name -> float32 tensor in PyTorch layout, layout) for every non-CLIP parameter of `model`."""
    layout = head_layout(model)
    flat = dict(flat_params(model))
    tensors = {}
    for name, entry in layout.items():
        leaf = entry["flax_path"].rsplit("/", 1)[-1]
        value = np.asarray(flat[entry["flax_path"]].get_value(), np.float32)
        tensors[name] = np.ascontiguousarray(to_torch(entry["kind"], leaf, value))
    return tensors, layout


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_export(model: dcp.DCPCLIP, config: ml_collections.ConfigDict, out_dir: str | os.PathLike, *,
                 tokenizer_dir: str | os.PathLike, train_classes=None, step: int | None = None,
                 progress=None) -> Path:
    """Write the export files of `model` into the (new or empty) directory `out_dir`.

    Prefer `export_workdir`, which also writes atomically; this writes in place."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_config = model.clip.config
    if clip_config.vision.image_size != int(config.clip.image_size):
        raise ExportError(f"model CLIP runs at {clip_config.vision.image_size} px but config.clip.image_size="
                          f"{config.clip.image_size}; the config does not belong to this model")
    # The CLIP config already carries the trained resolution, and the params its resized position table.
    clip_lib.save_hf_checkpoint(model.clip, clip_config, out_dir / CLIP_DIR)
    if tokenizer_dir is not None:  # None: weights only (a random model has no tokenizer; benchmarks)
        copy_tokenizer(tokenizer_dir, out_dir / CLIP_DIR)
    _advance(progress)

    tensors, layout = head_tensors(model)
    save_file(tensors, str(out_dir / HEAD_FILE), metadata={"format": "pt"})
    files.write_json(out_dir / LAYOUT_FILE, layout)
    _advance(progress)

    ckpt_lib.save_config(out_dir, config)
    if train_classes is not None:
        ckpt_lib.save_train_classes(out_dir, train_classes)
    (out_dir / README_FILE).write_text(_readme(config, clip_config, step, layout, train_classes is not None))
    _advance(progress)
    return out_dir


def _advance(progress) -> None:
    if progress is not None:
        progress.update(1)


def _has_hf_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or all((folder / n).exists() for n in ("vocab.json", "merges.txt"))


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the tokenizer files of `source` (W/tokenizer) into `target`. When they hold only OpenAI's BPE
    file, also write the equivalent transformers tokenizer so that `CLIPTokenizer.from_pretrained` works."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise ExportError(f"{source} missing: the workdir has no tokenizer (the trainer copies it there at start)")
    for item in sorted(source.iterdir()):
        if item.is_file():
            shutil.copyfile(item, target / item.name)
    if not _has_hf_tokenizer(target):
        from dcp_jax import text as text_lib
        text_lib.load_tokenizer(source).save_pretrained(str(target))


def _readme(config, clip_config: clip_lib.CLIPConfig, step, layout: dict, has_classes: bool) -> str:
    size = clip_config.vision.image_size
    kinds = sorted({entry["kind"] for entry in layout.values()})
    step_text = f" at step {step}" if step is not None else ""
    lines = [
        "# DCP-CLIP export",
        "",
        f"Written by `python -m dcp_jax.export`{step_text}.",
        "",
        "| file | what it is |",
        "|---|---|",
        f"| `{CLIP_DIR}/` | the fine-tuned CLIP as a transformers `CLIPModel` directory, image size {size} "
        "(position embedding already resized), with its tokenizer |",
        f"| `{HEAD_FILE}` | the DCP head ({len(layout)} tensors, PyTorch layout, kinds: {', '.join(kinds)}) |",
        f"| `{LAYOUT_FILE}` | tensor name -> flax path, shape and kind (linear, conv, conv_transpose, norm, "
        "param) |",
        f"| `{ckpt_lib.CONFIG_NAME}` | the training run's config (dcp_jax) |",
    ]
    if has_classes:
        lines.append(f"| `{ckpt_lib.TRAIN_CLASSES_NAME}` | the training vocabulary (tag validation uses it) |")
    lines += [
        "",
        "## The CLIP in transformers",
        "",
        "```python",
        "from transformers import CLIPModel, CLIPTokenizer",
        f'model = CLIPModel.from_pretrained("{CLIP_DIR}")',
        f'tokenizer = CLIPTokenizer.from_pretrained("{CLIP_DIR}")',
        "```",
        "",
        f"Images go in at {size}x{size}, normalised with CLIP's mean and std; no `interpolate_pos_encoding`.",
        "",
        "## The head in PyTorch",
        "",
        "```python",
        "from safetensors.torch import load_file",
        f'head = load_file("{HEAD_FILE}")  # names like decoder.layers.0.up.weight',
        "```",
        "",
        "Names are the flax module paths joined with `.`, `kernel` and `scale` renamed `weight`.",
        "`linear` is `nn.Linear` ([out, in]), `conv` is `nn.Conv2d` ([out, in, kh, kw]), `conv_transpose` is",
        "`nn.ConvTranspose2d(in, out, k, stride=k)` ([in, out, kh, kw], already flipped to match),",
        "`norm` is `nn.LayerNorm` / `nn.GroupNorm` (eps 1e-5), `param` is a bare tensor.",
        "",
        "Back to JAX: `from dcp_jax.export_format import load_export; model = load_export(\"<this dir>\")`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading (the inverse)
# ---------------------------------------------------------------------------------------------

def is_export(directory: str | os.PathLike) -> bool:
    """Whether `directory` is an export this module wrote: its head layout file is the export's own marker."""
    directory = Path(directory)
    return (directory / LAYOUT_FILE).is_file() and (directory / HEAD_FILE).is_file()


def load_export(directory: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> dcp.DCPCLIP:
    """Rebuild the DCPCLIP an export came from (the exact inverse of the export). `config`: the run config
    (default DIR/config.json). Strict: every head tensor must be there, with the right name and shape."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    for need in (CLIP_DIR, HEAD_FILE):
        if not (directory / need).exists():
            raise ExportError(f"{directory / need} missing: {directory} is not a dcp_jax export "
                              "(python -m dcp_jax.export writes it)")
    if config is None:
        config = ckpt_lib.load_config(directory)
    clip_params, clip_config = clip_lib.load_clip_params(directory / CLIP_DIR, image_size=config.clip.image_size)
    layout = head_layout(build.abstract_model(config, clip_config))
    tensors = load_file(str(directory / HEAD_FILE))
    clip_convert.check_params(tensors, {k: tuple(v["shape"]) for k, v in layout.items()},
                              what=f"the DCP head built from the config ({directory / HEAD_FILE})")
    _check_saved_layout(directory / LAYOUT_FILE, layout)
    given = {f"clip/{name}": value for name, value in clip_params.items()}
    for name, entry in layout.items():
        leaf = entry["flax_path"].rsplit("/", 1)[-1]
        given[entry["flax_path"]] = np.ascontiguousarray(from_torch(entry["kind"], leaf, tensors[name]))
    return build.init_module(lambda rngs: dcp.DCPCLIP(config, clip_config, rngs=rngs), mesh_config=config.mesh,
                             given=given)


def _check_saved_layout(path: Path, layout: dict) -> None:
    if not path.exists():
        return  # the safetensors names and shapes were checked; the layout file is documentation
    saved = json.loads(path.read_text())
    differ = sorted(k for k in set(saved) | set(layout) if saved.get(k) != layout.get(k))
    if differ:
        raise ExportError(f"{path} disagrees with the model built from the config on {len(differ)} tensors "
                          f"(first: {differ[:5]}); the export and the config do not belong together")
