"""Docker backend: each worker lives in a long-lived, hardened, labelled container started on first use.

Hardening: no network, read-only root, size- and inode-capped tmpfs /tmp and /dev/shm, /sys/fs/cgroup masked, no
log driver (nothing a job prints reaches the host's disk), memory limit without swap, pids limit, one CPU,
all capabilities dropped but those the worker needs to run each job child as an unprivileged uid of its own (init
and worker run as root, out of the job's reach), no-new-privileges, an init process, no host mounts.
The host talks to the worker over the container's attached stdin/stdout (one multiplexed socket, framed
messages): no `docker exec` per job. A container that stops answering is killed and replaced, never waited on.
Containers are removed on `close()`, at interpreter exit, and by `etpo sandbox prune` (by label).
"""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid

from sandbox.api import LABEL, Limits
from sandbox.cgroup import V1_ROOT, V2_ROOT, MemoryCgroup
from sandbox.images import WORKER_IN_IMAGE, docker_client, image_exists, image_tag
from sandbox.local import WORKER_CAPS, WORKER_MEMORY_MB, random_child_uid, sandbox_environment
from sandbox.workers import FdReader, SandboxUnavailable, WorkerHandle, WorkerSandbox

OWNER_LABEL = "etpo-gym.sandbox.owner"  # "<hostname>:<pid>" of the process that created it
SANDBOX_LABEL = "etpo-gym.sandbox.id"
EXTRA_PIDS = 16  # init, worker and helpers on top of the job's process limit
TMP_INODES = 16_384  # entries a job may make in /tmp (files, directories, links)
SHM_INODES = 1_024  # and in /dev/shm (joblib's memory maps need a handful)
_STREAM_HEADER = struct.Struct(">BxxxI")  # Docker's multiplexed stream framing: stream id, payload size


def docker_status(image: str | None = None) -> tuple[bool, str]:
    """(usable, reason): an engine answers and the image for the current worker exists."""
    try:
        client = docker_client(timeout=5)
        client.ping()
    except Exception as exc:  # any failure to reach an engine means "not available"
        return False, f"no Docker engine answers ({type(exc).__name__}: {exc})"
    tag = image or image_tag()
    try:
        if not image_exists(tag, client):
            return False, f"image {tag} is missing; build it with `etpo sandbox build --offline`"
    finally:
        client.close()
    return True, tag


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DemuxReader(FdReader):
    """Reads the container's stdout out of Docker's multiplexed attach stream; stderr goes to a small log."""

    def __init__(self, sock: socket.socket, log_cap: int = 8192):
        super().__init__(sock.fileno())
        self.sock = sock
        self.raw = bytearray()
        self.stderr_tail = bytearray()
        self.log_cap = log_cap

    def _read_chunk(self) -> bytes | None:
        data = self.sock.recv(1 << 20)
        if not data:
            return None
        self.raw += data
        out = bytearray()
        while len(self.raw) >= _STREAM_HEADER.size:
            stream, size = _STREAM_HEADER.unpack_from(self.raw)
            if len(self.raw) < _STREAM_HEADER.size + size:
                break
            payload = bytes(self.raw[_STREAM_HEADER.size:_STREAM_HEADER.size + size])
            del self.raw[:_STREAM_HEADER.size + size]
            if stream == 1:
                out += payload
            else:
                self.stderr_tail += payload
                del self.stderr_tail[:-self.log_cap]
        return bytes(out)


