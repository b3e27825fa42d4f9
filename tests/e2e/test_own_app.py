"""The README's "Send spans from an app you already have", run as written against real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.servers import wait_until
from tracetune import store
from tracetune.base.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def _tracetune(args: list[str], settings: Settings) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    result = subprocess.run([sys.executable, "-m", "tracetune", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_an_opentelemetry_app_gets_steps_and_token_cost(collector: Settings, tmp_path):
    section = _section("Send spans from an app you already have")
    (app,) = _blocks(section, "python")
    assert len(app.splitlines()) <= 30
    (shell,) = _blocks(section, "bash")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACETUNE_"))}
    for name, value in re.findall(r"^export (OTEL_\w+)=(.*)$", shell, re.MULTILINE):  # the README's variables
        env[name] = value.strip('"').replace("$(cat .tracetune/collector.token)", collector.secret("collector")) \
            .replace("127.0.0.1:4318", f"127.0.0.1:{collector.collector_port}")
    assert {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS"} <= set(env)
    (tmp_path / "app.py").write_text(app)
    sent = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert sent.returncode == 0, sent.stderr

    client = store.connect(collector, ensure_schema=False)
    wait_until(lambda: client.query("SELECT count() FROM otel_traces WHERE ServiceName = 'support-bot'")
               .first_row[0] == 9, 30, 0.2, "the app's 9 spans")

    stats = json.loads(_tracetune(["stats", "--pipeline", "support_bot", "--since", "15m", "--source", "raw",
                                   "--json"], collector))
    assert {(row["pipeline"], row["step"], row["requests"]) for row in stats} == {
        ("support_bot", "(end to end)", 3), ("support_bot", "retrieve", 3), ("support_bot", "generate", 3)}

    cost = json.loads(_tracetune(["cost", "--pipeline", "support_bot", "--since", "15m", "--source", "raw",
                                  "--by", "step", "--json"], collector))
    generate = next(row for row in cost if row["step"] == "generate")
    assert (generate["input_tokens"], generate["output_tokens"]) == (3 * 420, 3 * 80)
    assert generate["token_cost"] > 0  # gpt-4o-mini is in the bundled price table
