"""Sandbox fixtures shared by the test suite (owned by the sandbox package).

- `local_sandbox`: one session-wide local (bubblewrap) sandbox.
- `sandbox_backends`: a session-scoped fixture parametrised over the isolating backends ("local", "docker");
  each test using it runs once per backend. Docker is skipped when no engine or image is present, unless
  ETPO_REQUIRE_DOCKER=1, where a missing engine or image FAILS the test.
- `make_backend(name, limits)`: build a sandbox for a backend name with the same availability rules.
"""

from __future__ import annotations

import os

import pytest

from sandbox import Limits, make_sandbox

ISOLATING_BACKENDS = ("local", "docker")
TEST_LIMITS = Limits(wall_time_s=30.0, cpu_time_s=30)


def docker_required() -> bool:
    return os.environ.get("ETPO_REQUIRE_DOCKER", "") not in ("", "0")


def ensure_backend_available(name: str) -> None:
    """Skip (or fail, when Docker is required) if the backend cannot run on this host."""
    if name != "docker":
        return
    from sandbox.docker_backend import docker_status

    ok, why = docker_status()
    if not ok:
        if docker_required():
            pytest.fail(f"ETPO_REQUIRE_DOCKER=1 but the Docker backend is unavailable: {why}")
        pytest.skip(f"Docker backend unavailable: {why}")


def make_backend(name: str, limits: Limits = TEST_LIMITS, parallelism: int = 2):
    ensure_backend_available(name)
    return make_sandbox(name, limits=limits, parallelism=parallelism)


def backend_params() -> list:
    return [pytest.param(name, id=name, marks=[pytest.mark.docker] if name == "docker" else [])
            for name in ISOLATING_BACKENDS]


@pytest.fixture(scope="session")
def local_sandbox():
    sandbox = make_sandbox("local", limits=TEST_LIMITS, parallelism=2)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="session", params=backend_params())
def sandbox_backends(request):
    sandbox = make_backend(request.param)
    yield sandbox
    sandbox.close()
