"""Writing files so that a crash or a full disk never leaves half of one, and reading torch's
refusals in one line. Standard library and torch only: every other module may import it.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

Writer = Callable[[IO[bytes]], object]


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer) -> None:
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


def _umask() -> int:
    # The only way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
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
    return f"{type(err).__name__}: {' '.join((found[1] if found else text).split())}"
