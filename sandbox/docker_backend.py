"""Docker backend (placeholder until the image build lands): reports itself unavailable."""

from __future__ import annotations

from sandbox.pool import SandboxUnavailable


def docker_status(image: str | None = None) -> tuple[bool, str]:
    return False, "the Docker backend is not available yet"


class DockerSandbox:
    def __init__(self, *args, **kwargs):
        raise SandboxUnavailable("the Docker backend is not available yet")
