"""What every command does before its first array: the compilation cache, the multi-host job, the
backend (logged, and checked against `config.require_backend`), and a count of what XLA compiled.

    runtime.start(config)      # the first line of every command's body

- The persistent compilation cache lives under $DCP_JAX_CACHE/xla (default ~/.cache/dcp_jax/xla),
  switched on before anything compiles, so a restarted or resumed run loads its train step instead
  of compiling it again. A cache directory given to JAX itself (JAX_COMPILATION_CACHE_DIR) wins.
- One line names the jax version, the backend and the devices; `require_backend` = "gpu" or "tpu"
  (the launch scripts set it) stops a job that found only a CPU at once, instead of training on a
  mesh of one CPU device.
- `compile_stats()` counts compilations and cache hits from jax.monitoring's events.
"""

from __future__ import annotations

import os
import sys
import threading

import jax

from dcp_jax import distributed, files

BACKENDS = ("", "cpu", "gpu", "tpu")


class BackendError(RuntimeError):
    """The accelerator a config asks for is not what jax found."""


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk under $DCP_JAX_CACHE/xla, for every later command on the same shapes.
    Respects a cache directory that JAX was already given (JAX_COMPILATION_CACHE_DIR). A cache directory
    that cannot be written is skipped with a note, never an error."""
    _listen()
    if jax.config.jax_compilation_cache_dir:
        return
    path = files.cache_dir("xla")
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        print(f"[dcp_jax] note: {path} is not writable; compiled programs are not cached "
              "(set DCP_JAX_CACHE to a writable directory to cache them)", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def start(config=None, *, require_backend: str | None = None, log: bool = True) -> None:
    """Config ranges, cache, multi-host job, backend line and check. `require_backend` defaults to
    config.require_backend."""
    if config is not None:
        from dcp_jax import config as config_lib
        config_lib.check_ranges(config)
    enable_compilation_cache()
    distributed.initialize()
    if require_backend is None:
        require_backend = str(config.get("require_backend", "") or "") if config is not None else ""
    if log and distributed.is_primary():
        print(f"[dcp_jax] {describe_backend()}", file=sys.stderr, flush=True)
    check_backend(require_backend)


def describe_backend() -> str:
    """'jax 0.10.2, backend gpu: 4 x NVIDIA H200 (1 process)'."""
    processes = jax.process_count()
    return (f"jax {jax.__version__}, backend {jax.default_backend()}: {_device_kinds()} "
            f"({processes} process{'es' if processes > 1 else ''})")


def _device_kinds() -> str:
    kinds: dict[str, int] = {}
    for d in jax.devices():
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return ", ".join(f"{n} x {kind}" for kind, n in kinds.items())


def check_backend(require_backend: str) -> None:
    """A clear error when `require_backend` ("gpu", "tpu", "cpu"; "" = any) is not jax's backend."""
    if require_backend not in BACKENDS:
        raise ValueError(f"config.require_backend={require_backend!r}: expected one of {BACKENDS[1:]} or '' (any)")
    found = jax.default_backend()
    if not require_backend or found == require_backend:
        return
    fix = {"gpu": "install jax's CUDA plugin for the installed jax (pip install -e \".[cuda12]\" or \".[cuda13]\") "
                  "and check that nvidia-smi sees the GPUs and CUDA_VISIBLE_DEVICES/JAX_PLATFORMS allow them",
           "tpu": "install jax's TPU support (pip install -e \".[tpu]\") on the TPU VM and check that no other "
                  "process holds the TPU",
           "cpu": "set JAX_PLATFORMS=cpu"}[require_backend]
    raise BackendError(f"config.require_backend={require_backend!r} but jax {jax.__version__} found only the "
                       f"{found} backend ({_device_kinds()}): {fix}; or pass --config.require_backend= "
                       "to run on what was found")


# ---------------------------------------------------------------------------------------------
# What XLA compiled
# ---------------------------------------------------------------------------------------------

_lock = threading.Lock()
_stats = {"compiles": 0, "compile_seconds": 0.0, "cache_hits": 0, "cache_misses": 0}
_listening = False


def _on_event(event: str, **_) -> None:
    key = {"/jax/compilation_cache/cache_hits": "cache_hits",
           "/jax/compilation_cache/cache_misses": "cache_misses"}.get(event)
    if key:
        with _lock:
            _stats[key] += 1


def _on_duration(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":  # a compile, or a read from the cache
        with _lock:
            _stats["compiles"] += 1
            _stats["compile_seconds"] += float(duration)


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_stats() -> dict:
    """Since start-up: programs built ("compiles", cache reads included), seconds spent building them,
    persistent-cache hits and misses."""
    _listen()
    with _lock:
        return dict(_stats)


def format_compile_stats(stats: dict | None = None) -> str:
    s = compile_stats() if stats is None else stats
    return (f"{s['compiles']} programs built in {s['compile_seconds']:.1f} s; persistent cache: "
            f"{s['cache_hits']} hits, {s['cache_misses']} misses")
