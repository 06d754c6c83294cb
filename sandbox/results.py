"""Host side: turn a worker's answer (its raw facts and the prediction blobs) into a `RunResult`.

A status and a message an LLM can act on; predictions validated for count, shape, dtype and finiteness before
anything of them reaches a metric. Nothing is unpickled: blobs are `.npy` without pickle.
"""

from __future__ import annotations

import re
import signal

import numpy as np

from sandbox.api import Job, Limits, RunResult, Status
from sandbox.worker import wire


def timeout_message(limits: Limits, cpu: bool) -> str:
    what = f"{limits.cpu_time_s}s CPU-time" if cpu else f"{limits.wall_time_s:g}s wall-clock"
    return (f"The program exceeded the {what} limit and was stopped. Make it faster: fewer estimators or "
            "iterations, smaller search grids, no loops over rows, no sleeping or waiting for input.")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def n_rows(X) -> int:
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
        expected = n_rows(fold.X_eval)
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
                              "wipe_s": header.get("wipe_s"),
                              "job_memory_peak_mb": header.get("job_memory_peak_mb")})
    reason = header.get("killed_reason")
    exit_code = header.get("exit_code") if isinstance(header.get("exit_code"), int) else 0
    if reason == "timeout":
        result.status, result.message = Status.TIMEOUT, timeout_message(limits, cpu=False)
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
    elif reason == "scratch_not_cleared":
        result.status = Status.RUNTIME_ERROR
        result.message = ("The program left more files or directories in /tmp or /dev/shm than the sandbox could "
                          "clear between folds, so the job was stopped. Write only the files you need.")
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
    for key in ("message", "traceback", "stdout", "stderr"):
        setattr(result, key, encodable(getattr(result, key)))
    result.error_type = encodable(result.error_type) if result.error_type else result.error_type
    return result


def encodable(text: str) -> str:
    """`text` with lone surrogates (which JSON can carry and an exception can hold) and control characters other
    than tab, newline and carriage return (terminal escapes: a program's message must not clear or recolour the
    console that prints it) replaced by U+FFFD, so a host that prints, logs or encodes what a program said never
    raises UnicodeEncodeError nor takes orders from it."""
    return _UNPRINTABLE.sub("\ufffd", text) if text else text


# A Python string holds surrogate code points only unpaired (decoding joins a valid pair into one code point).
_UNPRINTABLE = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
        result.status, result.message = Status.TIMEOUT, timeout_message(limits, cpu=True)
    elif near_memory_limit or (number == signal.SIGKILL and result.isolation == "docker"):
        result.status = Status.MEMORY_EXCEEDED
        result.message = (f"The program was killed ({name}) after using about {result.peak_memory_mb:.0f} MiB; "
                          f"the limit is {limits.memory_mb} MiB. Use less memory.")
    else:
        result.status = Status.KILLED_BY_SIGNAL
        result.message = (f"The program crashed with {name} (for example a segmentation fault from ctypes or a "
                          "native library, or unbounded recursion). Use plain scikit-learn/pandas code.")
    result.error_type = name
