"""The benchmark protocol with model-free agents on a real task and the local sandbox: the policy is evaluated at
fixed points on fresh episodes that cost no budget, learners train in cumulative chunks, agents of known quality are
ranked, a learner's rise is seen, old result folders are refused, and `etpo bench` runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from agents import benchmark as bench
from agents.base import play

pytestmark = pytest.mark.sandbox

TASK = "breast_cancer"
ROWS = 300  # small task: each env step fits and scores 5 dev splits quickly
BUDGET, EVERY, EPISODES = 4, 2, 2
ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
def build_model(X, y):
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X = pd.DataFrame(X).select_dtypes("number").fillna(0)
    columns = list(X.columns)
    inner = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)

    class Model:
        def predict_proba(self, X_new):
            return inner.predict_proba(pd.DataFrame(X_new)[columns].fillna(0))

    return Model()
"""
# One feature only: runs, but clearly worse than the full model.
WEAK = GOOD.replace('select_dtypes("number").fillna(0)', 'select_dtypes("number").fillna(0).iloc[:, [1]]')
BROKEN = "def build_model(X, y):\n    raise ValueError('not yet')\n"

LEARN_CALLS: dict[int, list[tuple[int, int]]] = {}  # seed -> (budget asked, env steps consumed before the call)


class GoodAgent:
    """Always submits a sound full-feature model."""

    def reset(self):
        pass

    def act(self, obs, info):
        return GOOD


class WeakAgent:
    """Submits a broken program first in every episode, then a one-feature model."""

    def reset(self):
        self.attempt = 0

    def act(self, obs, info):
        self.attempt += 1
        return BROKEN if self.attempt == 1 else WEAK


class LearningAgent:
    """Gets better as its consumed budget grows: broken, then the weak model, then the good one. `learn` spends its
    budget in the env it is given (counting steps over its life, as the protocol says)."""

    def __init__(self, seed=0):
        self.seed, self.consumed = seed, 0

    def reset(self):
        pass

    def act(self, obs, info):
        return BROKEN if self.consumed < BUDGET // 2 else WEAK if self.consumed < BUDGET else GOOD

    def learn(self, env, budget):
        LEARN_CALLS.setdefault(self.seed, []).append((budget, self.consumed))
        result = play(env, self, budget - self.consumed, seed=self.seed)
        self.consumed += result.steps
        return {}


AGENTS = [f"{__name__}:{name}" for name in ("GoodAgent", "WeakAgent", "LearningAgent")]


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory, local_sandbox):
    LEARN_CALLS.clear()
    out = tmp_path_factory.mktemp("protocol")
    result = bench.run_benchmark(AGENTS, [TASK], seeds=3, budget=BUDGET, eval_every=EVERY, eval_episodes=EPISODES,
                                 sandbox=local_sandbox, out=out, progress=False, max_rows=ROWS, max_attempts=2)
    return result, {(r["agent"], r["seed"]): r for r in result["runs"]}


def test_fixed_agents_are_ranked_with_separate_intervals(protocol_run):
    result, _ = protocol_run
    rows = {row["agent"]: row for row in result["summary"]["per_task"]}
    good, weak = rows["GoodAgent"], rows["WeakAgent"]
    assert good["n"] == weak["n"] == 3
    assert good["final"] - good["final_ci"] > weak["final"] + weak["final_ci"]
    assert good["success_rate"] == weak["success_rate"] == 1.0
    assert good["attempts_to_success"] == 1.0 and weak["attempts_to_success"] == 2.0  # the broken first attempt
    assert good["gain"] == weak["gain"] == 0.0  # they cannot change: step 0 stands for every point


def test_the_learner_rises_from_its_step_zero_evaluation(protocol_run):
    result, runs = protocol_run
    for seed in range(3):
        curve = runs[("LearningAgent", seed)]["curve"]
        assert [p["point"] for p in curve] == [0, 2, 4] and all(p["measured"] for p in curve)
        assert curve[0]["success_rate"] == 0.0 and curve[0]["score"] == bench.CHANCE_SCORE  # nothing ran
        assert curve[0]["score"] < curve[1]["score"] < curve[2]["score"]
    final = {run["agent"]: run["final_score"] for run in result["runs"] if run["seed"] == 0}
    assert final["LearningAgent"] == pytest.approx(final["GoodAgent"])  # it ends as the good agent
    row = next(r for r in result["summary"]["per_task"] if r["agent"] == "LearningAgent")
    assert row["gain"] - row["gain_ci"] > 0  # a rise whose 95% interval excludes zero


