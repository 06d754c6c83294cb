"""The warm worker: the process that lives inside the isolation boundary and runs agent programs.

It imports the data-science stack once, then serves jobs read from stdin (framed messages, see `encode_frame`).
Each job runs in a fresh forked child with resource limits, an unprivileged uid (when the worker may switch uids),
a private empty working directory and a wall-clock deadline enforced from here (the worker kills every process the
job left). Each fold of a job runs in a child of its own (a fold's training rows are other folds' evaluation rows).
Children are forked by a fork server (`Zygote`) that has seen no job, and are ready, privileges dropped, before
their job arrives (`Worker.prepare`). The answer goes out as soon as the result is complete; the cleanup follows
(`Worker.finish`). Results travel back as JSON plus `.npy` arrays; nothing is pickled in either direction.

This file is self-contained (stdlib + numpy, pandas lazily) because it is copied alone into the container image.
The host imports the same module for the wire format, so both ends always agree.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import selectors
import signal
import struct
import sys
import time
import traceback

import numpy as np

MAGIC = b"EtpW"
_PREFIX = struct.Struct(">4sIQ")  # magic, header length, body length
AGENT_FILENAME = "<agent>"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
JOB_DIR = "job"
MEMORY_POLL_S = 0.1  # how often the worker sums the memory of all job processes


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed frame."""


# ----------------------------------------------------------------------------------------------------- framing

def encode_frame(header: dict, blobs: list[bytes] = ()) -> bytes:
    """One message: fixed prefix, a JSON header (which lists the blob sizes), then the blobs back to back."""
    header = dict(header, blob_sizes=[len(b) for b in blobs])
    head = json.dumps(header, allow_nan=False).encode()
    body = b"".join(blobs)
    return _PREFIX.pack(MAGIC, len(head), len(body)) + head + body


def read_frame(read_exact, max_header: int = 16 << 20, max_body: int = 1 << 34) -> tuple[dict, list[bytes]]:
    """Read one frame with `read_exact(n) -> bytes`; sizes are checked before anything is allocated."""
    magic, head_len, body_len = _PREFIX.unpack(read_exact(_PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}")
    if head_len > max_header or body_len > max_body:
        raise ProtocolError(f"frame too large (header {head_len} B, body {body_len} B)")
    try:
        header = json.loads(read_exact(head_len))
    except ValueError as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from None
    sizes = header.get("blob_sizes") if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes) or sum(sizes) != body_len:
        raise ProtocolError("frame blob sizes do not match its body")
    body = read_exact(body_len)
    blobs, offset = [], 0
    for size in sizes:
        blobs.append(body[offset:offset + size])
        offset += size
    return header, blobs


def parse_frame(data: bytes, max_header: int = 16 << 20) -> tuple[dict, list[bytes]]:
    """`read_frame` over a complete byte string; trailing bytes are an error."""
    view = io.BytesIO(data)

    def read_exact(n: int) -> bytes:
        chunk = view.read(n)
        if len(chunk) != n:
            raise ProtocolError("frame is truncated")
        return chunk

    frame = read_frame(read_exact, max_header=max_header, max_body=len(data))
    if view.tell() != len(data):
        raise ProtocolError("trailing bytes after frame")
    return frame


# ------------------------------------------------------------------------------------------------ array codec

