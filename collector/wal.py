"""The collector's write-ahead log: an acknowledged request is on disk (fsynced) before the 200.

A record is framed so that it survives its neighbours: a magic number, a header with its own CRC
(payload length, span count, log sequence number, running span total) and a CRC of the payload. Recovery
reads every record it can; at a damaged one it scans forward to the next valid header and reports the
damage by position, LSN range and span count (the running total of the records on either side says how
many spans were lost) instead of dropping what follows. A segment with damage is moved to `damaged/`
once its good records are in ClickHouse, never deleted.

Appends are written, then fsynced together (group commit); a record is handed on (`on_durable`) only
after its fsync succeeded, in LSN order. A failed write or fsync refuses every record it covered and
cuts them from the file, so nothing refused is ever inserted. Segments are small and the active one is
closed as soon as everything in it is in ClickHouse, so the space comes back without waiting for a full
segment.

The checkpoint (`checkpoint`: last LSN in ClickHouse, and the batch in flight so a restart re-sends the
same batch with the same deduplication token) is two fixed 4 KiB slots overwritten in turn, each with a
sequence number and a CRC: updating it needs no rename and no new disk space, and a torn update leaves
the other slot. Every file created or renamed is followed by an fsync of its directory.

File operations go through `FileOps`, so a test can record them and replay every crash state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tracetune.collector")

MAGIC = b"TTw1"
_HEAD = struct.Struct("<4sIIQQI")  # magic, payload length, spans, LSN, spans so far in this log, payload CRC-32
_HEAD_CRC = struct.Struct("<I")  # CRC-32 of the fields above
HEADER_SIZE = _HEAD.size + _HEAD_CRC.size
MAX_RECORD_BYTES = 1 << 30
_PREFIX, _SUFFIX = "seg-", ".wal"
_LEGACY_PREFIX, _LEGACY_SUFFIX = "wal-", ".log"  # earlier releases: <length, LSN, CRC> headers, no resync
_LEGACY_HEAD = struct.Struct("<IQI")
_CHECKPOINT, _LEGACY_CHECKPOINT = "checkpoint", "checkpoint.json"
_SLOT = 4096
_SLOT_HEAD = struct.Struct("<4sQII")  # magic, sequence, body length, body CRC-32
_SLOT_MAGIC = b"TTcp"
DAMAGED_DIR = "damaged"
SEGMENT_BYTES = 8 << 20
_EAGER_ROTATE_BYTES = 256 << 10  # a fully written-out segment at least this big is closed and deleted at once


class WalError(Exception):
    """The log cannot take a record (disk full, I/O error, directory in use): the request must not be acknowledged."""


@dataclass(frozen=True)
class Intent:
    """A batch about to be inserted: records first..last."""

    first: int
    last: int


@dataclass(frozen=True)
class Location:
    """Where a record lies: segment file, byte offset of its header, bytes including the header."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class Record:
    """One intact record of a segment."""

    lsn: int
    spans: int
    total: int  # spans in this log up to and including this record; -1 when unknown (legacy segments)
    payload: bytes
    location: Location


@dataclass(frozen=True)
class Damage:
    """Bytes of a segment that are no record: where, which LSNs they held and how many spans (None: unknown)."""

    path: Path
    start: int
    end: int
    first_lsn: int
    last_lsn: int
    spans: int | None

    def describe(self) -> str:
        spans = "an unknown number of" if self.spans is None else str(self.spans)
        lsns = f"LSN {self.first_lsn}" if self.first_lsn == self.last_lsn else f"LSNs {self.first_lsn}-{self.last_lsn}"
        return (f"damaged write-ahead log record(s): bytes {self.start}-{self.end} of {self.path.name} ({lsns}, "
                f"{spans} spans) cannot be read; the segment is kept in {DAMAGED_DIR}/")


