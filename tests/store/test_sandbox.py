"""The store's Landlock confinement, tested with the allow-lists out of the way.

A child process applies the same `confine()` the store applies and then asks chDB directly (no
allow-list in between) to read and write host files and to reach a local listener: each must fail
with EACCES / a refused connection, while the data folder keeps working.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from tracetune.store import sandbox

pytestmark = pytest.mark.skipif(sandbox.abi() < 4, reason="needs Landlock with network rules (ABI 4, Linux 6.7)")

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tracetune.store.sandbox import confine
    data, secret, written, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    confined = confine(Path(data), 0)
    import chdb  # after confine: chDB starts its threads on import
    conn = chdb.connect(data)
    out = {"abi": confined.abi}
    def run(name, sql):
        try:
            out[name] = "ok:" + conn.query(sql, "TSV").bytes().decode()
        except Exception as exc:
            out[name] = "error:" + str(exc).splitlines()[0]
    run("create", "CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a")
    run("insert", "INSERT INTO t VALUES (7)")
    run("merge", "OPTIMIZE TABLE t FINAL")
    run("select", "SELECT sum(a) FROM t")
    run("read_secret", f"SELECT * FROM file('{secret}', 'LineAsString')")
    run("read_passwd", "SELECT * FROM file('/etc/passwd', 'LineAsString') LIMIT 1")
    run("write_file", f"INSERT INTO FUNCTION file('{written}', 'LineAsString') SELECT 'pwned'")
    run("url", f"SELECT * FROM url('http://127.0.0.1:{port}/', 'LineAsString', 'l String') "
               "SETTINGS http_max_tries = 1, max_execution_time = 10")
    try:
        open(secret).read()
        out["python_read"] = "ok"
    except OSError as exc:
        out["python_read"] = f"errno:{exc.errno}"
    print(json.dumps(out))
""")


def test_the_engine_in_a_confined_process_reaches_only_its_data_folder(tmp_path):
    secret = tmp_path / "secret.token"
    secret.write_text("the secret\n")
    written = tmp_path / "written.txt"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    connections: list[tuple] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(listener.accept()[1])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "data"), str(secret), str(written),
                                str(listener.getsockname()[1])], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    # The data folder works: tables are created, written, merged and read.
    assert out["select"] == "ok:7\n", out
    # Host files: EACCES from the kernel, whatever the engine was asked.
    for name in ("read_secret", "read_passwd", "write_file"):
        assert out[name].startswith("error:") and "Permission denied" in out[name], (name, out[name])
    assert out["python_read"] == "errno:13"
    assert not written.exists()
    # Network: the connect is refused by the kernel; the listener saw nobody.
    assert out["url"].startswith("error:") and "Permission denied" in out["url"], out["url"]
    assert connections == []


def test_a_kernel_without_landlock_is_fatal_only_when_required(tmp_path):
    """Where Landlock is missing: one warning line and the store runs, or with the setting, exit 2 in one line."""
    script = ("import sys; from tracetune.store import sandbox; sandbox.abi = lambda: 0; "
              "sys.argv = ['tracetune', 'store']; import runpy; runpy.run_module('tracetune', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    env.update({"TRACETUNE_HOME": str(tmp_path / "home"), "TRACETUNE_STORE_PORT": "1",
                "TRACETUNE_STORE_REQUIRE_SANDBOX": "true"})
    required = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
    assert required.returncode == 2, required.stderr
    lines = [line for line in required.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "store_require_sandbox" in lines[0] and "Landlock" in lines[0], required.stderr