def test_the_learners_rise_shows_on_every_learning_metric(protocol_run):
    result, runs = protocol_run
    for seed in range(3):  # broken, then the weak model, then the good one
        curve = runs[("LearningAgent", seed)]["curve"]
        assert [p["first_attempt_validity"] for p in curve] == [0.0, 1.0, 1.0]
        assert curve[0]["episode_return"] == -2.0  # two failed attempts at the failure reward
        assert curve[0]["episode_return"] < curve[1]["episode_return"] < curve[2]["episode_return"]
        assert curve[0]["attempts_to_first_run"] is None and curve[2]["attempts_to_first_run"] == 1.0
    rows = {row["agent"]: row for row in result["summary"]["per_task"]}
    assert rows["LearningAgent"]["validity_gain"] == 1.0 and rows["LearningAgent"]["validity_gain_ci"] == 0.0
    assert rows["LearningAgent"]["return_gain"] - rows["LearningAgent"]["return_gain_ci"] > 2.0
    # the fixed agents: the weak one's first attempt always fails, the good one's always runs
    assert rows["WeakAgent"]["validity_final"] == 0.0 and rows["WeakAgent"]["attempts_final"] == 2.0
    assert rows["GoodAgent"]["validity_final"] == 1.0 and rows["GoodAgent"]["attempts_final"] == 1.0
    assert rows["GoodAgent"]["return_final"] > rows["WeakAgent"]["return_final"]


def test_learn_gets_cumulative_budgets_and_evaluation_costs_none(protocol_run):
    _, runs = protocol_run
    for seed in range(3):
        assert LEARN_CALLS[seed] == [(2, 0), (4, 2)]  # budgets E, 2E = B over the agent's life
        run = runs[("LearningAgent", seed)]
        assert run["learn_budgets"] == [2, 4] and run["env_steps"] == BUDGET
        assert [p["env_steps"] for p in run["evaluations"]] == [0, 2, 4]  # evaluation spent no training steps
        assert sum(e["attempts"] for p in run["evaluations"] for e in p["episodes"]) > 0
    assert runs[("GoodAgent", 0)]["env_steps"] == 0 and runs[("GoodAgent", 0)]["learn_budgets"] == []


def test_every_agent_meets_the_same_evaluation_episodes(protocol_run):
    _, runs = protocol_run
    for seed in range(3):
        seeds = {agent: [e["seed"] for e in runs[(agent, seed)]["evaluations"][0]["episodes"]]
                 for agent in ("GoodAgent", "WeakAgent", "LearningAgent")}
        assert seeds["GoodAgent"] == seeds["WeakAgent"] == seeds["LearningAgent"]
        assert seeds["GoodAgent"] == [bench.eval_seed(TASK, seed, 0, k) for k in range(EPISODES)]
    later = [e["seed"] for e in runs[("LearningAgent", 0)]["evaluations"][1]["episodes"]]
    assert later == [bench.eval_seed(TASK, 0, 0, k) for k in range(EPISODES)]  # every point replays them


def test_final_programs_are_scored_on_the_test_part(protocol_run, local_sandbox):
    _, runs = protocol_run
    episode = runs[("GoodAgent", 1)]["evaluations"][0]["episodes"][0]
    direct = tasks.evaluate(tasks.get(TASK, max_rows=ROWS), GOOD, local_sandbox, part="test", seed=1)
    assert episode["program"].strip() == GOOD.strip() and episode["test_score"] == pytest.approx(direct.score)
    search = runs[("LearningAgent", 0)]["search_result"]
    assert search["program"].strip() == WEAK.strip()  # the best-on-dev program of its training steps
    fixed = runs[("WeakAgent", 0)]["search_result"]  # no training: the best of its step-0 evaluation episodes
    assert fixed["program"].strip() == WEAK.strip() and fixed["dev_score"] is not None


