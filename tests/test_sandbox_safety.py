"""Safety suite (`pytest -m safety`): every hostile case against every isolating backend.

The cases themselves live in sandbox/safety.py so `etpo sandbox check` runs exactly the same programs.
"""

from __future__ import annotations

import os

import pytest

from sandbox import Job
from sandbox.local import _descendants
from sandbox.safety import (
    CASES,
    HOSTILE_LIMITS,
    applicable_cases,
    planted_host,
    processes_with,
    run_case,
    shares_uid,
    tiny_fold,
)
from tests.fixtures_sandbox import backend_params, make_backend

pytestmark = [pytest.mark.safety, pytest.mark.sandbox]


@pytest.fixture(scope="module")
def planted():
    with planted_host() as host:
        yield host


@pytest.fixture(scope="module", params=backend_params())
def hostile_sandbox(request):
    sandbox = make_backend(request.param, limits=HOSTILE_LIMITS, parallelism=1)
    yield sandbox
    sandbox.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_program_is_contained(hostile_sandbox, planted, case):
    if case not in applicable_cases(hostile_sandbox.isolation):
        pytest.fail(f"{case.name} must apply to an isolating backend")
    shared_uid = shares_uid(hostile_sandbox.isolation)
    verdict = run_case(hostile_sandbox, case, planted, shared_uid=shared_uid)
    assert verdict.contained, f"{case.name} on {hostile_sandbox.isolation}: {verdict.detail}"


def _sandbox_processes() -> list[int]:
    """Our own descendants that are sandbox machinery (bubblewrap or a worker: `python -I -B /opt/etpo/worker`)."""
    found = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"bwrap" in cmdline or b"/etpo/worker" in cmdline:
            found.append(pid)
    return found


@pytest.mark.parametrize("backend", backend_params())
def test_nothing_is_left_after_close(backend, planted):
    before = set(_sandbox_processes())
    sandbox = make_backend(backend, limits=HOSTILE_LIMITS, parallelism=2)
    daemon = next(c for c in CASES if c.name == "shell_subprocess_daemon")
    from string import Template

    program = Template(daemon.program).safe_substitute(planted.values())
    assert sandbox.run(Job(program, [tiny_fold()])).ok
    sandbox.warm_up()
    if backend == "docker":
        from sandbox.docker_backend import SANDBOX_LABEL
        from sandbox.images import docker_client

        client = docker_client()
        label = {"label": f"{SANDBOX_LABEL}={sandbox.sandbox_id}"}
        assert len(client.containers.list(filters=label)) == 2, "one running container per slot"
        sandbox.close()
        left = client.containers.list(all=True, filters=label)
        client.close()
        assert left == []
    else:
        assert set(_sandbox_processes()) - before, "the sandbox should be running workers now"
        sandbox.close()
        assert set(_sandbox_processes()) - before == set()
    assert processes_with(planted.marker) == []
