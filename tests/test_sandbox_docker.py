"""Docker backend: hardening of the container, wedge recovery, cleanup by label, image tagging and reuse."""

from __future__ import annotations

import time

import pytest

from sandbox import Job, Limits, Status, images, make_sandbox
from sandbox.docker_backend import LABEL, OWNER_LABEL, SANDBOX_LABEL, owner_id, prune
from sandbox.safety import HONEST_PROGRAM, tiny_fold
from tests.fixtures_sandbox import ensure_backend_available, make_backend

pytestmark = pytest.mark.sandbox

PROBE = """
import os
def build_model(X, y):
    # interfaces from sysfs: the filter refuses netlink sockets, so socket.if_nameindex() cannot list them
    print(os.getuid(), sorted(os.listdir("/sys/class/net")), os.access("/", os.W_OK), os.access("/tmp", os.W_OK))
    raise RuntimeError("probe")
"""


@pytest.fixture()
def docker_sandbox():
    sandbox = make_backend("docker", limits=Limits(wall_time_s=20, memory_mb=1024, max_processes=32), parallelism=1)
    yield sandbox
    sandbox.close()


def _containers(client, sandbox_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{SANDBOX_LABEL}={sandbox_id}"})


def test_image_tag_is_a_content_hash(tmp_path, monkeypatch):
    tag = images.image_tag()
    assert tag.startswith(f"{images.REPOSITORY}:") and len(tag.split(":")[1]) == 16
    assert images.image_tag() == tag
    package = tmp_path / "worker"  # the worker package is hashed as a unit: any module's change is a new tag
    package.mkdir()
    for path in images.worker_files():
        (package / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(images, "WORKER", package)
    assert images.image_tag() == tag
    (package / "wire.py").write_bytes((package / "wire.py").read_bytes() + b"\n# changed\n")
    assert images.image_tag() != tag
    (package / "wire.py").unlink()
    assert images.image_tag() != tag


@pytest.mark.docker
def test_container_is_hardened_and_started_only_on_first_run(docker_sandbox):
    import docker

    client = docker.from_env()
    try:
        assert _containers(client, docker_sandbox.sandbox_id) == []
        result = docker_sandbox.run(Job(PROBE, [tiny_fold()]))
        assert result.status is Status.RUNTIME_ERROR and result.isolation == "docker"
        uid, rest = result.stdout.split(" ", 1)
        assert int(uid) != 0
        assert rest.strip() == "['lo'] False True"
        (container,) = _containers(client, docker_sandbox.sandbox_id)
        host = container.attrs["HostConfig"]
        assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
        assert host["Memory"] == host["MemorySwap"] > 0
        assert host["PidsLimit"] > 0 and host["NanoCpus"] == 1_000_000_000 and host["Init"] is True
        assert "/tmp" in host["Tmpfs"] and "size=" in host["Tmpfs"]["/tmp"]
        assert not host.get("Binds") and not container.attrs["Mounts"]
        # init and worker are root with only the uid-switching capabilities; the job ran as another uid (above)
        from sandbox.local import WORKER_CAPS

        assert container.attrs["Config"]["User"] == "0:0"
        assert sorted(c.removeprefix("CAP_") for c in host["CapAdd"]) == sorted(c.removeprefix("CAP_") for c in WORKER_CAPS)
        assert host["Tmpfs"]["/dev/mqueue"].startswith("ro,")
        # inode caps on every writable tmpfs, the cgroup files masked, and no log file of the worker's frames
        assert "nr_inodes=" in host["Tmpfs"]["/tmp"] and "nr_inodes=" in host["Tmpfs"]["/dev/shm"]
        assert host["Tmpfs"]["/sys/fs/cgroup"].startswith("ro,")
        assert host["LogConfig"]["Type"] == "none" and not container.attrs.get("LogPath")
        assert container.labels[LABEL] == "1" and container.labels[OWNER_LABEL] == owner_id()
    finally:
        client.close()


@pytest.mark.docker
def test_wedged_container_is_killed_and_replaced(docker_sandbox, monkeypatch):
    import docker

    from sandbox import workers

    monkeypatch.setattr(workers, "RESPONSE_GRACE_S", 2.0)
    assert docker_sandbox.run(Job(HONEST_PROGRAM, [tiny_fold()])).ok
    client = docker.from_env()
    try:
        (container,) = _containers(client, docker_sandbox.sandbox_id)
        container.pause()  # the worker can no longer answer: the host must not wait on it
        started = time.monotonic()
        docker_sandbox.limits = Limits(wall_time_s=1.0)
        wedged = docker_sandbox.run(Job(HONEST_PROGRAM, [tiny_fold()]))
        # the worker enforces the wall time itself: silence past the grace is the worker's fault, not the job's
        assert wedged.status is Status.SANDBOX_ERROR and "replaced" in wedged.message
        assert time.monotonic() - started < 15
        assert docker_sandbox.run(Job(HONEST_PROGRAM, [tiny_fold()])).ok
        remaining = [c.id for c in _containers(client, docker_sandbox.sandbox_id)]
        assert container.id not in remaining and len(remaining) == 1
    finally:
        client.close()


@pytest.mark.docker
def test_prune_spares_live_owners_and_close_removes_containers():
    import docker

    ensure_backend_available("docker")
    sandbox = make_sandbox("docker", parallelism=1)
    client = docker.from_env()
    try:
        assert sandbox.run(Job(HONEST_PROGRAM, [tiny_fold()])).ok
        (container,) = _containers(client, sandbox.sandbox_id)
        assert container.short_id not in prune()  # its owner (this process) is alive
        assert len(_containers(client, sandbox.sandbox_id)) == 1
        sandbox.close()
        assert _containers(client, sandbox.sandbox_id) == []
    finally:
        sandbox.close()
        client.close()


KILLED_OWNER = """
import sys
from sandbox import Job, make_sandbox
from sandbox.safety import HONEST_PROGRAM, tiny_fold
sandbox = make_sandbox("docker", parallelism=1)
assert sandbox.run(Job(HONEST_PROGRAM, [tiny_fold()])).ok
print(sandbox.sandbox_id, flush=True)
sys.stdin.read()  # wait here until the test kills this process
"""


@pytest.mark.docker
def test_container_of_a_killed_owner_removes_itself():
    import os
    import signal
    import subprocess
    import sys

    import docker

    ensure_backend_available("docker")
    client = docker.from_env()
    owner = subprocess.Popen([sys.executable, "-c", KILLED_OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id and len(_containers(client, sandbox_id)) == 1
        os.kill(owner.pid, signal.SIGKILL)  # no atexit, no close(): only the container's own wiring can help
        owner.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _containers(client, sandbox_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _containers(client, sandbox_id) == []
    finally:
        if owner.poll() is None:
            owner.kill()
        client.close()


@pytest.mark.docker
def test_offline_build_is_a_noop_when_the_image_is_current():
    ensure_backend_available("docker")
    lines: list[str] = []
    started = time.monotonic()
    tag = images.build_image(offline=True, log=lines.append)
    assert tag == images.image_tag()
    assert "up to date" in lines[0] and time.monotonic() - started < 10


@pytest.mark.docker
def test_auto_prefers_docker_when_the_image_exists():
    ensure_backend_available("docker")
    with make_sandbox("auto", parallelism=1) as sandbox:
        assert sandbox.isolation == "docker"
