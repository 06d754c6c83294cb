"""End-to-end benchmark runs on one real task with the local sandbox: files, numbers, user agents, resume, crashes."""

import json
import math
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

import tasks
from agents import benchmark as bench
from agents.base import SCRIPTED_PROGRAM
from agents.benchmark.statistics import metric

pytestmark = pytest.mark.sandbox

TASK = tasks.DEFAULT_TASK
ROWS = 300  # small task: each env step fits and scores 5 dev splits

LOGREG_BODY = """\
def build_model(X, y):
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X = pd.DataFrame(X).select_dtypes("number").fillna(0)
    columns = list(X.columns)

    class Model:
        inner = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)

        def predict_proba(self, X_new):
            return self.inner.predict_proba(pd.DataFrame(X_new)[columns].fillna(0))

    return Model()
"""


def _write_agent_module(directory, name, body):
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


@pytest.fixture
def task():
    return tasks.get(TASK, max_rows=ROWS)


def test_scripted_and_random_runs_write_consistent_files(tmp_path, local_sandbox, task):
    result = bench.run_benchmark(["scripted", "random"], [TASK], seeds=2, budget=2, eval_every=1, eval_episodes=2,
                                 sandbox=local_sandbox, out=tmp_path, progress=False, max_rows=ROWS)
    for name in ["results.json", "results.csv", "summary.md", "config.json", *bench.PLOTS]:
        assert (tmp_path / name).stat().st_size > 0, name
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        f"{agent}__{TASK}__seed{seed}.json" for agent in ("random", "scripted") for seed in (0, 1)]

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["budget"] == 2 and data["config"]["seeds"] == [0, 1]
    assert data["versions"]["numpy"] and data["versions"]["python"]
    runs = data["runs"]
    assert len(runs) == 4 and len(result["runs"]) == 4
    for run in runs:
        assert not run["learner"] and run["env_steps"] == 0  # plain agents are evaluated, not trained
        (point,) = run["evaluations"]  # at step 0 only; it stands for every point of the curve
        assert [p["point"] for p in run["curve"]] == [0, 1, 2]
        assert len(point["episodes"]) == 2
        for episode in point["episodes"]:
            assert episode["score"] == (episode["test_score"] if episode["test_score"] is not None
                                        else bench.CHANCE_SCORE)
            assert episode["normalized"] == task.normalize(episode["score"], part="test")
        assert run["final_score"] == pytest.approx(sum(e["score"] for e in point["episodes"]) / 2)

    scripted = [r for r in runs if r["agent"] == "scripted"]
    direct = tasks.evaluate(task, SCRIPTED_PROGRAM, local_sandbox, part="test", seed=0)
    assert all(r["success_rate"] == 1.0 and r["attempts_to_success"] == 1.0 for r in scripted)
    assert scripted[0]["final_score"] == pytest.approx(direct.score)  # the bench scores through tasks.evaluate
    assert 0.5 < scripted[0]["final_score"] <= 1.0

    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 4 and set(csv["env_steps"]) == {0}
    by_key = {(r["agent"], r["seed"]): r for r in runs}
    for row in csv.itertuples():
        assert row.final_score == pytest.approx(by_key[(row.agent, row.seed)]["final_score"])

    scale = data["summary"]["scale"]
    per_task = {row["agent"]: row for row in data["summary"]["per_task"]}
    for agent in ("scripted", "random"):
        finals = [metric(r, "final", scale) for r in runs if r["agent"] == agent]
        assert per_task[agent]["final"] == pytest.approx(sum(finals) / 2)
        assert per_task[agent]["n"] == 2
    summary_md = (tmp_path / "summary.md").read_text()
    expected = bench.format_ci(per_task["scripted"]["final"], per_task["scripted"]["final_ci"])
    assert f"| {TASK} | scripted | 2 | {expected} |" in summary_md
    assert "eval_curves.png" in summary_md


