"""Hostile-program conformance suite, shared by `pytest -m safety` and `etpo sandbox check`.

Each case is a program an agent could write to escape, starve or poison the harness. A case is *contained* when
the job ends with one of the expected statuses, the host shows no trace of it (planted secret unread, canary
unseen, host files untouched, no TCP connection accepted, no process left behind), and an honest job run right
after it succeeds promptly on the same sandbox.

Network probes target only a server this suite opens on 127.0.0.1 and a name lookup; they are skipped for the
`unsafe-process` backend, which has no network isolation (a lookup there would leave the machine).
"""

from __future__ import annotations

import contextlib
import os
import socket
import string
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from sandbox.api import Fold, Job, Limits, RunResult, Status

# Short limits keep the suite fast; memory stays large enough for the pre-imported stack.
HOSTILE_LIMITS = Limits(wall_time_s=3.0, cpu_time_s=3, memory_mb=1024, max_processes=32, max_file_size_mb=8,
                        max_open_files=64, max_output_bytes=4096, output_kill_bytes=1 << 20, tmpfs_mb=32)
HONEST_DEADLINE_S = 30.0  # an honest job after a hostile one (a replaced worker must start: imports, container)

HONEST_PROGRAM = """
from sklearn.ensemble import RandomForestClassifier

def build_model(X, y):
    return RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)
"""

CONST_MODEL = """
import numpy as np
class ConstModel:
    def predict_proba(self, X):
        return np.full((len(X), 2), 0.5)
"""


def tiny_fold() -> Fold:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    return Fold(X[:30], y[:30], X[30:])


@dataclass
class Host:
    """What the suite plants on the host for one run, and how to look for traces afterwards."""

    root: str
    secret_path: str
    secret: str
    canary_name: str
    canary_value: str
    marker: str
    port: int
    watched_cmd: str = ""  # command-line token of a host process the sandbox must not see
    accepted: list = field(default_factory=list)

    def values(self) -> dict[str, str]:
        return {"secret_path": self.secret_path, "canary_name": self.canary_name, "marker": self.marker,
                "port": str(self.port), "host_dir": self.root}

    def host_writes(self) -> list[str]:
        """Host paths a case tried to create that exist now."""
        return [p for p in (os.path.join(self.root, "pwned"), f"/etc/etpo-pwned-{self.marker}",
                            f"/tmp/etpo-pwned-{self.marker}", os.path.join(self.root, "unpickled"))
                if os.path.exists(p)]


