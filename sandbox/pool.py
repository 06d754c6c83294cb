"""`SandboxPool`: a bounded set of sandboxes that many envs share (the one thing the project calls a pool; its
Ray counterpart is `sandbox.ray_pool.RaySandboxPool`).

A program run is mostly waiting on a sandboxed child process, so envs stepped from threads overlap their runs; the
pool bounds how many run at once and how many sandboxes exist.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class SandboxPool:
    """Up to `size` sandboxes, created on demand and shared; `run` borrows an idle one (or waits for one).

    It satisfies the `sandbox.Sandbox` protocol, so it can be passed as `sandbox=` to any number of envs.
    `close()` closes every sandbox it created and is idempotent.
    """

    def __init__(
        self,
        size: int = 2,
        backend: str = "auto",
        limits: Any = None,
        factory: Callable[[], Any] | None = None,
    ):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.isolation = ""  # known after the first run
        self._factory = factory or _sandbox_factory(backend, limits)
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue = queue.LifoQueue()  # LIFO: the most recently used (warm) sandbox first
        self._created: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, job: Any) -> Any:
        if self._closed:
            raise RuntimeError("the SandboxPool is closed")
        with self._slots:
            sandbox = self._checkout()
            try:
                result = sandbox.run(job)
            finally:
                self._idle.put(sandbox)
        self.isolation = self.isolation or getattr(result, "isolation", "")
        return result

    @property
    def started(self) -> int:
        """How many sandboxes exist now (0 until the first run)."""
        return len(self._created)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sandboxes, self._created = self._created, []
            self._idle = queue.LifoQueue()
        for sandbox in sandboxes:
            sandbox.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checkout(self) -> Any:
        # Holding a slot means fewer than `size` sandboxes are busy, so with none idle one more may be made.
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the SandboxPool is closed") from None
                sandbox = self._factory()
                self._created.append(sandbox)
                return sandbox


def _sandbox_factory(backend: str, limits: Any) -> Callable[[], Any]:
    def make() -> Any:
        from sandbox import make_sandbox

        return make_sandbox(backend, limits=limits, parallelism=1)  # the pool's size bounds concurrency

    return make
