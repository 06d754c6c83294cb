"""The worker process: imports the data-science stack once, starts the fork server, then serves framed requests
from stdin and answers on stdout until end of input (see the package docstring).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from . import child, seccomp
from .child import _die_with_parent, run_program, set_dumpable
from .supervisor import Worker
from .wire import decode_fold, encode_fold, encode_frame, fd_reader, read_frame

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")


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


def _start_guardian(protocol_fd: int) -> int:
    """Fork a process that kills the worker as soon as its input closes (the host closed it, or died).

    The worker notices end of input only when it reads, between jobs; a worker that a job stopped or wedged never
    reads again, and a container whose worker does not exit is never removed. The guardian does nothing but wait
    for the hang-up, without reading (POLLHUP is reported even with no events asked for), then SIGKILLs the worker,
    which ends the pid namespace (docker-init or bubblewrap exits with its child) and so the container. It runs
    as the worker's uid: where jobs have a uid of their own they cannot signal it.
    """
    import select

    worker = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        os.close(protocol_fd)  # the host must see end of stream when the worker dies, not wait on this copy
        _die_with_parent()
        poller = select.poll()
        poller.register(0, 0)
        while True:
            for _, events in poller.poll():
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os.kill(worker, signal.SIGKILL)
                    os._exit(0)
    except BaseException:
        pass
    os._exit(1)


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
    read_exact = fd_reader(0)
    guardian = _start_guardian(proto_out.fileno())

    worker = Worker(args.own_pid_namespace, args.child_uid, args.scratch)
    worker.keep_pids.add(guardian)
    if worker.child_uid is None:
        set_dumpable(False)  # jobs share our uid: keep them from ptrace-attaching to us or reading our /proc files
    stack = _import_stack()
    child.JOB_FILTER = seccomp.prepare()  # before the fork server starts: its children inherit it compiled
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
            try:
                answer = _answer(worker, request, blobs)
            except Exception as exc:  # a bug of the worker's own: say so, then leave (the host starts a new worker)
                proto_out.write(encode_frame({"type": "error", "message": f"worker failure: {exc!r}"[:2000]}))
                return 1
            proto_out.write(answer)
            damaged = not worker.finish()
    except BrokenPipeError:
        return 0
    finally:
        worker.discard_prepared()
