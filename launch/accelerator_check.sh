#!/usr/bin/env bash
# The accelerator check on an offline GPU/TPU image that already has jax (with its CUDA or TPU plugin),
# flax, optax, orbax-checkpoint, torch and transformers, from a plain checkout: the packages the image
# lacks are installed from WHEELS_DIR into a private folder (never the image's site-packages, never its
# jax), and dcp_jax runs from the checkout through PYTHONPATH.
#
#   launch/accelerator_check.sh WHEELS_DIR [OUT_DIR] [extra bench flags...]
#
# Fill WHEELS_DIR on a machine with network, for the image's Python (here 3.12, x86-64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d WHEELS_DIR grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 tensorboardX==2.6.5 \
#     portpicker==1.6.0 importlib_resources cloudpickle
#   (a few MB; add flax==0.12.12 to pin flax too). Keep one version of each package.
#
# Output: OUT_DIR/accelerator.md and .json (the table), OUT_DIR/log.txt. Defaults: the B/16 and L/14
# recipes, 5 timed runs per case; e.g. `--only B/16` or `--runs 3` as extra flags.
set -euo pipefail
wheels=${1:?usage: launch/accelerator_check.sh WHEELS_DIR [OUT_DIR] [bench flags...]}
out=${2:-accelerator_check}
shift $(( $# >= 2 ? 2 : 1 ))
repo=$(cd "$(dirname "$0")/.." && pwd)
site=$(mktemp -d "${TMPDIR:-/tmp}/dcp_jax_site.XXXXXX")
trap 'rm -rf "$site"' EXIT

if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
else
  echo "note: no wheels in $wheels; using the image's packages as they are" >&2
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # report what the programs use, not a preallocated pool
mkdir -p "$out"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$out/log.txt"
python3 -m dcp_jax.bench --suite accelerator --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
