"""Arrow conversion of the writer's batches in a child process, so receiving and converting use two cores.

The receive path (HTTP, protobuf parse, the log's fsync) and the conversion of a batch to Arrow
(columns.to_arrow: ptars, numpy, Arrow compute) are both Python: in one process they take turns holding
the GIL, and each time one releases it (a syscall, an Arrow kernel) it waits for the other to give it
back. Here a child process runs the same conversion (writer's `_to_arrow_in_chunks`): the parent writes
a batch's request bodies into a file of a private folder on a memory file system, the child converts them
and writes the table beside it as the Arrow IPC file an insert sends, which the parent sends as it is
(writer.ArrowFile; read back into a table only to split a part the store refused).

Nothing about durability changes: the child sees only copies of bodies that are already in the log, and
the table it returns is what the same function gives in process. When the child cannot be started, dies,
answers wrongly or takes longer than `timeout`, that batch is converted in process (as without a child)
and a new child is started for the next one.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa

from tracetune.collector.rows import COLUMNS
from tracetune.collector.writer import ArrowFile, _to_arrow_in_chunks

log = logging.getLogger("tracetune.collector")

_MEMORY_DIRS = ("/dev/shm",)  # a tmpfs: the files never reach a disk
_MEMORY_DIR_MIN_FREE = 1 << 30  # a smaller one (a container's 64 MiB /dev/shm) could not hold a large batch
_LOG_EVERY_SECONDS = 60.0  # the same failure is logged once a minute, not once a batch
_IOV_MAX = 512  # bodies per writev call (the system's limit is at least 1024)
# As clickhouse-connect's insert_arrow writes an insert's body (LZ4-compressed buffers): a quarter of the size
# in memory, and the store decodes it as it decodes every Arrow insert.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4") else None)


_PREFIX = "tracetune-convert-"


def _remove_stale(root: Path) -> None:
    """Folders of collectors that were killed before they could remove theirs (a memory file system keeps
    them until the machine restarts)."""
    for folder in root.glob(f"{_PREFIX}*-*"):
        pid = folder.name[len(_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or folder.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def _scratch_root() -> str | None:
    """A memory file system to hold the files, else the system's temporary folder."""
    for path in _MEMORY_DIRS:
        try:
            free = os.statvfs(path)
        except OSError:
            continue
        if os.access(path, os.W_OK | os.X_OK) and free.f_bavail * free.f_frsize >= _MEMORY_DIR_MIN_FREE:
            return path
    return None