class ContainerWorker(WorkerHandle):
    isolation = "docker"

    def __init__(self, client, image: str, limits: Limits, sandbox_id: str, slot: int):
        from docker.types import LogConfig

        uid = random_child_uid()
        self.client = client
        self.container = client.containers.create(
            image, command=["python3", "-I", "-B", WORKER_IN_IMAGE, "--own-pid-namespace", "--scratch", "/tmp",
                            "--child-uid", str(uid)],
            # detach=False is what makes docker-py set StdinOnce (with AttachStdin/out/err); with auto_remove, if this
            # process dies (even by SIGKILL) the worker reads EOF on stdin, exits, and the daemon removes the
            # container. `close()`, atexit and `etpo sandbox prune` are the other paths.
            # docker-init and the worker run as root with only the capabilities that switch each job child to `uid`
            # and clean up after it: a job can neither signal, trace nor read them (/proc/1/mem, /proc/1/fd/1, the
            # protocol stream). Jobs run as `uid`, without capabilities, under the worker's system-call filter.
            stdin_open=True, detach=False, auto_remove=True, tty=False, init=True, user="0:0", working_dir="/tmp",
            environment=sandbox_environment(), network_mode="none", read_only=True,
            # /dev/mqueue is world-writable by default: queues created there as files would outlive a fold.
            # Inode caps: a flood of empty entries costs no bytes but makes the sweep after the job take minutes.
            # /sys/fs/cgroup is masked: the container's memory high-water mark there survives every fold.
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={limits.tmpfs_mb}m,nr_inodes={TMP_INODES},mode=1777",
                   "/dev/shm": f"rw,nosuid,nodev,noexec,size=64m,nr_inodes={SHM_INODES},mode=1777",
                   "/dev/mqueue": "ro,nosuid,nodev,noexec,size=4k,mode=755",
                   "/sys/fs/cgroup": "ro,nosuid,nodev,noexec,size=4k,nr_inodes=1,mode=555"},
            # No log driver: the worker's frames (predictions, program output) never reach the host's disk.
            log_config=LogConfig(type=LogConfig.types.NONE),
            mem_limit=f"{limits.memory_mb + WORKER_MEMORY_MB}m", memswap_limit=f"{limits.memory_mb + WORKER_MEMORY_MB}m",
            pids_limit=limits.max_processes + EXTRA_PIDS, nano_cpus=1_000_000_000, cap_drop=["ALL"],
            cap_add=[cap.removeprefix("CAP_") for cap in WORKER_CAPS],
            security_opt=["no-new-privileges"], ipc_mode="private",
            labels={LABEL: "1", OWNER_LABEL: owner_id(), SANDBOX_LABEL: sandbox_id, f"{LABEL}.slot": str(slot)})
        try:
            self._attach = client.api.attach_socket(self.container.id,
                                                    params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            self.sock = self._attach._sock
            self.sock.setblocking(True)
            self.container.start()
            # The container's own memory cgroup, where the host can read it: its OOM kills name the job's failure.
            self.memory_cgroup = MemoryCgroup.existing(
                [V1_ROOT / "docker" / self.container.id, V2_ROOT / "system.slice" / f"docker-{self.container.id}.scope"])
        except Exception:
            self.kill()
            raise
        self._reader = DemuxReader(self.sock)

    def send(self, data: bytes, deadline: float) -> None:
        # sendall's timeout bounds the whole call (Python >= 3.5), so a stopped worker cannot block us here.
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            self.sock.sendall(data)
        finally:
            self.sock.settimeout(None)

    def reader(self) -> FdReader:
        return self._reader

    def diagnostics(self) -> str:
        tail = bytes(self._reader.stderr_tail).decode("utf-8", "replace").strip() if hasattr(self, "_reader") else ""
        return f"container log: {tail[-2000:]}" if tail else ""

    def kill(self) -> None:
        import docker.errors

        try:
            self.container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
        for closer in (getattr(self, "sock", None), getattr(self, "_attach", None)):
            try:
                if closer is not None:
                    closer.close()
            except OSError:
                pass


class DockerSandbox(WorkerSandbox):
    """Warm workers in hardened containers; one container per concurrent slot, created on first use."""

    def __init__(self, limits: Limits | None = None, parallelism: int | None = None, recycle_after: int = 500,
                 image: str | None = None):
        ok, why = docker_status(image)
        if not ok:
            raise SandboxUnavailable(f"the Docker backend is unavailable: {why}")
        self.image = image or image_tag()
        self.sandbox_id = uuid.uuid4().hex[:12]
        self._client = docker_client(timeout=60)
        super().__init__("docker", self._launch, limits, parallelism, recycle_after)

    def _launch(self, slot: int) -> WorkerHandle:
        return ContainerWorker(self._client, self.image, self.limits, self.sandbox_id, slot)

    def _after_close(self) -> None:
        prune(sandbox_id=self.sandbox_id)


def prune(sandbox_id: str | None = None, all_owners: bool = False) -> list[str]:
    """Remove project containers: those of one sandbox, those whose owner process is gone, or all of them."""
    import docker.errors

    client = docker_client(timeout=30)
    filters = {"label": [f"{SANDBOX_LABEL}={sandbox_id}"] if sandbox_id else [LABEL]}
    removed = []
    for container in client.containers.list(all=True, filters=filters):
        owner = container.labels.get(OWNER_LABEL, "")
        if not (sandbox_id or all_owners or _owner_gone(owner)):
            continue
        try:
            container.remove(force=True, v=True)
            removed.append(container.short_id)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
    client.close()
    return removed


def _owner_gone(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
