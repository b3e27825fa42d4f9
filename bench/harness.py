"""What the benchmarks share to run real processes: free ports and a clean stop."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def isolated_settings(home, **overrides):
    """Settings on free ports under `home`, ignoring any tracetune.toml or TRACETUNE_* of the caller."""
    from tracetune import settings

    ports = {name: free_port() for name in ("store_port", "collector_port", "collector_grpc_port", "tuner_port",
                                            "executor_port", "dashboard_port", "llm_port", "crm_port")}
    return settings.load(config_file=home / "none.toml", environ={}, home=str(home), **ports, **overrides)
