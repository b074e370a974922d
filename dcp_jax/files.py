"""Writing files so that nothing is ever left half-written under its final name.

Every file the project writes for a user (configs, checkpoints' side files, predictions, prepared
datasets, caches, exports) goes through `atomic_write`: the content goes to a hidden temporary file
in the same directory, which is then renamed over the target (an atomic step on POSIX), so a crash
or Ctrl-C leaves either the old file or the new one. A temporary name carries its host and process
id (`.NAME.<host>-<pid>.<random>.tmp`); one that a killed process (SIGKILL, power loss) left behind is
removed by the next write of the same NAME on that host (`_remove_stale`). No jax import here:
data-preparation worker processes use this module too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp creates 0600


_HOST = socket.gethostname().replace(".", "_").replace("-", "_")


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporary files and directories of earlier writes of `path` whose process (on this host)
    no longer exists: what a SIGKILL in the middle of a write leaves behind."""
    start = f".{path.name}.{_HOST}-"
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if not (entry.name.startswith(start) and entry.name.endswith((".tmp", ".old"))):
                continue
            pid = entry.name[len(start):].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) with a temporary path next to `path`, then rename tmp over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _FILE_MODE)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise ValueError naming `what` unless `path` is (or can be created as) a writable directory: checked
    before a command's work, so a long run never ends in a permission traceback. Creates nothing."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; give a directory")
    existing = path
    while not existing.exists():  # the folder that will hold it, once created
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{what} {path} cannot be written ({existing} is not a writable directory); "
                         "give a writable directory")


def cache_dir(name: str) -> Path:
    """$DCP_JAX_CACHE/<name> (default ~/.cache/dcp_jax/<name>): text embeddings, compiled programs, the toy CLIP."""
    return Path(os.environ.get("DCP_JAX_CACHE") or Path.home() / ".cache" / "dcp_jax") / name


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Fill a temporary sibling directory, then move it to `path` when the block succeeds.

    An existing `path` is refused unless `overwrite` (then it is replaced only after the new one is
    complete). On error the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive kernel lock (flock) on `path`, waiting for another process that holds it: two
    commands that would build the same cached thing build it once. A killed holder never leaves it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "os_error_code='27'",
                   "os_error_code='28'", "os error 27", "os error 28")


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk is full or a file-size limit was reached. Libraries
    wrap the OSError (safetensors, TensorStore under Orbax), so their messages are read too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False

