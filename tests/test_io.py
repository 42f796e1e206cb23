"""Atomic writes: whole or nothing, a one-line error on a full disk, ordinary permissions."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from deradiff.errors import UserError
from deradiff.io import atomic_dir, atomic_write, sha256_file, write_json_atomic


def test_atomic_write_replaces_whole_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_full_disk_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "out" / "r.json"

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="no space left") as err:
        write_json_atomic(path, {"a": 1})
    assert str(tmp_path / "out") in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path / "out") == []


def test_modes_follow_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "f.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_leaves_nothing_on_error_and_sha256(tmp_path):
    with pytest.raises(ValueError), atomic_dir(tmp_path / "ckpt") as d:
        (d / "w").write_bytes(b"abc")
        raise ValueError
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