class FileOps:
    """The file-system calls the log makes (reads aside); a test records them to explore crash states."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- framing ---------------------------------------------------------------------------------------
def encode(lsn: int, payload: bytes | tuple[bytes, ...], spans: int, total: int) -> bytes:
    """One record as it is written: header, header CRC, payload (given whole or in parts: copied once, here)."""
    parts = (payload,) if isinstance(payload, bytes | bytearray | memoryview) else payload
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    head = _HEAD.pack(MAGIC, sum(map(len, parts)), spans, lsn, total, crc)
    return b"".join((head, _HEAD_CRC.pack(zlib.crc32(head)), *parts))


def _header(data: bytes, offset: int) -> tuple[int, int, int, int, int] | None:
    """(payload length, spans, lsn, total, payload crc) of a valid header at `offset`, else None."""
    if data[offset:offset + 4] != MAGIC or offset + HEADER_SIZE > len(data):
        return None
    (crc,) = _HEAD_CRC.unpack_from(data, offset + _HEAD.size)
    if zlib.crc32(data[offset:offset + _HEAD.size]) != crc:
        return None
    _, length, spans, lsn, total, payload_crc = _HEAD.unpack_from(data, offset)
    return (length, spans, lsn, total, payload_crc) if length <= MAX_RECORD_BYTES else None


def _record_at(data: bytes, offset: int, path: Path) -> Record | None:
    head = _header(data, offset)
    if head is None:
        return None
    length, spans, lsn, total, payload_crc = head
    start, end = offset + HEADER_SIZE, offset + HEADER_SIZE + length
    if end > len(data) or zlib.crc32(data[start:end]) != payload_crc:
        return None
    return Record(lsn, spans, total, data[start:end], Location(path, offset, end - offset))


def scan(data: bytes, path: Path) -> Iterator[Record | tuple[int, int]]:
    """Every intact record of a segment, and (start, end) of every run of bytes between them that is none.

    After a bad byte the scan resumes at the next offset holding a whole valid record (magic, header CRC
    and payload CRC all agree), so one damaged record never hides the ones after it.
    """
    offset = 0
    while offset < len(data):
        record = _record_at(data, offset, path)
        if record is not None:
            yield record
            offset += record.location.length
            continue
        resume = offset + 1
        while (resume := data.find(MAGIC, resume)) >= 0 and _record_at(data, resume, path) is None:
            resume += 1
        end = len(data) if resume < 0 else resume
        yield offset, end
        offset = end


def _scan_legacy(data: bytes, path: Path) -> Iterator[Record | tuple[int, int]]:
    """Segments of earlier releases (no magic, no resync): records up to the first bad one."""
    offset = 0
    while offset + _LEGACY_HEAD.size <= len(data):
        length, lsn, crc = _LEGACY_HEAD.unpack_from(data, offset)
        start, end = offset + _LEGACY_HEAD.size, offset + _LEGACY_HEAD.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        yield Record(lsn, 0, -1, data[start:end], Location(path, offset, end - offset))
        offset = end
    if offset < len(data):
        yield offset, len(data)


def _first_lsn(path: Path) -> int:
    name = path.name
    prefix = _PREFIX if name.startswith(_PREFIX) else _LEGACY_PREFIX
    return int(name[len(prefix):name.index(".")])


@dataclass
class _Unsynced:
    """A record written and not yet fsynced; `state` 1 once durable, -1 once refused."""

    lsn: int
    spans: int
    total: int
    location: Location
    on_durable: Callable[[int, Location], None] | None
    state: int = 0
    error: str = ""


@dataclass
class _Segment:
    first: int
    path: Path
    damaged: bool = False
    legacy: bool = False


@dataclass
class _Scan:
    """What recovery learnt from the segments."""

    last_lsn: int = 0
    total: int = 0
    damage: list[Damage] = field(default_factory=list)


class WriteAheadLog:
    """Segments of records under `directory`; one process at a time (an flock guards it)."""

    def __init__(self, directory: Path, max_bytes: int = 512 << 20, segment_bytes: int = SEGMENT_BYTES,
                 ops: FileOps | None = None):
        self.directory = Path(directory)
        self.ops = ops or FileOps()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise WalError(f"{self.directory} is in use by another collector; give each collector its own "
                           "home (TRACETUNE_HOME)") from None
        self._lock = threading.Lock()  # appends and the segment list
        self._sync_lock = threading.Lock()  # fsync, rotation, checkpoint
        self._read_fds: dict[Path, int] = {}
        self._read_lock = threading.Lock()
        body = self._read_checkpoint()
        self.wal_id: str = body.get("wal_id") or uuid.uuid4().hex[:16]
        self.done_lsn: int = int(body.get("done", 0))
        self._done_total: int = int(body.get("done_total", 0))
        raw = body.get("intent")
        self.intent: Intent | None = Intent(*raw) if raw else None
        self._checkpoint_seq = int(body.get("seq", 0))
        self._checkpoint_fd = -1
        self._checkpoint_dirty = True
        self._pending: deque[tuple[int, int, int]] = deque()  # (lsn, bytes, total) not yet in ClickHouse
        self.pending_bytes = 0
        self._segments: list[_Segment] = []
        found = self._recover()
        self.damage: list[Damage] = found.damage  # reported by the collector, then cleared
        self._next_lsn = max(found.last_lsn, self.done_lsn, self.intent.last if self.intent else 0) + 1
        self._total = self._synced_total = found.total
        self.synced_lsn = self._next_lsn - 1
        self._unsynced: list[_Unsynced] = []
        self._committer: _Committer | None = None  # the writer thread of append_async, started by its first call
        self._fd = -1
        self._size = self._synced_size = 0
        self._closed = False
        self._broken = ""  # set when refused records could not be cut from the log: no more appends
        self.short_of_space = False  # the last append failed for space; set back by the next success
        self._last_open_attempt = 0.0
        with contextlib.suppress(WalError):
            self._ensure_writable()  # a full disk at start: refuse appends until there is room, keep running

    # ---- appending ---------------------------------------------------------------------------
    def append(self, payload: bytes | tuple[bytes, ...], spans: int = 0,
               on_durable: Callable[[int, Location], None] | None = None) -> int:
        """Write one record (its payload whole, or in parts read back as one) and return its LSN once it is
        fsynced; WalError if it cannot be.

        `on_durable(lsn, location)` runs once the record is fsynced, for every record in LSN order (the thread
        that did the fsync calls it). A record that raised WalError was never handed on and is not in
        the log.
        """
        item = self._write(payload, spans, on_durable)
        self._sync(item)
        if item.state < 0:
            raise WalError(item.error)
        return item.lsn

    async def append_async(self, payload: bytes | tuple[bytes, ...], spans: int = 0,
                           on_durable: Callable[[int, Location], None] | None = None) -> int:
        """`append` for a caller on an asyncio event loop: the record is written and fsynced by the log's
        writer thread, with every other record queued meanwhile (one group commit), and the loop is woken once
        per group. A thread per request (run_in_executor) cost about 100 µs of CPU per request in hand-offs."""
        with self._lock:
            if self._committer is None:
                if self._closed:
                    raise WalError("the write-ahead log is closed")
                self._committer = _Committer(self)
        return await self._committer.append(payload, spans, on_durable)

    def _write(self, payload: bytes | tuple[bytes, ...], spans: int,
               on_durable: Callable[[int, Location], None] | None) -> _Unsynced:
        """Write one record, not yet fsynced (`_sync` makes it durable); WalError if it cannot be written."""
        with self._lock:
            if self._closed:
                raise WalError("the write-ahead log is closed")
            if self._broken:
                raise WalError(self._broken)
            self._ensure_writable()
            lsn, total, offset = self._next_lsn, self._total + spans, self._size
            data = encode(lsn, payload, spans, total)
            try:
                self._write_all(data, offset)
            except OSError as exc:
                self.short_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                with contextlib.suppress(OSError):
                    self.ops.ftruncate(self._fd, offset)  # no torn record before the next one
                raise WalError(f"cannot write the write-ahead log in {self.directory}: {exc}") from None
            self.short_of_space = False
            self._next_lsn += 1
            self._size += len(data)
            self._total = total
            item = _Unsynced(lsn, spans, total, Location(self._segments[-1].path, offset, len(data)), on_durable)
            self._unsynced.append(item)
        return item

    def _write_all(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = self.ops.pwrite(self._fd, view, offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, "no space left on device (short write)")
            view, offset = view[written:], offset + written

    def _sync(self, item: _Unsynced | None = None) -> None:
        """fsync every record written so far (`item` among them) unless another thread's fsync covered it."""
        with self._sync_lock:
            if item is not None and item.state:
                return  # another thread's fsync covered (or refused) this record
            with self._lock:
                if not self._unsynced:
                    return
                batch, self._unsynced = self._unsynced, []
                fd, size = self._fd, self._size
            try:
                self.ops.fdatasync(fd)
            except OSError as exc:
                self._refuse(batch, f"cannot fsync the write-ahead log in {self.directory}: {exc}")
                return
            self._durable(batch, size)
            if self._size >= self.segment_bytes:
                with self._lock:
                    if not self._unsynced:
                        self._rotate()

    def _durable(self, batch: list[_Unsynced], size: int) -> None:
        """Called with _sync_lock held: `batch` is on disk; hand it on in LSN order."""
        if not batch:
            return
        self._synced_size, self._synced_total, self.synced_lsn = size, batch[-1].total, batch[-1].lsn
        for item in batch:
            self._pending.append((item.lsn, item.location.length, item.total))
            self.pending_bytes += item.location.length
            item.state = 1
            if item.on_durable is not None:
                item.on_durable(item.lsn, item.location)

    def _refuse(self, batch: list[_Unsynced], message: str) -> None:
        """Called with _sync_lock held after a failed fsync: refuse every unsynced record and cut them out.

        After a failed fsync the kernel may have dropped the dirty pages, so nothing written since the last
        good fsync is trusted: those records are removed from the file (and their senders get 503). If even
        that fails, the log takes no more records: what it holds could reappear at the next start.
        """
        with self._lock:
            batch = batch + self._unsynced
            self._unsynced = []
            try:
                self.ops.ftruncate(self._fd, self._synced_size)
                self.ops.fdatasync(self._fd)
                self._size, self._total = self._synced_size, self._synced_total
            except OSError as exc:
                self._broken = (f"the write-ahead log in {self.directory} failed ({message}; then {exc}) and takes "
                                "no more records; restart the collector once the disk is healthy")
                log.error("%s", self._broken)
        log.error("%s: %d records refused", message, len(batch))
        for item in batch:
            item.state, item.error = -1, message

    def _ensure_writable(self) -> None:
        """Called with _lock held: the checkpoint exists and a segment is open, or WalError (tried at most 1/s)."""
        if self._fd >= 0 and self._checkpoint_fd >= 0:
            return
        now = time.monotonic()
        if now - self._last_open_attempt < 1.0 and self._last_open_attempt:
            raise WalError(f"the write-ahead log in {self.directory} cannot open its files (disk full?); retry later")
        self._last_open_attempt = now
        try:
            if self._checkpoint_fd < 0:
                self._open_checkpoint()
            if self._fd < 0:
                self._open_segment()
        except OSError as exc:
            self.short_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise WalError(f"the write-ahead log in {self.directory} cannot open its files: {exc}") from None

    def _rotate(self) -> None:
        """Called with _sync_lock and _lock held and nothing unsynced: close the segment, open the next."""
        if self._fd < 0:
            return
        self.ops.close(self._fd)
        self._fd = -1
        try:
            self._open_segment()
        except OSError as exc:
            log.warning("cannot open a new write-ahead log segment (%s); trying again at the next append", exc)

    def _open_segment(self) -> None:
        path = self.directory / f"{_PREFIX}{self._next_lsn:020d}{_SUFFIX}"
        fd = self.ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.ops.fsync_dir(self.directory)  # the new name survives a power cut before its first record
        except OSError:
            self.ops.close(fd)
            raise
        self._fd, self._size, self._synced_size = fd, 0, 0
        if not self._segments or self._segments[-1].path != path:
            self._segments.append(_Segment(self._next_lsn, path))

    @property
    def full(self) -> bool:
        """The log holds `max_bytes` not yet in ClickHouse, or the disk refused the last record."""
        return self.pending_bytes >= self.max_bytes or bool(self._broken)

    @property
    def broken(self) -> str:
        return self._broken

    # ---- recovery ------------------------------------------------------------------------------
    def _recover(self) -> _Scan:
        """Index existing segments, count pending records, find damage; what recovery learnt."""
        found = _Scan(total=self._done_total)
        paths = sorted(self.directory.glob(f"{_LEGACY_PREFIX}*{_LEGACY_SUFFIX}"), key=_first_lsn)
        paths += sorted(self.directory.glob(f"{_PREFIX}*{_SUFFIX}"), key=_first_lsn)
        prev_lsn, prev_total = self.done_lsn, self._done_total
        open_damage: list[tuple[_Segment, int, int, int, int]] = []  # (segment, start, end, prev lsn, prev total)
        for path in paths:
            segment = _Segment(_first_lsn(path), path, legacy=path.name.startswith(_LEGACY_PREFIX))
            self._segments.append(segment)
            for item in self._scan_path(segment):
                if isinstance(item, tuple):
                    open_damage.append((segment, *item, prev_lsn, prev_total))
                    continue
                for seg, start, end, d_lsn, d_total in open_damage:
                    spans = item.total - item.spans - d_total if item.total >= 0 and d_total >= 0 else None
                    self._damaged(found, seg, Damage(seg.path, start, end, d_lsn + 1, item.lsn - 1, spans))
                open_damage = []
                found.last_lsn = max(found.last_lsn, item.lsn)
                prev_lsn, prev_total = item.lsn, item.total
                if item.total >= 0:
                    found.total = item.total
                if item.lsn > self.done_lsn:
                    self._pending.append((item.lsn, item.location.length, item.total))
                    self.pending_bytes += item.location.length
        tail = open_damage.pop() if open_damage and open_damage[-1][0] is self._segments[-1] else None
        for seg, start, end, d_lsn, _ in open_damage:  # no intact record after it: at most one record per header
            last = d_lsn + max(1, (end - start) // HEADER_SIZE)
            self._damaged(found, seg, Damage(seg.path, start, end, d_lsn + 1, last, None))
        if tail is not None:
            self._torn_tail(tail[0], tail[1], tail[2])
        return found

    def _damaged(self, found: _Scan, segment: _Segment, damage: Damage) -> None:
        segment.damaged = True
        found.last_lsn = max(found.last_lsn, damage.last_lsn)  # new records never reuse a lost record's LSN
        if damage.last_lsn <= self.done_lsn:
            log.warning("write-ahead log %s: bytes %d-%d unreadable, all of it already in ClickHouse",
                        segment.path.name, damage.start, damage.end)
            return
        log.error("%s", damage.describe())
        found.damage.append(damage)

    def _torn_tail(self, segment: _Segment, start: int, end: int) -> None:
        """The end of the newest segment is no record: a write cut short by a crash, never acknowledged.

        It is cut off (so a later start does not take it for damage); its bytes, unless all zero, are kept
        in damaged/ in case they were damage to an acknowledged last record after all.
        """
        log.warning("write-ahead log %s: bytes %d-%d after the last record are no record (a write cut short "
                    "by a crash, never acknowledged); cut off", segment.path.name, start, end)
        try:
            data = segment.path.read_bytes()[start:end]
            if data.strip(b"\0"):
                aside = self._damaged_dir() / f"{segment.path.name}.tail-{start}"
                fd = self.ops.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    self.ops.pwrite(fd, data, 0)
                    self.ops.fdatasync(fd)
                finally:
                    self.ops.close(fd)
                self.ops.fsync_dir(aside.parent)
                log.warning("the cut bytes are kept in %s", aside)
            fd = self.ops.open(segment.path, os.O_WRONLY, 0o600)
            try:
                self.ops.ftruncate(fd, start)
                self.ops.fdatasync(fd)
            finally:
                self.ops.close(fd)
        except OSError as exc:  # a full disk: leave it; the scan skips it again next time
            log.warning("cannot cut the torn end of %s: %s", segment.path.name, exc)

    def _damaged_dir(self) -> Path:
        path = self.directory / DAMAGED_DIR
        if not path.is_dir():
            self.ops.mkdir(path)
            self.ops.fsync_dir(self.directory)
        return path

    def _scan_path(self, segment: _Segment) -> Iterator[Record | tuple[int, int]]:
        try:
            data = segment.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:  # unreadable at all (EIO): one damaged run
            log.error("write-ahead log %s cannot be read: %s", segment.path, exc)
            segment.damaged = True
            yield 0, max(0, segment.path.stat().st_size)
            return
        yield from (_scan_legacy if segment.legacy else scan)(data, segment.path)

    def replay(self) -> Iterator[Record | Damage]:
        """Every record not yet in ClickHouse and every unreported damage, in LSN order."""
        damage = sorted(self.damage, key=lambda d: d.last_lsn)
        for segment in list(self._segments):
            for item in self._scan_path(segment):
                if isinstance(item, tuple) or item.lsn <= self.done_lsn:
                    continue
                while damage and damage[0].last_lsn < item.lsn:
                    yield damage.pop(0)
                yield item
        yield from damage

    def read(self, location: Location) -> bytes:
        """The payload of the record at `location` (for the writer); WalError if it no longer reads back intact."""
        try:
            with self._read_lock:
                fd = self._read_fds.get(location.path)
                if fd is None:
                    for stale in list(self._read_fds)[:-1]:
                        os.close(self._read_fds.pop(stale))
                    fd = self._read_fds[location.path] = os.open(location.path, os.O_RDONLY)
                data = os.pread(fd, location.length, location.offset)
        except OSError as exc:
            raise WalError(f"cannot read {location.path.name} at byte {location.offset}: {exc}") from None
        record = _record_at(data, 0, location.path)
        if record is None:
            raise WalError(f"bytes {location.offset}-{location.offset + location.length} of {location.path.name} "
                           "no longer read back as the record written there")
        return record.payload

    # ---- checkpoint ------------------------------------------------------------------------------
    def _read_checkpoint(self) -> dict:
        path = self.directory / _CHECKPOINT
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self._read_legacy_checkpoint()
        best: dict | None = None
        for slot in range(2):
            raw = data[slot * _SLOT:(slot + 1) * _SLOT]
            if len(raw) < _SLOT_HEAD.size:
                continue
            magic, seq, length, crc = _SLOT_HEAD.unpack_from(raw)
            body = raw[_SLOT_HEAD.size:_SLOT_HEAD.size + length]
            if magic != _SLOT_MAGIC or len(body) != length or zlib.crc32(body) != crc:
                continue
            if best is None or seq > best["seq"]:
                best = {**json.loads(body), "seq": seq}
        if best is None:
            raise WalError(f"{path} is unreadable (no valid slot); move it away to replay the whole log")
        return best

    def _read_legacy_checkpoint(self) -> dict:
        path = self.directory / _LEGACY_CHECKPOINT
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            raise WalError(f"{path} is unreadable ({exc}); move it away to replay the whole log") from None

    def _slot(self) -> tuple[bytes, int]:
        intent = self.intent
        body = json.dumps({"wal_id": self.wal_id, "done": self.done_lsn, "done_total": self._done_total,
                           "intent": [intent.first, intent.last] if intent else None}).encode()
        self._checkpoint_seq += 1
        head = _SLOT_HEAD.pack(_SLOT_MAGIC, self._checkpoint_seq, len(body), zlib.crc32(body))
        return (head + body).ljust(_SLOT, b"\0"), self._checkpoint_seq % 2

    def _open_checkpoint(self) -> None:
        """Open the checkpoint for in-place updates, creating it on a first start (or from a legacy one)."""
        try:
            self._checkpoint_fd = self.ops.open(self.directory / _CHECKPOINT, os.O_WRONLY, 0o600)
        except FileNotFoundError:
            self._create_checkpoint()

    def _create_checkpoint(self) -> None:
        """Write a fresh checkpoint file under a temporary name and rename it in place (then fsync the folder)."""
        path, tmp = self.directory / _CHECKPOINT, self.directory / (_CHECKPOINT + ".tmp")
        slot, _ = self._slot()
        fd = self.ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self.ops.pwrite(fd, slot + slot, 0)  # both slots: the next update overwrites one of them
            self.ops.fdatasync(fd)
            self.ops.rename(tmp, path)
            self.ops.fsync_dir(self.directory)
        except OSError:
            self.ops.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._checkpoint_fd = fd
        self._checkpoint_dirty = False
        legacy = self.directory / _LEGACY_CHECKPOINT
        if legacy.exists():
            self.ops.unlink(legacy)
            self.ops.fsync_dir(self.directory)

    def _write_checkpoint(self) -> None:
        """Called with _sync_lock held: overwrite the older slot and fsync; OSError if the disk refuses."""
        if self._checkpoint_fd < 0:
            with self._lock:
                self._open_checkpoint()
        slot, index = self._slot()
        self._checkpoint_dirty = True
        self.ops.pwrite(self._checkpoint_fd, slot, index * _SLOT)
        self.ops.fdatasync(self._checkpoint_fd)
        self._checkpoint_dirty = False

    def begin(self, intent: Intent) -> None:
        """Record durably which records the next insert carries, before it is sent; WalError if it cannot be."""
        with self._sync_lock:
            self.intent = intent
            try:
                self._write_checkpoint()
            except OSError as exc:
                raise WalError(f"cannot write the write-ahead log checkpoint in {self.directory}: {exc}") from None

    def commit(self, last: int) -> None:
        """Records up to `last` are in ClickHouse: forget them and give their segments' space back.

        The checkpoint is made durable before any segment is deleted; if it cannot be written, the
        segments stay (the records are re-sent with the same token after a restart, and dropped).
        """
        with self._sync_lock:
            with self._lock:
                self.done_lsn = max(self.done_lsn, last)
                self.intent = None
                while self._pending and self._pending[0][0] <= last:
                    _, size, total = self._pending.popleft()
                    self.pending_bytes -= size
                    if total >= 0:
                        self._done_total = total
                if (self._fd >= 0 and not self._unsynced and self._next_lsn - 1 <= self.done_lsn and self._size
                        and (self._size >= _EAGER_ROTATE_BYTES or self.short_of_space)):
                    self._rotate()  # everything in the open segment is in ClickHouse: give its space back now
            if self._closed:
                return
            try:
                self._write_checkpoint()
            except OSError as exc:
                log.warning("cannot write the write-ahead log checkpoint (%s); segments are kept until it can", exc)
                return
            with self._lock:
                finished = [seg for i, seg in enumerate(self._segments[:-1])
                            if self._segments[i + 1].first - 1 <= self.done_lsn]
                if self._fd < 0 and self._segments and self._segments[-1].first <= self._next_lsn - 1 <= self.done_lsn:
                    finished.append(self._segments[-1])  # no open segment (rotation failed) and the last is done
                self._segments = [seg for seg in self._segments if seg not in finished]
            self._release(finished)

    def _release(self, finished: list[_Segment]) -> None:
        """Delete finished segments, or move damaged ones aside; then fsync the folder(s)."""
        if not finished:
            return
        for segment in finished:
            with self._read_lock:
                fd = self._read_fds.pop(segment.path, None)
                if fd is not None:
                    os.close(fd)
            try:
                if segment.damaged:
                    self.ops.rename(segment.path, self._damaged_dir() / segment.path.name)
                    self.ops.fsync_dir(self.directory / DAMAGED_DIR)
                    log.warning("write-ahead log segment %s had damage; its good records are in ClickHouse and it "
                                "is kept in %s/", segment.path.name, self.directory / DAMAGED_DIR)
                else:
                    self.ops.unlink(segment.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot release write-ahead log segment %s: %s", segment.path.name, exc)
        with contextlib.suppress(OSError):
            self.ops.fsync_dir(self.directory)

    def token(self, first: int, last: int) -> str:
        """The insert deduplication token of the batch first..last (unique to this log)."""
        return f"{self.wal_id}:{first}-{last}"

    def close(self) -> None:
        """Close the files; a record still queued for append_async is refused (WalError), never written after."""
        with self._lock:
            committer, self._committer = self._committer, None
        if committer is not None:
            committer.close()
        with self._sync_lock, self._lock:
            self._closed = True
            for fd in (self._fd, self._checkpoint_fd, *self._read_fds.values()):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        self.ops.close(fd)
            self._fd = self._checkpoint_fd = -1
            self._read_fds.clear()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


class _Committer:
    """The log's writer thread for callers on event loops: it writes every record queued since its last
    fsync, fsyncs once for all of them (group commit: the group is what arrived during the previous fsync),
    then wakes each waiting loop once with the outcome of each of its records."""

    def __init__(self, wal: WriteAheadLog):
        self._wal = wal
        self._cond = threading.Condition()
        self._queue: list[tuple[bytes | tuple[bytes, ...], int, Callable | None, asyncio.Future]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="wal-commit", daemon=True)
        self._thread.start()

    async def append(self, payload: bytes | tuple[bytes, ...], spans: int,
                     on_durable: Callable[[int, Location], None] | None) -> int:
        future = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._closing:
                raise WalError("the write-ahead log is closed")
            self._queue.append((payload, spans, on_durable, future))
            self._cond.notify()
        return await future

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                group, self._queue = self._queue, []
                closing = self._closing
            if closing:  # refused unwritten: the sender retries, and nothing it was not told of is replayed
                outcomes = [(future, WalError("the write-ahead log is closed")) for *_, future in group]
            else:
                outcomes = self._commit(group)
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for future, outcome in outcomes:
                by_loop.setdefault(future.get_loop(), []).append((future, outcome))
            for loop, settled in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                    loop.call_soon_threadsafe(_settle, settled)
            if closing:
                return

    def _commit(self, group: list) -> list[tuple[asyncio.Future, int | WalError]]:
        """Write the group's records and fsync them once: each record's LSN, or why it was refused."""
        written: list[tuple[asyncio.Future, _Unsynced | WalError]] = []
        for payload, spans, on_durable, future in group:
            try:
                written.append((future, self._wal._write(payload, spans, on_durable)))
            except WalError as exc:
                written.append((future, exc))
        failed = ""
        try:
            self._wal._sync()
        except Exception as exc:  # a waiter must always be answered
            log.exception("write-ahead log group commit failed")
            failed = str(exc)
        return [(future, item if isinstance(item, WalError) else item.lsn if item.state > 0
                 else WalError(item.error or failed)) for future, item in written]


def _settle(settled: list[tuple[asyncio.Future, int | WalError]]) -> None:
    for future, outcome in settled:
        if future.done():
            continue  # the waiter was cancelled
        if isinstance(outcome, WalError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
