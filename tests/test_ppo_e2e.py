"""`etpo train --agent ppo` on the tiny model and a bundled task, in the real env and sandbox, then resumed."""

import json

import pytest
import torch

DIAGNOSTICS = ("approx_kl", "clip_fraction", "explained_variance", "value_loss", "policy_loss", "entropy",
               "kl_to_reference", "kl_coef", "reward_mean", "grad_norm", "time_collect_s", "time_advantages_s",
               "time_update_s", "time_generation_s", "time_sandbox_s", "tokens_per_s", "env_steps_per_s")


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.sandbox
def test_train_cli_runs_ppo_end_to_end_and_resumes(tiny_model_dir, tmp_path, capsys):
    from agents.cli import main

    out = tmp_path / "run"
    command = ["train", "--agent", "ppo", "--task", "breast_cancer", "--model", str(tiny_model_dir),
               "--out", str(out), "--sandbox", "local", "--max-attempts", "2",
               "--set", "max_new_tokens=16", "--set", "rollout_steps=2", "--set", "minibatch_size=2",
               "--set", "epochs=1", "--set", "device=cpu", "--set", "decomposed_backup=false", "--set", "gamma=0.95"]
    assert main([*command, "--budget", "2"]) == 0
    first = read_metrics(out)
    assert [r["step"] for r in first] == [2]
    missing = [key for key in DIAGNOSTICS if key not in first[0]]
    assert not missing, f"diagnostics not logged: {missing}"
    assert (out / "tensorboard").is_dir() and (out / "checkpoint" / "trainer.pt").exists()
    saved = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert saved["counters"]["env_steps"] == 2 and saved["counters"]["updates"] == 1

    capsys.readouterr()
    assert main([*command, "--budget", "4", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    records = read_metrics(out)
    assert [r["step"] for r in records] == [2, 4]  # the count continued, nothing was redone
    assert [r["updates"] for r in records] == [1, 2]
    resumed = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert resumed["counters"]["env_steps"] == 4 and resumed["counters"]["updates"] == 2
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["decomposed_backup"] is False and config["gamma"] == 0.95  # the saved config carried over
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 4
