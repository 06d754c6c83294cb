"""Host side of every backend: a pool of warm workers and the request/response exchange (results: `sandbox.results`).

A backend only says how to start one isolated worker (`Launcher`); the pool starts workers on demand (nothing
before the first `run`), serves up to `parallelism` concurrent `run` calls, recycles a worker after a number of
jobs or on any sign of damage, and kills a worker that does not answer in time (never waits on it).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
import weakref
from dataclasses import asdict

from sandbox.api import Job, Limits, RunResult, Status
from sandbox.results import build_result, n_rows
from sandbox.worker import wire

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing the stack in a cold container on a loaded machine
RESPONSE_GRACE_S = 10.0  # on top of the job's wall time, before the worker itself is declared wedged
SEND_TIMEOUT_S = 10.0  # a worker waiting for its next job takes it at once; plus SEND_RATE for a large one
SEND_RATE = 50 << 20  # bytes per second a busy machine still moves through a pipe or the attach socket
MAX_CLASSES_RETURNED = 1024  # bounds what a job may send back (rows x columns x 8 bytes)


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this host; the message names the fix."""


class WorkerLost(Exception):
    """The worker died, stopped answering, or broke the protocol."""


class Malformed(WorkerLost):
    """The worker's answer is not a well-formed, bounded frame (its stream can no longer be trusted)."""


def write_with_deadline(fd: int, data: bytes, deadline: float) -> None:
    """Write all of `data` to a pipe without blocking past `deadline` (TimeoutError): a stopped reader fills the
    pipe, and a plain blocking write would then wait forever."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        _, ready, _ = select.select([], [fd], [], remaining)
        if ready:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue


class FdReader:
    """Reads exact byte counts from a file descriptor with a deadline (select, so a silent peer cannot hang us)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.fd], [], [], remaining)
        if not ready:
            raise TimeoutError
        chunk = self._read_chunk()
        if chunk is None:
            raise WorkerLost("the worker closed its output")
        self.buffer += chunk

    def _read_chunk(self) -> bytes | None:
        """Payload bytes now available (possibly none), or None at end of stream."""
        return os.read(self.fd, 1 << 20) or None

    def read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            self._fill(deadline)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class WorkerHandle:
    """One started worker: send frames, read frames, kill. Subclasses supply the transport."""

    isolation = ""
    memory_cgroup = None  # a `sandbox.cgroup.MemoryCgroup` around the worker, where the backend has one

    def memory_events(self) -> tuple[int, int]:
        """(processes the kernel killed for the worker's memory limit, allocations that met it) so far; (0, 0)
        without a cgroup. A job during which either rose ran out of memory, whatever else it reports."""
        group = self.memory_cgroup
        return (group.oom_kills(), group.limit_hits()) if group is not None else (0, 0)

    def send(self, data: bytes, deadline: float) -> None:
        """Write one frame; TimeoutError when the worker does not take it by `deadline`."""
        raise NotImplementedError

    def reader(self) -> FdReader:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def diagnostics(self) -> str:
        return ""

    def read_frame(self, deadline: float, max_body: int) -> tuple[dict, list[bytes]]:
        reader = self.reader()
        try:
            return wire.read_frame(lambda n: reader.read_exact(n, deadline), max_header=16 << 20, max_body=max_body)
        except wire.ProtocolError as exc:
            raise Malformed(f"protocol error: {exc}") from None


Launcher = "Callable[[int], WorkerHandle]"  # slot number -> started worker (documentation alias)


# --------------------------------------------------------------------------------------------------- pool

def encode_job(job: Job, limits: Limits) -> bytes:
    """The request frame: program text and limits, then one frame per fold (JSON + npy), which the worker hands
    to that fold's child alone."""
    fold_frames = [wire.encode_fold(fold.X_fit, fold.y_fit, fold.X_eval) for fold in job.folds]
    eval_rows = sum(n_rows(f.X_eval) for f in job.folds)
    wire_limits = dict(asdict(limits), max_result_bytes=result_budget(eval_rows, len(job.folds)))
    header = {"type": "job", "program": job.program, "entry_point": job.entry_point,
              "predict_method": job.predict_method, "limits": wire_limits}
    return wire.encode_frame(header, fold_frames)


