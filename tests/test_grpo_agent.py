"""GRPOAgent on the tiny LM inside the learner shell: groups form from the collector's shared first prompts (per
prompt, and per episode position across feedback prompts), the update trains the policy adapter, π_old comes from
the very function the update differentiates, the registry builds it from overrides, and a checkpoint restores
everything needed for the next update to be the one an uninterrupted run would make."""

import math

import numpy as np
import pytest
import torch

from agents.grpo import GRPOAgent, GRPOConfig
from agents.registry import build_agent
from agents.rollout import Transition
from tests.fixtures_lm import ScriptedTextEnv

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL = dict(device="cpu", max_new_tokens=8, lora_r=4, lora_alpha=8, num_envs=4, rollout_steps=8, minibatch_size=4,
             iterations=2, seed=0)
DIAGNOSTICS = ("reward_mean", "reward_std", "groups", "group_size_mean", "zero_advantage_share", "policy_loss",
               "approx_kl", "clip_fraction", "kl_to_reference", "entropy", "grad_norm", "tokens_per_action",
               "time_update_s", "signal/advantage_first_tenth", "signal/advantage_last_tenth")


class GroupedTextEnv(ScriptedTextEnv):
    """ScriptedTextEnv (reward = the action's length in characters) whose first prompt is the same in every episode
    and env, whose later prompts quote the env's last action (feedback prompts of their own, as DataSciCode's), and
    which spawns siblings, so the collector's `num_envs` envs start their episodes from one shared prompt."""

    def _obs(self) -> str:
        if self.t == 0:
            obs = f"Task {self.tag}\ndef build_model(X, y):"
        else:
            obs = f"Task {self.tag}, attempt {self.t}. You wrote {self.received[-1]!r}\ndef build_model(X, y):"
        self.emitted.append(obs)
        return obs

    def spawn(self) -> "GroupedTextEnv":
        return GroupedTextEnv(self.length, self.truncate, self.tag)


