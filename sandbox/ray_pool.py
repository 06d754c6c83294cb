"""Sandbox slots on a Ray cluster: `RaySandboxPool` spreads warm sandboxes over the nodes, behind the `Sandbox` protocol.

Each slot is a Ray actor placed with SPREAD scheduling; the actor creates a one-worker Docker or local sandbox on
its own node, so untrusted code runs inside that node's isolation exactly as it does on one machine (the actor is
host-side code: what it returns is the `RunResult` its sandbox built and validated). Concurrent `run` calls from
several threads (a pooled vector env's envs) each borrow an idle slot.

Nothing hangs: every wait on the cluster has a deadline derived from the limits, and a slot whose actor or node
dies, or whose actor stops answering, turns the job in flight into a `sandbox_error` result and is replaced by a
fresh actor. Ray is imported on first use only: `import sandbox` never imports it.

    with RaySandboxPool(size=4, backend="local", address="auto") as pool:
        envs = make_pooled_vec_env(num_envs=8, sandbox=pool, task="iris")
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sandbox.api import Job, Limits, RunResult, Status
from sandbox.workers import RESPONSE_GRACE_S, SEND_TIMEOUT_S, STARTUP_TIMEOUT_S

log = logging.getLogger(__name__)

QUIET_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}  # no usage-stats notice (or upload); a user's setting wins
# A new local runtime turns token authentication on and says so at WARNING level; it stays on, without the notice.
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
ACTOR_START_TIMEOUT_S = 60.0  # scheduling the actor and starting its Ray worker, on top of the sandbox worker's start
TRANSFER_GRACE_S = 30.0  # moving a job and its result between nodes, beyond what the sandbox itself allows
CLOSE_TIMEOUT_S = 10.0


def quiet_ray_environment() -> None:
    """Set Ray's environment defaults before it is imported (it reads them then, and its runtime at start-up).

    With a token at hand (Ray's own file, or RAY_AUTH_TOKEN[_PATH]), token authentication is on: a cluster started
    with `ray start` uses it by default and refuses a driver without it.
    """
    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)
    has_token = any(os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) or \
        os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    if has_token and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect_ray(address: str | None = "auto", **init_options: Any) -> bool:
    """Make sure this process is connected to Ray; True when this call started the connection (and so owns it).

    An existing connection is used as it is. `None` or `"auto"`: connect to a cluster running on this machine (or
    named by RAY_ADDRESS) if there is one, else start a local one; any other address connects to that cluster.
    The owner disconnects with `ray.shutdown()`, which also stops a local runtime it started and never a cluster.
    """
    quiet_ray_environment()
    import ray

    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
               **init_options}
    notice = logging.getLogger(AUTH_NOTICE_LOGGER)
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address=None if address in (None, "auto") else address, **options)
    finally:
        notice.setLevel(level)
    return True


class SandboxSlot:
    """One slot on one node: a single-worker sandbox created here, on the node the actor was placed on."""

    def __init__(self, backend: str, limits: Limits, options: dict[str, Any]):
        from sandbox.factory import make_sandbox

        self.sandbox = make_sandbox(backend, limits=limits, parallelism=1, **options)

    def start(self) -> dict[str, Any]:
        """Start the sandbox worker now; where this slot lives."""
        import socket

        import ray

        self.sandbox.warm_up()
        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "pid": os.getpid(), "isolation": self.sandbox.isolation}

    def run(self, job: Job) -> RunResult:
        return self.sandbox.run(job)

    def close(self) -> None:
        self.sandbox.close()


@functools.cache
def _slot_actor_class() -> Any:
    import ray

    return ray.remote(SandboxSlot)


@dataclass(eq=False)
class _Slot:
    index: int
    actor: Any = None
    ready: Any = None  # ObjectRef of the actor's `start`
    info: dict[str, Any] = field(default_factory=dict)  # its answer: node, host, pid, isolation


class SlotLost(Exception):
    """The slot's actor died, its node died, or it did not answer in time; the message says which."""


class RaySandboxPool:
    """`size` sandbox slots as Ray actors spread over the cluster's nodes; a `Sandbox` usable from many threads.

    `backend` is each node's sandbox backend ("auto", "docker", "local"); `options` go to it (e.g. `image`,
    `recycle_after`). `num_cpus` is the CPU each slot reserves on its node. `address` is as in `connect_ray`; a
    runtime the pool started is shut down by `close()`. Actors start (and warm their sandbox worker) at once.
    """

    def __init__(self, size: int = 2, backend: str = "auto", limits: Limits | None = None,
                 address: str | None = "auto", num_cpus: float = 1, **options: Any):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.backend = backend
        self.limits = limits or Limits()
        self.num_cpus = num_cpus
        self.isolation = ""  # the nodes' sandbox backend, known once a slot has started
        self._options = options
        self._owns_ray = connect_ray(address)
        self._check_fits()
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._slots = [_Slot(index) for index in range(size)]
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"jobs": 0, "actors_started": 0, "actors_replaced": 0}
        for slot in self._slots:
            self._spawn(slot)
            self._idle.put(slot)

    # -- protocol
    def run(self, job: Job) -> RunResult:
        if not isinstance(job, Job):
            raise TypeError(f"Sandbox.run expects a sandbox.Job, got {type(job).__name__}")
        if self._closed:
            raise RuntimeError("this sandbox is closed")
        slot = self._idle.get()
        if self._closed:  # closed while this call waited for a slot
            self._idle.put(slot)
            raise RuntimeError("this sandbox is closed")
        started = time.monotonic()
        try:
            result = self._run_on(slot, job)
        except SlotLost as exc:
            result = self._lost(slot, str(exc), time.monotonic() - started)
        finally:
            self._idle.put(slot)
        with self._lock:
            self.stats["jobs"] += 1
        return result

    def close(self) -> None:
        """Stop every actor (a job in flight returns a sandbox_error); shut Ray down if this pool started it."""
        import ray

        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not ray.is_initialized():  # Ray was shut down under the pool: its actors are gone with it
            return
        closing = [slot.actor.close.remote() for slot in self._slots if slot.actor is not None]
        ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for slot in self._slots:
            self._kill(slot)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> RaySandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection
    def warm_up(self) -> list[dict[str, Any]]:
        """Wait until every slot has started (its sandbox worker warm); where each lives."""
        import ray

        return ray.get([slot.ready for slot in self._slots], timeout=self.start_deadline_s())

    @property
    def actors(self) -> list[Any]:
        """The slots' current actor handles, slot by slot."""
        return [slot.actor for slot in self._slots]

    def start_deadline_s(self) -> float:
        return ACTOR_START_TIMEOUT_S + STARTUP_TIMEOUT_S

    def job_deadline_s(self) -> float:
        """How long a slot may take to answer: its sandbox's own bounds (a worker start, the send, the job's wall
        time, the grace), twice when a worker damaged by the previous job refuses it, plus the transfers."""
        own = STARTUP_TIMEOUT_S + SEND_TIMEOUT_S + self.limits.wall_time_s + RESPONSE_GRACE_S
        return 2 * own + TRANSFER_GRACE_S

    # -- internals
    def _check_fits(self) -> None:
        """Refuse slots the cluster can never place: their actors would wait forever, their jobs time out."""
        import ray

        cpus = ray.cluster_resources().get("CPU", 0)
        if self.size * self.num_cpus > cpus:
            if self._owns_ray:
                ray.shutdown()
            raise ValueError(f"{self.size} slots of {self.num_cpus} CPU each do not fit the cluster's {cpus:g} "
                             "CPUs; use fewer slots or a smaller num_cpus")

    def _spawn(self, slot: _Slot) -> None:
        actor = _slot_actor_class().options(scheduling_strategy="SPREAD", num_cpus=self.num_cpus, max_restarts=0,
                                            max_task_retries=0)
        slot.actor = actor.remote(self.backend, self.limits, self._options)
        slot.ready = slot.actor.start.remote()
        slot.info = {}
        with self._lock:
            self.stats["actors_started"] += 1

    def _kill(self, slot: _Slot) -> None:
        import ray

        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
            slot.actor = None

    def _run_on(self, slot: _Slot, job: Job) -> RunResult:
        if not slot.info:
            slot.info = self._wait(slot, slot.ready, self.start_deadline_s(), "start")
            self.isolation = self.isolation or slot.info["isolation"]
        result = self._wait(slot, slot.actor.run.remote(job), self.job_deadline_s(), "answer")
        result.extra.update(ray_slot=slot.index, ray_node=slot.info["node_id"])
        return result

    def _wait(self, slot: _Slot, ref: Any, timeout: float, stage: str) -> Any:
        """`ray.get` with a deadline; every way of losing the slot becomes `SlotLost`."""
        import ray
        from ray import exceptions as rx

        where = slot.info.get("host") or "its node"
        try:
            return ray.get(ref, timeout=timeout)
        except rx.GetTimeoutError:
            raise SlotLost(f"the sandbox actor on {where} did not {stage} within {timeout:.0f}s") from None
        except (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError) as exc:
            raise SlotLost(f"the sandbox actor on {where} died ({type(exc).__name__})") from None
        except rx.RayTaskError as exc:
            if isinstance(exc.cause, TypeError):  # the job's data cannot be sent: the caller's error, as locally
                raise TypeError(str(exc.cause)) from None
            raise SlotLost(f"the sandbox on {where} failed to {stage}: {exc.cause}") from None
        except rx.RayError as exc:
            raise SlotLost(f"the cluster lost the sandbox actor on {where} ({type(exc).__name__}: {exc})") from None

    def _lost(self, slot: _Slot, why: str, elapsed: float) -> RunResult:
        lost = slot.info
        self._kill(slot)
        if not self._closed:
            self._spawn(slot)
            with self._lock:
                self.stats["actors_replaced"] += 1
        log.info("ray sandbox slot %d replaced: %s", slot.index, why)
        return RunResult(Status.SANDBOX_ERROR, isolation=lost.get("isolation", self.isolation), duration_s=elapsed,
                         extra={"ray_slot": slot.index, "ray_node": lost.get("node_id"), "ray_lost": why},
                         message=(f"The sandbox running this program on the cluster was lost: {why}. It was "
                                  "replaced; the program itself may not be at fault, so it can be run again."))

    def __repr__(self) -> str:
        return f"<RaySandboxPool size={self.size} backend={self.backend} isolation={self.isolation or '?'}>"


__all__ = ["RaySandboxPool", "connect_ray", "quiet_ray_environment"]