def array_to_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def npy_to_array(data: bytes) -> np.ndarray:
    """Decode `.npy` bytes; object arrays (which would need pickle) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _json_scalar(value):
    """A JSON-safe stand-in for one cell of an object column: None for missing, else a str/bool/int/float."""
    if value is None or value is getattr(_pandas(), "NA", None):
        return None
    if isinstance(value, float | np.floating) and math.isnan(value):
        return None
    if isinstance(value, str | bool | np.bool_):
        return value if isinstance(value, str) else bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else str(value)
    return str(value)


def _pandas():
    import pandas

    return pandas


def encode_data(value, blobs: list[bytes]) -> dict:
    """Describe `value` (ndarray, DataFrame or Series) in JSON, appending binary parts to `blobs`.

    Keeps what a data-science program looks at: dtypes (numeric, bool, datetime, nullable, string, object),
    categoricals with their categories and order, missing values, column names and the index.
    """
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, pd.DataFrame):
        return {"kind": "frame", "index": _encode_index(value.index, blobs), "parts": _encode_parts(value, blobs)}
    if pd is not None and isinstance(value, pd.Series):
        return {"kind": "series", "name": _json_scalar(value.name), "index": _encode_index(value.index, blobs),
                "data": _encode_column(value, blobs)}
    array = np.asarray(value)
    if array.dtype.kind in "biufcmMSU":
        blobs.append(array_to_npy(array))
        return {"kind": "ndarray", "blob": len(blobs) - 1}
    return {"kind": "list", "shape": list(array.shape), "values": [_json_scalar(v) for v in array.ravel().tolist()]}


def _plain(dtype) -> bool:
    """A NumPy dtype whose values are raw numbers (also booleans and datetimes): stored as `.npy`."""
    return isinstance(dtype, np.dtype) and dtype.kind in "biufcmM"


def _encode_parts(frame, blobs: list[bytes]) -> list[dict]:
    """A frame's columns in order; each run of adjacent columns with one plain dtype travels as one 2-D block.

    One `.npy` per block instead of per column: data-science frames are mostly wide runs of floats, and per-column
    headers and Series made encoding plus decoding cost ~15 ms per standard job, most of a step's sandbox overhead.
    """
    dtypes, parts, start = list(frame.dtypes), [], 0
    while start < len(dtypes):
        stop = start + 1
        if _plain(dtypes[start]):
            while stop < len(dtypes) and dtypes[stop] == dtypes[start]:
                stop += 1
            blobs.append(array_to_npy(frame.iloc[:, start:stop].to_numpy()))
            parts.append({"codec": "block", "blob": len(blobs) - 1,
                          "names": [_json_scalar(name) for name in frame.columns[start:stop]]})
        else:
            parts.append(dict(_encode_column(frame.iloc[:, start], blobs), name=_json_scalar(frame.columns[start])))
        start = stop
    return parts


def _encode_index(index, blobs: list[bytes]) -> dict:
    pd = _pandas()
    if isinstance(index, pd.RangeIndex):
        return {"codec": "range", "start": index.start, "stop": index.stop, "step": index.step}
    return _encode_column(index.to_series(), blobs)


def _encode_column(series, blobs: list[bytes]) -> dict:
    pd = _pandas()
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = series.cat.codes.to_numpy()
        blobs.append(array_to_npy(codes))
        cats = _encode_column(pd.Series(dtype.categories), blobs)
        return {"codec": "category", "codes": len(blobs) - 1, "categories": cats, "ordered": bool(dtype.ordered)}
    if _plain(dtype):
        blobs.append(array_to_npy(series.to_numpy()))
        return {"codec": "npy", "blob": len(blobs) - 1}
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and getattr(dtype, "numpy_dtype", None) is not None \
            and dtype.numpy_dtype.kind in "biuf" and not isinstance(dtype, pd.StringDtype):
        mask = series.isna().to_numpy()
        blobs.append(array_to_npy(series.to_numpy(dtype=dtype.numpy_dtype, na_value=0)))
        blobs.append(array_to_npy(mask))
        return {"codec": "masked", "dtype": str(dtype), "blob": len(blobs) - 2, "mask": len(blobs) - 1}
    kind = "string" if isinstance(dtype, pd.StringDtype) else "object"
    return {"codec": kind, "dtype": str(dtype), "values": [_json_scalar(v) for v in series.tolist()]}


FOLD_PARTS = ("X_fit", "y_fit", "X_eval")


def encode_fold(X_fit, y_fit, X_eval) -> bytes:
    """One fold as a frame of its own: the worker hands it to that fold's child alone."""
    blobs: list[bytes] = []
    meta = {part: encode_data(value, blobs) for part, value in zip(FOLD_PARTS, (X_fit, np.asarray(y_fit), X_eval))}
    return encode_frame(meta, blobs)


