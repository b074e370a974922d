"""Test-wide setup: 4 simulated CPU devices, absl flags marked parsed (grain workers need it), and a session
that never touches the user's machine: its own temporary $DCP_JAX_CACHE, JAX compilation cache, $HOME and XDG
directories, whatever the environment says, shared by the whole session (pytest-xdist's workers and the
subprocesses tests start) so that the same tiny programs, built again by separate runs, compile once and the
toy CLIP is trained once."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

# XLA:CPU's cheapest compile for the many small test programs, measured on the tiny train step (2-core
# AMD EPYC, jax 0.10.2): optimisation level 0 compiles it in 10.4 s instead of 16.2 s, and without the
# fusion emitters (LLVM IR per fusion, on by default) in 6.2 s; its steps run 13 % slower (556 vs 492 ms),
# a good trade for tests that mostly compile. Subprocesses that choose their own device count use xla_flags().
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's subprocess: `devices` simulated CPU devices, compiled as cheaply as the suite."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_XLA_FLAGS}"


os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

_SESSION_VAR = "DCP_JAX_TEST_SESSION"  # "<pid of the process that made it>:<directory>"


def _session_root() -> Path:
    """The session's temporary directory. The process that loads this file first (plain pytest, or xdist's
    controller) makes it and removes it at exit; xdist's workers, its direct children, inherit the variable
    and use the same one, so the toy CLIP is trained once (under toy_clip's file lock) for both workers.
    Anything else that inherited the variable (a pytest run started from a test) makes its own."""
    pid, _, path = os.environ.get(_SESSION_VAR, "").partition(":")
    if os.environ.get("PYTEST_XDIST_WORKER") and pid == str(os.getppid()) and Path(path).is_dir():
        return Path(path)
    root = Path(tempfile.mkdtemp(prefix="dcp_jax_test_session_"))
    os.environ[_SESSION_VAR] = f"{os.getpid()}:{root}"
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


_ROOT = _session_root()
_HOME = _ROOT / "home"
# Set, not setdefault: a user's exported DCP_JAX_CACHE (the README's demo suggests one) or HOME must not be read
# or written by the tests (test_toy_clip's cache checks fail on a populated cache). Nothing the tests run needs
# the real HOME: the venv's interpreter is found by absolute path and tests use only local checkpoints.
for _name, _path in {"DCP_JAX_CACHE": _ROOT / "dcp_jax_cache", "JAX_COMPILATION_CACHE_DIR": _ROOT / "xla_cache",
                     "HOME": _HOME, "XDG_CACHE_HOME": _HOME / ".cache", "XDG_CONFIG_HOME": _HOME / ".config",
                     "XDG_DATA_HOME": _HOME / ".local" / "share"}.items():
    _path.mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(_path)
# Locations a user may export that would lead a library to their real files; unset, they fall back to the
# temporary HOME / XDG directories above (the data roots of dcp_jax: ./datasets and ~/tensorflow_datasets).
for _name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME",
              "TFDS_DATA_DIR", "DETECTRON2_DATASETS"):
    os.environ.pop(_name, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_clip_checkpoint():
    """The toy CLIP of toy_clip.TEST_RECIPE, trained once per session into $DCP_JAX_CACHE (above).

    Trained by the command line in a subprocess without this file's XLA optimisation level 0, which makes
    its steps ~1.5x slower (that setting is meant for the many small programs the other tests compile).
    """
    import subprocess
    import sys

    from dcp_jax import toy_clip

    env = {**os.environ, "XLA_FLAGS": ""}
    run = subprocess.run([sys.executable, "-m", "dcp_jax.toy_clip", "--quick"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    path = toy_clip.cache_root() / toy_clip.TEST_RECIPE.key()
    assert (path / toy_clip.RECIPE_FILE).is_file(), run.stdout
    return path
