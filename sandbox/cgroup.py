"""A memory cgroup around one local worker: the limit covers what the job makes the kernel hold for it.

The worker's own memory check sums the job processes' memory, which misses kernel memory: socket buffers, tmpfs
files, inodes and dentries (an adversarial review held 4 GiB in UNIX socket buffers under a 2 GiB limit). A memory
cgroup charges all of it: cgroup v2 always; v1 where kernel-memory accounting is on (the default; these machines
have it). The host makes one cgroup per worker, starts the worker inside it (`wrap`: the first process joins before
it execs, so nothing escapes by forking early), reads its OOM-kill counter to name a job that hit the limit
`memory_exceeded`, and removes it when the worker is gone. Docker already puts each container in one; `existing`
finds it so the same counter serves both backends.

Needs root (or a delegated subtree); elsewhere `create` returns None with the reason, and the local backend falls
back to process memory only (stated once in the log and in the README).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
GROUP = "etpo-gym"  # every worker's cgroup lives under this one


class MemoryCgroup:
    """One memory cgroup: `path` and its version (1 or 2)."""

    def __init__(self, path: Path, version: int, owned: bool):
        self.path, self.version, self.owned = path, version, owned

    # -- finding and making
    @staticmethod
    def unavailable_reason() -> str | None:
        """Why no worker cgroup can be made here, or None when one can."""
        if os.geteuid() != 0:
            return "not running as root"
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            return None if os.access(V1_ROOT, os.W_OK) else f"{V1_ROOT} is not writable"
        controllers = V2_ROOT / "cgroup.controllers"
        if controllers.exists():
            if "memory" not in controllers.read_text().split():
                return "the cgroup v2 memory controller is not enabled"
            return None if os.access(V2_ROOT, os.W_OK) else f"{V2_ROOT} is not writable"
        return "no cgroup memory controller is mounted"

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup | None:
        """A fresh cgroup limited to `limit_bytes` (no swap), or None (logged once) where the host allows none."""
        reason = cls.unavailable_reason()
        if reason is None:
            try:
                return cls._create(limit_bytes)
            except OSError as exc:
                reason = str(exc)
        _log_fallback_once(reason)
        return None

    @classmethod
    def _create(cls, limit_bytes: int) -> MemoryCgroup:
        name = f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            parent = V1_ROOT / GROUP
            parent.mkdir(exist_ok=True)
            group = cls(parent / name, 1, owned=True)
            group.path.mkdir()
            group._write("memory.limit_in_bytes", limit_bytes)
            if (group.path / "memory.memsw.limit_in_bytes").exists():  # memory plus swap: no swapping out of it
                group._write("memory.memsw.limit_in_bytes", limit_bytes)
            return group
        parent = V2_ROOT / GROUP
        parent.mkdir(exist_ok=True)
        for level in (V2_ROOT, parent):  # let the children of each level have a memory controller
            (level / "cgroup.subtree_control").write_text("+memory")
        group = cls(parent / name, 2, owned=True)
        group.path.mkdir()
        group._write("memory.max", limit_bytes)
        group._write("memory.swap.max", 0)
        return group

    @classmethod
    def existing(cls, candidates: list[Path]) -> MemoryCgroup | None:
        """The first of `candidates` that is a memory cgroup (e.g. a container's), not owned (never removed)."""
        for path in candidates:
            if (path / "memory.oom_control").exists():
                return cls(path, 1, owned=False)
            if (path / "memory.events").exists():
                return cls(path, 2, owned=False)
        return None

    # -- using
    def wrap(self, command: list[str]) -> list[str]:
        """`command`, started inside this cgroup: a shell joins it, then execs the command."""
        procs = str(self.path / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *command]

    def oom_kills(self) -> int:
        """Processes the kernel killed for this cgroup's limit so far (0 when unreadable)."""
        return self._counter("memory.oom_control" if self.version == 1 else "memory.events", "oom_kill")

    def limit_hits(self) -> int:
        """Times an allocation met this cgroup's limit so far (0 when unreadable). Some allocations fail there
        instead of calling the OOM killer (socket buffers, for one), so a job can hit the limit and kill nothing."""
        return self._counter("memory.failcnt") if self.version == 1 else self._counter("memory.events", "max")

    def _counter(self, name: str, key: str | None = None) -> int:
        """A counter of the cgroup: file `name` holding one number, or the value of its line `key <value>`; 0 when
        unreadable."""
        try:
            text = (self.path / name).read_text()
            if key is None:
                return int(text)
            for line in text.splitlines():
                found, _, value = line.partition(" ")
                if found == key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, wait_s: float = 2.0) -> None:
        """Remove the cgroup once its processes are gone: killed processes leave it a moment after their parent
        is reaped, so this waits up to `wait_s` (best effort: `etpo sandbox prune` removes what is left)."""
        if not self.owned:
            return
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    log.debug("cannot remove %s: %s", self.path, exc)
                    return
                time.sleep(0.02)

    def _write(self, name: str, value: int) -> None:
        (self.path / name).write_text(str(value))


def prune_empty() -> list[str]:
    """Remove worker cgroups no process is in (left by a host process that was killed); their names."""
    removed = []
    for root in (V1_ROOT / GROUP, V2_ROOT / GROUP):
        for group in sorted(root.glob("worker-*")) if root.is_dir() else []:
            try:
                if not (group / "cgroup.procs").read_text().strip():
                    group.rmdir()
                    removed.append(group.name)
            except OSError:
                continue
    return removed


_warned: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("local sandbox: no memory cgroup (%s); its memory limit counts the job's processes only, not "
                    "kernel memory (socket buffers, tmpfs inodes). Run as root on a host with a cgroup memory "
                    "controller, or use the docker backend.", reason)