def test_results_files_carry_the_schema(protocol_run):
    result, _ = protocol_run
    out = Path(result["out"])
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == bench.SCHEMA == 3
    assert json.loads((out / "config.json").read_text())["schema"] == 3
    assert all(json.loads(p.read_text())["schema"] == 3 for p in (out / "runs").iterdir())
    assert data["config"]["eval_points"] == [0, 2, 4]
    for name in bench.PLOTS:
        assert (out / name).stat().st_size > 0, name
    assert set(data["summary"]["aggregates"]["final"]) == {"GoodAgent", "WeakAgent", "LearningAgent"}
    for key in ("validity_final", "validity_gain", "return_final", "return_gain"):
        assert set(data["summary"]["aggregates"][key]) == {"GoodAgent", "WeakAgent", "LearningAgent"}, key
    csv = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"validity_final", "validity_gain", "return_final", "return_gain", "attempts_final"} <= set(csv)
    summary = (out / "summary.md").read_text()
    assert "primary metric" in summary and "first-attempt validity" in summary.lower()


def test_the_gain_plot_shows_the_learner_rise_and_the_fixed_agents_flat(protocol_run):
    from agents.benchmark.report import curve_bands

    result, _ = protocol_run
    scale = result["summary"]["scale"]
    for key in (scale, "first_attempt_validity", "episode_return"):
        band = curve_bands(result["runs"], "LearningAgent", [TASK], key)
        assert band.points == [0, EVERY, BUDGET] and band.seeds == 3 and band.gain[0] == 0.0
        assert band.gain[-1] - band.gain_half[-1] > 0, key  # paired by seed: the rise is clear of zero
        band = curve_bands(result["runs"], "GoodAgent", [TASK], key)
        assert list(band.gain) == [0.0, 0.0, 0.0] and list(band.gain_half) == [0.0, 0.0, 0.0], key
    assert curve_bands(result["runs"], "NoSuchAgent", [TASK], scale) is None


def test_a_folder_of_the_old_protocol_is_refused(tmp_path, local_sandbox):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"scripted__{TASK}__seed0.json").write_text(json.dumps({"agent": "scripted", "score": 0.9}))
    kwargs = dict(seeds=1, budget=1, sandbox=local_sandbox, out=tmp_path, progress=False, max_rows=ROWS)
    with pytest.raises(ValueError, match="another benchmark protocol.*no schema field"):
        bench.run_benchmark(["scripted"], [TASK], **kwargs)
    (tmp_path / "runs" / f"scripted__{TASK}__seed0.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"schema": 1, "comparable": {}}))
    with pytest.raises(ValueError, match="schema 1"):
        bench.run_benchmark(["scripted"], [TASK], **kwargs)


def test_cli_runs_module_class_agents_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "agents.cli", "bench", "--agents", ",".join(AGENTS[:2]), "--tasks", TASK,
         "--seeds", "2", "--budget", "2", "--eval-every", "1", "--eval-episodes", "1", "--sandbox", "local",
         "--max-rows", str(ROWS), "--max-attempts", "2", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "warn" not in proc.stdout.lower(), proc.stderr[-3000:]
    assert "GoodAgent" in proc.stdout and "summary.md" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if str(out) not in line]  # a long path is not cut
    assert max(len(line) for line in lines) <= 80  # readable in an 80-column terminal
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == 3 and len(data["runs"]) == 4
    assert {r["agent"] for r in data["runs"]} == {"GoodAgent", "WeakAgent"}


