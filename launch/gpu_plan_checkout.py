r"""Another checkout's B/16 train step (bfloat16, batch 4, K = 32) compiled for a GPU and read as the plan reads
its own: the "before" of a change, and the calibration of the time estimate (docs/performance.md).

    python launch/gpu_plan_checkout.py /path/to/checkout-of-db307c5 --measured-ms 51      # the calibration
    python launch/gpu_plan_checkout.py /path/to/checkout-of-dbfb214 --set model.attention=xla

On 2026-12-04 one NVIDIA H200 (jax 0.11.2) ran the B/16 recipe's train step of commit db307c5 in bfloat16
at batch 4, K = 32: 51 ms per step (shared/research/gpu_run.md). This script compiles a checkout's own
train step for a GPU without one, in a subprocess that imports that checkout (the code of that day), with
XLA's dump on; reads the dump with this checkout's dcp_jax.gpu_program; and prints the kernels, XLA's
temporaries, the estimate and its parts, and estimate / measurement where a measurement is given.
`--set KEY=VALUE` overrides the recipe (values parsed as Python literals, else strings). Needs jax's
CUDA plugin and cuDNN (pip install -e ".[gpu-plan]"), as the plan does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs inside the old checkout: its config, model and train step, lowered from shapes as
# dcp_jax.accelerator.lower_train_step does today (older train steps take the state as a tree), with the
# choices it made by backend made for the GPU.
DRIVER = r"""
import sys, jax, jax.numpy as jnp
jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, sys.argv[3])  # this checkout, for its GPU descriptions only
from dcp_jax import gpu_targets
sys.path.pop(0)
for name in [m for m in sys.modules if m == "dcp_jax" or m.startswith("dcp_jax.")]:
    del sys.modules[name]  # the old checkout's dcp_jax from here on
import importlib.util
from flax import nnx
from dcp_jax import distributed, optim, train
from dcp_jax.models import build, dcp
devices = gpu_targets.compile_only_devices(gpu_targets.gpu_target(sys.argv[1]))
# The code of that day chose its CPU-only paths (attention in chunks) by jax's default backend, which is the
# CPU in this process: traced as on the GPU it ran on.
jax.default_backend = lambda: "gpu"
spec = importlib.util.spec_from_file_location("recipe", "configs/dcp_vitb16_coco_stuff.py")
recipe = importlib.util.module_from_spec(spec); spec.loader.exec_module(recipe)
config = recipe.get_config()
config.clip.dtype = "bfloat16"
config.train.batch_size = 4
import ast, json
for item in sys.argv[4:]:
    key, _, text = item.partition("=")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    config.update_from_flattened_dict({key: value})
mesh = distributed.make_mesh(1, devices)
def model_and_optimizer():
    model = build.abstract_model(config)
    return model, optim.make_optimizer(config, model)
graphdef, state = nnx.split(nnx.eval_shape(model_and_optimizer))
shardings = distributed.tree_shardings(state, mesh, config.mesh)
state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
data, rep = distributed.batch_sharding(mesh), distributed.replicated(mesh)
batch = {"image": jax.ShapeDtypeStruct((4, 384, 384, 3), jnp.uint8, sharding=data),
         "label": jax.ShapeDtypeStruct((4, 384, 384), jnp.int32, sharding=data)}
dim = build.clip_config_for(config).projection_dim
text = jax.ShapeDtypeStruct((171, dcp.num_templates(config), dim), jnp.float32, sharding=rep)
step = train.make_train_step(config, graphdef, shardings, 171)
try:
    lowered = step.lower(jax.tree.leaves(state), batch, text, None)
except Exception:
    lowered = step.lower(state, batch, text, None)
import time
start = time.perf_counter()
compiled = lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False, "xla_dump_to": sys.argv[2]})
print(json.dumps({"temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
                  "compile_s": time.perf_counter() - start}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="a checkout of the commit that was measured (db307c5)")
    parser.add_argument("--gpu", default="h200")
    parser.add_argument("--measured-ms", type=float, default=None, help="the step time measured on that GPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override")
    args = parser.parse_args()
    checkout = Path(args.checkout).resolve()
    if not (checkout / "dcp_jax").is_dir():
        print(f"error: {checkout} is not a checkout of dcp_jax (no dcp_jax/ folder)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from dcp_jax import gpu_program, gpu_targets

    target = gpu_targets.gpu_target(args.gpu)
    with tempfile.TemporaryDirectory(prefix="dcp_gpu_calibration_") as dump:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(checkout)}
        run = subprocess.run([sys.executable, "-c", DRIVER, args.gpu, dump, str(HERE), *args.set], cwd=checkout,
                             env=env, capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            print(f"error: compiling {checkout}'s train step for {target.device_kind} failed", file=sys.stderr)
            return 1
        program = gpu_program.read_program(dump)
    estimate = gpu_program.estimate(program, target.bf16_tflops, target.memory_bandwidth)
    ms = 1e3 * estimate["seconds"]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    settings = "".join(f", {item}" for item in args.set)
    print(f"{checkout.name}: B/16 train step, bfloat16, batch 4, K = 32{settings}, compiled for {target.device_kind}")
    print(f"kernels per step: {program.launches()} ({program.launches(in_graph=True)} in CUDA graphs, "
          f"{program.graph_launches} graph launches); kernel FLOPs {program.flops() / 1e9:.0f} G; "
          f"XLA's temporaries {compiled['temp_gib']:.2f} GiB; compiled in {compiled['compile_s']:.1f} s")
    print(f"estimate: {ms:.2f} ms = kernels {1e3 * estimate['kernel_seconds']:.2f} ms + launches "
          f"{1e3 * estimate['launch_seconds']:.2f} ms")
    if args.measured_ms:
        print(f"measured: {args.measured_ms:g} ms; estimate / measured = {ms / args.measured_ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