def test_user_agent_given_as_module_class_is_loaded_and_run(tmp_path, local_sandbox, monkeypatch):
    _write_agent_module(tmp_path, "my_bench_agent", f'''
        CALLS = []

        class MyAgent:
            def __init__(self, seed=0):
                self.seed = seed

            def reset(self):
                pass

            def act(self, obs, info):
                CALLS.append((self.seed, obs[:20]))
                return {LOGREG_BODY!r}
    ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = bench.run_benchmark(["my_bench_agent:MyAgent", "scripted"], [TASK], seeds=[3], budget=2,
                                 eval_episodes=2, sandbox=local_sandbox, out=out, progress=False, max_rows=ROWS)
    import my_bench_agent

    assert [seed for seed, _ in my_bench_agent.CALLS] == [3, 3]  # two evaluation episodes, one attempt each
    (run,) = [r for r in result["runs"] if r["agent"] == "MyAgent"]
    assert run["agent_spec"] == "my_bench_agent:MyAgent" and run["success_rate"] == 1.0
    assert (out / "runs" / f"MyAgent__{TASK}__seed3.json").exists()
    assert {row["agent"] for row in result["summary"]["overall"]} == {"MyAgent", "scripted"}


def test_resume_after_interruption_skips_finished_runs(tmp_path, local_sandbox, monkeypatch):
    flag = tmp_path / "interrupt"
    log = tmp_path / "acts.log"
    _write_agent_module(tmp_path, "flaky_bench_agent", f'''
        import pathlib

        class Flaky:
            def __init__(self, seed=0):
                self.seed = seed

            def reset(self):
                pass

            def act(self, obs, info):
                if self.seed == 1 and pathlib.Path({str(flag)!r}).exists():
                    raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second run
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{self.seed}}\\n")
                return {LOGREG_BODY!r}
    ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    kwargs = dict(agents=["flaky_bench_agent:Flaky"], tasks=[TASK], seeds=2, budget=2, eval_episodes=2,
                  sandbox=local_sandbox, out=out, progress=False, max_rows=ROWS)
    flag.touch()
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(**kwargs)
    assert [p.name for p in (out / "runs").iterdir()] == [f"Flaky__{TASK}__seed0.json"]
    partial = json.loads((out / "results.json").read_text())  # outputs of the finished runs are written anyway
    assert [r["seed"] for r in partial["runs"]] == [0]

    flag.unlink()
    result = bench.run_benchmark(**kwargs)
    assert log.read_text().split() == ["0", "0", "1", "1"]  # seed 0 was not run again (2 episodes per cell)
    assert sorted(r["seed"] for r in result["runs"]) == [0, 1]

    with pytest.raises(ValueError, match="different settings"):
        bench.run_benchmark(**{**kwargs, "budget": 3})


def test_resume_runs_again_the_cells_made_with_other_agent_defaults(tmp_path, local_sandbox, monkeypatch):
    """Each record keeps every config field its agent was built with; after the agent's defaults change (a new
    package version), resuming the same command runs those cells again instead of mixing old and new results."""
    log = tmp_path / "acts.log"
    module = """
        import dataclasses

        @dataclasses.dataclass
        class Settings:
            seed: int = 0
            depth: int = {depth}

        class Configured:
            config_class = Settings

            def __init__(self, model=None, config=None):
                self.config = config

            def reset(self):
                pass

            def act(self, obs, info):
                with open({log!r}, "a") as f:
                    f.write(f"{{self.config.depth}}\\n")
                return {body!r}
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    kwargs = dict(agents=["configured_bench_agent:Configured"], tasks=[TASK], seeds=1, budget=1, eval_episodes=1,
                  sandbox=local_sandbox, out=tmp_path / "out", progress=False, max_rows=ROWS)
    _write_agent_module(tmp_path, "configured_bench_agent", module.format(depth=1, log=str(log), body=LOGREG_BODY))
    first = bench.run_benchmark(**kwargs)
    assert first["runs"][0]["agent_settings"] == {"seed": 0, "depth": 1}
    bench.run_benchmark(**kwargs)  # the same settings: the finished cell is kept
    assert log.read_text().split() == ["1"]
    monkeypatch.delitem(sys.modules, "configured_bench_agent")
    _write_agent_module(tmp_path, "configured_bench_agent", module.format(depth=2, log=str(log), body=LOGREG_BODY))
    second = bench.run_benchmark(**kwargs)
    assert log.read_text().split() == ["1", "2"]
    assert second["runs"][0]["agent_settings"] == {"seed": 0, "depth": 2}


def test_crashing_agent_is_a_failed_run_not_a_crashed_benchmark(tmp_path, local_sandbox, monkeypatch):
    _write_agent_module(tmp_path, "broken_bench_agent", '''
        class Broken:
            def reset(self):
                pass

            def act(self, obs, info):
                raise RuntimeError("boom")
    ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    result = bench.run_benchmark(["broken_bench_agent:Broken", "scripted"], [TASK], seeds=1, budget=2,
                                 eval_episodes=1, sandbox=local_sandbox, out=tmp_path / "out", progress=False,
                                 max_rows=ROWS)
    runs = {r["agent"]: r for r in result["runs"]}
    assert runs["Broken"]["error"] == "RuntimeError: boom" and runs["Broken"]["success_rate"] == 0.0
    assert runs["Broken"]["final_score"] == bench.CHANCE_SCORE and runs["Broken"]["env_steps"] == 0
    assert all(p["score"] == bench.CHANCE_SCORE and not p["measured"] for p in runs["Broken"]["curve"])
    assert runs["scripted"]["success_rate"] == 1.0 and runs["scripted"]["error"] is None


def test_cli_benchmarks_an_agent_from_the_working_directory(tmp_path):
    _write_agent_module(tmp_path, "cli_bench_agent", f'''
        class MyAgent:
            def reset(self):
                pass

            def act(self, obs, info):
                return {LOGREG_BODY!r}
    ''')
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "agents.cli", "bench", "--agents", "cli_bench_agent:MyAgent", "--tasks", TASK,
         "--seeds", "1", "--budget", "1", "--eval-episodes", "1", "--sandbox", "local", "--max-rows", str(ROWS), "--out", str(out),
         "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MyAgent" in proc.stdout and "summary.md" in proc.stdout
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["success_rate"] == 1.0 and math.isfinite(run["final_score"])
