"""CLIP checkpoint formats <-> dcp_jax's parameter tree. Pure numpy (torch only for .bin/.pt, imported lazily).

Our names are the '/'-joined `nnx.state` paths of `dcp_jax.models.clip.CLIPModel`, identical to the transformers-4.x
Flax tree minus `params/` (`vision_model/encoder/layers/3/self_attn/q_proj/kernel`). Conversions:

- HF PyTorch (`vision_model.encoder.layers.3.self_attn.q_proj.weight`): Linear weight.T -> kernel; conv weight
  transpose(2,3,1,0) -> kernel (HWIO); LayerNorm weight -> scale; Embedding weight -> embedding. Export is the
  exact inverse.
- OpenAI CLIP (`visual.transformer.resblocks.3.attn.in_proj_weight`) -> HF names (in_proj split q, k, v; `proj`
  matrices stored [in, out] are transposed to HF's [out, in]); the config is inferred from shapes like OpenAI's
  `build_model`.
- HF Flax `flax_model.msgpack`: already our tree.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
import numpy as np

VISION_POSEMB = "vision_model/embeddings/position_embedding/embedding"

_LAYER_NORMS = {"layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm", "final_layer_norm"}
_EMBEDDINGS = {"token_embedding", "position_embedding"}
_CONVS = {"patch_embedding"}
# Buffers some checkpoints carry that are not parameters.
_IGNORED_HF = re.compile(r"(^|\.)position_ids$")
_IGNORED_OPENAI = {"input_resolution", "context_length", "vocab_size"}


# --------------------------------------------------------------------------------------------------
# HF PyTorch names <-> ours
# --------------------------------------------------------------------------------------------------


def hf_to_ours(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF PyTorch state dict (numpy) -> our flat params. `position_ids` buffers are dropped."""
    out = {}
    for name, value in tensors.items():
        if _IGNORED_HF.search(name):
            continue
        *parents, leaf = name.split(".")
        module = parents[-1] if parents else ""
        value = np.asarray(value)
        if leaf == "weight":
            if module in _LAYER_NORMS:
                leaf = "scale"
            elif module in _EMBEDDINGS:
                leaf = "embedding"
            elif module in _CONVS and value.ndim == 4:
                leaf, value = "kernel", value.transpose(2, 3, 1, 0)
            elif value.ndim == 2:
                leaf, value = "kernel", value.T
        out["/".join([*parents, leaf])] = value
    return out


