"""bench/tuner.py --frontier and --slo, run as a user runs them: the script in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "tuner.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_frontier_writes_every_config_the_search_ran_against_the_objectives_given(tmp_path):
    out = tmp_path / "frontier.json"
    done = _bench("--pipelines", "rag_answering", "--real-load", "--minutes", "10", "--evaluations", "10",
                  "--slo", "p95_ms=2500,quality_floor=0.85", "--frontier", str(out), "--out", str(tmp_path / "o"),
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(out.read_text())["rag_answering"]
    # The override replaces only what it names; the rest stays as declared.
    assert found["slo"]["p95_ms"] == 2500 and found["slo"]["quality_floor"] == 0.85
    assert found["slo"]["p99_ms"] == 4000
    runs = found["runs"]
    # 10 minutes leave no room for a shorter screening run: the 10 evaluations are the full runs.
    assert len(runs) == 10 and not any(r["screened"] for r in runs) and runs[0]["config"] == {}
    for run in runs:
        assert 0 < run["quality_lb"] < run["quality_after"] <= 1
        assert run["windows"] and all(w["p95_ms"] <= w["p99_ms"] for w in run["windows"])
        judged = [w for w in run["windows"] if w["minute"] >= 5]
        inside = sum(w["p95_ms"] <= 2500 and w["p99_ms"] <= 4000 for w in judged) / len(judged)
        assert run["slo_windows"] == inside  # counted against the objectives given, not the declared ones
        assert run["feasible"] == (inside >= 0.99 and run["quality_lb"] >= 0.85)
    assert found["best"]["config"] in [r["config"] for r in runs]
    assert (tmp_path / "frontier-rag_answering.png").stat().st_size > 0
    assert not (tmp_path / "o" / "tuner-sim.json").exists()  # the search alone: no arms were run


def test_a_bad_objective_is_one_line_and_exit_code_2(tmp_path):
    for bad, said in (("p95=1", "KEY one of"), ("p95_ms=fast", "must be a number"), ("quality_floor=-1", "above 0")):
        done = _bench("--pipelines", "rag_answering", "--slo", bad, "--frontier", str(tmp_path / "f.json"),
                      cwd=tmp_path)
        assert done.returncode == 2 and said in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    done = _bench("--pipelines", "rag_answering", "--frontier", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "give a file" in done.stderr
