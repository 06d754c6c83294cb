"""Host side of every backend: a pool of warm workers, the request/response exchange, and result validation.

A backend only says how to start one isolated worker (`Launcher`); the pool starts workers on demand (nothing
before the first `run`), serves up to `parallelism` concurrent `run` calls, recycles a worker after a number of
jobs or on any sign of damage, and kills a worker that does not answer in time (never waits on it).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import threading
import time
import weakref
from dataclasses import asdict

import numpy as np

from sandbox import worker as wire
from sandbox.api import Job, Limits, RunResult, Status

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing the stack in a cold container on a loaded machine
RESPONSE_GRACE_S = 10.0  # on top of the job's wall time, before the worker itself is declared wedged
MAX_CLASSES_RETURNED = 1024  # bounds what a job may send back (rows x columns x 8 bytes)


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this host; the message names the fix."""


class WorkerLost(Exception):
    """The worker died, stopped answering, or broke the protocol."""


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

    def send(self, data: bytes) -> None:
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
            raise WorkerLost(f"protocol error: {exc}") from None


Launcher = "Callable[[int], WorkerHandle]"  # slot number -> started worker (documentation alias)


# ------------------------------------------------------------------------------------------------ messages

def _limit_hint(limits: Limits) -> str:
    return (f"limits: {limits.wall_time_s:g}s wall, {limits.cpu_time_s}s CPU, {limits.memory_mb} MiB memory, "
            f"{limits.max_processes} processes")


def _timeout_message(limits: Limits, cpu: bool) -> str:
    what = f"{limits.cpu_time_s}s CPU-time" if cpu else f"{limits.wall_time_s:g}s wall-clock"
    return (f"The program exceeded the {what} limit and was stopped. Make it faster: fewer estimators or "
            "iterations, smaller search grids, no loops over rows, no sleeping or waiting for input.")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _n_rows(X) -> int:
    return int(X.shape[0]) if hasattr(X, "shape") else len(X)


def validate_predictions(blobs: list[bytes], job: Job) -> tuple[list[np.ndarray] | None, str]:
    """Check what came back against the job: one finite float array per fold with one row per eval row."""
    if len(blobs) != len(job.folds):
        return None, f"expected predictions for {len(job.folds)} fold(s), got {len(blobs)}"
    out = []
    for i, (blob, fold) in enumerate(zip(blobs, job.folds)):
        try:
            array = wire.npy_to_array(blob)
        except Exception as exc:  # malformed or object array: refuse, never unpickle
            return None, f"fold {i}: the prediction is not a plain numeric array ({type(exc).__name__})"
        expected = _n_rows(fold.X_eval)
        method = job.predict_method
        if array.dtype.kind not in "biuf":
            return None, f"fold {i}: `{method}` returned dtype {array.dtype}; it must return numbers"
        if array.ndim not in (1, 2) or array.shape[0] != expected or (array.ndim == 2 and array.shape[1] == 0):
            return None, (f"fold {i}: `{method}` returned shape {array.shape}, expected ({expected}, n_classes) "
                          f"with one row per row of X (X had {expected} rows)")
        array = array.astype(np.float64, copy=False)
        bad = int(np.size(array) - np.isfinite(array).sum())
        if bad:
            return None, (f"fold {i}: `{method}` returned {bad} NaN or infinite value(s) out of {array.size}; "
                          "check missing-value handling and divisions")
        out.append(array)
    return out, ""


def build_result(header: dict, blobs: list[bytes], job: Job, limits: Limits, isolation: str) -> RunResult:
    """Turn the worker's raw facts into a status and a message an LLM can act on."""
    def text(key: str) -> str:
        value = header.get(key, "")
        return value if isinstance(value, str) else ""

    report = header.get("report") if isinstance(header.get("report"), dict) else None
    result = RunResult(status=Status.SANDBOX_ERROR, stdout=text("stdout"), stderr=text("stderr"),
                       duration_s=float(header.get("duration_s") or 0.0),
                       peak_memory_mb=float(header.get("peak_memory_mb") or 0.0), isolation=isolation,
                       extra={"exit_code": header.get("exit_code"), "cpu_time_s": header.get("cpu_time_s"),
                              "stdout_bytes": header.get("stdout_bytes"), "stderr_bytes": header.get("stderr_bytes"),
                              "sweep_s": header.get("sweep_s"), "drain_s": header.get("drain_s"),
                              "job_memory_peak_mb": header.get("job_memory_peak_mb")})
    reason = header.get("killed_reason")
    exit_code = header.get("exit_code") if isinstance(header.get("exit_code"), int) else 0
    if reason == "timeout":
        result.status, result.message = Status.TIMEOUT, _timeout_message(limits, cpu=False)
    elif reason == "output_flood":
        result.status = Status.OUTPUT_EXCEEDED
        result.message = (f"The program printed more than {limits.output_kill_bytes} bytes and was stopped. "
                          "Remove print statements in loops and turn off verbose output of estimators.")
    elif reason == "memory":
        result.status = Status.MEMORY_EXCEEDED
        result.message = (f"The program's processes together used more than the {limits.memory_mb} MiB memory "
                          "limit and were stopped. Use fewer processes (n_jobs=1) and less memory.")
    elif reason == "killed_sandbox":
        result.message = ("The program killed a process of the sandbox itself (its parent, or everything with "
                          "kill -1); the sandbox was replaced. Do not signal other processes.")
    elif reason == "result_too_large":
        result.status = Status.INVALID_OUTPUT
        result.message = "The program's predictions were far larger than one row per input row; it was stopped."
    elif report is not None:
        _apply_report(result, report, blobs, job, limits)
    elif exit_code < 0:
        _apply_signal(result, -exit_code, limits)
    else:
        result.status = Status.RUNTIME_ERROR
        result.message = (f"The process exited with code {exit_code} before returning predictions (did the "
                          f"program call os._exit or exit the interpreter?). Return a fitted model from "
                          f"`{job.entry_point}` instead of exiting.")
    failed_fold = header.get("failed_fold")
    if not result.ok and isinstance(failed_fold, int) and len(job.folds) > 1:
        # Folds run in order and the first failure stops the job: say where, since it may be data-dependent.
        result.message += f" (in fold {failed_fold + 1} of {len(job.folds)})"
        result.extra["failed_fold"] = failed_fold
    return result


