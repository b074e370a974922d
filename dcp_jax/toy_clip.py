"""A toy CLIP pre-trained contrastively on the toy world, so that a CPU demo shows real open-vocabulary segmentation.

    python -m dcp_jax.toy_clip --out DIR [--seed S]

trains a small CLIP (ViT image tower + text transformer, `dcp_jax.models.clip.CLIPModel`) with the symmetric
InfoNCE loss and a learnable logit scale on freshly rendered image-caption pairs of `dcp_jax.data.toy_world`, prints
its zero-shot classification accuracy on held-out images, and writes an HF checkpoint directory (config.json,
model.safetensors, a BPE tokenizer whose merges are learnt from the world's words, and toy_clip.json with the
recipe and the measured numbers) that both `load_clip(DIR)` and transformers' `CLIPModel.from_pretrained(DIR)` load.

The checkpoint is generated, never committed: `ensure_toy_clip(recipe)` caches it under
$DCP_JAX_CACHE/toy_clip/<recipe hash> (default ~/.cache/dcp_jax), written atomically, and returns the cached
directory, training it only when it is missing. The default recipe trains in 1.5-3 minutes on a 2-core CPU;
`TEST_RECIPE` is a reduced one (~30 s) for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dcp_jax import files
from dcp_jax.data import toy_world
from dcp_jax.models import build
from dcp_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, normalize_pixels,
                                 save_hf_checkpoint)

CODE_VERSION = "toy_clip-2"  # bump when training or evaluation changes: it keys the cache
RECIPE_FILE = "toy_clip.json"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the trained weights depend on (with CODE_VERSION and the world's version): the cache key."""

    image_size: int = 64  # 8x8 patch grid: small enough for the segmentation model to train on a CPU after
    patch_size: int = 8
    # ONE image block: CAT-Seg's dense features (last block's v-path + the CLS token's input) are then a function of
    # each patch alone, so they carry local class information. With 2-4 blocks the CLS input already holds the
    # whole scene, the dense features collapse onto the image embedding and zero-shot mIoU drops from ~22 to ~5-8.
    vision_layers: int = 1
    vision_width: int = 128
    text_layers: int = 2
    text_width: int = 64
    num_heads: int = 4
    mlp_ratio: int = 2  # MLP width / model width: 2 instead of CLIP's 4 buys more steps in the CPU budget
    projection_dim: int = 64
    context_length: int = 32  # the longest caption is ~25 tokens, CLIP's prompt templates need < 20
    vocab_size: int = 768
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.05
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"recipe": dataclasses.asdict(self), "code": CODE_VERSION,
                           "world": toy_world.WORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_RECIPE = Recipe()  # 1.5-3 minutes on a 2-core CPU
TEST_RECIPE = Recipe(steps=150, lr=4e-3)  # reduced for tests: well under a minute, still far above chance


def clip_config(recipe: Recipe) -> CLIPConfig:
    v, w = recipe.vocab_size, recipe
    text = CLIPTextConfig(vocab_size=v, hidden_size=w.text_width, intermediate_size=w.mlp_ratio * w.text_width,
                          num_hidden_layers=w.text_layers, num_attention_heads=w.num_heads,
                          max_position_embeddings=w.context_length, pad_token_id=v - 1, bos_token_id=v - 2,
                          eos_token_id=v - 1)
    vision = CLIPVisionConfig(hidden_size=w.vision_width, intermediate_size=w.mlp_ratio * w.vision_width,
                              num_hidden_layers=w.vision_layers, num_attention_heads=w.num_heads,
                              image_size=w.image_size, patch_size=w.patch_size)
    return CLIPConfig(text=text, vision=vision, projection_dim=w.projection_dim,
                      logit_scale_init_value=float(np.log(1 / 0.07)))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _tokenizer(recipe: Recipe, folder: Path):
    from dcp_jax.models.tiny_clip import tiny_tokenizer_files
    from dcp_jax.text import load_tokenizer

    for name, content in tiny_tokenizer_files(recipe.vocab_size, corpus=toy_world.corpus_words()).items():
        (folder / name).write_text(content, encoding="utf-8")
    return load_tokenizer(folder)


def _contrastive_loss(model: CLIPModel, pixels, ids, mask, same):
    img = model.get_image_features(pixels)
    txt = model.get_text_features(ids, mask)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    logits = jnp.exp(jnp.minimum(model.logit_scale[...], np.log(100.0))) * img @ txt.T
    # Pairs whose scenes hold the same classes have equivalent captions: they share the target mass
    # instead of being each other's negatives.
    targets = same / same.sum(axis=1, keepdims=True)
    return 0.5 * (optax.softmax_cross_entropy(logits, targets).mean() +
                  optax.softmax_cross_entropy(logits.T, targets).mean())


