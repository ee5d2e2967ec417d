"""The house's rules: which room may import which (pyproject.toml's import-linter contracts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return exe


def test_the_import_contracts_hold():
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_broken_rule_is_caught(tmp_path):
    """The contracts are live: a copy of the package where model/ imports lora/ breaks one."""
    copy = tmp_path / "minilora"
    shutil.copytree(ROOT / "minilora", copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (copy / "model" / "decoder.py").write_text(
        (copy / "model" / "decoder.py").read_text() + "\nfrom minilora.lora import layer  # noqa\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert proc.returncode != 0
    assert "minilora.model.decoder -> minilora.lora.layer" in proc.stdout
