"""`make_sandbox`: pick and build a backend."""

from __future__ import annotations

import logging

from sandbox.api import Limits, Sandbox
from sandbox.workers import SandboxUnavailable

log = logging.getLogger(__name__)

BACKENDS = ("auto", "docker", "local", "unsafe-process")


def make_sandbox(backend: str = "auto", limits: Limits | None = None, parallelism: int | None = None,
                 **options) -> Sandbox:
    """Create a sandbox. Nothing is started before the first `run`.

    `auto` uses Docker when an engine answers and the sandbox image exists, else the local namespace sandbox;
    `unsafe-process` (no isolation) is only ever used when asked for by name. `options` go to the backend
    (e.g. `recycle_after`, or `image` for Docker).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        from sandbox.docker_backend import docker_status

        ok, why = docker_status(options.get("image"))
        backend = "docker" if ok else "local"
        if not ok:
            log.info("sandbox: using the local backend (%s)", why)
    if backend == "docker":
        from sandbox.docker_backend import DockerSandbox

        return DockerSandbox(limits=limits, parallelism=parallelism, **options)
    options.pop("image", None)
    if backend == "local":
        from sandbox.local import LocalSandbox

        return LocalSandbox(limits=limits, parallelism=parallelism, **options)
    from sandbox.local import UnsafeProcessSandbox

    return UnsafeProcessSandbox(limits=limits, parallelism=parallelism, **options)


__all__ = ["BACKENDS", "SandboxUnavailable", "make_sandbox"]
