"""The supervisor's children stop when it dies, however it dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.servers import wait_until

ROOT = Path(__file__).resolve().parents[2]

SUPERVISE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tests.conftest import make_settings
    from tracetune.supervisor import Supervisor, components

    settings = make_settings(Path(sys.argv[1]))
    parts = [p for p in components(settings, 0, with_dashboard=False) if p.name in ("store", "tuner")]
    Supervisor(settings, parts, echo=lambda *_: None).start()
    print(json.dumps({"pids": [p.proc.pid for p in parts], "port": settings.store_port}), flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_children_stop_when_the_supervisor_is_killed(tmp_path):
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISE, str(tmp_path)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")})
    try:
        started = json.loads(supervisor.stdout.readline())
        pids = started["pids"]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        supervisor.send_signal(signal.SIGKILL)  # no handler, no cleanup: only the kernel can tell them
        supervisor.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in pids), 30, 0.1, "the children to stop")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
