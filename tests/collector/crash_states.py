"""A crash-state explorer for the write-ahead log, in the manner of ALICE and CrashMonkey.

A run of the log/checkpoint protocol goes through `RecordingOps`, which performs every file operation on
a real directory and writes it down, together with the acknowledgements the senders got and the inserts
ClickHouse took. For every point of that trace, `crash_states` builds each file-system state a POSIX
file system may leave after a power cut there: a write or truncate not followed by an fsync of its file
may be lost, torn (a prefix) or land as zeros; a create, rename, unlink or mkdir not followed by an fsync
of its folder may be undone; operations not yet made durable may persist in any order. With up to
`EXHAUSTIVE` such operations every subset is tried, beyond that every prefix and every single omission.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.collector.wal import FileOps

EXHAUSTIVE = 6


@dataclass(frozen=True)
class Op:
    kind: str  # create, write, truncate, sync, rename, unlink, mkdir, dirsync, ack, insert
    args: tuple


class RecordingOps(FileOps):
    """Real file operations under `root`, each written down (thread-safe) in `trace`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.trace: list[Op] = []
        self.lock = threading.RLock()
        self._inodes: dict[str, int] = {}  # relative path -> inode number of the model
        self._fds: dict[int, int] = {}  # fd -> model inode
        self._next = itertools.count(1)

    def _rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def mark(self, kind: str, *args: Any) -> None:
        with self.lock:
            self.trace.append(Op(kind, args))

    def open(self, path, flags, mode=0o600):
        with self.lock:
            rel = self._rel(path)
            exists = rel in self._inodes and os.path.exists(path)
            fd = super().open(path, flags, mode)
            if not exists:
                self._inodes[rel] = next(self._next)
                self.trace.append(Op("create", (rel, self._inodes[rel])))
            elif flags & os.O_TRUNC:
                self.trace.append(Op("truncate", (self._inodes[rel], 0)))
            self._fds[fd] = self._inodes[rel]
            return fd

    def pwrite(self, fd, data, offset):
        with self.lock:
            written = super().pwrite(fd, data, offset)
            self.trace.append(Op("write", (self._fds[fd], offset, bytes(data[:written]))))
            return written

    def fdatasync(self, fd):
        with self.lock:
            super().fdatasync(fd)
            self.trace.append(Op("sync", (self._fds[fd],)))

    def ftruncate(self, fd, size):
        with self.lock:
            super().ftruncate(fd, size)
            self.trace.append(Op("truncate", (self._fds[fd], size)))

    def close(self, fd):
        with self.lock:
            super().close(fd)
            self._fds.pop(fd, None)

    def rename(self, src, dst):
        with self.lock:
            super().rename(src, dst)
            a, b = self._rel(src), self._rel(dst)
            self._inodes[b] = self._inodes.pop(a)
            self.trace.append(Op("rename", (a, b)))

    def unlink(self, path):
        with self.lock:
            super().unlink(path)
            rel = self._rel(path)
            self._inodes.pop(rel, None)
            self.trace.append(Op("unlink", (rel,)))

    def mkdir(self, path):
        with self.lock:
            super().mkdir(path)
            self.trace.append(Op("mkdir", (self._rel(path),)))

    def fsync_dir(self, path):
        with self.lock:
            super().fsync_dir(path)
            rel = self._rel(path)
            self.trace.append(Op("dirsync", ("" if rel == "." else rel,)))


def _parent(rel: str) -> str:
    parent = str(Path(rel).parent)
    return "" if parent == "." else parent


def _durable(trace: list[Op], upto: int) -> list[bool]:
    """Whether each operation before `upto` is certainly on disk at a crash at `upto`."""
    durable = [False] * upto
    synced_inodes: set[int] = set()
    synced_dirs: set[str] = set()
    for j in range(upto - 1, -1, -1):  # walk back: a later fsync makes earlier operations durable
        op = trace[j]
        if op.kind == "sync":
            synced_inodes.add(op.args[0])
            durable[j] = True
        elif op.kind == "dirsync":
            synced_dirs.add(op.args[0])
            durable[j] = True
        elif op.kind in ("write", "truncate"):
            durable[j] = op.args[0] in synced_inodes
        elif op.kind in ("create", "unlink", "mkdir"):
            durable[j] = _parent(op.args[0]) in synced_dirs
        elif op.kind == "rename":
            durable[j] = _parent(op.args[0]) in synced_dirs and _parent(op.args[1]) in synced_dirs
        else:
            durable[j] = True  # acknowledgements and inserts: they happened
    return durable


