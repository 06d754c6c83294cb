"""The worker's side of a job: the fork server (`Zygote`) and the supervisor (`Worker`) that runs each fold of a
job in a child of its own, enforces the deadline and the memory cap from outside, captures output, and cleans up.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import stat
import struct
import sys
import time
import traceback

from .child import _die_with_parent, child_main
from .wire import ProtocolError, encode_frame, parse_frame, write_all

JOB_DIR = "job"
MEMORY_POLL_S = 0.1  # how often the worker sums the memory of all job processes
ZYGOTE_TIMEOUT_S = 5.0  # the fork server answers in milliseconds; silence this long means it was stopped or wedged
REPORT_STATUSES = ("ok", "syntax_error", "runtime_error", "invalid_output", "memory_exceeded", "sandbox_error")
# A job can fill its tmpfs with a million empty directories in seconds; emptying them takes ~25 µs each. The wipe
# stops at this bound and the worker retires (its namespace or container, tmpfs included, goes with it), so the next
# job meets a fresh worker instead of waiting for the sweep.
WIPE_DEADLINE_S = 2.0
REPORT_TEXT_CAP = 16_384  # characters of a child's message or traceback passed on to the host


class CappedBuffer:
    """Keeps the first and last `cap // 2` bytes of a stream and counts the rest."""

    def __init__(self, cap: int):
        self.half = max(cap // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            del self.tail[:-self.half]

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        if self.total <= len(self.head) + len(self.tail):
            return head + self.tail.decode("utf-8", "replace")
        dropped = self.total - len(self.head) - len(self.tail)
        return f"{head}\n... [{dropped} bytes truncated] ...\n{self.tail.decode('utf-8', 'replace')}"


def _number(value) -> float:
    """A non-negative finite float from a self-reported value, else 0.0 (never raises: the child wrote it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:
        return 0.0
    return number if math.isfinite(number) and number >= 0 else 0.0


def _clip(text: str) -> str:
    if len(text) <= REPORT_TEXT_CAP:
        return text
    half = REPORT_TEXT_CAP // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters truncated] ...\n{text[-half:]}"


def checked_report(report) -> dict:
    """The fields of a child's report the host may see, checked: the program runs in the child's process and can
    write anything to the result channel, so nothing of it is passed on unchecked (types, status, text size)."""
    if not isinstance(report, dict) or report.get("status") not in REPORT_STATUSES:
        return {"status": "invalid_output", "message": "the program corrupted the result channel (its report has no "
                                                       "valid status)"}
    checked = {"status": report["status"]}
    for key in ("message", "error_type", "traceback"):
        value = report.get(key)
        checked[key] = _clip(value) if isinstance(value, str) else ""
    if checked["status"] == "sandbox_error":  # the child's process is the program's: it cannot blame the sandbox
        checked["status"] = "runtime_error"
        checked["message"] = "the job's process reported a failure of its own: " + checked["message"]
    return checked


def empty_directory(path: str, spare: frozenset = frozenset(), deadline: float = math.inf) -> None:
    """Remove everything inside `path` (which stays), whatever a job did to it; raises OSError when it cannot, and
    TimeoutError (an OSError) when `deadline` (time.monotonic()) passes first.

    Iterative, holding one directory descriptor at a time and walking back up through "..": a tree thousands of
    levels deep needs neither recursion (shutil.rmtree recurses) nor a descriptor per level, nor paths longer than
    PATH_MAX. Directories a job made unreadable (mode 000) are given back to their owner first. Other file systems
    (mount points: the local sandbox binds a Python installation under /tmp when it lives there) are not entered,
    and the directories in `spare` ((st_dev, st_ino): the sandbox's own skeleton) are emptied but kept. Only called
    once every process of the job is gone, so nothing changes under it.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        device = os.fstat(fd).st_dev
        pending = [_unlink_files(fd, device, spare, deadline)]  # per open level: the subdirectories still to remove
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"emptying {path} took longer than its bound")
            if pending[-1]:
                name, _ = pending[-1][-1]
                if stat.S_IMODE(os.lstat(name, dir_fd=fd).st_mode) & 0o700 != 0o700:
                    os.chmod(name, 0o700, dir_fd=fd)  # a directory: checked by the listing, nothing can swap it now
                child = os.open(name, flags, dir_fd=fd)
                os.close(fd)
                fd = child
                pending.append(_unlink_files(fd, device, spare, deadline))
            else:
                pending.pop()
                if pending:
                    parent = os.open("..", flags, dir_fd=fd)
                    os.close(fd)
                    fd = parent
                    name, kept = pending[-1].pop()
                    if not kept:
                        os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


def _unlink_files(fd: int, device: int, spare: frozenset, deadline: float = math.inf) -> list[tuple[str, bool]]:
    """Unlink everything but directories in the directory `fd`; its subdirectories on `device`, each with whether
    it is spared."""
    subdirs = []
    with os.scandir(fd) as entries:
        for count, entry in enumerate(entries):
            if count % 1024 == 1023 and time.monotonic() > deadline:
                raise TimeoutError("emptying a directory took longer than its bound")
            if entry.is_dir(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                if info.st_dev == device:  # a mount point shows the mounted root's device: left alone
                    subdirs.append((entry.name, (info.st_dev, info.st_ino) in spare))
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs


def skeleton(root: str) -> frozenset:
    """(st_dev, st_ino) of every directory under `root` on its file system, before any job: what the sandbox
    itself made there (bubblewrap's parent directories of its binds), which wiping keeps."""
    try:
        device = os.lstat(root).st_dev
    except OSError:
        return frozenset()
    found, frontier = set(), [root]
    while frontier:
        current = frontier.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_dev == device:
                    info = entry.stat(follow_symlinks=False)
                    found.add((info.st_dev, info.st_ino))
                    frontier.append(entry.path)
            except OSError:
                continue
    return frozenset(found)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _process_memory(pid: int) -> int:
    """PSS of a process when readable, else its resident memory minus file-backed pages (statm)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            fields = handle.read().split()
        return max(int(fields[1]) - int(fields[2]), 0) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def kill_uid(uid: int) -> None:
    """Kill every process of `uid` from a helper running as that uid (kill(-1) spares only the helper itself)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(20):
                os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


class Zygote:
    """A fork server started before the first job: every job child is forked from it, never from the worker.

    The worker holds each job's data (all its folds) while the job runs; a child forked from the worker would
    inherit that data in its heap and in the worker's stack frames, where a program can find it. The zygote has
    imported the stack and seen no job, so a child starts with nothing but its own fold. The zygote reaps its
    children and reports their exit status and resource use; the worker supervises them through pidfds.
    Stdlib only; `socket.send_fds` passes the child's pipes to the worker.
    """

    def __init__(self, child_uid: int | None, workdir: str):
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            _zygote_main(theirs, child_uid, workdir)
        theirs.close()
        ours.settimeout(ZYGOTE_TIMEOUT_S)
        self._socket = ours
        self._exits: dict[int, dict] = {}

    def _unresponsive(self, what: str) -> ChildProcessError:
        """The fork server did not answer (a job stopped it, or it is wedged): kill it; the worker is damaged."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return ChildProcessError(f"the fork server did not answer ({what}) and was killed")

    def fork(self) -> tuple[int, int, dict]:
        """(pid, job pipe write end, {stdout, stderr, result: read end}) of a new child waiting for its job."""
        import socket

        try:
            self._socket.send(b"fork")
        except OSError:
            raise ChildProcessError("the fork server is gone") from None
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._socket, 1 << 16, 4)
            except TimeoutError:
                raise self._unresponsive("fork") from None
            if not message:
                raise ChildProcessError("the fork server is gone")
            reply = json.loads(message)
            if "exit" in reply:
                self._exits[reply["exit"]] = reply
                continue
            job_fd, stdout_fd, stderr_fd, result_fd = fds
            return reply["pid"], job_fd, {"stdout": stdout_fd, "stderr": stderr_fd, "result": result_fd}

    def wait(self, pid: int) -> tuple[int, dict]:
        """Block until the zygote has reaped `pid`: its wait status and {maxrss_kb, cpu_s}."""
        while pid not in self._exits:
            try:
                message = self._socket.recv(1 << 16)
            except TimeoutError:
                raise self._unresponsive("wait") from None
            if not message:
                raise ChildProcessError("the fork server is gone")
            reply = json.loads(message)
            self._exits[reply["exit"]] = reply
        reply = self._exits.pop(pid)
        return reply["status"], reply


def _zygote_main(control, child_uid: int | None, workdir: str) -> None:
    """The fork server's loop (see `Zygote`). Never returns."""
    import socket

    try:
        _die_with_parent()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        keep = sorted({control.fileno(), 2})
        os.closerange(3, keep[-1])
        os.closerange(keep[-1] + 1, 1 << 16)
        selector = selectors.DefaultSelector()
        selector.register(control, selectors.EVENT_READ, None)
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    if not control.recv(64):
                        os._exit(0)  # the worker is gone
                    pid, fds = _spawn_child(child_uid, workdir)
                    selector.register(os.pidfd_open(pid), selectors.EVENT_READ, pid)
                    socket.send_fds(control, [json.dumps({"pid": pid}).encode()], fds)
                    for fd in fds:
                        os.close(fd)
                else:
                    selector.unregister(key.fileobj)
                    os.close(key.fileobj)
                    _, status, usage = os.wait4(key.data, 0)
                    control.send(json.dumps({"exit": key.data, "status": status, "maxrss_kb": usage.ru_maxrss,
                                             "cpu_s": usage.ru_utime + usage.ru_stime}).encode())
    except BaseException:
        traceback.print_exc()
    os._exit(1)


def _spawn_child(child_uid: int | None, workdir: str) -> tuple[int, list[int]]:
    os.makedirs(workdir, mode=0o700, exist_ok=True)  # made anew after every wipe in a private namespace
    os.chmod(workdir, 0o700)  # elsewhere emptied and kept: undo whatever mode the last job gave it
    if child_uid is not None:
        os.chown(workdir, child_uid, child_uid)
    pipes = {name: os.pipe() for name in ("job", "stdout", "stderr", "result")}
    pid = os.fork()
    if pid == 0:
        child_main(pipes["job"][0], pipes["result"][1], pipes["stdout"][1], pipes["stderr"][1], child_uid, workdir)
    os.close(pipes["job"][0])
    for name in ("stdout", "stderr", "result"):
        os.close(pipes[name][1])
    return pid, [pipes["job"][1], pipes["stdout"][0], pipes["stderr"][0], pipes["result"][0]]


class Worker:
    """Serves jobs one at a time; see the module docstring."""

    def __init__(self, own_pid_namespace: bool, child_uid: int | None, scratch: str):
        self.own_pid_namespace = own_pid_namespace
        self.child_uid = child_uid if (child_uid is not None and os.geteuid() == 0) else None
        self.scratch = scratch
        self.jobs_run = 0
        self._zygote: Zygote | None = None
        self._next: tuple[int, int, dict] | None = None  # (pid, job pipe, output pipes) of the prepared child
        self._deferred = None  # cleanup of the last job, run after its answer is sent
        self.keep_pids: set[int] = set()  # worker processes besides the fork server (the guardian) that sweeps spare
        self._skeleton: dict[str, frozenset] = {}  # per scratch root: directories that were there before any job

    # -- process control
    def _other_pids(self) -> list[int]:
        """Every process in this pid namespace except the worker and its ancestors (init)."""
        keep = {os.getpid(), os.getppid(), 1, self._zygote.pid if self._zygote else 1, *self.keep_pids}
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in keep]

    def _kill_uid(self) -> None:
        kill_uid(self.child_uid)

    def sweep(self, child_pid: int) -> bool:
        """Kill everything the job started; True when nothing of it is left."""
        for _ in range(50):
            try:
                os.killpg(child_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if not self.own_pid_namespace:
                if self.child_uid is not None:
                    self._kill_uid()  # catches descendants that left the process group (setsid)
                return True
            others = self._other_pids()
            if not others:
                return True
            for pid in others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self._reap()
            time.sleep(0.002)
        return not self._other_pids()

    def _namespace_memory(self) -> int:
        """Proportional set size (shared pages split between sharers) of every job process, in bytes.

        0 while the job is a single process: its address-space limit already caps it, and reading smaps walks its
        page tables under the lock its own allocations need (polling a lone child slowed jobs by ~10 %).
        """
        pids = self._other_pids()
        return sum(_process_memory(pid) for pid in pids) if len(pids) > 1 else 0

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _wipe_scratch(self) -> bool:
        """Empty every place a job can write, so the next child's working directory is made anew; False when
        something could not be removed (the worker is then damaged and replaced: a fresh container or bubblewrap
        brings a fresh tmpfs)."""
        # A private namespace owns its whole /tmp and /dev/shm; elsewhere only the job's own directory is ours.
        roots = (self.scratch, "/dev/shm") if self.own_pid_namespace else (os.path.join(self.scratch, JOB_DIR),)
        clean = True
        deadline = time.monotonic() + WIPE_DEADLINE_S
        for root in roots:
            if not os.path.isdir(root):
                continue
            try:
                mode = stat.S_IMODE(os.stat(root).st_mode)
                if mode & 0o700 != 0o700:  # a job sharing the owner's uid made it unreadable: give it back
                    os.chmod(root, 0o700)
                empty_directory(root, self._skeleton.get(root, frozenset()), deadline)
                if mode & 0o700 != 0o700:
                    os.chmod(root, 0o700 if root.endswith(JOB_DIR) else 0o1777)
                os.utime(root, ns=(0, 0))  # its times were the last job's to set (a clock-valued message)
            except OSError as exc:
                print(f"worker: cannot empty {root}: {exc}", file=sys.stderr, flush=True)
                clean = False
        return clean

    # -- one job
    def start(self) -> None:
        """Start the fork server; call once the stack is imported and before any job is read."""
        if self.own_pid_namespace:
            self._skeleton = {root: skeleton(root) for root in (self.scratch, "/dev/shm")}
        self._zygote = Zygote(self.child_uid, os.path.join(self.scratch, JOB_DIR))

    def prepare(self) -> None:
        """Have the next child forked now, so a job pays neither for fork nor for dropping privileges.

        Called after a job is answered and swept, while the host is busy elsewhere (scoring, generating the next
        program), and between the folds of a job. The child waits for its job frame.
        """
        if self._next is None:
            self._next = self._zygote.fork()

    def discard_prepared(self) -> None:
        """Let a prepared child go: it reads end-of-file and exits."""
        if self._next is not None:
            pid, job_fd, read_fds = self._next
            self._next = None
            for fd in (job_fd, *read_fds.values()):
                os.close(fd)

    def run_job(self, job: dict, fold_frames: list[bytes]) -> tuple[dict, list[bytes]]:
        """Run the program once per fold, each fold in a child of its own, under one wall-clock deadline and one
        CPU budget; stop at the first fold that fails.

        One child per fold because a fold's training rows are other folds' evaluation rows, with their labels: a
        program that could reach the other folds (through its caller's frame, the heap, or a file left for the
        next fold) could look its answers up. Children of one job share nothing (each is swept before the next).
        """
        limits = job["limits"]
        cap = int(limits["max_output_bytes"])
        buffers = {"stdout": CappedBuffer(cap), "stderr": CappedBuffer(cap)}
        started = time.monotonic()
        deadline = started + float(limits["wall_time_s"])
        request = {k: job[k] for k in ("program", "entry_point", "predict_method")}
        totals = {"cpu_time_s": 0.0, "peak_memory_mb": 0.0, "job_memory_peak_mb": 0.0, "sweep_s": 0.0,
                  "drain_s": 0.0, "wipe_s": 0.0, "damaged": False}
        header: dict = {"exit_code": 0, "killed_reason": None, "report": {"status": "ok", "message": ""}}
        predictions: list[bytes] = []
        for index, fold_frame in enumerate(fold_frames):
            cpu_left = math.ceil(float(limits["cpu_time_s"]) - totals["cpu_time_s"])
            fold_limits = dict(limits, cpu_time_s=max(1, cpu_left))
            header, outputs = self._run_child(encode_frame(dict(request, limits=fold_limits), [fold_frame]),
                                              fold_limits, deadline, buffers, last=index == len(fold_frames) - 1)
            for key in ("cpu_time_s", "sweep_s", "drain_s", "wipe_s"):
                totals[key] += header[key]
            for key in ("peak_memory_mb", "job_memory_peak_mb"):
                totals[key] = max(totals[key], header[key])
            totals["damaged"] = totals["damaged"] or header["damaged"]
            failed = header["killed_reason"] or header["exit_code"] or header.get("report", {}).get("status") != "ok"
            if failed or len(outputs) != 1:
                predictions = []
                header["failed_fold"] = index
                break
            if header["damaged"] and index < len(fold_frames) - 1:
                # The sweep after this fold could not clear what it left (a flood outlasting its bound): the next
                # fold would find it. Stop here; the worker retires after the answer.
                predictions = []
                header.update(killed_reason="scratch_not_cleared", failed_fold=index)
                break
            predictions += outputs
        self.jobs_run += 1
        header.update(totals, type="result", duration_s=time.monotonic() - started,
                      stdout=buffers["stdout"].text(), stderr=buffers["stderr"].text(),
                      stdout_bytes=buffers["stdout"].total, stderr_bytes=buffers["stderr"].total)
        return header, predictions

    def _run_child(self, request: bytes, limits: dict, deadline: float, buffers: dict,
                   last: bool) -> tuple[dict, list[bytes]]:
        """Hand `request` (one fold) to the prepared child and supervise it to the end."""
        self.prepare()
        pid, job_fd, read_fds = self._next
        self._next = None
        try:
            write_all(job_fd, request)
        except OSError:  # the child died before its job arrived; the supervisor below reports what happened
            pass
        os.close(job_fd)
        return self._supervise(pid, read_fds, limits, deadline, buffers, defer_cleanup=last)

    def finish(self) -> bool:
        """Run the cleanup a job's answer did not wait for; False when the sandbox is damaged (exit, be replaced)."""
        cleanup, self._deferred = self._deferred, None
        return cleanup is None or not cleanup()["damaged"]

    def _supervise(self, pid: int, read_fds: dict, limits: dict, deadline: float, buffers: dict,
                   defer_cleanup: bool = False) -> tuple[dict, list[bytes]]:
        """Watch a child until its result is complete, it exits, or a limit is hit; then clean up after it.

        A complete result ends the job: the child's only work left is to exit, which costs milliseconds for a
        process this size. With `defer_cleanup` the answer is built at once and killing, reaping, sweeping and
        wiping wait in `self._deferred` until the worker has replied (`finish` runs before the next child).
        """
        kill_at = int(limits["output_kill_bytes"])
        result_cap = int(limits["max_result_bytes"])
        result = bytearray()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # the child is already dead and reaped (it failed before its job could start)
            pidfd = None
        selector = selectors.DefaultSelector()
        for name, fd in read_fds.items():
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, name)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ, "exit")
        reason, exited, complete = None, pidfd is None, False
        memory_cap = int(limits["memory_mb"]) << 20
        peak_total = 0
        while not (exited or complete) and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in selector.select(timeout=min(remaining, MEMORY_POLL_S)):
                if key.data == "exit":
                    exited = True
                    continue
                reason = self._drain(key, selector, buffers, result, kill_at, result_cap) or reason
            # The child wrote its result and closed the channel (a crash closes it empty).
            complete = bool(result) and read_fds["result"] not in selector.get_map()
            if self.own_pid_namespace and not (exited or complete):
                # Address-space limits are per process; a job that forks could still sum past the memory limit.
                total = self._namespace_memory()
                peak_total = max(peak_total, total)
                if total > memory_cap:
                    reason = reason or "memory"
        state = {"pid": pid, "pidfd": pidfd, "selector": selector, "buffers": buffers, "result": result,
                 "kill_at": kill_at, "result_cap": result_cap, "reason": reason, "complete": complete}
        if defer_cleanup and complete and reason is None and not exited:
            for name in ("stdout", "stderr"):  # what the child printed before its result is in the pipes now
                self._drain_now(read_fds[name], selector, buffers, name)
            self._deferred = lambda: self._clean_up(**state)
            facts = {"exit_code": 0, "killed_reason": None, "damaged": False, "sweep_s": 0.0, "drain_s": 0.0,
                     "wipe_s": 0.0}
        else:
            facts = self._clean_up(**state)
        header = {key: value for key, value in facts.items() if key not in ("maxrss_kb", "cpu_s")}
        header["job_memory_peak_mb"] = peak_total / (1 << 20)
        child_blobs: list[bytes] = []
        usage: dict = {"maxrss_kb": facts.get("maxrss_kb", 0), "cpu_s": facts.get("cpu_s", 0.0)}
        if header["killed_reason"] is None and result:
            try:
                report, child_blobs = parse_frame(bytes(result), max_header=1 << 20)
                header["report"] = checked_report(report)
                if "maxrss_kb" not in facts and isinstance(report.get("usage"), dict):
                    # self-reported (the child is not reaped yet): the program may have written it, so checked by
                    # _number and held to the limits it ran under
                    usage = {"maxrss_kb": min(_number(report["usage"].get("maxrss_kb")),
                                              float(limits["memory_mb"]) * 1024),
                             "cpu_s": min(_number(report["usage"].get("cpu_s")), float(limits["cpu_time_s"]))}
            except (ProtocolError, struct.error, ValueError) as exc:
                header["report"] = {"status": "invalid_output",
                                    "message": f"the program corrupted the result channel ({exc})"}
        header["peak_memory_mb"] = _number(usage.get("maxrss_kb")) / 1024.0
        header["cpu_time_s"] = _number(usage.get("cpu_s"))
        return header, child_blobs

    def _clean_up(self, pid: int, pidfd: int, selector, buffers: dict, result: bytearray, kill_at: int,
                  result_cap: int, reason: str | None, complete: bool) -> dict:
        """Kill what is left of a child's job, reap it, sweep, collect late output, wipe; the facts for the answer."""
        if reason is not None or complete:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            wait_status, usage = self._zygote.wait(pid)
            server_alive = True
        except ChildProcessError:  # the job killed the fork server, its parent: this worker must be replaced
            wait_status, usage, server_alive = signal.SIGKILL, {"maxrss_kb": 0, "cpu_s": 0.0}, False
            reason = reason or "killed_sandbox"
        if pidfd is not None:
            selector.unregister(pidfd)
            os.close(pidfd)
        sweep_started = time.monotonic()
        clean = self.sweep(pid)
        # Writers are gone now: collect what is still buffered in the pipes.
        drain_started = time.monotonic()
        while selector.get_map() and time.monotonic() < drain_started + 1.0:
            for key, _ in selector.select(timeout=0.1):
                late = self._drain(key, selector, buffers, result, kill_at, result_cap)  # always drain
                reason = reason or late
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
            os.close(key.fileobj)
        selector.close()
        self._reap()
        wipe_started = time.monotonic()
        wiped = self._wipe_scratch()
        # A complete result was killed by us: how the process ended says nothing about the job.
        exit_code = 0 if complete and reason is None else os.waitstatus_to_exitcode(wait_status)
        return {"exit_code": exit_code, "killed_reason": reason, "damaged": not (clean and server_alive and wiped),
                "maxrss_kb": usage["maxrss_kb"], "cpu_s": usage["cpu_s"],
                "sweep_s": drain_started - sweep_started, "drain_s": wipe_started - drain_started,
                "wipe_s": time.monotonic() - wipe_started}

    def _drain_now(self, fd: int, selector, buffers: dict, name: str) -> None:
        """Read what `fd` holds right now, without waiting for more."""
        if fd not in selector.get_map():
            return
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                return
            buffers[name].feed(data)

    def _drain(self, key, selector, buffers, result, kill_at, result_cap) -> str | None:
        try:
            data = os.read(key.fileobj, 1 << 16)
        except BlockingIOError:
            return None
        if not data:
            selector.unregister(key.fileobj)
            os.close(key.fileobj)
            return None
        if key.data == "result":
            result += data
            return "result_too_large" if len(result) > result_cap else None
        buffers[key.data].feed(data)
        return "output_flood" if buffers["stdout"].total + buffers["stderr"].total > kill_at else None
