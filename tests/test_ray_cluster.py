"""`RaySandboxPool` on a two-node `ray.cluster_utils.Cluster` (two raylets on this machine, one runtime for the
module): slots are spread over the nodes, and a node that dies mid-job fails that job with a sandbox_error, its
slot moves to the surviving node, and the next jobs succeed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox import Job, Limits, Status
from sandbox.safety import HONEST_PROGRAM, tiny_fold
from tests.test_ray import sleeping_program

pytestmark = [pytest.mark.ray, pytest.mark.sandbox]

LIMITS = Limits(wall_time_s=20.0, cpu_time_s=20)
# Node deaths are noticed within about a second (Ray's default health check takes tens of seconds).
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from sandbox.ray_pool import connect_ray, quiet_ray_environment

    quiet_ray_environment()
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
    worker = nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    assert connect_ray(nodes.address)
    yield nodes, worker
    import ray

    ray.shutdown()
    nodes.shutdown()


def all_cpus_free(total: float, timeout_s: float = 30.0) -> None:
    """Wait until the actors of an earlier pool have given their CPUs back (Ray frees them asynchronously);
    otherwise SPREAD can only place new actors where CPUs are free."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(0.2)


def test_slots_spread_over_the_nodes(cluster):
    from sandbox.ray_pool import RaySandboxPool

    nodes, worker = cluster
    all_cpus_free(3)
    with RaySandboxPool(2, backend="local", limits=LIMITS) as pool:
        where = pool.warm_up()
        results = [pool.run(Job(HONEST_PROGRAM, [tiny_fold()])) for _ in range(2)]
    assert all(r.ok for r in results), [r.message for r in results]
    assert {w["node_id"] for w in where} == {nodes.head_node.node_id, worker.node_id}


def test_dead_node_fails_its_job_and_the_slot_moves(cluster):
    from sandbox.ray_pool import RaySandboxPool

    nodes, worker = cluster
    all_cpus_free(3)
    with RaySandboxPool(2, backend="local", limits=LIMITS) as pool:
        where = pool.warm_up()
        assert {w["node_id"] for w in where} == {nodes.head_node.node_id, worker.node_id}
        with ThreadPoolExecutor(2) as threads:
            running = [threads.submit(pool.run, Job(sleeping_program(4), [tiny_fold()])) for _ in range(2)]
            time.sleep(1.5)  # both jobs are asleep on their nodes
            nodes.remove_node(worker, allow_graceful=False)
            results = [future.result(timeout=120) for future in running]
        after = pool.warm_up()
        again = [pool.run(Job(HONEST_PROGRAM, [tiny_fold()])) for _ in range(2)]
        assert pool.stats["actors_replaced"] == 1
    by_node = {r.extra["ray_node"]: r for r in results}
    assert by_node[nodes.head_node.node_id].ok
    lost = by_node[worker.node_id]
    assert lost.status is Status.SANDBOX_ERROR and "died" in lost.message
    assert {w["node_id"] for w in after} == {nodes.head_node.node_id}
    assert all(r.ok for r in again), [r.message for r in again]
