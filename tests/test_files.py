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
