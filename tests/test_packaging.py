"""The built wheel holds the whole package and runs from where it is installed.

The wheel is built from a copy of the source tree (so a stale build/ folder in the checkout can
neither hide a missing file nor add a removed one), installed with `pip install --target` into a
folder of its own, and run from outside the checkout with only that folder on the path. Torch and
the other dependencies come from the running interpreter: installing them into a fresh venv would
take minutes, and what this test checks is the wheel, not them.

Deselect with `-m "not packaging"` (it builds a wheel: about 15 s on two busy cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"

pytestmark = pytest.mark.packaging


def _package_files() -> set[str]:
    """What the wheel must hold: every module of the package and every asset, as wheel names."""
    names = set()
    for path in PACKAGE.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        if path.suffix == ".py" or rel.parts[1] == "assets":
            names.add(rel.as_posix())
    return names


def _pip(*args: str, cwd: Path) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copytree(PACKAGE, src / "minilora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir",
         str(tmp / "dist"), str(src), cwd=tmp)
    (built,) = (tmp / "dist").glob("minilora-*.whl")
    return built


def test_the_wheel_holds_every_module_and_asset_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    in_package = {n for n in names if n.startswith("minilora/")}
    expected = _package_files()
    assert len(expected) > 70  # the walk itself found the package
    assert sorted(expected - in_package) == []  # missing from the wheel
    assert sorted(in_package - expected) == []  # in the wheel but not in the source tree
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages >= {"core", "model", "lora", "adapters", "data", "training", "decoding",
                           "serve", "cli"}
    assert "minilora = minilora.cli:main" in scripts


def test_the_installed_wheel_trains_from_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    work = tmp_path / "work"  # outside the checkout: nothing of it is on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)

    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    probe = ("import importlib, minilora\n"
             f"for name in {subpackages!r}:\n"
             "    print(importlib.import_module('minilora.' + name).__file__)\n"
             "print(minilora.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [Path(line) for line in proc.stdout.splitlines()]
    assert len(files) == len(subpackages) + 1
    for file in files:
        assert file.is_relative_to(site), f"{file} was imported, not the installed wheel's"

    # The entry point pip wrote, on the wheel's own embedded model and demo data.
    minilora = site / "bin" / "minilora"
    data = site / "minilora" / "assets" / "persona.jsonl"
    out = work / "run"
    proc = subprocess.run([sys.executable, str(minilora), "train", "--max-steps", "2",
                           "--batch-size", "2", "--data", str(data), "--out", str(out)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "config.json").is_file()