@dataclass
class CrashState:
    """Files (relative path -> bytes) after a crash at trace index `at`, and how they came about."""

    at: int
    files: dict[str, bytes]
    dirs: set[str]
    how: str
    digest: str = field(default="")

    def materialize(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for rel in sorted(self.dirs):
            (root / rel).mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            if _parent(rel) and _parent(rel) not in self.dirs:
                continue
            path = root / rel
            path.write_bytes(data)
            os.chmod(path, 0o600)


def _apply(trace: list[Op], upto: int, chosen: set[int], torn: dict[int, bytes]) -> tuple[dict[str, bytes], set[str]]:
    names: dict[str, int] = {}
    contents: dict[int, bytearray] = {}
    dirs: set[str] = set()
    durable = _durable(trace, upto)
    for j in range(upto):
        if not (durable[j] or j in chosen):
            continue
        op = trace[j]
        if op.kind == "create":
            names[op.args[0]] = op.args[1]
            contents.setdefault(op.args[1], bytearray())
        elif op.kind == "write":
            inode, offset, data = op.args
            data = torn.get(j, data)
            buf = contents.setdefault(inode, bytearray())
            if len(buf) < offset:
                buf.extend(b"\0" * (offset - len(buf)))
            buf[offset:offset + len(data)] = data
        elif op.kind == "truncate":
            buf = contents.setdefault(op.args[0], bytearray())
            del buf[op.args[1]:]
            if len(buf) < op.args[1]:
                buf.extend(b"\0" * (op.args[1] - len(buf)))
        elif op.kind == "rename":
            if op.args[0] in names:
                names[op.args[1]] = names.pop(op.args[0])
        elif op.kind == "unlink":
            names.pop(op.args[0], None)
        elif op.kind == "mkdir":
            dirs.add(op.args[0])
    return {name: bytes(contents.get(inode, b"")) for name, inode in names.items()}, dirs


def crash_states(trace: list[Op]) -> Iterator[CrashState]:
    """Every distinct crash state of the trace (distinct by files and by the marks before the crash)."""
    seen: set[str] = set()
    for upto in range(len(trace) + 1):
        durable = _durable(trace, upto)
        loose = [j for j in range(upto) if not durable[j]]
        choices: list[tuple[set[int], dict[int, bytes], str]] = []
        if len(loose) <= EXHAUSTIVE:
            for r in range(len(loose) + 1):
                for subset in itertools.combinations(loose, r):
                    choices.append((set(subset), {}, f"unsynced kept: {list(subset)}"))
        else:
            for k in range(len(loose) + 1):
                choices.append((set(loose[:k]), {}, f"first {k} unsynced kept"))
            for skip in loose:
                choices.append((set(loose) - {skip}, {}, f"all unsynced kept but {skip}"))
        for j in loose:  # torn writes: the ones before it kept, a prefix of it, or zeros where it was
            op = trace[j]
            if op.kind != "write" or len(op.args[2]) < 2:
                continue
            before = {k for k in loose if k < j}
            data = op.args[2]
            for cut, label in ((len(data) // 2, "half"), (1, "one byte")):
                choices.append((before | {j}, {j: data[:cut]}, f"{j} torn ({label})"))
            choices.append((before | {j}, {j: b"\0" * len(data)}, f"{j} as zeros"))
        marks = sum(1 for op in trace[:upto] if op.kind in ("ack", "insert"))
        for chosen, torn, how in choices:
            files, dirs = _apply(trace, upto, chosen, torn)
            digest = hashlib.sha256(repr((marks, sorted(files.items()), sorted(dirs))).encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            yield CrashState(upto, files, dirs, f"crash at {upto}: {how}", digest)
