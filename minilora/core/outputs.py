"""Where a command may write: never over one of its inputs, never over what it did not write,
never while another process writes there.

Three rules, shared by ``train``, ``merge``, ``combine`` and ``convert``:

- ``check_not_an_input``: the output is not an input, does not lie inside one and does not
  contain one (``merge --model X --out X`` would overwrite the base it reads).
- ``check_own_folder``: an existing output folder holds only what this command writes there
  (and temporary leftovers of its own crashed writes); a user's folder is refused, naming what
  is in it.
- ``FolderLock``: one process at a time per output folder (an fcntl lock on a file holding the
  holder's PID); a second one is refused, naming the PID.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from minilora.core.errors import OutputError

LOCK_NAME = ".minilora.lock"


def check_not_an_input(out: str | os.PathLike[str], inputs: Mapping[str, object],
                       flag: str) -> None:
    """Refuse an output path that is, lies inside, or contains one of the inputs.

    Args:
        out: the output path (it need not exist).
        inputs: what the command reads, by the flag that names it (``{"--model": path}``);
            None values and lists of paths are accepted.
        flag: the output's flag, for the message (``--out``).

    Raises:
        OutputError: naming the input and the relation.
    """
    target = Path(out).resolve()
    for name, value in inputs.items():
        paths: Sequence[Any] = value if isinstance(value, (list, tuple)) else [value]
        for path in paths:  # str or PathLike, or None for an input not given
            if path is None or str(path) == "":
                continue
            source = Path(path).resolve()
            if target == source:
                relation = "is"
            elif source in target.parents and source.is_dir():
                relation = "lies inside"
            elif target in source.parents:
                relation = "contains"
            else:
                continue
            raise OutputError(f"{flag} {out} {relation} the input {name} {path}; the command "
                              f"would overwrite what it reads: choose another {flag}")


def check_own_folder(folder: str | os.PathLike[str], own: Iterable[str] | re.Pattern[str],
                     command: str, flag: str) -> None:
    """Refuse an existing folder that holds anything but this command's own earlier outputs.

    A folder is this command's when its lock file (written before anything else) names the
    command, and it holds only the names the command writes. A base model folder holds a
    config.json and weights just as a merged one does; only the lock file tells them apart.

    Args:
        folder: the output folder (absent or empty passes).
        own: the names the command writes there: a set of names or a full-match pattern.
            Hidden temporary leftovers of these names (``.<name>.tmp-...``) count as its own.
        command: the command (``train``, ``merge``), as its lock file names it.
        flag: the output's flag, for the message.

    Raises:
        OutputError: the folder is a file, was not written by ``command``, or holds other
            entries (listed).
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    entries = sorted(e.name for e in folder.iterdir())
    pattern = own if isinstance(own, re.Pattern) else re.compile(
        "|".join(re.escape(n) for n in own))
    foreign = [n for n in entries if not _is_own(n, pattern)]
    if entries and _lock_command(folder / LOCK_NAME) != command:
        foreign = [n for n in entries if n != LOCK_NAME]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign) - 8} more)"
                                          if len(foreign) > 8 else "")
        raise OutputError(f"{flag} {folder} holds files that minilora {command} did not write "
                          f"({shown}); nothing there is overwritten: choose an empty or new "
                          f"{flag}")


def _lock_command(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return str(json.loads(f.read(4096))["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_own(name: str, pattern: re.Pattern[str]) -> bool:
    if name == LOCK_NAME or pattern.fullmatch(name):
        return True
    # atomic_write's ".<name>.<random>.tmp", replace_folder's ".<name>.tmp-<pid>" / ".old-<pid>"
    hidden = re.fullmatch(r"\.(.+?)\.(?:tmp-\d+|old-\d+|[^.]+\.tmp)", name)
    return hidden is not None and pattern.fullmatch(hidden[1]) is not None


class FolderLock:
    """An exclusive lock on an output folder for one process (``with FolderLock(...)``).

    The lock is an fcntl lock on ``<folder>/.minilora.lock``, which holds the holder's command
    and PID. The system releases it when the process ends, however it ends, so a killed run
    never leaves a stale lock; the file stays and is reused.

    Raises:
        OutputError: another process holds the folder (its PID named).
        OSError: the folder cannot be created or the lock file written.
    """

    def __init__(self, folder: str | os.PathLike[str], command: str) -> None:
        self.folder = Path(folder)
        self.command = command
        self._fd: int | None = None
        self.path = self.folder / LOCK_NAME

    @classmethod
    def beside(cls, output: str | os.PathLike[str], command: str) -> FolderLock:
        """A lock for an output that cannot hold the lock file itself (an adapter folder, which
        holds only the adapter's files; a ``.pth`` file): ``.<name>.minilora.lock`` beside it,
        which stays there (an empty lock file, reused by the next run)."""
        lock = cls(output, command)
        lock.path = lock.folder.parent / f".{lock.folder.name}{LOCK_NAME}"
        return lock

    def acquire(self) -> FolderLock:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputError(f"{self.folder} is in use by another process ({_holder(path)}); "
                              "wait for it to end, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"command": self.command, "pid": os.getpid()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read(4096))
        return f"minilora {info['command']}, PID {int(info['pid'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown"
