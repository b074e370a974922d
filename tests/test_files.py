"""Atomic writes: a failed or interrupted write leaves the old file (or directory) and no temporary."""

import os
import stat
from pathlib import Path

import pytest

from dcp_jax import files


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path):
    dst = tmp_path / "a.png"
    dst.write_bytes(b"old")

    def failing_write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(dst, failing_write)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    files.write_json(tmp_path / "sub" / "b.json", {"x": 1})  # parents are created
    assert (tmp_path / "sub" / "b.json").read_text() == '{\n  "x": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "sub" / "b.json").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        with files.atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with files.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["mine.txt"]
    with files.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.txt"]


def test_what_a_killed_write_leaves_behind_is_removed_by_the_next_write_of_the_same_name(tmp_path):
    """SIGKILL in the middle of an atomic directory write (as of an export) leaves its hidden temporary
    folder; the next write of the same name removes it. Temporaries of live processes and of other hosts
    (a shared filesystem) are left alone, and the finished target is never touched until replaced."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "export"
    script = ("import sys, time; from dcp_jax import files\n"
              "with files.atomic_directory(sys.argv[1], overwrite=True) as tmp:\n"
              "    (tmp / 'weights.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]
    assert len(leftovers) == 1 and leftovers[0].is_dir() and not target.exists()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f".export.{files._HOST}-{live.pid}.abc.tmp", tmp_path / ".export.otherhost-1.abc.tmp"]
        for k in kept:
            k.mkdir()
        stale_file = tmp_path / f".export.{files._HOST}-{proc.pid}.def.tmp"
        stale_file.write_text("half a file")
        with files.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"y")
        assert (target / "weights.bin").read_bytes() == b"y"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export.")) == sorted(k.name for k in kept)
    finally:
        live.kill()
        live.wait()
    time.sleep(0.1)
    files.write_text(tmp_path / "export" / "note.txt", "done")  # a file write cleans its own name's leftovers too
    assert (target / "note.txt").read_text() == "done"