def result_budget(eval_rows: int, n_folds: int) -> int:
    return 8 * eval_rows * MAX_CLASSES_RETURNED + 4096 * (n_folds + 1) + (1 << 16)


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.handle: WorkerHandle | None = None
        self.jobs = 0
        self.info: dict = {}


class WorkerSandbox:
    """A `Sandbox` over warm workers started by `launcher(slot_index)`; thread-safe up to `parallelism`."""

    def __init__(self, isolation: str, launcher, limits: Limits | None = None, parallelism: int | None = None,
                 recycle_after: int = 500):
        self.isolation = isolation
        self.limits = limits or Limits()
        self.parallelism = max(1, int(parallelism or os.cpu_count() or 1))
        self.recycle_after = recycle_after
        self._launcher = launcher
        self._idle: queue.LifoQueue[_Slot] = queue.LifoQueue()
        for index in reversed(range(self.parallelism)):
            self._idle.put(_Slot(index))
        self._lock = threading.Lock()
        self._busy: set[_Slot] = set()
        self._closed = False
        self.stats = {"jobs": 0, "workers_started": 0, "workers_replaced": 0}
        # Runs on garbage collection or at interpreter exit, whichever comes first: no worker outlives us.
        self._finalizer = weakref.finalize(self, WorkerSandbox._kill_all, list(self._idle.queue))

    @staticmethod
    def _kill_all(slots: list[_Slot]) -> None:
        for slot in slots:
            if slot.handle is not None:
                try:
                    slot.handle.kill()
                except Exception:  # best effort at shutdown
                    log.debug("kill failed", exc_info=True)
                slot.handle = None

    # -- protocol
    def run(self, job: Job) -> RunResult:
        if not isinstance(job, Job):
            raise TypeError(f"Sandbox.run expects a sandbox.Job, got {type(job).__name__}")
        if self._closed:
            raise RuntimeError("this sandbox is closed")
        try:
            request = encode_job(job, self.limits)
        except Exception as exc:
            raise TypeError(f"cannot send this job's data to the sandbox: {exc}") from exc
        slot = self._idle.get()
        with self._lock:
            self._busy.add(slot)
        try:
            result = self._run_on(slot, job, request)
            if result is None:  # the previous job left the worker damaged or busy, and it refused or never took
                # this one: once more, on a fresh worker
                result = self._run_on(slot, job, request) or RunResult(
                    Status.SANDBOX_ERROR, message="a fresh sandbox worker did not take the job either",
                    isolation=self.isolation)
            return result
        finally:
            with self._lock:
                self._busy.discard(slot)
            if self._closed:
                self._kill_all([slot])
            self._idle.put(slot)

    def _start(self, slot: _Slot) -> None:
        handle = self._launcher(slot.index)
        try:
            hello, _ = handle.read_frame(time.monotonic() + STARTUP_TIMEOUT_S, max_body=0)
        except (WorkerLost, TimeoutError, OSError) as exc:
            details = handle.diagnostics()
            handle.kill()
            raise SandboxUnavailable(f"the {self.isolation} sandbox worker did not start ({exc}). {details}") from None
        if hello.get("type") != "ready":
            handle.kill()
            raise SandboxUnavailable(f"unexpected greeting from the worker: {hello!r}")
        slot.handle, slot.jobs, slot.info = handle, 0, hello
        self.stats["workers_started"] += 1

    def _retire(self, slot: _Slot) -> None:
        if slot.handle is not None:
            slot.handle.kill()
            slot.handle = None
            self.stats["workers_replaced"] += 1

    def _run_on(self, slot: _Slot, job: Job, request: bytes) -> RunResult | None:
        started = time.monotonic()
        try:
            if slot.handle is None:
                self._start(slot)
        except SandboxUnavailable as exc:
            return RunResult(Status.SANDBOX_ERROR, message=str(exc), isolation=self.isolation)
        eval_rows = sum(n_rows(f.X_eval) for f in job.folds)
        memory_events = slot.handle.memory_events()
        stage = "take"
        try:
            slot.handle.send(request, time.monotonic() + SEND_TIMEOUT_S + len(request) / SEND_RATE)
            stage = "answer"
            # The worker enforces the job's wall time itself and answers then; silence past the grace is the worker's.
            deadline = time.monotonic() + self.limits.wall_time_s + RESPONSE_GRACE_S
            header, blobs = slot.handle.read_frame(deadline, max_body=result_budget(eval_rows, len(job.folds)))
        except TimeoutError:
            self._retire(slot)
            if stage == "take":  # the worker never took it (still sweeping up after the job before): once more
                return None
            return RunResult(Status.SANDBOX_ERROR, message=(
                f"the sandbox worker did not {stage} the job in time (it was stopped or wedged, perhaps by this "
                "program signalling or stopping sandbox processes); it was killed and replaced. Do not signal "
                "other processes."), duration_s=time.monotonic() - started, isolation=self.isolation)
        except Malformed as exc:
            self._retire(slot)
            return RunResult(Status.INVALID_OUTPUT, message=(
                f"Invalid output: the sandbox's answer was malformed ({exc}); the program may have written to the "
                "sandbox's own channels. The sandbox worker was replaced."),
                duration_s=time.monotonic() - started, isolation=self.isolation)
        except (WorkerLost, OSError) as exc:
            details = slot.handle.diagnostics() if slot.handle else ""
            out_of_memory = slot.handle is not None and _rose(memory_events, slot.handle.memory_events())
            self._retire(slot)
            if out_of_memory:
                return self._out_of_memory(RunResult(Status.SANDBOX_ERROR, duration_s=time.monotonic() - started,
                                                     isolation=self.isolation))
            return RunResult(Status.SANDBOX_ERROR, message=f"the sandbox worker died during the job ({exc}); the "
                             "program may have killed it (for example with kill -1 or by signalling its parent). "
                             f"It was replaced; do not signal other processes. {details}".strip(),
                             duration_s=time.monotonic() - started,
                             isolation=self.isolation)
        if header.get("type") == "damaged":  # the damage was the previous job's, found after its answer
            self._retire(slot)
            return None
        slot.jobs += 1
        self.stats["jobs"] += 1
        if header.get("type") != "result":
            self._retire(slot)
            return RunResult(Status.SANDBOX_ERROR, message=f"unexpected worker reply {header.get('type')!r}",
                             isolation=self.isolation)
        result = build_result(header, blobs, job, self.limits, self.isolation)
        if not result.ok and _rose(memory_events, slot.handle.memory_events()):
            result = self._out_of_memory(result)
        if header.get("damaged") or slot.jobs >= self.recycle_after:
            self._retire(slot)
        return result

    def _out_of_memory(self, result: RunResult) -> RunResult:
        """The kernel killed a process for the worker's memory cgroup during this job: the job's doing."""
        result.status, result.error_type = Status.MEMORY_EXCEEDED, "MemoryError"
        result.message = (
            f"The program exceeded the {self.limits.memory_mb} MiB memory limit, counting what it made the kernel "
            "hold (socket buffers, files and directories in /tmp, page cache) as well as its processes' memory, "
            "and was stopped. Use less memory, and do not hoard sockets, files or directories.")
        return result

    def warm_up(self, n: int | None = None) -> None:
        """Start up to `n` workers now (default: all) so the first jobs do not pay for imports."""
        slots = [self._idle.get() for _ in range(min(n or self.parallelism, self.parallelism))]
        try:
            threads = [threading.Thread(target=self._start, args=(s,)) for s in slots if s.handle is None]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for s in slots:
                self._idle.put(s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        idle = []
        while True:
            try:
                idle.append(self._idle.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            busy = list(self._busy)
        # Busy workers are killed too: their `run` calls return promptly with a sandbox_error.
        self._kill_all(idle + busy)
        for s in idle:
            self._idle.put(s)
        self._after_close()

    def _after_close(self) -> None:
        """Backend-specific cleanup once every worker is gone."""

    def __enter__(self) -> WorkerSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} isolation={self.isolation} parallelism={self.parallelism}>"


def _rose(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    return any(b > a for a, b in zip(before, after))
