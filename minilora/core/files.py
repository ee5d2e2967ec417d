"""Writing files and folders so that a crash or a full disk never leaves half of one, reading
files bounded in size and only where they are regular files, and reading torch's refusals in one
line. Standard library, torch and minilora.core.errors only: every other module may import it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from minilora.core.errors import ConfigError, MiniloraError

Writer = Callable[[IO[bytes]], object]


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Writer) -> None:
    """Writes ``path`` so that a reader sees the old file or the new one, never half of one.

    The content goes to a temporary file in the same folder (``mkstemp``), is fsynced and renamed
    over ``path``; the folder is fsynced so the rename survives a crash. On any failure the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to write; its folder must exist.
        data: bytes, a str (written as UTF-8), or a function that writes into the open binary
            file (``lambda f: torch.save(obj, f)``).

    Raises:
        OSError: the write, the fsync or the rename failed (a full disk, say).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the user's umask decides, as for any file they write
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens the file itself (by name); on
    leaving the block without an error it is fsynced and renamed over ``path``, as
    ``atomic_write`` does, else removed and ``path`` is left as it was.

    Raises:
        OSError: the fsync or the rename failed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    # The only way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Makes the entries of ``folder`` (a rename into it, say) durable.

    A platform that cannot open a folder, or a file system that cannot fsync one (EINVAL), is
    skipped; any other error (a full disk) is raised.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def torch_load_reason(err: BaseException) -> str:
    """A ``torch.load(weights_only=True)`` error in one line.

    For a refused pickle only the refused part is kept ("Unsupported global: GLOBAL exec ..."):
    torch's paragraphs around it advise retrying with weights_only=False, which is wrong advice
    for a file nobody vouches for.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?= Please use|\n\n|$)", text, re.S)
    text = found[1] if found else text
    # Whatever global torch names, its paragraphs around the reason advise weights_only=False or
    # allow-listing: every sentence of that kind goes, the reason stays.
    kept = [s for s in re.split(r"(?<=[.!])\s+", " ".join(text.split()))
            if s and not _ADVICE.search(s)]
    return f"{type(err).__name__}: {' '.join(kept) or 'refused by weights_only=True'}"


_ADVICE = re.compile(r"weights_only|trusted source|safe_globals|Weights only load failed|"
                     r"documentation|allowlist|Please use", re.I)


# ---------------------------------------------------------------------------------------------
# Reading: bounded, regular files only
# ---------------------------------------------------------------------------------------------

# A config, an adapter_config.json, a tokenizer_config.json, an index, a tasks or a train config
# file is a few KB to a few MB; anything bigger is not one, and reading it whole could take all
# of the memory (an endless file, a FIFO, /dev/zero).
MAX_JSON_BYTES = 16 << 20


def regular_file(path: str | os.PathLike[str], what: str = "a file") -> Path:
    """``path`` if it is a regular file (or a link to one); raises otherwise.

    A FIFO, a device such as /dev/zero or a socket never ends or never answers, and a folder is
    not a file: each is refused before it is opened.

    Raises:
        FileNotFoundError: nothing is there.
        OSError: ``path`` is something else than a regular file (the message says what).
    """
    path = Path(path)
    mode = path.stat().st_mode  # FileNotFoundError names the path
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise OSError(errno.EINVAL, f"{path} is {kind}; expected {what}")
    return path


def read_bounded(path: str | os.PathLike[str], limit: int, what: str = "a file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, never reading more than that.

    Raises:
        FileNotFoundError, OSError: as ``regular_file``, or a file over ``limit`` bytes.
    """
    path = regular_file(path, what)
    pieces, size = [], 0
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"{path} is larger than {limit} bytes; expected {what}")
        # In pieces, so that a file that grows while it is read is still bounded.
        while piece := f.read(min(1 << 24, limit + 1 - size)):
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                raise OSError(errno.EFBIG, f"{path} is larger than {limit} bytes; expected "
                              f"{what}")
    return b"".join(pieces)


def read_json(path: str | os.PathLike[str], what: str = "a JSON file", limit: int = MAX_JSON_BYTES,
              error: type[MiniloraError] = ConfigError) -> object:
    """A JSON file read whole, bounded: at most ``limit`` bytes, UTF-8, a regular file.

    Returns:
        The parsed value (any JSON type: the caller checks it is the one it needs).

    Raises:
        FileNotFoundError: nothing at ``path``.
        OSError: not a regular file, or too large.
        error: (ConfigError by default) not UTF-8 or not valid JSON, naming file and line.
    """
    data = read_bounded(path, limit, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: byte {e.start} is not UTF-8 ({data[e.start:e.start + 1]!r}); "
                         f"expected {what} in UTF-8") from None
    try:
        return json.loads(text, parse_constant=_not_finite, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except _NotFinite as e:
        raise error(f"{path}: {e} is not a finite number; expected {what} with finite "
                    "numbers") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be {what}") from None


def parse_json(text: str) -> object:
    """``json.loads`` for a line from outside, where every way it fails is one ValueError with
    the reason in words: invalid JSON (the JSONDecodeError itself), an integer of more digits
    than Python converts, or nesting deep enough to exhaust the stack (a RecursionError, which
    ``except ValueError`` alone would let through as a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null),
    for messages about a file that holds the wrong one."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


class _NotFinite(ValueError):
    pass


def _not_finite(name: str) -> float:
    # Python's json reads NaN, Infinity and -Infinity, which JSON itself does not have.
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf
        raise _NotFinite(text)
    return value


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Replacing a folder as a whole
# ---------------------------------------------------------------------------------------------


def replace_folder(final: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Writes a folder so that a reader sees the old one or the new one, never a mixture.

    ``write`` fills a new sibling folder ``.<name>.tmp-<pid>``; its files and the folder are
    fsynced, then it takes the place of ``final``: with one atomic exchange where the system
    has one (Linux ``renameat2(RENAME_EXCHANGE)``), else by renaming the old folder aside as a
    backup, the new one into place, and only then removing the backup. On any failure the new
    folder is removed and ``final`` is left as it was.

    Raises:
        OSError: a write, fsync or rename failed (a full disk, say).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        for entry in sorted(tmp.rglob("*"), reverse=True):  # files, then their folders
            _fsync_file(entry) if entry.is_file() else fsync_dir(entry)
        fsync_dir(tmp)
        if not final.exists():
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            os.rename(tmp, old)  # tmp now holds the old folder
        else:
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _recover(final: Path) -> None:
    """Clean up after a writer of ``final`` that died: its new folder is dropped; its backup of
    the old folder is put back if ``final`` is missing (a kill between the two renames of the
    fallback path), else dropped. Leftovers of a live process are left to it."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(\d+)")
    for entry in final.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m[2])):
            continue
        if m[1] == "old" and not final.exists():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this call is the writer now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, file system without it
        return False
    raise OSError(err, f"cannot replace {b}: {os.strerror(err)}")
