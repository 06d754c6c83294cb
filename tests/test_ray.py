"""`RaySandboxPool` against a real local Ray runtime (two logical CPUs, one runtime for the module).

The pool's slots are Ray actors, each with a local (bubblewrap) sandbox of its own: a program result and a timeout
come back exactly as from the local sandbox, concurrent runs spread over the slots, a pooled vector env steps on
it, and an actor killed mid-job fails that step with a sandbox_error and is replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sandbox import Job, Limits, Status
from sandbox.results import timeout_message
from sandbox.safety import HONEST_PROGRAM, tiny_fold

pytestmark = [pytest.mark.ray, pytest.mark.sandbox]

LIMITS = Limits(wall_time_s=4.0, cpu_time_s=10)


def sleeping_program(seconds: float) -> str:
    return f"""
import time
from sklearn.linear_model import LogisticRegression

def build_model(X, y):
    time.sleep({seconds})
    return LogisticRegression(max_iter=200).fit(X, y)
"""


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    from sandbox.ray_pool import connect_ray

    started = connect_ray("local", num_cpus=2)
    assert started, "another Ray connection was already open in this process"
    yield ray
    ray.shutdown()


def test_import_sandbox_does_not_import_ray():
    code = ("import sys, sandbox, sandbox.ray_pool; "
            "print(sorted(m for m in ('ray', 'tasks', 'etpo_env', 'agents') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pool_gives_the_local_sandbox_results(ray_runtime, local_sandbox):
    from sandbox.ray_pool import RaySandboxPool

    job = Job(HONEST_PROGRAM, [tiny_fold()])
    with RaySandboxPool(1, backend="local", limits=LIMITS) as pool:
        result = pool.run(job)
        timed_out = pool.run(Job(sleeping_program(30), [tiny_fold()]))
        assert pool.isolation == "local"
    expected = local_sandbox.run(job)
    assert result.ok, result.message
    assert result.isolation == "local"
    np.testing.assert_array_equal(result.predictions[0], expected.predictions[0])
    assert timed_out.status is Status.TIMEOUT
    assert timed_out.message == timeout_message(LIMITS, cpu=False)


def test_pool_refuses_slots_the_cluster_cannot_place(ray_runtime):
    from sandbox.ray_pool import RaySandboxPool

    with pytest.raises(ValueError, match="do not fit the cluster's 2 CPUs"):
        RaySandboxPool(3, backend="local")  # two slots of one CPU fit: the tests below use them
    with pytest.raises(ValueError, match="5 slots of 0.5 CPU"):
        RaySandboxPool(5, backend="local", num_cpus=0.5)


def test_concurrent_runs_use_every_slot(ray_runtime):
    from sandbox.ray_pool import RaySandboxPool

    job = Job(sleeping_program(1.0), [tiny_fold()])
    with RaySandboxPool(2, backend="local", limits=LIMITS) as pool:
        pool.warm_up()
        with ThreadPoolExecutor(4) as threads:
            results = list(threads.map(lambda _: pool.run(job), range(4)))
        assert pool.stats == {"jobs": 4, "actors_started": 2, "actors_replaced": 0}
    assert all(r.ok for r in results), [r.message for r in results]
    assert {r.extra["ray_slot"] for r in results} == {0, 1}


def test_pooled_vector_env_steps_on_the_pool(ray_runtime):
    from etpo_env.vector import make_pooled_vec_env
    from sandbox.ray_pool import RaySandboxPool

    with RaySandboxPool(2, backend="local", limits=LIMITS) as pool:
        envs = make_pooled_vec_env(num_envs=2, sandbox=pool, task="iris", mode="refine")
        envs.reset(seed=0)
        _, rewards, _, _, infos = envs.step((HONEST_PROGRAM, "raise ValueError('bad')"))
        envs.close()
    assert list(infos["status"]) == ["ok", "runtime_error"]
    assert rewards[0] > rewards[1]


def test_killed_actor_fails_the_step_and_is_replaced(ray_runtime):
    from etpo_env.env import DataSciCodeEnv
    from sandbox.ray_pool import RaySandboxPool

    with RaySandboxPool(1, backend="local", limits=LIMITS) as pool:
        pool.warm_up()
        env = DataSciCodeEnv(task="iris", sandbox=pool, mode="refine", max_attempts=10)
        env.reset(seed=0)
        doomed = pool.actors[0]
        with ThreadPoolExecutor(1) as thread:
            step = thread.submit(env.step, sleeping_program(3))
            time.sleep(1.0)  # the job is on the actor, asleep
            ray_runtime.kill(doomed)
            *_, failed = step.result(timeout=60)
        *_, after = env.step(HONEST_PROGRAM)
        env.close()
        replacement = pool.actors[0]
        assert pool.stats["actors_replaced"] == 1
    assert failed["status"] == "sandbox_error"
    assert "died" in failed["message"] and "replaced" in failed["message"]
    assert replacement._actor_id != doomed._actor_id
    assert after["status"] == "ok", after["message"]


# ---------------------------------------------------------------------------------------------------- benchmark
GRID = dict(agents=["scripted", "random"], tasks=["iris"], seeds=[1], budget=2, eval_episodes=1, sandbox="local",
            progress=False)


def exit_worker(obs: str) -> str:
    """An agent that takes its whole process down (as a native crash would): on Ray, the cell's worker dies."""
    os._exit(3)


def without_timings(row: dict) -> dict:
    """A cell record or summary row without its timings, which differ between any two runs."""
    return json.loads(json.dumps({k: v for k, v in row.items() if "time" not in k}, default=str))


