"""Start-up of every command: the backend line and check, the compilation cache, configs from a plain checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from dcp_jax import runtime

REPO = Path(__file__).resolve().parents[1]


def test_a_gpu_launch_that_finds_only_a_cpu_stops_at_once(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "dcp_jax.train", "--config", str(REPO / "configs/tiny.py"),
                           "--workdir", str(workdir), "--config.require_backend=gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("[dcp_jax] jax ") and "backend cpu" in lines[0]
    assert len(lines) == 2 and "config.require_backend='gpu'" in lines[1] and "cuda" in lines[1].lower()
    assert not workdir.exists()  # nothing was written before the check


def test_require_backend_values():
    runtime.check_backend("")
    runtime.check_backend("cpu")
    with pytest.raises(runtime.BackendError, match="require_backend='tpu'.*jax"):
        runtime.check_backend("tpu")
    with pytest.raises(ValueError, match="expected one of"):
        runtime.check_backend("cuda")


def test_compilation_cache_goes_under_dcp_jax_cache(monkeypatch, tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("DCP_JAX_CACHE", str(tmp_path))
        runtime.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_an_unwritable_cache_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # unwritable for root too, unlike a chmod
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("DCP_JAX_CACHE", str(blocker / "cache"))
        runtime.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
        assert "not writable" in capsys.readouterr().err
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_configs_import_from_a_plain_checkout(tmp_path):
    """An accelerator image runs from the checkout with PYTHONPATH, without `pip install -e .` (which would
    replace its jax): dcp_jax.configs must exist there too."""
    checkout = tmp_path / "checkout"
    for name in ("dcp_jax", "configs"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "from dcp_jax.configs import demo\n"
            "from dcp_jax import config\n"
            "print(demo.__file__); print(config.config_file('tiny')); print(demo.get_config().clip.checkpoint)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    demo_file, tiny_file, checkpoint = proc.stdout.split()
    assert Path(demo_file) == checkout / "configs" / "demo.py"
    assert Path(tiny_file) == checkout / "configs" / "tiny.py"
    assert checkpoint == "toy:"
