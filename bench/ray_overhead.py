"""Ray sandbox pool: what a slot on Ray costs per job, and env steps/s with one vs two Ray sandbox actors.

Measured side by side in one run, on a local Ray runtime started here (this machine is the cluster), with the
local (bubblewrap) backend on every slot:

- per-job latency: the same small job (a 5-tree random forest on 40 rows) on a local sandbox and on a one-actor
  `RaySandboxPool`, interleaved job by job so load affects both alike; the difference of the medians is Ray's
  per-job overhead (serialising the job and the result, the actor call, the object store);
- env steps/s: two pooled DataSciCode envs stepping together on a local `SandboxPool` of 2, on a Ray pool of one
  actor and on a Ray pool of two actors, interleaved round by round.

    .venv/bin/python bench/ray_overhead.py [--jobs 30] [--rounds 12] [--task breast_cancer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # the sandboxes run single-threaded BLAS; so does the host side here

import etpo_env  # noqa: E402,F401  (registers DataSciCode-v0)
from etpo_env.vector import make_pooled_vec_env  # noqa: E402
from sandbox import Job, Limits, make_sandbox  # noqa: E402
from sandbox.ray_pool import RaySandboxPool, connect_ray  # noqa: E402
from sandbox.safety import HONEST_PROGRAM, tiny_fold  # noqa: E402

LIMITS = Limits(wall_time_s=120, cpu_time_s=120)


def timed_run(sandbox, job: Job) -> float:
    started = time.perf_counter()
    result = sandbox.run(job)
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{sandbox!r}: {result.status.value}: {result.message}")
    return elapsed


def per_job_latency(n_jobs: int) -> dict[str, list[float]]:
    """One job at a time on a local sandbox and on a one-actor Ray pool, alternating."""
    job = Job(HONEST_PROGRAM, [tiny_fold()])
    local = make_sandbox("local", limits=LIMITS, parallelism=1)
    on_ray = RaySandboxPool(1, backend="local", limits=LIMITS)
    on_ray.warm_up()
    timings: dict[str, list[float]] = {"local sandbox": [], "Ray pool, 1 actor": []}
    try:
        for sandbox in (local, on_ray):  # one untimed job each: caches, lazy imports
            timed_run(sandbox, job)
        for _ in range(n_jobs):
            timings["local sandbox"].append(timed_run(local, job))
            timings["Ray pool, 1 actor"].append(timed_run(on_ray, job))
    finally:
        local.close()
        on_ray.close()
    return timings


def env_rates(task: str, rounds: int) -> dict[str, float]:
    """Env steps/s of two pooled envs on each shared sandbox, interleaved round by round (median of rounds)."""
    pools = {"local SandboxPool of 2": None, "Ray pool, 1 actor": RaySandboxPool(1, backend="local", limits=LIMITS),
             "Ray pool, 2 actors": RaySandboxPool(2, backend="local", limits=LIMITS)}
    envs = {}
    for name, pool in pools.items():
        if pool is None:
            envs[name] = make_pooled_vec_env(num_envs=2, pool_size=2, sandbox="local", limits=LIMITS, task=task,
                                             mode="refine", max_attempts=10**6)
        else:
            pool.warm_up()
            envs[name] = make_pooled_vec_env(num_envs=2, sandbox=pool, task=task, mode="refine",
                                             max_attempts=10**6)
    rates: dict[str, list[float]] = {name: [] for name in envs}
    try:
        for vec in envs.values():
            vec.reset(seed=0)
            vec.step((HONEST_PROGRAM,) * 2)  # warm-up: every sandbox of the pool started
        for _ in range(rounds):
            for name, vec in envs.items():
                started = time.perf_counter()
                _, _, _, _, infos = vec.step((HONEST_PROGRAM,) * 2)
                rates[name].append(2 / (time.perf_counter() - started))
                if list(infos["status"]) != ["ok", "ok"]:
                    raise RuntimeError(f"{name}: {list(infos['status'])} {list(infos['message'])}")
    finally:
        for vec in envs.values():
            vec.close()
        for pool in pools.values():
            if pool is not None:
                pool.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="timed jobs per variant (per-job latency)")
    parser.add_argument("--rounds", type=int, default=12, help="timed vector steps per setting (env steps/s)")
    parser.add_argument("--task", default="breast_cancer")
    args = parser.parse_args(argv)

    # Three actors exist at once (the one- and two-actor pools); each reserves one logical CPU.
    connect_ray("local", num_cpus=max(3, os.cpu_count() or 1))
    try:
        latency = per_job_latency(args.jobs)
        rates = env_rates(args.task, args.rounds)
    finally:
        import ray

        ray.shutdown()

    print(f"\nper-job latency: a 5-tree random forest on 40 rows, one job at a time, {args.jobs} jobs per variant, "
          "interleaved")
    print(f"{'variant':<22} {'p50 ms':>8} {'p95 ms':>8} {'p50 ratio':>10}")
    floor = statistics.median(latency["local sandbox"])
    for name, values in latency.items():
        p50, p95 = statistics.median(values), sorted(values)[int(0.95 * (len(values) - 1))]
        print(f"{name:<22} {p50 * 1e3:>8.1f} {p95 * 1e3:>8.1f} {p50 / floor:>9.2f}x")
    overhead_ms = (statistics.median(latency["Ray pool, 1 actor"]) - floor) * 1e3

    print(f"\nenv steps/s: 2 pooled envs on task {args.task}, refine mode, median of {args.rounds} interleaved "
          "vector steps")
    print(f"{'setting':<24} {'steps/s':>8} {'vs local':>9}")
    base = rates["local SandboxPool of 2"]
    for name, rate in rates.items():
        print(f"{name:<24} {rate:>8.2f} {rate / base:>8.2f}x")
    one, two = rates["Ray pool, 1 actor"], rates["Ray pool, 2 actors"]
    print(f"\n{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.1f}")
    print(f"summary: a Ray slot changes a job's p50 by {overhead_ms:+.1f} ms ({floor * 1e3:.1f} -> "
          f"{(floor * 1e3 + overhead_ms):.1f} ms); 2 envs step at {two:.2f}/s on 2 Ray actors vs {one:.2f}/s on 1 "
          f"({two / one:.2f}x) and {base:.2f}/s on a local pool of 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
