"""Tests for minilora.files: atomic writes and torch.load refusals in one line."""

import errno
import os
import stat

import pytest
import torch

from minilora.files import atomic_write, fsync_dir, torch_load_reason


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]  # no temp file left behind
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]


@pytest.mark.parametrize("data", [b"bytes \xff", "text \u00e9"])
def test_atomic_write_takes_bytes_and_text(tmp_path, data):
    path = tmp_path / "f"
    atomic_write(path, data)
    expected = data.encode("utf-8") if isinstance(data, str) else data
    assert path.read_bytes() == expected and os.listdir(tmp_path) == ["f"]


def test_a_failed_fsync_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_two_writers_use_their_own_temp_files(tmp_path):
    # A fixed "<name>.tmp" would let one writer rename the other's half-written file.
    path = tmp_path / "f"

    def outer(f):
        atomic_write(path, b"inner")
        f.write(b"outer")

    atomic_write(path, outer)
    assert path.read_bytes() == b"outer" and os.listdir(tmp_path) == ["f"]


def test_fsync_dir_skips_an_unsupported_folder_fsync(tmp_path, monkeypatch):
    def unsupported(fd):
        raise OSError(errno.EINVAL, "not supported")

    monkeypatch.setattr(os, "fsync", unsupported)
    fsync_dir(tmp_path)  # no error
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "io")))
    with pytest.raises(OSError):
        fsync_dir(tmp_path)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_torch_load_reason_drops_the_weights_only_false_advice(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"x": Exploit()}, path)
    with pytest.raises(Exception) as info:
        torch.load(path, weights_only=True)
    reason = torch_load_reason(info.value)
    assert "\n" not in reason and "weights_only=False" not in reason
    assert reason.startswith("UnpicklingError: ") and "print" in reason


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "f.json", "{}")
        atomic_write(tmp_path / "f.json", "{}")  # a replaced file too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode
