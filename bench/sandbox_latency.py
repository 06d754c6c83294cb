"""Sandbox latency and throughput: what isolation costs per environment step.

Standard job: fit a random forest (100 trees) on half of scikit-learn's bundled breast-cancer data (a pandas
DataFrame) and predict_proba on the other half. Measured side by side in one run, interleaved round-robin so
machine load affects every variant alike:

- in-process: exec the program in this process (no isolation; the floor),
- each warm backend (local, docker, unsafe-process): one warm worker, fresh forked child per job,
- cold per job: a hardened `docker run` per job, and a fresh Python process per job (what naive harnesses do).

Prints p50/p95 latency and ratios to in-process, then jobs/s one at a time (each warm backend in turn, side by side
with the ratio to Docker) and with 2 concurrent jobs.

    python bench/sandbox_latency.py [--repeats 20] [--cold-repeats 5] [--backends local,docker]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # the sandboxes run single-threaded BLAS; so does the in-process floor

import numpy as np  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

from sandbox import Fold, Job, Limits, make_sandbox  # noqa: E402
from sandbox.images import WORKER_IN_IMAGE  # noqa: E402
from sandbox.local import WORKER_SOURCE  # noqa: E402
from sandbox.worker import wire  # noqa: E402
from sandbox.workers import encode_job, result_budget  # noqa: E402

PROGRAM = """
from sklearn.ensemble import RandomForestClassifier

def build_model(X, y):
    return RandomForestClassifier(n_estimators=100, random_state=0).fit(X, y)