def train(recipe: Recipe, out_dir: str | os.PathLike, *, progress: bool = True, evaluate: bool = True) -> dict:
    """Train the toy CLIP of `recipe` into `out_dir` (checkpoint + tokenizer + toy_clip.json); returns the report
    (with the zero-shot classification accuracy unless `evaluate` is false)."""
    from dcp_jax.text import tokenize
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = _tokenizer(recipe, out_dir)
    config = clip_config(recipe)
    model = build.random_clip(config, seed=recipe.seed)
    warmup = min(recipe.warmup_steps, recipe.steps // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, warmup, max(recipe.steps, warmup + 1),
                                                  end_value=recipe.lr * 0.05)
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731 (kernels/embeddings only)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=recipe.weight_decay,
                                                                 mask=decay))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, ids, mask, same):
        def loss_fn(p):
            return _contrastive_loss(nnx.merge(graphdef, p), normalize_pixels(images), ids, mask, same)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def batch(i):  # the world renders a fresh batch per step: no image is ever seen twice
        images, captions, present = toy_world.caption_batch(recipe.seed, i, recipe.batch_size, recipe.image_size)
        ids, mask = tokenize(tokenizer, captions, context_length=recipe.context_length)
        same = (present[:, None, :] == present[None, :, :]).all(-1).astype(np.float32)
        return images, ids, mask, same

    losses, next_batch = [], batch(0)
    bar = tqdm(range(recipe.steps), desc="toy CLIP", unit="step", disable=not progress, dynamic_ncols=True)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, *next_batch)
        if i + 1 < recipe.steps:
            next_batch = batch(i + 1)  # rendered on the host while the device runs the step (async dispatch)
        losses.append(loss)
        if i % 10 == 0 or i + 1 == recipe.steps:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    train_seconds = time.perf_counter() - start
    model = nnx.merge(graphdef, params)
    save_hf_checkpoint(model, config, out_dir)
    report = {"recipe": dataclasses.asdict(recipe), "key": recipe.key(), "code_version": CODE_VERSION,
              "world_version": toy_world.WORLD_VERSION, "train_seconds": round(train_seconds, 1),
              "final_loss": float(np.mean([float(x) for x in losses[-20:]])),
              "zero_shot": zero_shot_classification(model, tokenizer, recipe) if evaluate else None}
    (out_dir / RECIPE_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# Zero-shot evaluation
# --------------------------------------------------------------------------------------------------


def class_embeddings(model: CLIPModel, tokenizer, class_names) -> np.ndarray:
    """[C,D] text embeddings averaged over CLIP's 80 ImageNet templates (what the segmenter uses), L2-normalised."""
    from dcp_jax.text import embed_vocabulary

    with tempfile.TemporaryDirectory() as tmp:  # no on-disk cache for these few prompts
        T = embed_vocabulary(model, tokenizer, list(class_names), cache_dir=tmp)
    mean = T.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def _held_out(recipe: Recipe, kind: str, count: int):
    """Held-out images (a seed stream training never uses): single objects on stuff, or a single stuff."""
    rng = np.random.default_rng([recipe.seed, 7919, {"object": 0, "stuff": 1}[kind]])
    images, labels = [], []
    for i in range(count):
        if kind == "object":
            name = toy_world.OBJECTS[i % len(toy_world.OBJECTS)]
            image, _, _ = toy_world.render_scene(rng, recipe.image_size, objects=[name], num_stuff=(1, 2),
                                                 radius=(0.15, 0.3))
        else:
            name = toy_world.STUFF[i % len(toy_world.STUFF)]
            image, _, _ = toy_world.render_scene(rng, recipe.image_size, stuff=[name], objects=[])
        images.append(image)
        labels.append(toy_world.CLASS_NAMES.index(name))
    return np.stack(images), np.asarray(labels)


def zero_shot_classification(model: CLIPModel, tokenizer, recipe: Recipe, per_class: int = 10) -> dict:
    """Accuracy (%) on held-out single-object images (among the 16 object prompts and among all 24) and single-stuff
    images (among all 24 prompts), with chance beside each."""
    text = class_embeddings(model, tokenizer, toy_world.CLASS_NAMES)
    encode = jax.jit(lambda x: model.get_image_features(normalize_pixels(x)))
    out = {}
    for kind, classes in (("object", toy_world.OBJECTS), ("stuff", toy_world.STUFF)):
        images, labels = _held_out(recipe, kind, per_class * len(classes))
        img = np.asarray(encode(images))
        scores = (img / np.linalg.norm(img, axis=-1, keepdims=True)) @ text.T
        among_all = scores.argmax(-1) == labels
        out[f"{kind}_acc_all"] = round(100 * float(among_all.mean()), 1)
        out[f"{kind}_chance_all"] = round(100 / len(toy_world.CLASS_NAMES), 1)
        if kind == "object":
            first = len(toy_world.STUFF)  # objects follow the stuff classes
            among_objects = scores[:, first:].argmax(-1) + first == labels
            out["object_acc"] = round(100 * float(among_objects.mean()), 1)
            out["object_chance"] = round(100 / len(classes), 1)
    return out


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return files.cache_dir("toy_clip")


def root_for(fallback: Path, recipe: Recipe | None = None) -> Path:
    """Where `recipe`'s toy CLIP lives: the cache, unless the cache neither holds it nor can be written (a
    read-only cache is never written): then `fallback`, with a note."""
    recipe = recipe or DEFAULT_RECIPE
    root = cache_root()
    if (root / recipe.key() / RECIPE_FILE).is_file():
        return root
    try:
        files.check_writable_dir(root, "the toy CLIP cache")
    except ValueError as e:
        print(f"note: {e}; the toy CLIP is trained into {fallback} instead", file=sys.stderr)
        return Path(fallback)
    return root


def ensure_toy_clip(recipe: Recipe | None = None, *, progress: bool = True, root: Path | None = None) -> Path:
    """The checkpoint directory of `recipe` (default DEFAULT_RECIPE) under `root` (default the cache), trained
    there on the first call."""
    recipe = recipe or DEFAULT_RECIPE
    final = Path(root or cache_root()) / recipe.key()
    if (final / RECIPE_FILE).is_file():  # written last: its presence means a complete checkpoint
        return final
    with files.waiting_lock(final.with_name(final.name + ".lock")):  # another process may be training it
        if (final / RECIPE_FILE).is_file():
            return final
        with files.atomic_directory(final, overwrite=True) as tmp:  # an incomplete leftover is replaced
            report = train(recipe, tmp, progress=progress)
    print(f"toy CLIP trained in {report['train_seconds']:.0f} s; {format_zero_shot(report['zero_shot'])}",
          file=sys.stderr)
    return final


def format_zero_shot(z: dict) -> str:
    return (f"zero-shot accuracy: objects {z['object_acc']:.1f}% among {len(toy_world.OBJECTS)} object prompts "
            f"(chance {z['object_chance']:.1f}%), {z['object_acc_all']:.1f}% among all "
            f"{len(toy_world.CLASS_NAMES)} (chance {z['object_chance_all']:.1f}%); stuff {z['stuff_acc_all']:.1f}% "
            f"among all {len(toy_world.CLASS_NAMES)} (chance {z['stuff_chance_all']:.1f}%)")


def main(argv=None) -> int:
    from absl import flags

    from dcp_jax import cli
    cmd = cli.Command("python -m dcp_jax.toy_clip", __doc__, argv)
    f = cmd.flags
    flags.DEFINE_string("out", None, "copy the checkpoint directory here (default: only print the cached path)",
                        flag_values=f)
    flags.DEFINE_integer("seed", 0, "training seed (the weights are deterministic for it)", flag_values=f)
    flags.DEFINE_integer("steps", None, f"training steps (default {DEFAULT_RECIPE.steps}; {TEST_RECIPE.steps} "
                         "with --quick)", flag_values=f)
    flags.DEFINE_bool("quick", False, "the reduced recipe the tests use (under a minute)", flag_values=f)
    flags.DEFINE_bool("overwrite", False, "replace a toy CLIP already in --out", flag_values=f)
    args = cmd.parse()

    def body():
        recipe = TEST_RECIPE if args.quick else DEFAULT_RECIPE
        recipe = dataclasses.replace(recipe, seed=args.seed, steps=args.steps or recipe.steps)
        if recipe.steps < 1:
            raise ValueError("--steps must be >= 1")
        out = Path(args.out) if args.out else None
        if out is not None:
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {out} is a file; give a directory")
            if out.exists() and any(out.iterdir()) and not (args.overwrite and (out / RECIPE_FILE).is_file()):
                raise ValueError(f"--out {out} is not empty" + ("; pass --overwrite to replace the toy CLIP in it"
                                                                if (out / RECIPE_FILE).is_file() else ""))
            files.check_writable_dir(out.parent, "--out's folder")
        root = root_for(Path(tempfile.mkdtemp(prefix="dcp_toy_clip_")), recipe)
        path = ensure_toy_clip(recipe, root=root)
        report = json.loads((path / RECIPE_FILE).read_text())
        print(f"toy CLIP: {path} (trained in {report['train_seconds']:.0f} s)")
        print(format_zero_shot(report["zero_shot"]))
        if out is not None:
            with files.atomic_directory(out, overwrite=True) as tmp:
                shutil.copytree(path, tmp, dirs_exist_ok=True)
            print(f"copied to {out}")

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
