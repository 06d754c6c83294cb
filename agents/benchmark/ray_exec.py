"""Benchmark cells as Ray tasks: each `(agent_spec, task_name, seed)` cell runs on some node of a cluster.

A cell is `agents.benchmark.run.run_cell_isolated(config, agent_spec, task_name, seed)` in a Ray worker: it builds its
own task, sandbox (the configured backend, on that node) and agent there and returns the cell record, the same
record the local loop writes. The driver hands each record to `on_record` as its cell finishes (any order).

Resources: every cell declares `num_cpus=1`; a cell whose agent options put the model on CUDA (an option named
`device`, e.g. `--set device=cuda`, with a `cuda` value) declares `num_gpus=1` as well. Ray hides the GPUs
from a cell that did not declare one, so an agent on `device=auto` runs on the CPU there.

A cell that fails as a task (its worker crashed, its node died, or `run_cell_isolated` raised) is submitted again,
at most `max_retries` times; after that its record carries the error and the agent's own cells keep running. An
agent that crashes inside a cell is not a task failure: `run_cell` records it, as locally.

Each node needs the project installed (the same version, in the Python the cluster runs) and its sandbox: the image
for the Docker backend, bubblewrap for the local one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from agents.benchmark.config import BenchConfig
from agents.benchmark.run import load_task, run_cell_isolated, unrun_cell_record

Cell = tuple[str, str, int]  # (agent_spec, task_name, seed)
WAIT_SLICE_S = 2.0  # the driver wakes this often while cells run (so Ctrl-C and progress are handled promptly)
REPORT_EVERY_S = 1.0  # a cell hands its env-step count to the driver at most this often (one remote call each)


def cell_resources(config: BenchConfig, agent_spec: str) -> dict[str, float]:
    """Ray resources one cell declares: one CPU, and one GPU when its agent options put the model on CUDA."""
    from agents.registry import options_for

    try:
        options = options_for(agent_spec, config.agent_options)
    except (ImportError, ValueError, AttributeError):  # an agent that cannot be loaded reports it in its cell
        options = {}
    on_cuda = any(key.rsplit(".", 1)[-1] == "device" and str(value).startswith("cuda")
                  for key, value in options.items())
    return {"num_cpus": 1, "num_gpus": 1 if on_cuda else 0}


class StepReporter:
    """A cell's `on_step` on the cluster: counts its env steps and puts `(cell, steps)` on the driver's queue at most
    every REPORT_EVERY_S seconds (a remote call per env step would cost more than some steps), and at `flush`.

    While the cell runs, a report is sent without waiting for the queue's answer: a Ray task blocked on a remote
    call hands its CPU back, and Ray starts another cell on it (three cells on two cores, for the rest of the run).
    `flush`, the cell's last call, waits for every report it sent, so all are on the queue before the cell's record."""

    def __init__(self, queue: Any, cell: Cell, every_s: float = REPORT_EVERY_S):
        self.queue, self.cell, self.every_s = queue, cell, every_s
        self.pending, self.last = 0, time.monotonic()
        self.sent: list[Any] = []  # the reports' ObjectRefs, awaited by `flush`

    def __call__(self) -> None:
        self.pending += 1
        if time.monotonic() - self.last >= self.every_s:
            self._send()

    def flush(self) -> None:
        import ray

        self._send()
        ray.get(self.sent)
        self.sent = []

    def _send(self) -> None:
        if self.pending:  # ray.util.queue.Queue has no call that does not wait, so its actor is called directly
            self.sent.append(self.queue.actor.put_nowait.remote((self.cell, self.pending)))
        self.pending, self.last = 0, time.monotonic()


def _run_cell_isolated(config: BenchConfig, agent_spec: str, task_name: str, seed: int,
                       steps_queue: Any = None) -> dict[str, Any]:
    reporter = None if steps_queue is None else StepReporter(steps_queue, (agent_spec, task_name, seed))
    try:
        return run_cell_isolated(config, agent_spec, task_name, seed, on_step=reporter)
    finally:
        if reporter is not None:
            reporter.flush()


@functools.cache
def _remote_cell() -> Any:
    import ray

    return ray.remote(max_retries=0)(_run_cell_isolated)  # retries are counted here, for every kind of failure


def lost_cell_record(config: BenchConfig, cell: Cell, error: str, attempts: int) -> dict[str, Any]:
    """The record of a cell that failed on the cluster every time (`unrun_cell_record`), with `attempts` saying how
    often it ran."""
    agent_spec, task_name, seed = cell
    return unrun_cell_record(config, agent_spec, load_task(config, task_name), seed, error, attempts)


def describe_failure(exc: BaseException) -> str:
    """One line for a cell's `error`: the task's own exception where there is one, else Ray's reason."""
    from ray import exceptions as rx

    if isinstance(exc, rx.RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}".rstrip(": ")


def run_cells(address: str | None, config: BenchConfig, cells: Iterable[Cell],
              on_record: Callable[[dict[str, Any]], None], max_retries: int = 2,
              on_steps: Callable[[Cell, int], None] | None = None) -> list[dict[str, Any]]:
    """Run every cell as a Ray task; `on_record(record)` in this process as each one finishes; the records.

    `address`: "auto" (or None) connects to the cluster this host belongs to, or starts a local one; any other
    value connects to that cluster. A runtime started here is shut down at the end; a cluster is never stopped.
    `on_steps(cell, n)`, when given, hears of the env steps the cells take as they run (a progress bar's feed,
    through a Ray queue; a retried cell's steps are heard again).
    """
    import ray

    from sandbox.ray_pool import connect_ray

    owns_ray = connect_ray(address)
    try:
        return _run_all(config, list(cells), on_record, max_retries, on_steps)
    finally:
        if owns_ray:
            ray.shutdown()


def _run_all(config: BenchConfig, cells: Sequence[Cell], on_record: Callable[[dict[str, Any]], None],
             max_retries: int, on_steps: Callable[[Cell, int], None] | None) -> list[dict[str, Any]]:
    import ray
    from ray.util.queue import Queue

    config_ref = ray.put(config)  # one copy in the object store, shared by every cell
    steps_queue = Queue(actor_options={"num_cpus": 0}) if on_steps is not None else None  # holds no lane
    attempts = {cell: 0 for cell in cells}
    pending: dict[Any, Cell] = {}

    def submit(cell: Cell) -> None:
        attempts[cell] += 1
        options = cell_resources(config, cell[0])
        pending[_remote_cell().options(**options).remote(config_ref, *cell, steps_queue)] = cell

    def hear_steps() -> None:
        if steps_queue is not None and (waiting := steps_queue.qsize()):
            for cell, steps in steps_queue.get_nowait_batch(waiting):
                on_steps(tuple(cell), steps)

    for cell in cells:
        submit(cell)
    records = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SLICE_S)
            hear_steps()
            for ref in done:
                cell = pending.pop(ref)
                try:
                    record = ray.get(ref, timeout=0)
                except ray.exceptions.RayError as exc:
                    if attempts[cell] <= max_retries:
                        submit(cell)
                        continue
                    record = lost_cell_record(config, cell, f"the cell failed on the cluster {attempts[cell]} "
                                              f"time(s); last: {describe_failure(exc)}", attempts[cell])
                records.append(record)
                on_record(record)
    except BaseException:
        for ref in pending:  # interrupted: nothing keeps running on the cluster for us
            ray.cancel(ref, force=True)
        raise
    finally:
        if steps_queue is not None:
            steps_queue.shutdown()
    return records


__all__ = ["cell_resources", "lost_cell_record", "run_cells"]
