"""The wheel on its own: built from this tree, installed outside it, `tracetune` the only import name.

The wheel goes into a fresh virtual environment in a temporary folder with `--no-deps`; the
dependencies are taken from the environment running the tests (a path in a .pth file), so nothing
of this repository can be imported there except what the wheel holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.e2e.test_demo import check_demo_run
from tests.servers import stop_process

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the wheel (its dependencies reached through a .pth file): its bin folder."""
    where = tmp_path_factory.mktemp("wheel")
    source = where / "source"  # a copy, so the build leaves nothing in the working tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".tracetune", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(where / "dist"),
                    str(source)], check=True, capture_output=True)
    wheel = next((where / "dist").glob("tracetune-*.whl"))
    venv.EnvBuilder(with_pip=False).create(where / "venv")
    python = where / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True, capture_output=True)
    return where / "venv" / "bin"


def _run(bin_dir: Path, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRACETUNE_", "PYTHONPATH"))}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_the_wheel_installs_one_import_name_with_its_data(installed, tmp_path):
    probe = """
import importlib.metadata as m, json, tracetune, tracetune.store, tracetune.analyzer.prices as p
files = m.files("tracetune")
tops = sorted({f.parts[0] for f in files if f.suffix == ".py" or f.name == "__init__.py"})
print(json.dumps({"tops": tops, "version": m.version("tracetune"), "module": tracetune.__file__,
                  "sql": len(tracetune.store.schema_statements()), "prices": p.load().version}))
"""
    out = _run(installed, ["python", "-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["tops"] == ["tracetune"]
    assert str(installed.parent) in found["module"] and str(ROOT) not in found["module"]
    assert found["sql"] > 10 and found["prices"]
    import tracetune
    assert found["version"] == tracetune.__version__  # one version source

    assert _run(installed, ["python", "-c", "import store"], tmp_path).returncode != 0  # no bare names
    help_text = _run(installed, ["tracetune", "--help"], tmp_path)
    assert help_text.returncode == 0 and "Usage" in help_text.stdout


def test_the_installed_store_and_cost_report_work_outside_the_repository(installed, tmp_path):
    settings = make_settings(tmp_path / "home")
    env = settings.as_env()
    log = (tmp_path / "store.log").open("wb")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRACETUNE_", "PYTHONPATH"))}
    store = subprocess.Popen([str(installed / "tracetune"), "store"], cwd=tmp_path, env={**clean, **env}, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        from tracetune import store as store_mod

        store_mod.wait_ready(settings, 60)
        out = _run(installed, ["tracetune", "cost", "--json", "--since", "1h"], tmp_path, env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == []  # no spans yet, but the schema and the bundled prices were found
    finally:
        stop_process(store)


def test_the_installed_demo_builds_its_models_and_runs_the_whole_loop(installed, tmp_path, models_dir):
    """`tracetune models build` and `tracetune demo --duration 20` from the wheel alone: the demo
    pipeline, its stand-ins, the dashboard and the SQL all come from the installed package."""

    settings = make_settings(tmp_path / "home", load_rate=10)
    shutil.copytree(models_dir, settings.models_dir)  # built once per session; the command checks and reuses
    env = settings.as_env()
    built = _run(installed, ["tracetune", "models", "build"], tmp_path, env)
    assert built.returncode == 0, built.stderr
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRACETUNE_", "PYTHONPATH"))}
    demo = subprocess.run([str(installed / "tracetune"), "demo", "--duration", "20"], cwd=tmp_path,
                          env={**clean, **env, "COLUMNS": "120"}, capture_output=True, text=True, timeout=300)
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((settings.home / "logs").glob("*.log")))
    assert demo.returncode == 0, f"{demo.stdout[-2000:]}\n{demo.stderr[-2000:]}\n{logs}"
    check_demo_run(demo, settings)