def _apply_report(result: RunResult, report: dict, blobs: list[bytes], job: Job, limits: Limits) -> None:
    def field(key: str) -> str:
        value = report.get(key)
        return value if isinstance(value, str) else ""

    try:
        status = Status(report.get("status"))
    except ValueError:
        status = Status.INVALID_OUTPUT
    result.status, result.message = status, field("message")
    result.error_type = field("error_type") or None
    result.traceback = field("traceback")
    if status is Status.OK:
        predictions, problem = validate_predictions(blobs, job)
        if predictions is None:
            result.status, result.message = Status.INVALID_OUTPUT, problem
        else:
            result.predictions = predictions
    elif status is Status.MEMORY_EXCEEDED:
        result.message = (f"The program ran out of memory ({limits.memory_mb} MiB limit): {result.message}. "
                          "Use smaller models, fewer features or avoid copying the data.")
    elif status is Status.SYNTAX_ERROR:
        result.message = f"The program does not compile: {result.message}"
    elif status is Status.RUNTIME_ERROR and result.error_type and result.message.startswith(result.error_type):
        result.message = f"The program raised {result.message}"
    elif status is Status.INVALID_OUTPUT:
        result.message = f"Invalid output: {result.message}"


def _apply_signal(result: RunResult, number: int, limits: Limits) -> None:
    name = _signal_name(number)
    near_memory_limit = result.peak_memory_mb >= 0.8 * limits.memory_mb
    if number == signal.SIGXCPU:
        result.status, result.message = Status.TIMEOUT, _timeout_message(limits, cpu=True)
    elif near_memory_limit or (number == signal.SIGKILL and result.isolation == "docker"):
        result.status = Status.MEMORY_EXCEEDED
        result.message = (f"The program was killed ({name}) after using about {result.peak_memory_mb:.0f} MiB; "
                          f"the limit is {limits.memory_mb} MiB. Use less memory.")
    else:
        result.status = Status.KILLED_BY_SIGNAL
        result.message = (f"The program crashed with {name} (for example a segmentation fault from ctypes or a "
                          "native library, or unbounded recursion). Use plain scikit-learn/pandas code.")
    result.error_type = name


# --------------------------------------------------------------------------------------------------- pool

def encode_job(job: Job, limits: Limits) -> bytes:
    """The request frame: program text and limits, then one frame per fold (JSON + npy), which the worker hands
    to that fold's child alone."""
    fold_frames = [wire.encode_fold(fold.X_fit, fold.y_fit, fold.X_eval) for fold in job.folds]
    eval_rows = sum(_n_rows(f.X_eval) for f in job.folds)
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


class PooledSandbox:
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
        self._finalizer = weakref.finalize(self, PooledSandbox._kill_all, list(self._idle.queue))

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
            if result is None:  # the worker was damaged by the previous job and refused this one: once more
                result = self._run_on(slot, job, request) or RunResult(
                    Status.SANDBOX_ERROR, message="a fresh sandbox worker refused the job as well",
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
        eval_rows = sum(_n_rows(f.X_eval) for f in job.folds)
        deadline = time.monotonic() + self.limits.wall_time_s + RESPONSE_GRACE_S
        try:
            slot.handle.send(request)
            header, blobs = slot.handle.read_frame(deadline, max_body=result_budget(eval_rows, len(job.folds)))
        except TimeoutError:
            self._retire(slot)
            return RunResult(Status.TIMEOUT, message=_timeout_message(self.limits, cpu=False) +
                             " (the sandbox worker stopped answering and was replaced)",
                             duration_s=time.monotonic() - started, isolation=self.isolation)
        except (WorkerLost, OSError) as exc:
            details = slot.handle.diagnostics() if slot.handle else ""
            self._retire(slot)
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
        if header.get("damaged") or slot.jobs >= self.recycle_after:
            self._retire(slot)
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

    def __enter__(self) -> PooledSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} isolation={self.isolation} parallelism={self.parallelism}>"
