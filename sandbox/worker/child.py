"""The job child's side: runs in a process forked by the fork server, with one fold's data and nothing else.

It drops privileges before its job arrives (`child_main`), reads one job frame, sets its resource limits, runs the
agent's program (`run_program`) and writes one result frame (a report plus one `.npy` prediction per fold).
"""

from __future__ import annotations

import io
import os
import resource
import signal
import sys
import traceback

import numpy as np

from .wire import array_to_npy, decode_fold, encode_frame, fd_reader, read_frame

# The system-call filter (see `seccomp`), compiled by the worker before its fork server starts; every child
# loads it just before the program runs. None only until then: a child never runs a program without it.
JOB_FILTER = None

AGENT_FILENAME = "<agent>"


def _trimmed_traceback(exc: BaseException) -> str:
    """The agent's own frames (plus the innermost library frame for context) and the exception line."""
    frames = traceback.extract_tb(exc.__traceback__)
    keep = [f for f in frames if f.filename == AGENT_FILENAME]
    if frames and frames[-1].filename != AGENT_FILENAME:
        inner = frames[-1]
        keep.append(traceback.FrameSummary(os.path.basename(inner.filename), inner.lineno, inner.name,
                                           line=inner.line))
    lines = ["Traceback (most recent call last):\n"] if keep else []
    lines += traceback.format_list(keep)
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _child_report(status: str, exc: BaseException | None = None, message: str = "") -> dict:
    report = {"status": status, "message": message}
    if exc is not None:
        report["error_type"] = type(exc).__name__
        report["traceback"] = _trimmed_traceback(exc)
        if not message:
            report["message"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return report


def _as_prediction(value, n_rows: int) -> tuple[np.ndarray | None, str]:
    """Turn what predict_proba returned into a plain float array, or explain why it cannot be one."""
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            array = array.astype(np.float64)
        array = np.ascontiguousarray(array, dtype=np.float64)
    except Exception as exc:  # any exotic object: a plain array or nothing
        return None, f"the prediction ({type(value).__name__}) is not convertible to a float array: {exc}"
    return array, ""


def run_program(program: str, entry_point: str, predict_method: str, folds: list) -> tuple[dict, list[bytes]]:
    """Execute the agent program and collect one prediction array per fold (runs in the child)."""
    import linecache

    linecache.cache[AGENT_FILENAME] = (len(program), None, program.splitlines(True), AGENT_FILENAME)
    try:
        code = compile(program, AGENT_FILENAME, "exec")
    except (SyntaxError, ValueError) as exc:
        where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        report = _child_report("syntax_error", exc, f"{type(exc).__name__}{where}: {getattr(exc, 'msg', exc)}")
        report["traceback"] = "".join(traceback.format_exception_only(type(exc), exc))
        return report, []
    namespace = {"__name__": "__agent__", "__builtins__": __builtins__}
    blobs = []
    try:
        exec(code, namespace)
        entry = namespace.get(entry_point)
        if not callable(entry):
            return _child_report("runtime_error", message=f"the program does not define a function `{entry_point}`"), []
        for X_fit, y_fit, X_eval in folds:
            model = entry(X_fit, y_fit)
            predict = getattr(model, predict_method, None)
            if not callable(predict):
                return _child_report("invalid_output", message=(
                    f"`{entry_point}` returned a {type(model).__name__}, which has no `{predict_method}` method; "
                    f"return a fitted estimator (e.g. a scikit-learn classifier or Pipeline)")), []
            array, problem = _as_prediction(predict(X_eval), len(X_eval))
            if array is None:
                return _child_report("invalid_output", message=problem), []
            blobs.append(array_to_npy(array))
    except MemoryError as exc:
        return _child_report("memory_exceeded", exc), []
    except SystemExit as exc:
        return _child_report("runtime_error", exc, f"the program called sys.exit({exc.code!r}); "
                                                   "return a model instead of exiting"), []
    except BaseException as exc:  # everything the agent raises is data for the report
        return _child_report("runtime_error", exc), []
    return {"status": "ok", "message": ""}, blobs


def _set_limits(limits: dict) -> None:
    mb = 1 << 20
    cpu = int(limits["cpu_time_s"])
    plan = [
        (resource.RLIMIT_AS, int(limits["memory_mb"]) * mb),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_NPROC, int(limits["max_processes"])),
        (resource.RLIMIT_FSIZE, int(limits["max_file_size_mb"]) * mb),
        (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in plan:
        soft, hard = value if isinstance(value, tuple) else (value, value)
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


def _no_new_privileges() -> None:
    import ctypes

    pr_set_no_new_privs = 38
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    _die_with_parent()


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def set_dumpable(dumpable: bool) -> None:
    """PR_SET_DUMPABLE: whether processes of the same uid may ptrace this one or read its private /proc files."""
    import ctypes

    pr_set_dumpable = 4
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, int(dumpable), 0, 0, 0)


def _first_to_go_out_of_memory() -> None:
    """When the sandbox's memory cgroup runs out, the kernel kills the job rather than the worker: memory the job
    made the kernel hold (socket buffers, inodes) is not in its own size, so by size alone the worker would go."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass


def child_main(job_fd: int, result_fd: int, stdout_fd: int, stderr_fd: int, uid: int | None, workdir: str) -> None:
    """Body of the forked child. Never returns: exits through os._exit.

    The child is forked before its job exists (see `Worker.prepare`): it drops privileges, then waits for one job
    frame on `job_fd`. An empty read means no job will come (the worker is leaving): exit quietly.
    """
    try:
        os.setsid()
        os.dup2(job_fd, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.dup2(result_fd, 3)
        os.closerange(4, 1 << 16)
        for name in ("SIGINT", "SIGTERM", "SIGPIPE", "SIGCHLD"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        _first_to_go_out_of_memory()
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _no_new_privileges()
        set_dumpable(True)  # the worker is not; its jobs must be, so it can read their memory use
        os.chdir(workdir)
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        try:
            job, blobs = read_frame(fd_reader(0))
        except EOFError:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the program gets an empty stdin, not the job channel
        os.close(devnull)
        _set_limits(job["limits"])
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        folds = [decode_fold(frame) for frame in blobs]  # one per child
        if JOB_FILTER is None:
            raise RuntimeError("no system-call filter was compiled for this child")
        JOB_FILTER.install()
        report, outputs = run_program(job["program"], job["entry_point"], job["predict_method"], folds)
        own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        report["usage"] = {"cpu_s": own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime,
                           "maxrss_kb": max(own.ru_maxrss, waited.ru_maxrss)}
        frame = encode_frame(report, outputs)
        with os.fdopen(3, "wb") as result:
            result.write(frame)
    except BaseException:  # a failure of the harness itself inside the child
        try:
            os.write(3, encode_frame({"status": "sandbox_error", "message": traceback.format_exc(limit=3)}))
        except BaseException:
            pass
        os._exit(70)
    os._exit(0)
