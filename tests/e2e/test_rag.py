"""`tracetune demo --pipeline rag` as a user runs it: every process for real, the retrieval-augmented
pipeline under its daily load with bursts, a final per-step table, a clean stop."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import make_settings
from tests.e2e.test_demo import _env, _listening, _ports


def test_demo_runs_the_rag_pipeline_on_real_processes(tmp_path, models_dir):
    settings = make_settings(tmp_path / "home")
    shutil.copytree(models_dir, settings.models_dir)
    out = subprocess.run([sys.executable, "-m", "tracetune", "demo", "--pipeline", "rag", "--duration", "45",
                          "--rate", "3"], env=_env(settings), cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on pipeline rag_answering" in out.stdout
    table = out.stdout.split("per-step latency")[-1]
    counts = {}
    for step in ("normalize", "embed", "retrieve", "rerank", "generate"):
        line = next(line for line in table.splitlines() if f" {step} " in line)
        cells = [c.strip() for c in line.split("│") if c.strip()]
        counts[step] = int(cells[2].replace(",", ""))
        p50, p95, p99 = float(cells[4]), float(cells[5]), float(cells[6])
        assert p99 >= p95 >= p50 > 0, line
    assert counts["normalize"] > 40 and counts["rerank"] > 40, counts
    assert 0 < counts["generate"] <= counts["rerank"], counts  # the LLM is asked only when unsure
    assert "ticket_triage" not in table
    assert (settings.models_dir / "rag-index.npz").is_file()
    assert "stopped every process" in out.stdout
    assert not any(_listening(p) for p in _ports(settings))
