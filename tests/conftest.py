"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the matrices are tiny, so a second thread only adds waiting, and on the shared two cores a
    busy neighbour makes it ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok():
    """The tiny BPE tokenizer of helpers.tiny_tokenizer, trained once (tests only read it)."""
    return tiny_tokenizer()
