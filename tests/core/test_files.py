"""Tests for minilora.core.files: atomic writes and torch.load refusals in one line."""

import errno
import os
import stat

import pytest
import torch

from minilora.core.files import atomic_write, fsync_dir, torch_load_reason


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


# ---------------------------------------------------------------------------------------------
# Round two: bounded reads, whole-folder replacement, locks, checks (issue 14)
# ---------------------------------------------------------------------------------------------


def test_read_json_refuses_what_is_not_a_small_regular_utf8_json_file(tmp_path):
    from minilora.core.errors import ConfigError
    from minilora.core.files import read_json

    (tmp_path / "ok.json").write_text('{"a": [1, 2.5]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2.5]}
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(OSError, match="is a FIFO"):
        read_json(tmp_path / "pipe.json")  # would block forever if opened
    with pytest.raises(OSError, match="is a device"):
        read_json("/dev/zero")
    with pytest.raises(OSError, match="is a folder"):
        read_json(tmp_path)
    (tmp_path / "big.json").write_bytes(b" " * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        read_json(tmp_path / "big.json", limit=100)
    for text, message in (("NaN", "NaN is not a finite"), ('{"x": -Infinity}', "-Infinity"),
                          ('{"x": 1e999}', "1e999 is not a finite"), ("[1,", "line 1")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_json(tmp_path / "bad.json")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replace_folder_swaps_whole_folders_and_keeps_the_old_one_on_failure(
        tmp_path, monkeypatch, exchange):
    import minilora.core.files as files

    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    files.replace_folder(final, lambda d: (d / "a").write_text("1"))
    files.replace_folder(final, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # the old folder's files are gone

    def fails(d):
        (d / "c").write_text("half")
        raise OSError(errno.ENOSPC, "disk full")

    with pytest.raises(OSError, match="disk full"):
        files.replace_folder(final, fails)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_a_second_process_is_refused_the_lock_with_the_holders_pid(tmp_path):
    import subprocess
    import sys

    from minilora.core.errors import OutputError
    from minilora.core.outputs import FolderLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from minilora.core.outputs import FolderLock; "
         "FolderLock(sys.argv[1], 'train').acquire(); print('held', flush=True); "
         "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputError, match=rf"minilora train, PID {holder.pid}\)"):
            FolderLock(tmp_path, "train").acquire()
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path, "merge"):  # the holder died: the lock is free, no stale file
        pass


@pytest.mark.parametrize("pattern, usable", [
    (r".*\.(q|v)_proj", True), (r"model\.layers\.\d+\.self_attn\.(q|k)_proj", True),
    (r"(ab)+", True), (r"a{2,}(b+)?", True), (r"(a+)+b", False), (r"(a|aa)*", False),
    (r"((a*)?)*", False), (r"(?:x.*y)+", False), ("a" * 501, False), (r"(", False),
])
def test_target_regexes_that_could_backtrack_exponentially_are_refused(pattern, usable):
    from minilora.lora.layer import check_regex

    if usable:
        check_regex(pattern)
    else:
        with pytest.raises(ValueError):
            check_regex(pattern)


def test_tensor_and_type_checks_name_what_is_wrong():
    import dataclasses

    from minilora.core.checks import number, type_problems
    from minilora.core.errors import ConfigError
    from minilora.core.tensor_checks import tensor_problems

    problems = tensor_problems({"ok": torch.ones(2), "nan": torch.tensor([float("nan")]),
                                "int": torch.ones(2, dtype=torch.int8)})
    assert problems == ["1 tensor(s) of a dtype that is not float32, float16, bfloat16 or "
                        "float64: int (int8)", "1 tensor(s) holding NaN or infinite values: nan"]
    for bad in (float("nan"), float("inf"), True, "1", -1.0):
        with pytest.raises(ConfigError):
            number("x", bad, low=0)
    assert number("x", 3, low=0) == 3.0

    @dataclasses.dataclass
    class C:
        n: int = 1
        f: float = 1.0
        flag: bool = False
        names: list[str] | None = None

    assert type_problems(C(n=2.0, f=float("inf"), flag="false", names=["a", 1]), "C.") == [
        "C.n: expected int, got 2.0", "C.f: expected a finite number, got inf",
        "C.flag: expected bool, got 'false'", "C.names: expected list[str] or null, got ['a', 1]"]
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "f.json", "{}")
        atomic_write(tmp_path / "f.json", "{}")  # a replaced file too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode
