"""Stop sequences: how much of an answer's end must wait before it is shown.

``generate`` (stop sequences as token ids) and the server (stop strings on the decoded text)
both hold back the end of what they have that could still begin a stop, and show it once the
next token tells. One function serves both: it works on any sequence (a list of token ids, a
string). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def held_back(pending: Sequence[Any], stops: Sequence[Sequence[Any]]) -> int:
    """Length of the longest suffix of ``pending`` that is a proper prefix of a stop sequence
    (kept back until the following tokens show whether the stop follows).

    Args:
        pending: what is not shown yet (token ids, or text).
        stops: the stop sequences, of the same kind as ``pending``.

    Returns:
        0 when no end of ``pending`` could begin a stop.
    """
    for n in range(min(len(pending), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = pending[-n:]
        if any(len(s) > n and s[:n] == tail for s in stops):
            return n
    return 0
