"""Run untrusted data-science code safely and fast: Docker, local namespaces, or (opt-in) a bare process."""

from sandbox.api import Fold, Job, Limits, RunResult, Sandbox, Status

__all__ = ["Fold", "Job", "Limits", "RunResult", "Sandbox", "Status", "make_sandbox"]


def make_sandbox(backend: str = "auto", limits: Limits | None = None, parallelism: int | None = None) -> Sandbox:
    """Create a sandbox; `auto` picks Docker when an engine and the image exist, else local namespaces."""
    from sandbox.factory import make_sandbox as _make

    return _make(backend=backend, limits=limits, parallelism=parallelism)
