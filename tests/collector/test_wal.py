"""The write-ahead log on a real file system: damage costs only the damaged records (reported with their span
count), a failed write or fsync is a refusal that leaves nothing behind, committed space comes back at once."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest

from tracetune.collector.wal import HEADER_SIZE, Damage, FileOps, Record, WalError, WriteAheadLog


def fill(wal: WriteAheadLog, n: int, spans: int = 10, size: int = 200) -> list[tuple[int, bytes]]:
    out = []
    for i in range(n):
        payload = (f"record {i} ".encode() * size)[:size]
        out.append((wal.append(payload, spans=spans), payload))
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.wal"))


def damage_at(path: Path, offset: int, data: bytes = b"\xff\xff\xff\xff") -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def reopen(directory: Path, **options) -> tuple[WriteAheadLog, list[Record], list[Damage]]:
    wal = WriteAheadLog(directory, **options)
    items = list(wal.replay())
    return wal, [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Damage)]


def record_offset(index: int, size: int = 200) -> int:
    return index * (HEADER_SIZE + size)


@pytest.mark.parametrize("where", ["payload", "header", "magic"])
def test_one_damaged_record_costs_only_itself_and_is_reported_with_its_span_count(tmp_path, where):
    wal = WriteAheadLog(tmp_path / "wal")
    written = fill(wal, 20, spans=7)
    wal.close()
    shift = {"payload": HEADER_SIZE + 50, "header": 12, "magic": 0}[where]
    damage_at(segments(tmp_path / "wal")[0], record_offset(9) + shift)

    wal, records, damage = reopen(tmp_path / "wal")
    assert [(r.lsn, r.payload) for r in records] == written[:9] + written[10:]
    assert len(damage) == 1
    lost = damage[0]
    assert (lost.first_lsn, lost.last_lsn, lost.spans) == (written[9][0], written[9][0], 7)
    assert (lost.start, lost.end) == (record_offset(9), record_offset(10))
    assert wal.append(b"after") > written[-1][0]
    wal.close()


def test_a_run_of_damaged_records_is_counted_from_the_totals_on_either_side(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal")
    written = [(wal.append(b"x" * 200, spans=i + 1), i + 1) for i in range(10)]
    wal.close()
    segment = segments(tmp_path / "wal")[0]
    damage_at(segment, record_offset(3) + 5, os.urandom(3 * (HEADER_SIZE + 200) - 10))  # records 3, 4, 5
    wal, records, damage = reopen(tmp_path / "wal")
    assert [r.lsn for r in records] == [lsn for lsn, _ in written[:3] + written[6:]]
    assert [(d.first_lsn, d.last_lsn, d.spans) for d in damage] == [(written[3][0], written[5][0], 4 + 5 + 6)]
    wal.close()


def test_damage_in_an_older_segment_is_reported_and_the_segment_kept_aside_once_written(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=4096)
    written = fill(wal, 60, spans=3)
    wal.close()
    first = segments(tmp_path / "wal")[0]
    damage_at(first, record_offset(2) + HEADER_SIZE + 10)
    wal, records, damage = reopen(tmp_path / "wal", segment_bytes=4096)
    assert len(records) == 59 and [(d.last_lsn, d.spans) for d in damage] == [(written[2][0], 3)]
    wal.commit(written[-1][0])  # everything that could be read is in ClickHouse
    assert not first.exists() and (tmp_path / "wal" / "damaged" / first.name).read_bytes()
    assert not any(p.name == first.name for p in segments(tmp_path / "wal"))
    wal.close()
    wal, records, damage = reopen(tmp_path / "wal", segment_bytes=4096)
    assert not records and not damage  # reported once: the damage is behind the checkpoint now
    wal.close()


class FailingOps(FileOps):
    """Real file operations, with the next fdatasync or pwrite of a segment failing as a disk would."""

    def __init__(self):
        self.fail_sync = 0
        self.fail_write: list[int] = []  # per pwrite: an errno, or 0 for a short write

    def fdatasync(self, fd: int) -> None:
        if self.fail_sync and os.readlink(f"/proc/self/fd/{fd}").endswith(".wal"):
            self.fail_sync -= 1
            raise OSError(errno.EIO, "Input/output error")
        super().fdatasync(fd)

    def pwrite(self, fd: int, data, offset: int) -> int:
        if self.fail_write and os.readlink(f"/proc/self/fd/{fd}").endswith(".wal"):
            code = self.fail_write.pop(0)
            if code == 0:  # a short write: half of it reaches the file
                return super().pwrite(fd, bytes(data)[:len(data) // 2], offset)
            raise OSError(code, os.strerror(code))
        return super().pwrite(fd, data, offset)


@pytest.mark.parametrize("failure", ["fsync", "ENOSPC", "short-write"])
def test_a_failed_write_or_fsync_refuses_the_record_and_leaves_nothing_behind(tmp_path, failure):
    ops = FailingOps()
    wal = WriteAheadLog(tmp_path / "wal", ops=ops)
    durable: list[int] = []
    kept = [wal.append(b"before", spans=1, on_durable=lambda lsn, _: durable.append(lsn))]
    if failure == "fsync":
        ops.fail_sync = 1
    else:
        ops.fail_write = [errno.ENOSPC] if failure == "ENOSPC" else [0, errno.ENOSPC]  # half, then the disk is full
    with pytest.raises(WalError):
        wal.append(b"refused", spans=1, on_durable=lambda lsn, _: durable.append(lsn))
    kept.append(wal.append(b"after", spans=1, on_durable=lambda lsn, _: durable.append(lsn)))
    assert durable == kept  # the refused record was never handed on
    wal.close()
    wal, records, damage = reopen(tmp_path / "wal")
    assert [(r.lsn, r.payload) for r in records] == list(zip(kept, [b"before", b"after"], strict=True))
    assert not damage
    wal.close()


def test_committed_records_give_their_space_back_without_waiting_for_a_full_segment(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal")  # 8 MiB segments
    written = fill(wal, 1500, size=300)  # ~500 KB: one segment, far from full
    assert wal.pending_bytes > 400_000 and sum(p.stat().st_size for p in segments(tmp_path / "wal")) > 400_000
    wal.commit(written[-1][0])
    assert wal.pending_bytes == 0
    assert sum(p.stat().st_size for p in segments(tmp_path / "wal")) == 0  # a fresh, empty segment remains
    assert wal.append(b"next") == written[-1][0] + 1
    wal.close()


def test_a_torn_checkpoint_update_leaves_the_previous_one(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal")
    written = fill(wal, 4)
    wal.commit(written[1][0])
    wal.commit(written[2][0])
    wal.close()
    path = tmp_path / "wal" / "checkpoint"
    data = bytearray(path.read_bytes())
    newest = max(range(2), key=lambda s: struct.unpack_from("<4sQ", data, s * 4096)[1])
    data[newest * 4096 + 30] ^= 0xFF  # the last update was cut short
    path.write_bytes(bytes(data))
    wal, records, _ = reopen(tmp_path / "wal")
    assert wal.done_lsn == written[1][0] and [r.lsn for r in records] == [lsn for lsn, _ in written[2:]]
    wal.close()


def test_a_log_left_by_an_earlier_release_replays(tmp_path):
    """Segments `wal-*.log` with <length, LSN, CRC> headers and a checkpoint.json, as earlier releases wrote them."""
    directory = tmp_path / "wal"
    directory.mkdir()
    payloads = [f"old {i}".encode() for i in range(5)]
    with open(directory / f"wal-{1:020d}.log", "wb") as handle:
        for lsn, payload in enumerate(payloads, 1):
            handle.write(struct.pack("<IQI", len(payload), lsn, zlib.crc32(payload)) + payload)
    (directory / "checkpoint.json").write_text(json.dumps({"wal_id": "0123456789abcdef", "done": 2, "intent": None}))
    wal, records, damage = reopen(directory)
    assert wal.wal_id == "0123456789abcdef" and not damage
    assert [(r.lsn, r.payload) for r in records] == [(3, b"old 2"), (4, b"old 3"), (5, b"old 4")]
    assert wal.append(b"new") == 6
    wal.commit(6)
    assert not (directory / "checkpoint.json").exists() and not list(directory.glob("wal-*.log"))
    wal.close()


def test_files_are_private(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal")
    fill(wal, 2)
    wal.close()
    assert (tmp_path / "wal").stat().st_mode & 0o777 == 0o700
    for path in (tmp_path / "wal").iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


class RecordingOps(FailingOps):
    """FailingOps that notes every fdatasync of a segment and can hold the next one until released."""

    def __init__(self):
        super().__init__()
        self.syncs = 0
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".wal"):
            self.holding.set()
            self.hold.wait(10)
            self.syncs += 1
        super().fdatasync(fd)


def test_appends_from_an_event_loop_are_fsynced_in_groups_before_they_are_answered(tmp_path):
    """50 coroutines append while an fsync is held: each is answered only after its record's fsync, in LSN
    order on disk and handed on in LSN order, and the held fsync's followers share one fsync."""
    ops = RecordingOps()
    wal = WriteAheadLog(tmp_path / "wal", ops=ops)
    durable: list[int] = []

    async def run() -> list[int]:
        ops.hold.clear()
        first = asyncio.ensure_future(wal.append_async(b"first", spans=1,
                                                       on_durable=lambda lsn, _: durable.append(lsn)))
        await asyncio.to_thread(ops.holding.wait, 10)  # the writer thread is in the first group's fsync
        rest = [asyncio.ensure_future(wal.append_async(f"r{i}".encode(), spans=2,
                                                        on_durable=lambda lsn, _: durable.append(lsn)))
                for i in range(49)]
        await asyncio.sleep(0.2)
        assert not first.done() and not any(f.done() for f in rest)  # nothing answered before its fsync
        syncs_before = ops.syncs
        ops.hold.set()
        lsns = await asyncio.gather(first, *rest)
        assert ops.syncs - syncs_before == 2  # the first group, then the 49 queued meanwhile as one
        return lsns

    lsns = asyncio.run(run())
    assert lsns == sorted(lsns) and len(set(lsns)) == 50 and durable == lsns
    wal.close()
    wal, records, damage = reopen(tmp_path / "wal")
    assert [r.lsn for r in records] == lsns and records[0].payload == b"first" and not damage
    wal.close()