class ConversionProcess:
    """A child process converting batches of request bodies to one otel_traces Arrow table each.

    `convert` is called by one thread at a time (the writer's converter); the child is started on first use
    and again after it failed.
    """

    RESTART_SECONDS = 5.0  # a child that failed to start or died: the next one is started this much later

    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout
        root = _scratch_root()
        _remove_stale(Path(root or tempfile.gettempdir()))
        self._directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))  # mode 0700
        self._proc: subprocess.Popen | None = None
        self._ready = False  # the child said it has imported what it needs
        self._lock = threading.Lock()
        self._seq = 0
        self._next_start = 0.0  # after a failed start, the next attempt waits (batches convert in process)
        self.fallbacks = 0  # batches converted in process because the child failed
        self._logged: tuple[str, float] = ("", 0.0)

    def convert(self, bodies: list[bytes], spans: list[int]) -> ArrowFile | pa.Table | None:
        """writer._to_arrow_in_chunks(bodies, spans), by the child as the Arrow IPC file an insert sends when
        it can, else in process."""
        with self._lock:
            try:
                return self._remote(bodies, spans)
            except Exception as exc:  # noqa: BLE001 - _ChildFailed, or anything unforeseen: convert in process
                self.fallbacks += 1
                self._warn(f"the conversion process failed ({exc}); converting this batch in process")
                self._stop_child()
            return _to_arrow_in_chunks(bodies, spans)

    def start(self, wait: float = 0.0) -> bool:
        """Start the child now and wait up to `wait` s until it is ready (its imports take a second or
        two), so the first batch does not wait for them; False if it is not ready (batches then retry it)."""
        with self._lock:
            try:
                proc = self._child()
                if wait:
                    self._await_ready(proc, wait)
                return True
            except _ChildFailed as exc:
                log.warning("the conversion process is not ready (%s); batches are converted in process until "
                            "it is", exc)
                return False

    def _warn(self, message: str) -> None:
        last, at = self._logged
        if message != last or time.monotonic() - at >= _LOG_EVERY_SECONDS:
            self._logged = (message, time.monotonic())
            log.warning("%s", message)

    def close(self) -> None:
        """Stop the child and remove the folder."""
        with self._lock:
            self._stop_child()
            shutil.rmtree(self._directory, ignore_errors=True)

    # ---- parent side --------------------------------------------------------------------------
    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop_child()  # it exited: close its pipes
        if time.monotonic() < self._next_start:
            raise _ChildFailed("not restarted yet")
        self._next_start = time.monotonic() + self.RESTART_SECONDS
        try:
            # A child leaving on its closed stdin removes the folder (as when the collector dies): a new one
            # after a failed batch needs it back, or every later batch would be converted in process.
            self._directory.mkdir(mode=0o700, exist_ok=True)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tracetune.collector.converter", str(self._directory)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise _ChildFailed(f"cannot start it: {exc}") from None
        return self._proc

    def _await_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        if not self._ready:
            answer = self._answer(proc, timeout)
            if answer.get("status") != "ready":
                raise _ChildFailed(f"it did not start: {answer}")
            self._ready = True

    def _remote(self, bodies: list[bytes], spans: list[int]) -> ArrowFile | None:
        proc = self._child()
        self._await_ready(proc, self.timeout)
        self._seq += 1
        source = self._directory / f"{self._seq}.bodies"
        target = self._directory / f"{self._seq}.arrow"
        try:
            fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for start in range(0, len(bodies), _IOV_MAX):
                    chunk = bodies[start:start + _IOV_MAX]
                    if os.writev(fd, chunk) != sum(map(len, chunk)):
                        raise OSError("short write")
            finally:
                os.close(fd)
            request = {"bodies": source.name, "lengths": [len(b) for b in bodies], "spans": spans,
                       "table": target.name}
            answer = self._ask(proc, request)
            if answer.get("status") == "none":
                return None  # a batch for the reference converter, as in process
            if answer.get("status") != "ok":
                raise _ChildFailed(str(answer.get("message", answer))[:300])
            body = target.read_bytes()
            if pa.ipc.open_file(pa.py_buffer(body)).schema.names != COLUMNS:  # its footer and schema are whole
                raise _ChildFailed("a table with other columns")
            return ArrowFile(body, int(answer["rows"]))
        except OSError as exc:  # the scratch folder is full or gone: convert in process
            raise _ChildFailed(f"scratch files in {self._directory}: {exc}") from None
        except pa.ArrowInvalid as exc:
            raise _ChildFailed(f"its table cannot be read: {exc}") from None
        finally:
            for path in (source, target):
                path.unlink(missing_ok=True)

    def _ask(self, proc: subprocess.Popen, request: dict) -> dict:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise _ChildFailed(f"it does not take requests: {exc}") from None
        return self._answer(proc, self.timeout)

    def _answer(self, proc: subprocess.Popen, timeout: float) -> dict:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            raise _ChildFailed(f"no answer within {timeout:g} s")
        line = proc.stdout.readline()
        if not line:
            raise _ChildFailed(f"it exited ({proc.poll()})")
        try:
            return json.loads(line)
        except ValueError:
            raise _ChildFailed(f"an answer that is not JSON: {line[:100]!r}") from None

    def _stop_child(self) -> None:
        proc, self._proc, self._ready = self._proc, None, False
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(2.0)  # its stdin closed: it exits
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _ChildFailed(Exception):
    """The child gave no usable answer for this batch."""


# ---- child side ---------------------------------------------------------------------------------
def _serve(directory: Path) -> None:
    """Answer one JSON line per JSON line on stdin until it closes (the parent stopped or died).

    SIGINT and SIGTERM sent to the collector's process group are the parent's to handle: it may still
    be writing what is queued, with this process's help."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.stdout.buffer.write(b'{"status": "ready"}\n')
    sys.stdout.buffer.flush()

    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            source = directory / request["bodies"]
            data = source.read_bytes()
            source.unlink()  # its memory back now
            bodies, at = [], 0
            for length in request["lengths"]:
                bodies.append(data[at:at + length])
                at += length
            del data  # the bodies are copies: the joined file's bytes are not needed during the conversion
            table = _to_arrow_in_chunks(bodies, request["spans"])
            if table is None:
                answer = {"status": "none"}
            else:
                with pa.OSFile(str(directory / request["table"]), "wb") as sink, \
                        pa.ipc.new_file(sink, table.schema, options=_WRITE_OPTIONS) as writer:
                    writer.write_table(table)
                answer = {"status": "ok", "rows": table.num_rows}
        except Exception as exc:  # noqa: BLE001 - the parent converts this batch itself
            answer = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        sys.stdout.buffer.write(json.dumps(answer).encode() + b"\n")
        sys.stdout.buffer.flush()
    shutil.rmtree(directory, ignore_errors=True)  # the parent closed stdin or died: nothing here is wanted


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
