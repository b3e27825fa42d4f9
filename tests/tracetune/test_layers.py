"""The import layers in pyproject.toml's import-linter contract hold.

import-linter reads a package from one folder, while the components live in their own folders at
the repository root (mapped in pyproject.toml); so the check runs on a tree of symbolic links laid
out as the wheel lays them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("store", "collector", "executor", "analyzer", "tuner", "dashboard", "demo")


def _package_tree(where: Path) -> Path:
    package = where / "tracetune"
    package.mkdir(parents=True)
    for entry in (ROOT / "tracetune").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in COMPONENTS:
        (package / name).symlink_to(ROOT / name)
    return where


def _lint_imports(tree: Path, config: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(script), "--config", str(config), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_layers_hold(tmp_path):
    result = _lint_imports(_package_tree(tmp_path), ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_them(tmp_path):
    """The contract can fail: the store importing the CLI is reported."""
    tree = _package_tree(tmp_path / "tree")
    store = tree / "tracetune" / "store"
    store.unlink()
    store.mkdir()
    for entry in (ROOT / "store").iterdir():
        (store / entry.name).symlink_to(entry)
    (store / "upward.py").write_text("from tracetune import cli\n")
    result = _lint_imports(tree, ROOT / "pyproject.toml")
    assert result.returncode != 0
    assert "tracetune.store.upward -> tracetune.cli" in result.stdout