@pytest.mark.parametrize("failure", ["fsync", "ENOSPC"])
def test_a_failed_group_commit_refuses_what_it_covered_and_the_next_group_is_taken(tmp_path, failure):
    ops = FailingOps()
    wal = WriteAheadLog(tmp_path / "wal", ops=ops)

    async def run() -> tuple[list, list[int]]:
        kept = [await wal.append_async(b"before", spans=1)]
        if failure == "fsync":
            ops.fail_sync = 1
        else:
            ops.fail_write = [errno.ENOSPC]
        outcomes = await asyncio.gather(*(wal.append_async(f"g{i}".encode(), spans=1) for i in range(5)),
                                        return_exceptions=True)
        kept.append(await wal.append_async(b"after", spans=1))
        return outcomes, kept

    outcomes, kept = asyncio.run(run())
    refused = [o for o in outcomes if isinstance(o, WalError)]
    if failure == "fsync":
        assert len(refused) == 5  # a failed fsync refuses every record it covered
    else:
        assert len(refused) == 1  # the record the disk refused; the group's others are durable
        kept[1:1] = [o for o in outcomes if isinstance(o, int)]
    wal.close()
    wal, records, damage = reopen(tmp_path / "wal")
    assert [r.lsn for r in records] == kept and records[-1].payload == b"after" and not damage
    wal.close()


def test_closing_refuses_what_is_still_queued_and_writes_none_of_it(tmp_path):
    ops = RecordingOps()
    wal = WriteAheadLog(tmp_path / "wal", ops=ops)

    async def run():
        ops.hold.clear()
        first = asyncio.ensure_future(wal.append_async(b"first", spans=1))
        await asyncio.to_thread(ops.holding.wait, 10)
        queued = [asyncio.ensure_future(wal.append_async(b"queued", spans=1)) for _ in range(3)]
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(asyncio.to_thread(wal.close))
        await asyncio.sleep(0.2)
        ops.hold.set()
        await closing
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        with pytest.raises(WalError):
            await wal.append_async(b"late")
        return outcomes

    outcomes = asyncio.run(run())
    assert isinstance(outcomes[0], int) and all(isinstance(o, WalError) for o in outcomes[1:])
    wal, records, _ = reopen(tmp_path / "wal")
    assert [r.payload for r in records] == [b"first"]
    wal.close()
