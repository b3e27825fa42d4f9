"""Running stacks, as `tracetune up` records them for commands started in other folders.

`tracetune up` (and `demo`) write one record per stack into a per-user folder (`$XDG_RUNTIME_DIR/tracetune/stacks`,
else `~/.local/state/tracetune/stacks`; the folder 0700, each record 0600): the supervisor's pid, the folder it
runs in, and its settings with paths made absolute. A command started elsewhere without a home of its own reads
the one running stack's settings from it (its tokens, passwords, ports), so `tracetune executor` in a project
folder reaches the stack instead of making a new home with new tokens. The record is removed when the stack stops;
one whose supervisor is gone (killed) is ignored and removed by the next reader.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Stack", "SeveralStacks", "directory", "find", "record", "remove", "running"]

_RECORD_SUFFIX = ".json"


class SeveralStacks(Exception):
    """More than one stack runs and the command named none; the message lists them and says how to name one."""


@dataclass(frozen=True)
class Stack:
    """One running stack: its supervisor's pid, the folder it was started in, its home and settings."""

    pid: int
    folder: Path
    home: Path
    settings: dict[str, str]  # setting name -> value as TRACETUNE_<NAME> would carry it
    path: Path  # the record

    def describe(self) -> str:
        return f"pid {self.pid} in {self.folder} (home {self.home})"


def directory(environ: dict[str, str] | None = None) -> Path:
    """The per-user folder holding the records of running stacks."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "tracetune" / "stacks"
    state = environ.get("XDG_STATE_HOME", "") or str(Path.home() / ".local" / "state")
    return Path(state) / "tracetune" / "stacks"


def record(settings: Any, environ: dict[str, str] | None = None) -> Path:
    """Write this process's stack record (the caller is the stack's supervisor); returns its path."""
    folder = directory(environ)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    values = {name[len("TRACETUNE_"):].lower(): value for name, value in settings.as_env().items()}
    values["home"] = str(Path(settings.home).resolve())
    if values.get("prices_file") and not Path(values["prices_file"]).is_absolute():
        values["prices_file"] = str(Path(values["prices_file"]).resolve())
    body = {"pid": os.getpid(), "started": _started(os.getpid()), "folder": str(Path.cwd()), "home": values["home"],
            "settings": values}
    path = folder / f"{os.getpid()}{_RECORD_SUFFIX}"
    fd, tmp = tempfile.mkstemp(prefix=".stack.", dir=folder)  # mode 0600, then renamed whole into place
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(body, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), "" where /proc is absent: with
    the pid it names one process, so a record whose supervisor died and whose pid was reused is not believed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process under a reused pid: not our supervisor
        return False
    return not started or _started(pid) in (started, "")


def running(environ: dict[str, str] | None = None) -> list[Stack]:
    """The stacks whose supervisor is alive, oldest record first; records of dead supervisors are removed."""
    folder = directory(environ)
    found = []
    for path in sorted(folder.glob(f"*{_RECORD_SUFFIX}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []:
        try:
            info = path.stat()
            if info.st_mode & 0o077 or info.st_uid != os.getuid():  # not ours alone: never trusted
                continue
            body = json.loads(path.read_text())
            stack = Stack(int(body["pid"]), Path(body["folder"]), Path(body["home"]),
                          {str(k): str(v) for k, v in body["settings"].items()}, path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a crash, or not a record
        if _alive(stack.pid, str(body.get("started", ""))) and stack.home.is_dir():
            found.append(stack)
        else:
            remove(path)
    return found


def find(home: Path | None, environ: dict[str, str] | None = None) -> Stack | None:
    """The running stack a command should use.

    `home` given (an explicit setting): the stack with that home, or None (the command uses its settings as they
    are). Not given: the stack whose home is this folder's `.tracetune`, else the only one running, else None
    when none runs; SeveralStacks when several run and none is this folder's."""
    stacks = running(environ)
    if home is not None:
        wanted = Path(home).resolve()
        return next((s for s in stacks if s.home == wanted), None)
    here = (Path.cwd() / ".tracetune").resolve()
    mine = next((s for s in stacks if s.home == here), None)
    if mine is not None or len(stacks) <= 1:
        return mine or (stacks[0] if stacks else None)
    listed = "; ".join(s.describe() for s in stacks)
    raise SeveralStacks(f"{len(stacks)} tracetune stacks are running ({listed}); name one with "
                        "TRACETUNE_HOME=<its home>, or run this from its folder")