def decode_fold(frame: bytes) -> tuple:
    """Inverse of `encode_fold`: (X_fit, y_fit, X_eval)."""
    meta, blobs = parse_frame(frame)
    return tuple(decode_data(meta[part], blobs) for part in FOLD_PARTS)


def decode_data(meta: dict, blobs: list[bytes]):
    """Inverse of `encode_data`."""
    kind = meta["kind"]
    if kind == "ndarray":
        return npy_to_array(blobs[meta["blob"]])
    if kind == "list":
        return np.array([np.nan if v is None else v for v in meta["values"]], dtype=object).reshape(meta["shape"])
    pd = _pandas()
    index = _decode_index(meta["index"], blobs)
    if kind == "series":
        return pd.Series(_decode_column(meta["data"], blobs), index=index, name=meta["name"])
    parts = meta["parts"]
    if len(parts) == 1 and parts[0]["codec"] == "block":  # the common all-numeric frame: no copy
        return pd.DataFrame(npy_to_array(blobs[parts[0]["blob"]]), index=index, columns=parts[0]["names"])
    names, arrays = [], []
    for part in parts:
        if part["codec"] == "block":
            block = npy_to_array(blobs[part["blob"]])
            names += part["names"]
            arrays += [block[:, j] for j in range(block.shape[1])]
        else:
            names.append(part["name"])
            arrays.append(_decode_column(part, blobs))
    # Positional keys, then the names: duplicate column names survive.
    frame = pd.DataFrame(dict(enumerate(arrays)), index=index)
    frame.columns = pd.Index(names, tupleize_cols=False)
    return frame


def _decode_index(meta: dict, blobs: list[bytes]):
    pd = _pandas()
    if meta["codec"] == "range":
        return pd.RangeIndex(int(meta["start"]), int(meta["stop"]), int(meta["step"]))
    return pd.Index(_decode_column(meta, blobs))


def _decode_column(meta: dict, blobs: list[bytes]):
    pd = _pandas()
    codec = meta["codec"]
    if codec == "npy":
        return npy_to_array(blobs[meta["blob"]])
    if codec == "category":
        categories = pd.Index(_decode_column(meta["categories"], blobs))
        codes = npy_to_array(blobs[meta["codes"]])
        return pd.Categorical.from_codes(codes, categories=categories, ordered=meta["ordered"])
    if codec == "masked":
        values = npy_to_array(blobs[meta["blob"]])
        mask = npy_to_array(blobs[meta["mask"]])
        array = pd.array(values, dtype=meta["dtype"])
        array[mask] = pd.NA
        return array
    values = meta["values"]
    if codec == "string":
        return pd.array(values, dtype=meta["dtype"])
    return np.array([np.nan if v is None else v for v in values], dtype=object)


# --------------------------------------------------------------------------------------- output capture (cap)

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


# ------------------------------------------------------------------------------------------- the child's side

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


def _not_dumpable(flag: int = 0) -> None:
    import ctypes

    pr_set_dumpable = 4
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, flag, 0, 0, 0)


def _set_dumpable() -> None:
    _not_dumpable(1)


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
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _no_new_privileges()
        _set_dumpable()  # the worker is not; its jobs must be, so it can read their memory use
        os.chdir(workdir)
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        try:
            job, blobs = read_frame(_fd_reader(0))
        except EOFError:
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the program gets an empty stdin, not the job channel
        os.close(devnull)
        _set_limits(job["limits"])
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        folds = [decode_fold(frame) for frame in blobs]  # one per child
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) and number >= 0 else 0.0


