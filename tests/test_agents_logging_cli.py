"""RunLogger (console, TensorBoard, JSONL, cost breakdown) and the agents CLI (train options, train, build-tiny)."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from agents import cli as agents_cli
from agents.cli import build_parser, main
from agents.logging import RunLogger, cost_breakdown, read_metrics


def test_cost_breakdown_by_hand():
    out = cost_breakdown({"generated_tokens": 300, "time_generation_s": 2.0}, {"update": 1.5}, wall_s=4.0,
                         steps_done=8)
    assert out == {"time_update_s": 1.5, "tokens_per_s": 150.0, "env_steps_per_s": 2.0, "time_iteration_s": 4.0}
    assert "tokens_per_s" not in cost_breakdown({"generated_tokens": 3}, {}, 1.0, 0)


def test_run_logger_writes_tensorboard_jsonl_and_cost_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, total=10, console=False) as logger:
        with logger.timer("generation"):
            time.sleep(0.01)
        with logger.timer("sandbox"):
            pass
        first = logger.log({"reward_mean": 0.5, "generated_tokens": 40, "status": "ok"}, step=4)
        logger.log({"reward_mean": 0.75}, step=10)
    assert first["time_generation_s"] >= 0.01 and "time_sandbox_s" in first
    assert first["tokens_per_s"] == pytest.approx(40 / first["time_generation_s"])
    assert first["peak_rss_mb"] > 10 and "status" not in first
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [4, 10] and records[1]["reward_mean"] == 0.75
    assert "time_generation_s" not in records[1]  # timers reset each iteration
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rewards = events.Scalars("train/reward_mean")
    assert [(e.step, e.value) for e in rewards] == [(4, 0.5), (10, 0.75)]
    assert "cost/tokens_per_s" in events.Tags()["scalars"]


def test_train_lists_the_learner_config_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--agent", "sft", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--rollout-steps" in text and "self-improve" in text and "--keep-fraction" in text
    args = build_parser().parse_args(["train", "--agent", "sft", "--budget", "3", "--out", "x", "--lr", "0.01",
                                      "--set", "epochs=3", "--set", "recipe=demos"])
    config = agents_cli.build_learner_config(args.config_class, args)
    assert (config.lr, config.epochs, config.recipe) == (0.01, 3, "demos")
    with pytest.raises(ValueError, match="unknown config key"):
        agents_cli.build_learner_config(args.config_class, build_parser().parse_args(
            ["train", "--agent", "sft", "--budget", "1", "--out", "x", "--set", "nope=1"]))


@pytest.mark.sandbox
def test_cli_train_runs_a_user_learner_from_outside_the_repository(tmp_path, monkeypatch):
    """A user-written learner (not in the repo) trains through `etpo train` in the real env via the protocol."""
    (tmp_path / "user_learner.py").write_text(textwrap.dedent('''
        import json
        from dataclasses import dataclass, field
        from pathlib import Path

        @dataclass
        class Cfg:
            body: str = field(default="return 1", metadata={"help": "body"})

        class Learner:
            config_class = Cfg
            def __init__(self, model="tiny", config=None):
                self.config = config or Cfg()
                self.steps = 0
            def reset(self):
                pass
            def act(self, obs, info):
                return (
                    "\\n    from sklearn.linear_model import LogisticRegression\\n"
                    "    from sklearn.pipeline import make_pipeline\\n"
                    "    from sklearn.impute import SimpleImputer\\n"
                    "    return make_pipeline(SimpleImputer(), LogisticRegression(max_iter=500)).fit(X, y)\\n"
                    if self.steps else self.config.body)
            def learn(self, env, budget, callback=None):
                rewards, statuses = [], []
                obs, info = env.reset(seed=0)
                while self.steps < budget:
                    obs, reward, term, trunc, info = env.step(self.act(obs, info))
                    self.steps += 1
                    rewards.append(reward)
                    statuses.append(info["status"])
                    if term or trunc:
                        obs, info = env.reset()
                return {"rewards": json.dumps(rewards), "last_status": statuses[-1]}
            def save(self, directory):
                Path(directory).mkdir(parents=True, exist_ok=True)
                (Path(directory) / "steps.json").write_text(json.dumps(self.steps))
            @classmethod
            def load(cls, directory):
                agent = cls()
                agent.steps = json.loads((Path(directory) / "steps.json").read_text())
                return agent
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    code = main(["train", "--agent", "user_learner:Learner", "--task", "iris", "--budget", "2", "--out", str(out),
                 "--sandbox", "local", "--body", "this is not python ("])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rewards = json.loads(summary["rewards"])
    assert rewards[0] == -1.0 and rewards[1] > 0.5  # broken program fails; the real one scores ROC AUC
    assert summary["last_status"] == "ok"
    assert json.loads((out / "checkpoint" / "steps.json").read_text()) == 2


@pytest.mark.sandbox
def test_build_tiny_command_without_eval(tmp_path, capsys):
    assert main(["model", "build-tiny", "--preset", "test", "--out", str(tmp_path / "m"), "--no-eval"]) == 0
    assert (tmp_path / "m" / "build.json").exists() and "tiny model:" in capsys.readouterr().out


def test_set_with_an_unknown_key_is_a_usage_error_in_train_and_bench(capsys):
    for argv in (["train", "--agent", "sft", "--budget", "1", "--out", "x", "--set", "nonsense=1"],
                 ["bench", "--agents", "sft,scripted", "--budget", "1", "--set", "nonsense=1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "nonsense" in err and "lr" in err  # names the valid keys
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--agents", "scripted", "--budget", "1", "--mode", "sideways"])
    assert exit_info.value.code == 2


def test_env_options_come_from_env_config():
    from etpo_env.config import EnvConfig

    args = build_parser().parse_args(["bench", "--agents", "scripted", "--budget", "1", "--max-rows", "300",
                                      "--sandbox", "local", "--split-seed", "3"])
    args.prepare(args)
    assert args.env_config == EnvConfig(max_rows=300, sandbox="local", split_seed=3)
    demo = build_parser().parse_args(["demo"])
    demo.prepare(demo)
    assert (demo.env_config.max_attempts, demo.env_config.mode) == (5, "fix")  # the paper's episodes
    demo = build_parser().parse_args(["demo", "--max-attempts", "1"])
    demo.prepare(demo)
    assert demo.env_config.max_attempts == 1
    train = build_parser().parse_args(["train", "--agent", "sft", "--budget", "1", "--out", "x", "--task", "iris",
                                       "--reward", "improvement", "--set", "epochs=2"])
    train.prepare(train)
    assert (train.env_config.task, train.env_config.reward, train.config.epochs) == ("iris", "improvement", 2)


def test_demo_runs_the_tiny_models_cells_side_by_side_on_ray(monkeypatch):
    """`etpo demo` on the tiny model puts its cells on Ray, one per CPU (two single-thread cells use two cores better
    than one cell on both); a hub model, one CPU, no Ray installed or `--in-process` keep them in this process, and
    an explicit `--ray ADDRESS` is used as given."""
    import importlib.util
    import os

    from agents.benchmark.cli import demo_cells_address

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert demo_cells_address(None, False, "tiny") == "auto"
    assert demo_cells_address(None, True, "tiny") is None
    assert demo_cells_address(None, False, "Qwen/Qwen2.5-Coder-0.5B") is None
    assert demo_cells_address("10.0.0.5:6379", False, "Qwen/Qwen2.5-Coder-0.5B") == "10.0.0.5:6379"
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert demo_cells_address(None, False, "tiny") is None
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "ray" else real_find_spec(name))
    assert demo_cells_address(None, False, "tiny") is None


def test_demo_refuses_ray_and_in_process_together(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--ray", "--in-process", "--no-progress"])
    assert exit_info.value.code == 2 and "--in-process: not allowed with argument --ray" in capsys.readouterr().err
