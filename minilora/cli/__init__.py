"""The command line: one file per command, `main` the one place errors become one line.

Torch-free at import, so `minilora --help` and a bad flag answer at once.
"""

from minilora.cli.common import ASSETS, BASE_MODEL
from minilora.cli.main import main

__all__ = ["ASSETS", "BASE_MODEL", "main"]