@contextlib.contextmanager
def planted_host() -> Iterator[Host]:
    """Plant a secret file, an environment canary, a marker process and a TCP server on 127.0.0.1."""
    marker = uuid.uuid4().hex[:12]
    root = tempfile.mkdtemp(prefix="etpo-safety-")
    os.chmod(root, 0o755)
    secret = f"SECRET-{uuid.uuid4().hex}"
    secret_path = os.path.join(root, "secret.txt")
    with open(secret_path, "w") as handle:
        handle.write(secret)
    os.chmod(secret_path, 0o644)  # readable by anyone on the host: only isolation can hide it
    canary_name, canary_value = f"ETPO_CANARY_{marker.upper()}", f"canary-{uuid.uuid4().hex}"
    os.environ[canary_name] = canary_value
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    host = Host(root, secret_path, secret, canary_name, canary_value, marker, server.getsockname()[1])
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            host.accepted.append(1)
            conn.close()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    # A host process the sandbox must not see in /proc.
    watched = subprocess.Popen(["sleep", f"7{int(marker[:6], 16)}"], stdout=subprocess.DEVNULL)
    host.watched_cmd = f"7{int(marker[:6], 16)}"
    try:
        yield host
    finally:
        stop.set()
        acceptor.join(timeout=2)
        server.close()
        watched.kill()
        watched.wait()
        os.environ.pop(canary_name, None)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        for leftover in (f"/tmp/etpo-pwned-{marker}", f"/etc/etpo-pwned-{marker}"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (sandboxed processes are visible from the host)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as handle:
            if marker.encode() in handle.read():
                found.append(int(pid))
    return found


def _output(result: RunResult) -> str:
    return "\n".join((result.stdout, result.stderr, result.message, result.traceback))


@dataclass(frozen=True)
class Case:
    name: str
    program: str  # string.Template: $secret_path $canary_name $marker $port $host_dir
    expected: frozenset
    check: Callable[[RunResult, Host], str] | None = None  # returns a problem, or "" when contained
    network: bool = False
    # statuses also acceptable on a backend where job and worker share a uid (Docker's non-root worker)
    shared_uid_extra: frozenset = frozenset()


def _not_in_output(*needles_from_host: Callable[[Host], str]) -> Callable[[RunResult, Host], str]:
    def check(result: RunResult, host: Host) -> str:
        text = _output(result)
        for needle in needles_from_host:
            value = needle(host)
            if value and value in text:
                return f"leaked {value[:24]!r} into the job's output"
        return ""

    return check


def _no_marker_in_output(token: str) -> Callable[[RunResult, Host], str]:
    def check(result: RunResult, host: Host) -> str:
        return f"the program reported {token!r}: {_output(result)[:300]!r}" if token in result.stdout else ""

    return check


def _network_check(result: RunResult, host: Host) -> str:
    if host.accepted:
        return f"the host server on 127.0.0.1:{host.port} accepted {len(host.accepted)} connection(s)"
    return _no_marker_in_output("REACHED")(result, host)


S = frozenset
NOT_OK = S({Status.TIMEOUT, Status.RUNTIME_ERROR, Status.KILLED_BY_SIGNAL, Status.MEMORY_EXCEEDED})

CASES: list[Case] = [
    Case("fork_bomb", """
import os
def build_model(X, y):
    while True:
        try:
            os.fork()
        except OSError:
            pass
""", NOT_OK),
    Case("memory_bomb", """
def build_model(X, y):
    hog = bytearray(64 * 1024 ** 3)
    return hog
""", S({Status.MEMORY_EXCEEDED})),
    Case("slow_memory_creep", """
import time
import numpy as np
def build_model(X, y):
    hog = []
    while True:
        chunk = np.empty(16 * 1024 ** 2)  # 128 MiB
        chunk[::512] = 1.0  # touch every page so it is resident, not just reserved
        hog.append(chunk)
        time.sleep(0.01)
""", S({Status.MEMORY_EXCEEDED})),
    Case("forked_memory_bomb", """
import os, time
import numpy as np
def build_model(X, y):
    for _ in range(12):
        if os.fork() == 0:
            hog = np.empty(96 * 1024 ** 2 // 8)  # 96 MiB each: under the per-process cap, over it together
            hog[::512] = 1.0
            time.sleep(60)
            os._exit(0)
    time.sleep(60)
""", S({Status.MEMORY_EXCEEDED})),
    Case("shm_fill", """
import os
def build_model(X, y):
    for i in range(10 ** 6):
        with open(f"/dev/shm/fill{i}", "wb") as f:
            f.write(b"x" * (4 << 20))
""", S({Status.RUNTIME_ERROR, Status.KILLED_BY_SIGNAL, Status.MEMORY_EXCEEDED})),
    Case("infinite_loop", """
def build_model(X, y):
    while True:
        pass
""", S({Status.TIMEOUT})),
    Case("sleep_forever", """
import time
def build_model(X, y):
    time.sleep(10 ** 6)
""", S({Status.TIMEOUT})),
    Case("thread_storm", """
import threading, time
def build_model(X, y):
    while True:
        threading.Thread(target=time.sleep, args=(10 ** 6,), daemon=True).start()
""", NOT_OK),
    Case("disk_fill_one_file", """
def build_model(X, y):
    with open("big.bin", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
""", S({Status.RUNTIME_ERROR, Status.KILLED_BY_SIGNAL})),
    Case("disk_fill_many_files", """
import os
def build_model(X, y):
    for i in range(10 ** 6):
        with open(os.path.join("/tmp", f"f{i}"), "wb") as f:
            f.write(b"x" * (4 << 20))
""", S({Status.RUNTIME_ERROR, Status.KILLED_BY_SIGNAL})),
    Case("stdout_flood", """
def build_model(X, y):
    while True:
        print("spam" * 1000)
""", S({Status.OUTPUT_EXCEEDED})),
    Case("stderr_flood", """
import os
def build_model(X, y):
    while True:
        os.write(2, b"spam" * 4096)
""", S({Status.OUTPUT_EXCEEDED})),
    Case("deep_recursion", """
import sys
def build_model(X, y):
    sys.setrecursionlimit(10 ** 8)
    def down(n):
        return down(n + 1) + 1
    return down(0)
""", S({Status.RUNTIME_ERROR, Status.KILLED_BY_SIGNAL, Status.MEMORY_EXCEEDED, Status.TIMEOUT})),
    Case("fd_exhaustion", """
def build_model(X, y):
    files = []
    while True:
        files.append(open("/dev/null"))
""", S({Status.RUNTIME_ERROR})),
    Case("host_path_write", """
import os, sys
def build_model(X, y):
    for path in ["$host_dir/pwned", "/etc/etpo-pwned-$marker", "/tmp/etpo-pwned-$marker",
                 os.path.join(sys.prefix, "etpo-pwned-$marker")]:
        try:
            with open(path, "w") as f:
                f.write("pwned")
            print("WROTE", path)
        except OSError as exc:
            print("blocked", path, type(exc).__name__)
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}),
         check=lambda r, h: (f"host files were created: {h.host_writes()}" if h.host_writes() else
                             _no_marker_in_output("WROTE " + os.path.join(h.root, "pwned"))(r, h))),
    Case("read_planted_secret", """
def build_model(X, y):
    for path in ["$secret_path", "/etc/shadow"]:
        try:
            print(open(path).read())
        except OSError as exc:
            print("blocked", path, type(exc).__name__)
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}),
         check=lambda r, h: _not_in_output(lambda h: h.secret)(r, h) or
         ("/etc/shadow was readable" if "root:" in r.stdout else "")),
    Case("environment_canary", """
import os
def build_model(X, y):
    print(dict(os.environ))
    print(os.environ.get("$canary_name"))
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}), check=_not_in_output(lambda h: h.canary_value)),
    Case("proc_snooping", """
import os
def build_model(X, y):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                print(pid, open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" "))
            except OSError:
                pass
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}), check=lambda r, h: _not_in_output(lambda h: h.watched_cmd)(r, h) or
         ("host processes visible (pytest/etpo)" if "pytest" in r.stdout else "")),
    Case("kill_parent_and_everyone", """
import os, signal, time
def build_model(X, y):
    for target in (os.getppid(), 1):
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    time.sleep(0.5)
    raise RuntimeError("still here")
""", NOT_OK, shared_uid_extra=S({Status.SANDBOX_ERROR})),
    Case("ctypes_segfault", """
import ctypes
def build_model(X, y):
    ctypes.string_at(0)
""", S({Status.KILLED_BY_SIGNAL})),
    Case("os_exit", """
import os
def build_model(X, y):
    os._exit(0)
""", S({Status.RUNTIME_ERROR})),
    Case("sys_exit", """
import sys
def build_model(X, y):
    sys.exit(0)
""", S({Status.RUNTIME_ERROR})),
    Case("shell_subprocess_daemon", CONST_MODEL + """
import subprocess
def build_model(X, y):
    subprocess.Popen(["sh", "-c", "sleep 1000 # $marker"], start_new_session=True)
    print(subprocess.run("id; echo hello from sh", shell=True, capture_output=True, text=True).stdout)
    return ConstModel()
""", S({Status.OK})),
    Case("docker_socket", """
import socket
def build_model(X, y):
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            print("REACHED", path)
        except OSError as exc:
            print("blocked", path, type(exc).__name__)
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}), check=_no_marker_in_output("REACHED")),
    Case("setuid_root", """
import os
def build_model(X, y):
    for call in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.seteuid(0)):
        try:
            call()
        except OSError:
            pass
    if os.geteuid() == 0 or os.getuid() == 0:
        print("REACHED root")
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}), check=_no_marker_in_output("REACHED")),
    Case("pickle_bomb_return", """
import os
class Evil:
    def __reduce__(self):
        return (os.system, ("touch $host_dir/unpickled",))
    def __array__(self, *args, **kwargs):
        raise TypeError("no array here")
class Model:
    def predict_proba(self, X):
        return Evil()
    def __reduce__(self):
        return (os.system, ("touch $host_dir/unpickled",))
def build_model(X, y):
    return Model()
""", S({Status.INVALID_OUTPUT}), check=lambda r, h: "unpickled on the host" if h.host_writes() else ""),
    Case("nan_predictions", CONST_MODEL.replace("0.5", "float('nan')") + """
def build_model(X, y):
    return ConstModel()
""", S({Status.INVALID_OUTPUT})),
    Case("garbage_predictions", """
class Model:
    def predict_proba(self, X):
        return [["not", "a", "number"]] * len(X)
def build_model(X, y):
    return Model()
""", S({Status.INVALID_OUTPUT})),
    Case("wrong_shape_predictions", """
import numpy as np
class Model:
    def predict_proba(self, X):
        return np.zeros((len(X) + 5, 2))
def build_model(X, y):
    return Model()
""", S({Status.INVALID_OUTPUT})),
    Case("network_loopback_tcp", """
import socket
def build_model(X, y):
    try:
        socket.create_connection(("127.0.0.1", $port), timeout=1).close()
        print("REACHED")
    except OSError as exc:
        print("blocked", type(exc).__name__)
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}), check=_network_check, network=True),
    Case("network_name_lookup", """
import socket
def build_model(X, y):
    try:
        print("REACHED", socket.getaddrinfo("pypi.org", 443))
    except OSError as exc:
        print("blocked", type(exc).__name__)
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}), check=_no_marker_in_output("REACHED"), network=True),
    Case("network_interfaces", """
import socket
def build_model(X, y):
    print("INTERFACES", sorted(name for _, name in socket.if_nameindex()))
    raise RuntimeError("done")
""", S({Status.RUNTIME_ERROR}),
         check=lambda r, h: "" if "INTERFACES ['lo']" in r.stdout else f"interfaces other than lo: {r.stdout!r}",
         network=True),
]

