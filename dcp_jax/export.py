"""Export a trained DCP-CLIP for PyTorch: python -m dcp_jax.export --workdir W --out DIR [--checkpoint STEP] [--overwrite]
--verify: then run DIR in JAX and in PyTorch (dcp_jax.torch_ref) on random inputs, print their max logit difference.

DIR gets the fine-tuned CLIP as a transformers CLIPModel directory (clip/), every other parameter in
PyTorch layout (dcp_head.safetensors, with dcp_head_layout.json), the run config, the training
vocabulary and a README: the format and its inverse, `load_export`, are in dcp_jax/export_format.py.
The export is written into a temporary sibling directory and renamed into place at the end, so a
failed export leaves nothing half-written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ml_collections

from dcp_jax import checkpoint as ckpt_lib
from dcp_jax import cli, files, runtime
from dcp_jax.export_format import LAYOUT_FILE, ExportError, is_export, write_export


def _check_out_dir(out: Path, workdir: Path, overwrite: bool) -> None:
    """`out` and `workdir` resolved (symlinks, ..): an export never replaces the workdir, a folder holding it,
    or a non-empty folder that is not an earlier export (--overwrite replaces only those)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory; choose another path")
    if out == workdir or out in workdir.parents:
        raise ExportError(f"--out {out} is (or contains) the workdir {workdir}; export into another directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace an earlier "
                              "export there, or choose a new directory")
        if not is_export(out):
            raise ExportError(f"--out {out} holds files that are not a dcp_jax export (no {LAYOUT_FILE}); "
                              "--overwrite replaces only an earlier export: choose a new or empty directory")


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str | int | None = None,
                   overwrite: bool = False, show_progress: bool = False,
                   config: ml_collections.ConfigDict | None = None) -> Path:
    """Export W's checkpoint (default: the latest) into `out`. Returns the export directory.

    Refuses a non-empty `out` unless `overwrite` and `out` is an earlier export (`is_export`). Writes into a
    temporary sibling of `out` and renames it into place at the end: a failed export leaves `out` as it was."""
    workdir, out = Path(workdir).expanduser().resolve(), Path(out).expanduser().resolve()
    if not workdir.is_dir():
        raise ExportError(f"--workdir {workdir} does not exist; give the directory dcp_jax.train wrote")
    if not (workdir / ckpt_lib.CONFIG_NAME).exists():
        raise ExportError(f"{workdir} is not a dcp_jax workdir: it has no {ckpt_lib.CONFIG_NAME} "
                          "(python -m dcp_jax.train writes it)")
    _check_out_dir(out, workdir, overwrite)
    ckpt_lib.resolve_checkpoint(workdir, checkpoint)  # fail on a bad --checkpoint before any work

    from tqdm import tqdm
    progress = tqdm(total=4, desc="export", unit="part", disable=not show_progress, file=sys.stderr)
    try:
        with files.atomic_directory(out, overwrite=True) as tmp:
            model, config, step, _ = ckpt_lib.restore_model(workdir, config, checkpoint)
            progress.update(1)
            write_export(model, config, tmp, tokenizer_dir=ckpt_lib.tokenizer_dir(workdir),
                         train_classes=ckpt_lib.load_train_classes(workdir), step=step, progress=progress)
            if out.is_dir() and any(out.iterdir()) and not (overwrite and is_export(out)):  # appeared meanwhile
                raise ExportError(f"--out {out} changed during the export (it holds files now that are not an "
                                  "earlier export to replace); it was left as it is")
    finally:
        progress.close()
    return out

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from absl import flags
    cmd = cli.Command("python -m dcp_jax.export", __doc__, argv, config=cli.default_config(),
                      config_help="config file instead of WORKDIR/config.json (--config.KEY=VALUE overrides either)")
    f = cmd.flags
    flags.DEFINE_string("workdir", None, "the training workdir W (python -m dcp_jax.train)", flag_values=f)
    flags.DEFINE_string("out", None, "export directory DIR (created; must be new or empty)", flag_values=f)
    flags.DEFINE_string("checkpoint", None, "step number or step directory such as W/checkpoints/5000 "
                        "(default: the latest)", flag_values=f)
    flags.DEFINE_bool("overwrite", False, "replace an earlier export in --out (a non-empty folder that is not an "
                      "export is never replaced)", flag_values=f)
    flags.DEFINE_bool("verify", False, "after exporting, load DIR back in JAX and in PyTorch (dcp_jax.torch_ref), run "
                      "both on random inputs and print their max logit difference as the last line; exit 1 above "
                      "the tolerance (1e-4)", flag_values=f)
    cmd.required("workdir", "out")
    args = cmd.parse()

    def body():
        config = cmd.config(args.workdir)
        runtime.start(config)
        out = export_workdir(args.workdir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite,
                             show_progress=True, config=config)
        print(f"exported to {out}", file=sys.stderr)
        if args.verify:
            try:
                from dcp_jax.torch_ref import verify
            except ImportError as e:
                raise ExportError(f"--verify needs PyTorch and transformers ({e}); pip install 'dcp_jax[torch]'") from e
            sys.stderr.flush()  # the verdict below stays the last line of the output
            return 0 if verify.verify_export(out) <= verify.TOLERANCE else 1

    return cmd.run(body)


if __name__ == "__main__":
    sys.exit(main())