def ours_to_hf(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> HF PyTorch state-dict names and layouts (the exact inverse of `hf_to_ours`)."""
    out = {}
    for name, value in params.items():
        *parents, leaf = name.split("/")
        value = np.asarray(value)
        if leaf in ("scale", "embedding"):
            leaf = "weight"
        elif leaf == "kernel":
            leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
        out[".".join([*parents, leaf])] = np.array(value, order="C")
    return out


# --------------------------------------------------------------------------------------------------
# OpenAI CLIP -> HF names
# --------------------------------------------------------------------------------------------------

_OPENAI_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                 "attn.out_proj": "self_attn.out_proj"}
_OPENAI_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def is_openai_state_dict(tensors: dict) -> bool:
    return "visual.conv1.weight" in tensors or "visual.proj" in tensors


def openai_to_hf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI CLIP state dict -> HF PyTorch names. Unknown names are kept (strict checking happens later)."""
    out = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if name in _IGNORED_OPENAI:
            continue
        if name in _OPENAI_TOP:
            out[_OPENAI_TOP[name]] = value
        elif name == "visual.proj":
            out["visual_projection.weight"] = value.T  # OpenAI stores [in, out]
        elif name == "text_projection":
            out["text_projection.weight"] = value.T
        elif m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest, kind = f"{tower}.encoder.layers.{m.group(2)}", m.group(3), m.group(4)
            if rest in _OPENAI_BLOCK:
                out[f"{prefix}.{_OPENAI_BLOCK[rest]}.{kind}"] = value
            else:
                out[name] = value
        elif m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            tower = "vision_model" if m.group(1) else "text_model"
            if value.shape[0] % 3:
                raise ValueError(f"{name} has shape {value.shape}; expected the first dim to be 3 x width (q, k, v)")
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{part}_proj.{m.group(3)}"] = chunk
        elif m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.([qkv])_proj_(weight|bias)", name):
            # CAT-Seg's model_vpt splits in_proj into q/k/v parameters already.
            tower = "vision_model" if m.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{m.group(3)}_proj.{m.group(4)}"] = value
        else:
            out[name] = value
    return out


def openai_config(tensors: dict[str, np.ndarray]) -> dict:
    """HF config dict inferred from an OpenAI state dict's shapes (OpenAI `build_model`: heads = width // 64)."""
    need = ["visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
            "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ValueError(f"OpenAI CLIP state dict lacks {missing}; only ViT CLIP checkpoints are supported")

    def count_blocks(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in tensors if k.startswith(prefix + ".")})

    v_width, _, patch, _ = tensors["visual.conv1.weight"].shape
    grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = tensors["ln_final.weight"].shape[0]
    v_fc = tensors.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    t_fc = tensors.get("transformer.resblocks.0.mlp.c_fc.weight")
    vocab = tensors["token_embedding.weight"].shape[0]
    for name, width in (("visual", v_width), ("text", t_width)):
        if width % 64:
            raise ValueError(f"cannot infer the {name} head count: OpenAI CLIP uses width // 64 heads, but width is "
                             f"{width}; convert the checkpoint to an HF directory with a config.json instead")
    return {
        "model_type": "clip",
        "projection_dim": int(tensors["text_projection"].shape[1]),
        "logit_scale_init_value": float(np.asarray(tensors.get("logit_scale", 2.6592)).reshape(-1)[0]),
        "vision_config": {
            "hidden_size": int(v_width), "num_attention_heads": int(v_width // 64),
            "intermediate_size": int(v_fc.shape[0]) if v_fc is not None else 4 * int(v_width),
            "num_hidden_layers": count_blocks("visual.transformer.resblocks"),
            "patch_size": int(patch), "image_size": int(patch * grid), "hidden_act": "quick_gelu",
        },
        "text_config": {
            "hidden_size": int(t_width), "num_attention_heads": int(t_width // 64),
            "intermediate_size": int(t_fc.shape[0]) if t_fc is not None else 4 * int(t_width),
            "num_hidden_layers": count_blocks("transformer.resblocks"),
            "max_position_embeddings": int(tensors["positional_embedding"].shape[0]),
            "vocab_size": int(vocab), "hidden_act": "quick_gelu",
            # OpenAI pools at argmax(input_ids) (EOT is the largest id): HF's legacy eos_token_id == 2 rule.
            "eos_token_id": 2, "bos_token_id": int(vocab - 2), "pad_token_id": 1,
        },
    }


# --------------------------------------------------------------------------------------------------
# Position-embedding resize
# --------------------------------------------------------------------------------------------------


def resize_posemb(posemb: np.ndarray, new_grid: int) -> np.ndarray:
    """Resize a [1 + g*g, W] ViT position table (CLS row first) to [1 + new_grid**2, W].

    Bicubic with PyTorch semantics (`F.interpolate(mode="bicubic", align_corners=False)`, what HF's
    `interpolate_pos_encoding` and CAT-Seg use); the CLS row is kept as is.
    """
    import jax  # local: this module stays importable without initialising a backend

    posemb = np.asarray(posemb, np.float32)
    n, width = posemb.shape
    grid = round((n - 1) ** 0.5)
    if grid * grid != n - 1:
        raise ValueError(f"position embedding has {n} rows; expected 1 + a square number")
    if grid == new_grid:
        return posemb
    table = posemb[1:].reshape(grid, grid, width)
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        resized = jax.image.resize(table, (new_grid, new_grid, width), method="bicubic-pytorch", antialias=False)
    return np.concatenate([posemb[:1], np.asarray(resized, np.float32).reshape(-1, width)], axis=0)


# --------------------------------------------------------------------------------------------------
# Expected shapes (pure function of the config; tests check it equals the NNX model's tree)
# --------------------------------------------------------------------------------------------------


def _tower_shapes(prefix: str, cfg) -> dict[str, tuple[int, ...]]:
    w, m = cfg.hidden_size, cfg.intermediate_size
    out = {}
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}/encoder/layers/{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}/self_attn/{proj}/kernel"], out[f"{p}/self_attn/{proj}/bias"] = (w, w), (w,)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{p}/{ln}/scale"], out[f"{p}/{ln}/bias"] = (w,), (w,)
        out[f"{p}/mlp/fc1/kernel"], out[f"{p}/mlp/fc1/bias"] = (w, m), (m,)
        out[f"{p}/mlp/fc2/kernel"], out[f"{p}/mlp/fc2/bias"] = (m, w), (w,)
    return out


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Our flat param names -> shapes for a `clip.CLIPConfig`."""
    v, t, d = config.vision, config.text, config.projection_dim
    out = {"logit_scale": (), "visual_projection/kernel": (v.hidden_size, d),
           "text_projection/kernel": (t.hidden_size, d)}
    out |= _tower_shapes("vision_model", v) | _tower_shapes("text_model", t)
    e = "vision_model/embeddings"
    out[f"{e}/patch_embedding/kernel"] = (v.patch_size, v.patch_size, v.num_channels, v.hidden_size)
    out[f"{e}/class_embedding"] = (v.hidden_size,)
    out[VISION_POSEMB] = ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)
    for ln in ("pre_layrnorm", "post_layernorm"):
        out[f"vision_model/{ln}/scale"], out[f"vision_model/{ln}/bias"] = (v.hidden_size,), (v.hidden_size,)
    e = "text_model/embeddings"
    out[f"{e}/token_embedding/embedding"] = (t.vocab_size, t.hidden_size)
    out[f"{e}/position_embedding/embedding"] = (t.max_position_embeddings, t.hidden_size)
    for leaf in ("scale", "bias"):
        out[f"text_model/final_layer_norm/{leaf}"] = (t.hidden_size,)
    return out


# --------------------------------------------------------------------------------------------------
# Strict checking
# --------------------------------------------------------------------------------------------------


def check_params(params: dict[str, np.ndarray], expected: dict[str, tuple], what: str) -> None:
    """Raise one ValueError listing missing, unexpected and wrongly shaped tensors."""
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(np.shape(params[k]))} vs expected {tuple(expected[k])}"
                   for k in set(params) & set(expected) if tuple(np.shape(params[k])) != tuple(expected[k]))
    if missing or unexpected or wrong:
        lines = [f"checkpoint does not match {what}:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names))
        raise ValueError("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------------

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")


def _is_torchscript(path: Path) -> bool:
    """TorchScript zips hold `<archive>/constants.pkl` and `<archive>/code/`; plain torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    """State dict of a .bin/.pt file (plain state dict or TorchScript archive) as float32 numpy."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (pip install 'torch==2.13.0'), or convert it to "
                          "model.safetensors") from e
    try:
        if _is_torchscript(path):  # OpenAI's released .pt files are TorchScript archives
            with warnings.catch_warnings():  # torch 2.x deprecates TorchScript; reading weights is fine
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = torch.jit.load(str(path), map_location="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: expected a PyTorch state dict or a TorchScript archive ({e})") from e
    if isinstance(obj, torch.jit.ScriptModule) or isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a state dict of tensors")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = k[len("module."):] if k.startswith("module.") else k
        out[name] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
    return out


def _flatten(tree, prefix=()) -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, str(k))))
        return out
    return {"/".join(prefix): np.asarray(tree)}


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax import serialization

    tree = serialization.msgpack_restore(path.read_bytes())
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    return _flatten(tree)


def _as_float32(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V"
                else v) for k, v in params.items()}


def read_checkpoint(path, config_class) -> tuple[dict[str, np.ndarray], object]:
    """Read any supported CLIP checkpoint -> (our flat float32 params, config). Strict about names and shapes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
    if path.is_dir():
        config_file = path / "config.json"
        weights = next((path / f for f in HF_WEIGHT_FILES if (path / f).exists()), None)
        if weights is None:
            raise ValueError(f"{path} holds no CLIP weights; expected one of {', '.join(HF_WEIGHT_FILES)} "
                             "(sharded checkpoints: merge them into one model.safetensors first)")
        if not config_file.exists():
            raise ValueError(f"{path} has {weights.name} but no config.json; an HF checkpoint directory needs both")
        config = config_class.from_hf(json.loads(config_file.read_text()))
        if weights.suffix == ".safetensors":
            from safetensors.numpy import load_file

            params = hf_to_ours(load_file(weights))
        elif weights.suffix == ".bin":
            params = hf_to_ours(_torch_load(weights))
        else:
            params = _read_msgpack(weights)
        source = f"{config_file} ({weights.name})"
    elif path.suffix in (".pt", ".pth", ".bin"):
        tensors = _torch_load(path)
        if not is_openai_state_dict(tensors):
            raise ValueError(f"{path} is not an OpenAI CLIP state dict (no `visual.conv1.weight`); for HF weights "
                             "pass the checkpoint directory with config.json instead")
        config = config_class.from_hf(openai_config(tensors))
        params = hf_to_ours(openai_to_hf(tensors))
        source = f"the config inferred from {path.name}"
    else:
        raise ValueError(f"unknown CLIP checkpoint format: {path}; expected an HF checkpoint directory "
                         f"(config.json + one of {', '.join(HF_WEIGHT_FILES)}) or an OpenAI .pt file")
    params = _as_float32(params)
    check_params(params, param_shapes(config), what=source)
    return params, config


def write_hf_checkpoint(params: dict[str, np.ndarray], config_dict: dict, out_dir) -> Path:
    """Write config.json + model.safetensors (PyTorch layout, metadata format=pt) from our flat params."""
    from safetensors.numpy import save_file

    from dcp_jax import files

    out_dir = Path(out_dir)
    tensors = {k: np.array(v, dtype=np.float32, order="C") for k, v in ours_to_hf(params).items()}
    files.atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    files.write_text(out_dir / "config.json", json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return out_dir
