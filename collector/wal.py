"""The collector's write-ahead log: an acknowledged request is on disk (fsynced) before the 200.

Records are length-prefixed and CRC-checked, numbered by a log sequence number (LSN) that never
repeats in a directory, and appended to segment files that are deleted once every record in them is
in ClickHouse. Concurrent appends share one fsync (group commit). A small checkpoint file holds the
last LSN known to be written and the batch in flight (its LSN range, so that a restart re-sends the
same batch with the same deduplication token and ClickHouse drops it if it had landed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tracetune.collector")

_HEADER = struct.Struct("<IQI")  # payload length, LSN, CRC-32 of the payload
_PREFIX = "wal-"
_SUFFIX = ".log"


class WalError(Exception):
    """The log cannot take a record (disk full, directory in use): the request must not be acknowledged."""


@dataclass(frozen=True)
class Intent:
    """A batch about to be inserted: records first..last."""

    first: int
    last: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """Segments of records under `directory`; one process at a time (an flock guards it)."""

    def __init__(self, directory: Path, max_bytes: int = 512 << 20, segment_bytes: int = 32 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise WalError(f"{self.directory} is in use by another collector; give each collector its own "
                           "home (TRACETUNE_HOME)") from None
        self._lock = threading.Lock()  # appends
        self._sync_lock = threading.Lock()  # fsync and rotation
        checkpoint = self._read_checkpoint()
        self.wal_id: str = checkpoint.get("wal_id") or uuid.uuid4().hex[:16]
        self.done_lsn: int = int(checkpoint.get("done", 0))
        raw = checkpoint.get("intent")
        self.intent: Intent | None = Intent(*raw) if raw else None
        self._pending: deque[tuple[int, int]] = deque()  # (lsn, bytes) not yet in ClickHouse
        self.pending_bytes = 0
        self._segments: list[tuple[int, Path]] = []  # (first lsn, path), oldest first
        last = self._recover()
        self._next_lsn = max(last, self.done_lsn) + 1
        self.synced_lsn = self._next_lsn - 1
        self._fd = -1
        self._segment_size = 0
        self._open_segment()
        self._write_checkpoint()

    # ---- appending ---------------------------------------------------------------------------
    def append(self, payload: bytes, on_written: Callable[[int], None] | None = None) -> int:
        """Write one record and return its LSN once it is fsynced; WalError if it cannot be.

        `on_written(lsn)` runs right after the write, under the append lock, so callers see LSN order.
        """
        record_size = _HEADER.size + len(payload)
        if self._segment_size >= self.segment_bytes:
            with self._sync_lock, self._lock:  # no fsync may hold the descriptor rotation closes
                if self._fd >= 0 and self._segment_size >= self.segment_bytes:
                    self._rotate()
        with self._lock:
            if self._fd < 0:
                raise WalError("the write-ahead log is closed")
            lsn = self._next_lsn
            data = _HEADER.pack(len(payload), lsn, zlib.crc32(payload)) + payload
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(f"short write ({written} of {len(data)} bytes)")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._segment_size)  # no torn record before the next one
                raise WalError(f"cannot write the write-ahead log in {self.directory}: {exc}") from None
            self._next_lsn += 1
            self._segment_size += len(data)
            self._pending.append((lsn, record_size))
            self.pending_bytes += record_size
            if on_written is not None:
                on_written(lsn)
        self._sync(lsn)
        return lsn

    def _sync(self, lsn: int) -> None:
        with self._sync_lock:
            if self.synced_lsn >= lsn:
                return  # another thread's fsync covered this record
            with self._lock:
                target, fd = self._next_lsn - 1, self._fd
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise WalError(f"cannot fsync the write-ahead log in {self.directory}: {exc}") from None
            self.synced_lsn = target

    def _rotate(self) -> None:
        """Called with _sync_lock and _lock held: fsync and close the current segment, open the next."""
        os.fdatasync(self._fd)
        os.close(self._fd)
        self.synced_lsn = self._next_lsn - 1
        self._open_segment()

    def _open_segment(self) -> None:
        path = self.directory / f"{_PREFIX}{self._next_lsn:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_size = os.fstat(self._fd).st_size
        if not self._segments or self._segments[-1][1] != path:
            self._segments.append((self._next_lsn, path))
        _fsync_dir(self.directory)

    @property
    def full(self) -> bool:
        return self.pending_bytes >= self.max_bytes

    # ---- recovery ------------------------------------------------------------------------------
    def _recover(self) -> int:
        """Index existing segments, cut any torn tail, count pending records; the last LSN seen."""
        last = 0
        for path in sorted(self.directory.glob(f"{_PREFIX}*{_SUFFIX}")):
            self._segments.append((int(path.name[len(_PREFIX):-len(_SUFFIX)]), path))
            offset = 0
            for lsn, _, end in self._scan(path):
                last = max(last, lsn)
                if lsn > self.done_lsn:
                    self._pending.append((lsn, end - offset))
                    self.pending_bytes += end - offset
                offset = end
            if offset < path.stat().st_size:
                log.warning("write-ahead log %s: cut a torn record at byte %d (never acknowledged)", path, offset)
                with open(path, "r+b") as handle:
                    handle.truncate(offset)
                    os.fsync(handle.fileno())
        return last

    @staticmethod
    def _scan(path: Path) -> Iterator[tuple[int, bytes, int]]:
        """(lsn, payload, end offset) of each intact record of a segment, stopping at the first bad one."""
        with open(path, "rb") as handle:
            data = handle.read()
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, lsn, crc = _HEADER.unpack_from(data, offset)
            start, end = offset + _HEADER.size, offset + _HEADER.size + length
            if end > len(data) or zlib.crc32(data[start:end]) != crc:
                return
            yield lsn, data[start:end], end
            offset = end

    def replay(self) -> Iterator[tuple[int, bytes]]:
        """(lsn, payload) of every record not yet in ClickHouse, in LSN order."""
        for _, path in list(self._segments):
            if not path.exists():
                continue
            for lsn, payload, _ in self._scan(path):
                if lsn > self.done_lsn:
                    yield lsn, payload

    # ---- checkpoint ------------------------------------------------------------------------------
    def _read_checkpoint(self) -> dict:
        path = self.directory / "checkpoint.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            raise WalError(f"{path} is unreadable ({exc}); move it away to replay the whole log") from None

    def _write_checkpoint(self) -> None:
        path = self.directory / "checkpoint.json"
        tmp = path.with_suffix(".tmp")
        intent = self.intent
        body = {"wal_id": self.wal_id, "done": self.done_lsn,
                "intent": [intent.first, intent.last] if intent else None}
        with open(tmp, "w") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def begin(self, intent: Intent) -> None:
        """Record durably which records the next insert carries, before it is sent."""
        self.intent = intent
        self._write_checkpoint()

    def commit(self, last: int) -> None:
        """Records up to `last` are in ClickHouse: forget them and delete finished segments."""
        with self._lock:
            self.done_lsn = max(self.done_lsn, last)
            self.intent = None
            while self._pending and self._pending[0][0] <= last:
                self.pending_bytes -= self._pending.popleft()[1]
            finished = [seg for i, seg in enumerate(self._segments[:-1]) if self._segments[i + 1][0] - 1 <= last]
            self._segments = [seg for seg in self._segments if seg not in finished]
        for _, path in finished:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._write_checkpoint()

    def token(self, first: int, last: int) -> str:
        """The insert deduplication token of the batch first..last (unique to this log)."""
        return f"{self.wal_id}:{first}-{last}"

    def close(self) -> None:
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