def adapter_snapshot(agent: GRPOAgent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.policy.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("group_by, groups, group_size", [
    # 4 envs, 2-step episodes, 8 steps per update: round 1 = four first attempts on the shared prompt (one group),
    # round 2 = four second attempts, each on its own feedback prompt
    ("prompt", 5, 8 / 5),   # 1 group of 4 + 4 groups of one
    ("episode", 2, 4.0),    # (first prompt, attempt 1) and (first prompt, attempt 2): 2 groups of 4
])
def test_learns_end_to_end_with_groups_from_the_shared_first_prompt(tiny_model_dir, group_by, groups, group_size):
    agent = GRPOAgent(model=tiny_model_dir, group_by=group_by, lr=1e-2, **SMALL)
    assert "value" not in agent.policy.adapter_names  # no critic of any kind
    before = adapter_snapshot(agent)
    seen = []
    summary = agent.learn(GroupedTextEnv(length=2), 16, callbacks=seen.append)
    assert summary["updates"] == 2 and summary["env_steps"] == 16 and len(seen) == 2
    for stats in seen:
        for key in DIAGNOSTICS:
            assert key in stats and math.isfinite(stats[key]), key
        assert stats["groups"] == groups and stats["group_size_mean"] == pytest.approx(group_size)
        assert stats["gradient_steps"] == 4  # 2 iterations × 2 minibatches of 4
        assert stats["signal/advantage_first_tenth"] == pytest.approx(stats["signal/advantage_last_tenth"])
        assert stats["entropy"] > 0 and stats["kl_to_reference"] >= 0
    if group_by == "prompt":  # the four second attempts are groups of one
        assert all(stats["zero_advantage_share"] >= 0.5 for stats in seen)
    assert seen[0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA adapter is ρ itself
    assert seen[1]["kl_to_reference"] > 0  # ... until the first update moved it
    changed = [n for n, p in adapter_snapshot(agent).items() if not torch.equal(p, before[n])]
    assert changed and all(".policy." in n for n in changed)


def sampled_group(agent: GRPOAgent, seed: int = 0, size: int = 4) -> list[Transition]:
    """`size` actions sampled for one prompt, rewarded by their token count (so they differ)."""
    from agents.lm import GenerationSettings

    prompt = agent.policy.encode("Task A\ndef build_model(X, y):")
    gen = GenerationSettings(max_new_tokens=agent.config.generation.max_new_tokens, seed=seed)
    return [Transition(obs_ids=np.asarray(prompt, np.int32), action_ids=np.asarray(g.action_ids, np.int32),
                       logp=np.asarray(g.logp, np.float32), ref_logp=np.zeros(len(g.action_ids), np.float32),
                       reward=float(len(g.action_ids) + i % 2), terminated=True, truncated=False, episode_id=i, t=0)
            for i, g in enumerate(agent.policy.generate([prompt] * size, gen))]


def test_score_reproduces_sampling_and_the_first_ratio_is_one(tiny_model_dir):
    agent = GRPOAgent(model=tiny_model_dir, **{**SMALL, "iterations": 1})
    transitions = sampled_group(agent)
    with torch.no_grad():
        logp, extra = agent.score(transitions, reference=True, with_entropy=True)
    for i, t in enumerate(transitions):  # temperature 1: the update's π is the sampled one
        np.testing.assert_allclose(logp[i, : len(t.action_ids)].numpy(), t.logp, atol=1e-4)
    assert extra["entropy"].shape == extra["ref_logp"].shape == (sum(len(t.action_ids) for t in transitions),)
    stats = agent.train(transitions)  # one minibatch, one pass: π_θ = π_old throughout
    assert stats["gradient_steps"] == 1
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clip_fraction"] == 0.0
    for t in transitions:
        assert all(getattr(t, name) is not None for name in ("advantages", "old_logp", "entropy"))
        assert len(t.advantages) == len(t.old_logp) == len(t.ref_logp) == len(t.action_ids)


def test_score_is_the_tempered_distribution_actions_are_sampled_from(tiny_model_dir):
    agent = GRPOAgent(model=tiny_model_dir, **{**SMALL, "temperature": 0.7})
    transitions = sampled_group(agent, size=2)
    with torch.no_grad():
        logp, extra = agent.score(transitions, reference=True)
        for i, t in enumerate(transitions):  # log softmax(logits / 0.7) of the model (a fresh adapter = the base)
            ids = torch.as_tensor(np.r_[t.obs_ids, t.action_ids], dtype=torch.long)[None]
            logits = agent.policy.hf_model(ids).logits[0, len(t.obs_ids) - 1: -1].float() / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(t.action_ids).long()[:, None])
            n = len(t.action_ids)
            torch.testing.assert_close(logp[i, :n], expected[:, 0], rtol=0, atol=1e-4)
    flat = torch.cat([logp[i, : len(t.action_ids)] for i, t in enumerate(transitions)])
    torch.testing.assert_close(extra["ref_logp"], flat, rtol=0, atol=1e-5)  # ρ at the same temperature


def test_kl_coef_zero_skips_the_reference_pass(tiny_model_dir):
    agent = GRPOAgent(model=tiny_model_dir, kl_coef=0.0, lr=1e-2, **SMALL)
    before = adapter_snapshot(agent)
    transitions = sampled_group(agent)
    collected = [t.ref_logp.copy() for t in transitions]
    stats = agent.train(transitions)
    assert all(np.array_equal(t.ref_logp, r) and t.kl is None for t, r in zip(transitions, collected, strict=True))
    assert "kl_to_reference" not in stats
    assert stats["kl_loss"] == 0.0 and math.isfinite(stats["policy_loss"])
    assert any(not torch.equal(p, before[n]) for n, p in adapter_snapshot(agent).items())

    exact = GRPOAgent(model=tiny_model_dir, kl_coef=0.0, exact_kl_diagnostic=True, **SMALL)
    stats = exact.train(sampled_group(exact))
    assert stats["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # measured, though not in the loss


def test_registry_builds_grpo_from_overrides(tiny_model_dir):
    agent = build_agent("grpo", seed=3, model=str(tiny_model_dir),
                        overrides=["group_by=episode", "advantage=rloo", "loss_norm=constant", "kl_coef=0",
                                   "scale_rewards=false", "device=cpu", "max_new_tokens=6", "lora_r=2"])
    assert isinstance(agent, GRPOAgent)
    cfg = agent.config
    assert (cfg.seed, cfg.group_by, cfg.advantage, cfg.loss_norm, cfg.kl_coef, cfg.scale_rewards) == (
        3, "episode", "rloo", "constant", 0.0, False)
    assert cfg.generation.max_new_tokens == 6 and cfg.lora_r == 2
    with pytest.raises(ValueError, match="unknown config key"):
        build_agent("grpo", model=str(tiny_model_dir), overrides=["value_coef=0.5"])
    with pytest.raises(ValueError):
        build_agent("grpo", model=str(tiny_model_dir), overrides=["group_by=task"])


@pytest.mark.parametrize("changes, match", [
    (dict(group_by="task"), "group_by"), (dict(advantage="ppo"), "advantage"), (dict(loss_norm="batch"), "loss_norm"),
    (dict(iterations=0), "iterations"), (dict(kl_coef=-0.1), "kl_coef"), (dict(gamma=1.5), "gamma"),
])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**changes)


@pytest.mark.parametrize("override, match", [("top_k=5", "top_k"), ("top_p=0.9", "top_p"),
                                             ("temperature=0", "temperature")])
def test_filtered_or_greedy_sampling_is_refused(override, match):
    from agents.config import apply_overrides

    with pytest.raises(ValueError, match=match):
        apply_overrides(GRPOConfig(), [override])


def test_checkpoint_through_the_shell_restores_the_next_update_exactly(tiny_model_dir, tmp_path):
    options = {**SMALL, "minibatch_size": 2}  # 2 minibatches per pass: the restored generator must order them
    agent = GRPOAgent(model=tiny_model_dir, lr=1e-2, **options)
    agent.learn(GroupedTextEnv(length=2), 8, out_dir=tmp_path / "run")  # one update, then the final checkpoint
    assert agent.optimizer.state  # AdamW moments exist and have to travel

    resumed = GRPOAgent.load(tmp_path / "run" / "checkpoint")
    assert resumed.counters == agent.counters and resumed.counters["updates"] == 1
    assert resumed.config == agent.config
    for name, value in adapter_snapshot(agent).items():
        assert torch.equal(value, adapter_snapshot(resumed)[name]), name
    assert torch.equal(resumed.generator.get_state(), agent.generator.get_state())

    batch = sampled_group(agent, seed=2)
    batch_copy = [t.without_annotations() for t in batch]
    agent.train(batch)
    resumed.train(batch_copy)  # same optimizer moments, same minibatch order from the restored generator
    for name, value in adapter_snapshot(agent).items():
        torch.testing.assert_close(adapter_snapshot(resumed)[name], value, rtol=0, atol=1e-6, msg=name)
    moved = GRPOAgent.load(tmp_path / "run" / "checkpoint")
    assert any(not torch.equal(p, adapter_snapshot(moved)[n]) for n, p in adapter_snapshot(agent).items())