def _fd_reader(fd: int):
    """`read_exact(n)` over a blocking file descriptor; EOFError when the writer closes before any byte came."""
    def read_exact(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise EOFError if got == 0 else ProtocolError("job frame truncated")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    return read_exact


# ------------------------------------------------------------------------------------------ the worker's side

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
        self._socket = ours
        self._exits: dict[int, dict] = {}

    def fork(self) -> tuple[int, int, dict]:
        """(pid, job pipe write end, {stdout, stderr, result: read end}) of a new child waiting for its job."""
        import socket

        self._socket.send(b"fork")
        while True:
            message, fds, _, _ = socket.recv_fds(self._socket, 1 << 16, 4)
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
            message = self._socket.recv(1 << 16)
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
    os.makedirs(workdir, mode=0o700, exist_ok=True)
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

    # -- process control
    def _other_pids(self) -> list[int]:
        """Every process in this pid namespace except the worker and its ancestors (init)."""
        keep = {os.getpid(), os.getppid(), 1, self._zygote.pid if self._zygote else 1}
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

    def _wipe_scratch(self) -> None:
        import shutil

        # A private namespace owns its whole /tmp and /dev/shm; elsewhere only the job's own directory is ours.
        for root in (self.scratch, "/dev/shm") if self.own_pid_namespace else (os.path.join(self.scratch, JOB_DIR),):
            try:
                entries = os.listdir(root)
            except OSError:
                continue
            for name in entries:
                path = os.path.join(root, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass

    # -- one job
    def start(self) -> None:
        """Start the fork server; call once the stack is imported and before any job is read."""
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
                  "drain_s": 0.0, "damaged": False}
        header: dict = {"exit_code": 0, "killed_reason": None, "report": {"status": "ok", "message": ""}}
        predictions: list[bytes] = []
        for index, fold_frame in enumerate(fold_frames):
            cpu_left = math.ceil(float(limits["cpu_time_s"]) - totals["cpu_time_s"])
            fold_limits = dict(limits, cpu_time_s=max(1, cpu_left))
            header, outputs = self._run_child(encode_frame(dict(request, limits=fold_limits), [fold_frame]),
                                              fold_limits, deadline, buffers, last=index == len(fold_frames) - 1)
            for key in ("cpu_time_s", "sweep_s", "drain_s"):
                totals[key] += header[key]
            for key in ("peak_memory_mb", "job_memory_peak_mb"):
                totals[key] = max(totals[key], header[key])
            totals["damaged"] = totals["damaged"] or header["damaged"]
            failed = header["killed_reason"] or header["exit_code"] or header.get("report", {}).get("status") != "ok"
            if failed or len(outputs) != 1:
                predictions = []
                header["failed_fold"] = index
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
            _write_all(job_fd, request)
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
        pidfd = os.pidfd_open(pid)
        selector = selectors.DefaultSelector()
        for name, fd in read_fds.items():
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, name)
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        reason, exited, complete = None, False, False
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
            facts = {"exit_code": 0, "killed_reason": None, "damaged": False, "sweep_s": 0.0, "drain_s": 0.0}
        else:
            facts = self._clean_up(**state)
        header = {key: value for key, value in facts.items() if key not in ("maxrss_kb", "cpu_s")}
        header["job_memory_peak_mb"] = peak_total / (1 << 20)
        child_blobs: list[bytes] = []
        usage: dict = {"maxrss_kb": facts.get("maxrss_kb", 0), "cpu_s": facts.get("cpu_s", 0.0)}
        if header["killed_reason"] is None and result:
            try:
                report, child_blobs = parse_frame(bytes(result), max_header=1 << 20)
                header["report"] = {k: report.get(k) for k in ("status", "message", "error_type", "traceback")}
                if "maxrss_kb" not in facts and isinstance(report.get("usage"), dict):
                    usage = report["usage"]  # self-reported: the child is not reaped yet
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
        self._wipe_scratch()
        # A complete result was killed by us: how the process ended says nothing about the job.
        exit_code = 0 if complete and reason is None else os.waitstatus_to_exitcode(wait_status)
        return {"exit_code": exit_code, "killed_reason": reason, "damaged": not (clean and server_alive),
                "maxrss_kb": usage["maxrss_kb"], "cpu_s": usage["cpu_s"],
                "sweep_s": drain_started - sweep_started, "drain_s": time.monotonic() - drain_started}

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


