"""The store's process confines itself with Linux Landlock: a statement that slips through reaches nothing.

Landlock (Linux 5.13+, network rules from its ABI 4, Linux 6.7) lets an unprivileged process give up
rights for good, for itself and every thread it starts afterwards. The store calls `confine()` in its
main thread before the engine or the HTTP server start any thread, and keeps:
- read (and execute) access to the Python environment, its libraries and tracetune's own code;
- read access to /proc, /sys, time zones and the few /etc files the engine reads;
- read-write access to its data folder (temporary files go to a folder inside it) and /dev/null;
- TCP: bind on its own port only, connect nowhere.
Everything else (the home folder with its password files, other users' files, /etc/passwd, local and
remote servers) answers EACCES / EPERM, whatever the engine is asked to do.

Landlock is reached through its three system calls (`ctypes`, x86-64 and arm64 numbers): the Python
bindings on PyPI are young, and the calls are few and stable (linux/landlock.h).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on x86-64 and arm64
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights (linux/landlock.h), with the ABI that introduced them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = (
    1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12)
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_READ = EXECUTE | READ_FILE | READ_DIR
_WRITE = (WRITE_FILE | READ_FILE | READ_DIR | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM
          | MAKE_FIFO | MAKE_SOCK | REFER | TRUNCATE)
_READ_ONLY_FILES = ("/etc/localtime", "/etc/timezone", "/usr/share/zoneinfo", "/etc/ld.so.cache",
                    "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf",
                    "/etc/ssl", "/etc/pki", "/usr/lib/ssl", "/etc/os-release", "/etc/mime.types")
_SYSTEM_READ = ("/proc", "/sys", "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/dev/urandom",
                "/dev/random")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class SandboxError(Exception):
    """Landlock is missing or refused the rules; the message says which and why."""


@dataclass(frozen=True)
class Confinement:
    """What `confine` applied: the kernel's Landlock ABI and whether TCP is confined too."""

    abi: int
    network: bool


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def _fs_rights(version: int) -> int:
    rights = (1 << 13) - 1
    if version >= 2:
        rights |= REFER
    if version >= 3:
        rights |= TRUNCATE
    if version >= 5:
        rights |= IOCTL_DEV
    return rights


def python_paths() -> list[Path]:
    """Where this interpreter, its libraries and tracetune's code live (read and execute)."""
    prefixes = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths = set(prefixes)  # sys.path entries outside them (the working folder) stay closed
    paths |= {Path(p).resolve() for p in sys.path if p and any(Path(p).resolve().is_relative_to(x) for x in prefixes)}
    # site folders a .pth file adds from another environment (a wheel installed beside its dependencies)
    paths |= {Path(p).resolve() for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")}
    for name, module in list(sys.modules.items()):
        if name == "tracetune" or name.startswith("tracetune."):
            paths |= {Path(p) for p in getattr(module, "__path__", [])}
    paths.add(Path(sys.executable).resolve().parent.parent)
    return sorted(paths)


def confine(data_dir: Path, port: int, read: Iterable[Path] = ()) -> Confinement:
    """Restrict this process (and the threads it starts from now on) to `data_dir` and TCP `port`.

    Call it from the main thread before other threads start: Landlock binds the calling thread and
    its future children only. Raises SandboxError where the kernel has no Landlock.
    """
    version = abi()
    if version < 1:
        raise SandboxError("the kernel has no Landlock (Linux 5.13+ with landlock in the lsm= list)")
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        raise SandboxError(f"{threads} threads already run; confine before the engine and the server start")
    data_dir = Path(data_dir).resolve()
    _private_temp(data_dir)
    fs = _fs_rights(version)
    network = version >= 4
    attr = _RulesetAttr(fs, (BIND_TCP | CONNECT_TCP) if network else 0,
                        (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if version >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if version >= 6 else 16
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        writable = [data_dir, Path("/dev/null"), Path("/dev/zero")]
        readable = [*python_paths(), *(Path(p) for p in _SYSTEM_READ + _READ_ONLY_FILES), *read]
        for path, rights in [*((p, _READ) for p in readable), *((p, _WRITE) for p in writable)]:
            _add_path(ruleset, path, rights, fs)
        if network:
            rule = _NetPortAttr(BIND_TCP, port)
            _syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_NET_PORT), ctypes.byref(rule),
                     ctypes.c_uint32(0))
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
        _syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    except OSError as exc:
        raise SandboxError(f"Landlock refused the rules: {exc}") from None
    finally:
        os.close(ruleset)
    return Confinement(version, network)


def _private_temp(data_dir: Path) -> Path:
    """The engine's temporary files (TMPDIR) in a folder of the data folder, the one place it may write."""
    import tempfile

    temp = data_dir / "tmp"
    temp.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(temp)
    tempfile.tempdir = str(temp)
    return temp


def _add_path(ruleset: int, path: Path, rights: int, handled: int) -> None:
    """Allow `rights` beneath `path` (skipped if it does not exist); files take file rights only."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not path.is_dir():
            rights &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
        rule = _PathBeneathAttr(rights & handled, fd)
        _syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                 ctypes.c_uint32(0))
    finally:
        os.close(fd)


__all__ = ["abi", "confine", "Confinement", "SandboxError", "python_paths"]