CASE_NAMES = [case.name for case in CASES]


@dataclass
class Verdict:
    case: str
    contained: bool
    status: str
    detail: str
    seconds: float
    honest_seconds: float


def run_case(sandbox, case: Case, host: Host, shared_uid: bool = False) -> Verdict:
    """Run one hostile case and the honest job after it; judge containment."""
    program = string.Template(case.program).safe_substitute(host.values())
    started = time.monotonic()
    result = sandbox.run(Job(program, [tiny_fold()]))
    seconds = time.monotonic() - started
    problems = []
    allowed = case.expected | (case.shared_uid_extra if shared_uid else frozenset())
    if result.status not in allowed:
        expected = ", ".join(sorted(s.value for s in allowed))
        problems.append(f"status {result.status.value} (expected {expected}): {result.message[:200]}")
    if case.check is not None:
        problem = case.check(result, host)
        if problem:
            problems.append(problem)
    if not result.message and result.status is not Status.OK:
        problems.append("no message for a failed job")
    time.sleep(0.05)
    left = processes_with(host.marker)
    if left:
        problems.append(f"{len(left)} process(es) of the job still running on the host")
    honest_started = time.monotonic()
    honest = sandbox.run(Job(HONEST_PROGRAM, [tiny_fold()]))
    honest_seconds = time.monotonic() - honest_started
    if not honest.ok:
        problems.append(f"the honest job after it failed: {honest.status.value}: {honest.message[:200]}")
    elif honest_seconds > HONEST_DEADLINE_S:
        problems.append(f"the honest job after it took {honest_seconds:.1f}s")
    return Verdict(case.name, not problems, result.status.value, "; ".join(problems) or result.message[:120],
                   seconds, honest_seconds)


def applicable_cases(isolation: str, names: list[str] | None = None) -> list[Case]:
    cases = [c for c in CASES if names is None or c.name in names]
    if isolation == "unsafe-process":
        cases = [c for c in cases if not c.network]  # no isolation: probes would reach real networks
    return cases


def run_suite(sandbox, names: list[str] | None = None, progress: Callable[[Verdict], None] | None = None
              ) -> list[Verdict]:
    verdicts = []
    shared_uid = sandbox.isolation == "docker" or os.geteuid() != 0
    with planted_host() as host:
        for case in applicable_cases(sandbox.isolation, names):
            verdict = run_case(sandbox, case, host, shared_uid=shared_uid)
            verdicts.append(verdict)
            if progress is not None:
                progress(verdict)
    return verdicts
