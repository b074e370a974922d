"""Test-wide setup: 4 simulated CPU devices, absl flags marked parsed (grain workers need it), and a
compilation cache shared by the whole session (tests and their subprocesses) so that the same tiny
programs, built again by separate runs, compile once."""
import os
import tempfile

# Optimisation level 0: tiny test programs compile ~2x faster and run fast enough.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dcp_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("DCP_JAX_CACHE", tempfile.mkdtemp(prefix="dcp_jax_test_text_cache_"))

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