def _import_stack() -> dict:
    """Pre-import what agent programs use, so a job pays only for fork."""
    started = time.monotonic()
    versions = {}
    for name in ("numpy", "pandas", "scipy", "sklearn"):
        module = __import__(name)
        versions[name] = getattr(module, "__version__", "?")
    import scipy.sparse  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    import sklearn.impute  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import sklearn.pipeline  # noqa: F401
    import sklearn.preprocessing  # noqa: F401
    import sklearn.tree  # noqa: F401

    _warm_up_job()
    return {"versions": versions, "import_s": time.monotonic() - started}


_WARM_UP_PROGRAM = """
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

def build_model(X, y):
    RandomForestClassifier(n_estimators=2, random_state=0).fit(X, y).predict_proba(X)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
"""


def _warm_up_job() -> None:
    """Take one small job through the child's whole path (decode, fit, predict, encode) so the lazy imports and
    first-use caches inside pandas, scikit-learn and this module are filled here, once, instead of in every job."""
    import pandas as pd

    rows = np.random.default_rng(0).permutation(40)
    frame = pd.DataFrame({"a": np.arange(40.0), "b": np.arange(40.0) % 3}, index=rows)
    frame["c"] = pd.Categorical(["x", "y"] * 20).codes.astype(float)
    folds = [decode_fold(encode_fold(frame, rows % 2, frame.reset_index(drop=True)))]
    report, outputs = run_program(_WARM_UP_PROGRAM, "build_model", "predict_proba", folds)
    if report["status"] != "ok":
        raise RuntimeError(f"the worker's warm-up job failed: {report}")
    encode_frame(report, outputs)


def _answer(worker: Worker, request: dict, blobs: list[bytes]) -> bytes:
    kind = request.get("type")
    if kind == "job":
        header, out = worker.run_job(request, blobs)
        return encode_frame(dict(header, jobs_run=worker.jobs_run), out)
    if kind == "ping":
        return encode_frame({"type": "pong", "jobs_run": worker.jobs_run})
    return encode_frame({"type": "error", "message": f"unknown request {kind!r}"})


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="etpo-gym sandbox worker (speaks framed JSON+npy on stdin/stdout)")
    parser.add_argument("--own-pid-namespace", action="store_true",
                        help="this worker is alone in its pid namespace: kill every other process after a job")
    parser.add_argument("--child-uid", type=int, default=None, help="uid for job children (needs root)")
    parser.add_argument("--scratch", default="/tmp", help="directory for job working directories")
    args = parser.parse_args(argv)
    for name in THREAD_ENV:
        os.environ[name] = "1"
    # The protocol owns the original stdout; anything else printing goes to stderr.
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    # A closed pipe (the host left, or a child died before its job arrived) is an OSError here, not a signal.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    read_exact = _fd_reader(0)

    worker = Worker(args.own_pid_namespace, args.child_uid, args.scratch)
    if worker.child_uid is None:
        _not_dumpable()  # jobs share our uid: keep them from ptrace-attaching to us or reading our /proc files
    stack = _import_stack()
    worker.start()
    hello = dict(stack, type="ready", pid=os.getpid(), uid=os.getuid(), child_uid=worker.child_uid,
                 python=sys.version.split()[0])
    try:
        proto_out.write(encode_frame(hello))
        damaged = False
        while True:
            try:
                if not damaged:
                    worker.prepare()
            except ChildProcessError:
                damaged = True  # the fork server is gone
            try:
                request, blobs = read_frame(read_exact)
            except EOFError:
                return 0
            if request.get("type") == "exit":
                return 0
            if damaged:  # found after the last answer went out: refuse this request, the host starts a new worker
                proto_out.write(encode_frame({"type": "damaged", "message": "the previous job damaged the worker"}))
                return 1
            proto_out.write(_answer(worker, request, blobs))
            damaged = not worker.finish()
    except BrokenPipeError:
        return 0
    finally:
        worker.discard_prepared()


if __name__ == "__main__":
    sys.exit(main())