def test_demo_sets_an_earlier_demo_of_other_settings_aside_and_runs_afresh(tmp_path):
    """`make demo` after an upgrade that changed the demo's schedule: the old folder is kept under a new name (never
    mixed, never deleted) and the demo runs; `etpo bench` still refuses such a folder (test above)."""
    out = tmp_path / "demo"

    def demo(budget):
        return subprocess.run(
            [sys.executable, "-m", "agents.cli", "demo", "--agents", AGENTS[0], "--tasks", TASK, "--seeds", "1",
             "--budget", str(budget), "--eval-every", "1", "--eval-episodes", "1", "--sandbox", "local",
             "--model", "unused", "--max-rows", str(ROWS), "--max-attempts", "2", "--out", str(out), "--no-progress"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})

    first = demo(1)
    assert first.returncode == 0, first.stderr[-3000:]
    second = demo(2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"moved to {tmp_path / 'demo.1'}" in second.stdout and second.stdout.splitlines()[-1].startswith("demo: ")
    assert json.loads((tmp_path / "demo.1" / "config.json").read_text())["comparable"]["budget"] == 1
    assert json.loads((out / "config.json").read_text())["comparable"]["budget"] == 2
    refused = subprocess.run(  # `etpo bench` on the same folder with other settings: a usage error, no traceback
        [sys.executable, "-m", "agents.cli", "bench", "--agents", AGENTS[0], "--tasks", TASK, "--budget", "3",
         "--sandbox", "local", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "use another --out folder" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "demo.2").exists()


def test_ray_hook_runs_the_remaining_cells_through_run_cell_isolated(tmp_path, monkeypatch):
    import agents.benchmark.ray_exec as ray_exec

    calls = []

    def fake_run_cells(address, config, cells, on_record, on_steps):  # a cluster of one: this process
        calls.append((address, list(cells)))
        for cell in cells:
            on_record(bench.run_cell_isolated(config, *cell, on_step=lambda cell=cell: on_steps(cell, 1)))

    monkeypatch.setattr(ray_exec, "run_cells", fake_run_cells)
    kwargs = dict(seeds=2, budget=1, eval_episodes=1, sandbox="local", out=tmp_path, progress=False, max_rows=ROWS)
    result = bench.run_benchmark(["scripted"], [TASK], ray="auto", **kwargs)
    assert calls == [("auto", [("scripted", TASK, 0), ("scripted", TASK, 1)])]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"scripted__{TASK}__seed{s}.json" for s in (0, 1)]
    assert all(r["success_rate"] == 1.0 and r["schema"] == bench.SCHEMA for r in result["runs"])
    again = bench.run_benchmark(["scripted"], [TASK], **kwargs)  # locally: the same settings, nothing left to run
    assert len(calls) == 1 and [r["seed"] for r in again["runs"]] == [0, 1]


BATCHES: list[int] = []


class BatchAgent(WeakAgent):
    """WeakAgent's answers, given for every episode at once; one `reset` for the batch."""

    def reset(self):
        self.attempts = {}

    def act(self, obs, info):
        raise AssertionError("episodes of an agent with act_batch run through act_batch")

    def act_batch(self, observations, infos):
        BATCHES.append(len(observations))
        return [BROKEN if info.get("attempt", 0) == 0 else WEAK for info in infos]


def test_an_agent_with_act_batch_plays_the_episodes_in_lock_step(tmp_path, local_sandbox):
    BATCHES.clear()
    agents = [f"{__name__}:BatchAgent", f"{__name__}:WeakAgent"]
    result = bench.run_benchmark(agents, [TASK], seeds=1, budget=1, eval_episodes=3, sandbox=local_sandbox,
                                 out=tmp_path, progress=False, max_rows=ROWS, max_attempts=2)
    assert BATCHES == [3, 3]  # two rounds (broken, then weak) of three episodes each
    batched, sequential = ({e["program"]: e["test_score"] for e in run["evaluations"][0]["episodes"]}
                           for run in sorted(result["runs"], key=lambda r: r["agent"] != "BatchAgent"))
    assert batched == sequential and len(batched) == 1  # the same episodes, the same scores


def test_learners_evaluate_in_one_batch_from_a_stream_of_the_evaluation(tiny_model_dir):
    """A package learner's K evaluation episodes are one generate call per round, sampled from a stream of the
    evaluation's own: the policy's seeded stream is left to training. A learner that overrides `act` alone keeps
    its own `act` (episodes one by one)."""
    import torch

    from agents.benchmark.episodes import batch_actor
    from agents.etpo import ETPOAgent

    agent = ETPOAgent(model=tiny_model_dir, seed=0, max_new_tokens=8, **{"generation.seed": 7})
    calls = []
    generate = agent.policy.generate
    agent.policy.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k)
    torch.manual_seed(3)
    first = batch_actor(agent)(["p1", "p2", "p3"], [{}, {}, {}])
    torch.manual_seed(3)
    again = batch_actor(agent)(["p1", "p2", "p3"], [{}, {}, {}])
    assert calls == [3, 3] and first == again  # one call per round; the evaluation seed fixes the samples
    assert len(agent.act_batch(["p"], [{}])) == 1

    class OwnAct(ETPOAgent):
        def act(self, obs, info=None):
            return "custom"

    assert batch_actor(OwnAct.__new__(OwnAct)) is None