def test_bench_on_ray_gives_the_local_numbers(ray_runtime, tmp_path):
    from agents.benchmark.run import run_benchmark

    local = run_benchmark(out=tmp_path / "local", **GRID)
    on_ray = run_benchmark(out=tmp_path / "ray", ray="auto", **GRID)
    assert len(local["runs"]) == 2 and not any(r["error"] for r in local["runs"])
    assert ({(r["agent"], r["seed"]): without_timings(r) for r in on_ray["runs"]}
            == {(r["agent"], r["seed"]): without_timings(r) for r in local["runs"]})
    assert ([without_timings(row) for row in on_ray["summary"]["per_task"]]
            == [without_timings(row) for row in local["summary"]["per_task"]])


def test_cells_on_cuda_declare_a_gpu():
    from agents.benchmark.config import BenchConfig
    from agents.benchmark.ray_exec import cell_resources

    def resources(agent: str, **options) -> dict:
        config = BenchConfig(agents=[agent], tasks=["iris"], seeds=[0], budget=1, agent_options=options)
        return cell_resources(config, agent)

    assert resources("etpo", device="cuda:1") == {"num_cpus": 1, "num_gpus": 1}
    assert resources("etpo", device="auto") == resources("etpo") == {"num_cpus": 1, "num_gpus": 0}
    assert resources("scripted") == {"num_cpus": 1, "num_gpus": 0}


def test_lost_cell_is_retried_then_reported(ray_runtime):
    from agents.benchmark.config import BenchConfig
    from agents.benchmark.ray_exec import run_cells
    from agents.benchmark.statistics import CHANCE_SCORE
    from etpo_env.config import EnvConfig

    config = BenchConfig(agents=["scripted"], tasks=["iris"], seeds=[0], budget=1, sandbox="local",
                         env=EnvConfig(sandbox="local"), eval_episodes=1)
    cells = [("tests.test_ray:exit_worker", "iris", 0), ("scripted", "iris", 0)]
    seen = []
    records = run_cells("auto", config, cells, seen.append, max_retries=1)
    assert sorted(r["agent"] for r in seen) == ["exit_worker", "scripted"] and seen == records
    lost, fine = sorted(records, key=lambda r: r["agent"] != "exit_worker")
    assert lost["attempts"] == 2
    assert lost["error"].startswith("the cell failed on the cluster 2 time(s); last: WorkerCrashedError")
    assert lost["final_score"] == CHANCE_SCORE and lost["env_steps"] == 0 and lost["evaluations"] == []
    assert set(lost) - set(fine) == {"attempts"} and set(fine) <= set(lost)
    assert fine["error"] is None and len(fine["evaluations"]) == 1  # it does not learn: evaluated once


def test_cells_on_ray_report_their_env_steps_as_they_run(ray_runtime):
    """The progress feed of a benchmark on Ray: every env step a cell takes reaches the driver's `on_steps`, the
    same count as the local loop's `on_step` for the same cell, and before the cell's record."""
    from agents.benchmark.config import BenchConfig
    from agents.benchmark.ray_exec import run_cells
    from agents.benchmark.run import run_cell_isolated
    from etpo_env.config import EnvConfig

    config = BenchConfig(agents=["scripted", "random"], tasks=["iris"], seeds=[0], budget=3, sandbox="local",
                         env=EnvConfig(sandbox="local"), eval_every=2, eval_episodes=2)
    cells = [("scripted", "iris", 0), ("random", "iris", 0)]
    local = {}
    for cell in cells:
        local[cell] = 0

        def count(cell=cell):
            local[cell] += 1

        run_cell_isolated(config, *cell, on_step=count)
    heard, order = {}, []

    def on_steps(cell, steps):
        heard[cell] = heard.get(cell, 0) + steps
        order.append(("steps", cell))

    run_cells("auto", config, cells, lambda r: order.append(("record", (r["agent_spec"], r["task"], r["seed"]))),
              on_steps=on_steps)
    assert heard == local and all(n > 0 for n in local.values())
    for cell in cells:
        assert order.index(("steps", cell)) < order.index(("record", cell))


def test_reporting_steps_does_not_start_more_cells_than_cpus(ray_runtime):
    """A cell that blocks on a remote call gives its CPU back to Ray, which then starts another cell: on the two-CPU
    runtime the step reports must not let three cells run at once (they did, while each report waited for the
    queue's answer: every `etpo bench --ray` and `etpo demo` ran a third cell on two cores)."""
    from ray.util.queue import Queue

    @ray_runtime.remote(num_cpus=1)
    def cell(queue, index):
        from agents.benchmark.ray_exec import StepReporter

        reporter = StepReporter(queue, ("scripted", "iris", index), every_s=0.0)  # a report every step: the worst case
        start, steps = time.time(), 0
        while time.time() < start + 2.0:
            time.sleep(0.02)
            reporter()
            steps += 1
        end = time.time()
        reporter.flush()
        return start, end, steps

    queue = Queue(actor_options={"num_cpus": 0})
    try:
        spans = ray_runtime.get([cell.remote(queue, i) for i in range(5)])
        heard = sum(n for _, n in queue.get_nowait_batch(queue.qsize()))
    finally:
        queue.shutdown()
    assert heard == sum(steps for _, _, steps in spans)  # every step reported, the last ones by `flush`
    most_at_once = max(sum(1 for s, e, _ in spans if s <= t < e) for t, _, _ in spans)
    assert most_at_once <= 2