"""


def standard_job() -> Job:
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    order = np.random.default_rng(0).permutation(len(X))
    fit, held = order[: len(X) // 2], order[len(X) // 2:]
    return Job(PROGRAM, [Fold(X.iloc[fit], y.to_numpy()[fit], X.iloc[held])])


def run_in_process(job: Job) -> None:
    namespace: dict = {}
    exec(compile(job.program, "<agent>", "exec"), namespace)
    for fold in job.folds:
        model = namespace[job.entry_point](fold.X_fit, fold.y_fit)
        proba = np.asarray(getattr(model, job.predict_method)(fold.X_eval), dtype=float)
        assert proba.shape[0] == len(fold.X_eval)


def run_cold(command: list[str], job: Job, limits: Limits) -> None:
    """Start a process (or container), send one job, read its answer, let it exit: everything paid per job.

    Its input stays open until the answer is read: a worker's input closing means its host is gone (the worker is
    then killed at once), not "serve this job, then exit"."""
    request = encode_job(job, limits)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write(request)
        process.stdin.flush()
        read_exact = _reader(process.stdout)
        wire.read_frame(read_exact, max_body=0)  # the greeting
        header, _blobs = wire.read_frame(read_exact, max_body=result_budget(10 ** 6, 8))
    finally:
        process.stdin.close()
        process.wait(timeout=60)
        stderr = process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    if header.get("report", {}).get("status") != "ok":
        raise RuntimeError(f"cold run failed: {header} {stderr[-500:]!r}")


def _reader(stream):
    def read_exact(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise EOFError("the cold worker closed its output")
        return data

    return read_exact


def cold_docker_command(limits: Limits) -> list[str]:
    from sandbox.docker_backend import LABEL
    from sandbox.images import image_tag

    return ["docker", "run", "--rm", "-i", "--network", "none", "--read-only",
            "--tmpfs", f"/tmp:rw,nosuid,nodev,size={limits.tmpfs_mb}m,mode=1777",
            "--memory", f"{limits.memory_mb + 512}m", "--memory-swap", f"{limits.memory_mb + 512}m",
            "--pids-limit", str(limits.max_processes + 16), "--cpus", "1", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--user", "54321:54321", "--init", "--label", f"{LABEL}=1",
            "--label", f"{LABEL}.bench=cold", image_tag(),
            "python3", "-I", "-B", WORKER_IN_IMAGE, "--own-pid-namespace", "--scratch", "/tmp"]


def fresh_process_command(scratch: str) -> list[str]:
    return [sys.executable, "-I", "-B", str(WORKER_SOURCE), "--scratch", scratch]


def _tree_under_tmp(n_files: int) -> str:
    """A directory under /tmp with `n_files` empty files, added to the local sandbox's read-only binds."""
    from sandbox import local

    root = tempfile.mkdtemp(prefix="etpo-bench-tree-", dir="/tmp")
    for i in range(n_files):
        if i % 100 == 0:
            folder = os.path.join(root, f"pkg{i // 100}")
            os.mkdir(folder)
        open(os.path.join(folder, f"m{i}.py"), "w").close()
    roots = local._python_roots()
    local._python_roots = lambda: [*roots, root]
    return root


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def time_call(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def throughput(sandbox, job: Job, concurrency: int, n_jobs: int, phases: list | None = None) -> float:
    """Jobs per second; `phases` collects (the worker's own time for each job, the time per job) pairs."""
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda _: sandbox.run(job), range(n_jobs)))
        elapsed = time.perf_counter() - started
    if not all(r.ok for r in results):
        raise RuntimeError(f"throughput job failed: {[r.message for r in results if not r.ok][:1]}")
    if phases is not None:
        phases += [(r.duration_s, elapsed / n_jobs) for r in results]
    return n_jobs / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed jobs per warm variant")
    parser.add_argument("--cold-repeats", type=int, default=5, help="timed jobs per cold variant")
    parser.add_argument("--backends", default="local,docker,unsafe-process")
    parser.add_argument("--throughput-jobs", type=int, default=12, help="jobs per throughput measurement")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="interleaved one-at-a-time rounds")
    parser.add_argument("--tree-under-tmp", type=int, default=0, metavar="FILES",
                        help="bind a read-only tree of FILES files under /tmp into the local sandbox, as a virtual "
                             "environment or checkout under /tmp is (a CI runner's, say)")
    args = parser.parse_args(argv)

    import warnings

    from sandbox.docker_backend import docker_status

    job = standard_job()
    limits = Limits(wall_time_s=120, cpu_time_s=120)
    docker_ok, why = docker_status()
    wanted = [b for b in args.backends.split(",") if b]
    if "docker" in wanted and not docker_ok:
        print(f"docker skipped: {why}")
        wanted.remove("docker")
    sandboxes = {}
    tree = _tree_under_tmp(args.tree_under_tmp) if args.tree_under_tmp else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unsafe-process warns; here it is a measured variant
        for name in wanted:
            sandboxes[name] = make_sandbox(name, limits=limits, parallelism=2)
    for sandbox in sandboxes.values():
        sandbox.warm_up()
    variants = {"in-process": lambda: run_in_process(job)}
    for name, sandbox in sandboxes.items():
        def run_one(sandbox=sandbox):
            result = sandbox.run(job)
            if not result.ok:
                raise RuntimeError(f"{sandbox.isolation}: {result.status.value}: {result.message}")
        variants[name] = run_one
    for fn in variants.values():  # one untimed round: caches, lazy imports, page faults
        fn()
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            timings[name].append(time_call(fn))

    scratch = tempfile.mkdtemp(prefix="etpo-bench-")
    cold = {"fresh python process per job": fresh_process_command(scratch)}
    if docker_ok:
        cold["cold `docker run` per job"] = cold_docker_command(limits)
    for name in cold:
        timings[name] = []
    for _ in range(args.cold_repeats):
        for name, command in cold.items():
            timings[name].append(time_call(lambda c=command: run_cold(c, job, limits)))
        timings["in-process"].append(time_call(variants["in-process"]))  # keep the floor sampled alongside

    floor50, floor95 = percentile(timings["in-process"], 50), percentile(timings["in-process"], 95)
    print(f"\nstandard job: random forest (100 trees) on breast_cancer, {len(job.folds[0].X_fit)} fit rows, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<32} {'n':>3} {'p50 ms':>9} {'p95 ms':>9} {'p50 ratio':>10} {'p95 ratio':>10}")
    for name, values in [(name, values) for name, values in timings.items() if values]:
        p50, p95 = percentile(values, 50), percentile(values, 95)
        print(f"{name:<32} {len(values):>3} {p50 * 1e3:>9.1f} {p95 * 1e3:>9.1f} {p50 / floor50:>9.2f}x "
              f"{p95 / floor95:>9.2f}x")

    # One job at a time (a single env stepping): each backend in turn, several rounds, so load hits all alike.
    one_at_a_time: dict[str, list[float]] = {name: [] for name in sandboxes}
    phases: dict[str, list] = {name: [] for name in sandboxes}
    for _ in range(args.throughput_rounds):
        for name, sandbox in sandboxes.items():
            one_at_a_time[name].append(throughput(sandbox, job, 1, args.throughput_jobs, phases[name]))
    print(f"\nthroughput ({args.throughput_jobs} jobs per measurement; one at a time: median of "
          f"{args.throughput_rounds} interleaved rounds)")
    print(f"{'backend':<16} {'1 at a time':>13} {'vs docker':>10} {'worker ms':>10} {'rest ms':>8} "
          f"{'2 concurrent':>14} {'speed-up':>9}")
    docker_one = statistics.median(one_at_a_time["docker"]) if "docker" in sandboxes else None
    for name, sandbox in sandboxes.items():
        one = statistics.median(one_at_a_time[name])
        two = throughput(sandbox, job, 2, args.throughput_jobs)
        versus = f"{one / docker_one:>9.0%}" if docker_one else f"{'-':>9}"
        # the worker's own time for a job (fold children, cleanup before the answer) and the rest of each job's
        # share of the wall clock: host encoding and decoding, transport, cleanup after the answer
        worker_ms = statistics.median(w for w, _ in phases[name]) * 1e3
        rest_ms = statistics.median(per_job - w for w, per_job in phases[name]) * 1e3
        print(f"{name:<16} {one:>11.2f}/s {versus} {worker_ms:>10.1f} {rest_ms:>8.1f} {two:>12.2f}/s {two / one:>8.2f}x")
    if docker_one and "local" in sandboxes:
        local_one = statistics.median(one_at_a_time["local"])
        print(f"one job at a time: local {local_one:.2f}/s, docker {docker_one:.2f}/s, "
              f"local/docker = {local_one / docker_one:.0%}")
    for sandbox in sandboxes.values():
        sandbox.close()
    shutil.rmtree(scratch, ignore_errors=True)
    if tree:
        shutil.rmtree(tree, ignore_errors=True)
    print(f"\nmedian in-process job: {statistics.median(timings['in-process']) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
