"""PPOAgent on the tiny LM: the update's forward pass agrees with sampling, both value-model layouts train, and a
checkpoint restores everything needed for the next update to be the one an uninterrupted run would make."""

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.rollout import Transition

SMALL = dict(device="cpu", num_envs=1, max_new_tokens=12, lora_r=4, lora_alpha=8, minibatch_size=2, epochs=2, seed=0)
PROMPTS = ["def build_model(X, y):\n", "Task: predict the class of each row.\n", "import numpy as np\n"]


def sampled_episode(agent: PPOAgent, seed: int = 0) -> list[Transition]:
    """A three-step episode sampled from the agent's policy: rewards 0, 0.5, 1; the last step terminates."""
    from agents.lm import GenerationSettings

    policy = agent.policy
    gen = GenerationSettings(max_new_tokens=agent.config.generation.max_new_tokens, seed=seed)
    prompts = [policy.encode(p) for p in PROMPTS]
    transitions = []
    for t, (prompt, g) in enumerate(zip(prompts, policy.generate(prompts, gen), strict=True)):
        with torch.no_grad():
            ref = policy.sequence_logprobs([prompt], [g.action_ids], adapter=None)[0].numpy()
        last = t == len(prompts) - 1
        transitions.append(Transition(
            obs_ids=np.asarray(prompt, np.int32), action_ids=np.asarray(g.action_ids, np.int32),
            logp=np.asarray(g.logp, np.float32), ref_logp=ref.astype(np.float32), reward=0.5 * t, terminated=last,
            truncated=False, episode_id=0, t=t, next_index=None if last else t + 1))
    return transitions


def snapshot(agent: PPOAgent) -> dict[str, torch.Tensor]:
    params = {f"policy.{n}": p.detach().clone() for n, p in agent.policy.model.named_parameters() if p.requires_grad}
    params.update({f"value_head.{n}": p.detach().clone() for n, p in agent.value_head.named_parameters()})
    return params


@pytest.mark.parametrize("value_model", ["shared", "adapter"])
def test_forward_reproduces_sampling_logprobs_and_update_trains_both_parts(tiny_model_dir, value_model):
    agent = PPOAgent(model=tiny_model_dir, value_model=value_model, **SMALL)
    transitions = sampled_episode(agent)
    agent.annotate_values(transitions)
    with torch.no_grad():
        out = agent.forward(transitions)
    for i, t in enumerate(transitions):
        n = len(t.action_ids)
        np.testing.assert_allclose(out.logp[i, :n].numpy(), t.logp, atol=1e-4)  # ratio = 1 before any update
        np.testing.assert_allclose(out.values[i, :n].numpy(), t.values, atol=1e-5)
        assert (out.entropy[i, :n] > 0).all()
    assert ("value" in agent.policy.adapter_names) == (value_model == "adapter")

    before = snapshot(agent)
    stats = agent.train(transitions)
    after = snapshot(agent)
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm"):
        assert np.isfinite(stats[key]), key
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".policy." in k for k in changed), "the policy adapter did not move"
    assert {"value_head.weight", "value_head.bias"} <= changed
    if value_model == "adapter":
        assert any(".value." in k for k in changed), "the value adapter did not move"
    for t in transitions:  # advantages and returns were written for every token
        assert len(t.advantages) == len(t.returns) == len(t.action_ids)


def test_exact_kl_diagnostic_is_zero_at_the_start_and_grows_with_updates(tiny_model_dir):
    agent = PPOAgent(model=tiny_model_dir, **{**SMALL, "lr": 1e-2})
    transitions = sampled_episode(agent)
    agent.annotate_values(transitions)  # a fresh LoRA adapter is the identity: π = ρ
    assert all(np.allclose(t.kl, 0.0, atol=1e-6) for t in transitions)
    agent.train(transitions)
    agent.annotate_values(transitions)
    kl = np.concatenate([t.kl for t in transitions])
    assert (kl >= -1e-6).all() and kl.mean() > 1e-6


def test_checkpoint_restores_the_next_update_exactly(tiny_model_dir, tmp_path):
    agent = PPOAgent(model=tiny_model_dir, kl_target=0.01, **SMALL)
    agent.train(sampled_episode(agent, seed=1))
    agent.kl_controller.update(1.0, 1000)  # move β so the checkpoint has to carry it
    agent.counters.update(updates=1, env_steps=3, tokens=36, episodes=1)
    agent.save(tmp_path / "ckpt")

    resumed = PPOAgent.load(tmp_path / "ckpt")
    assert resumed.counters == agent.counters
    assert resumed.kl_controller.value == pytest.approx(agent.kl_controller.value) != agent.config.kl_coef
    assert resumed.config == agent.config
    for key, value in snapshot(agent).items():
        assert torch.equal(value, snapshot(resumed)[key]), key

    batch = sampled_episode(agent, seed=2)
    batch_copy = [t.without_annotations() for t in batch]
    agent.train(batch)
    resumed.train(batch_copy)  # same optimizer moments, same minibatch order from the restored generator
    assert resumed.kl_controller.value == pytest.approx(agent.kl_controller.value, rel=1e-6)
    for key, value in snapshot(agent).items():
        torch.testing.assert_close(snapshot(resumed)[key], value, rtol=0, atol=1e-6, msg=key)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="value_model"):
        PPOConfig(value_model="separate")
    with pytest.raises(ValueError):
        PPOConfig(epochs=0)


def test_start_from_a_saved_adapter_makes_it_the_frozen_reference(tiny_model_dir, tmp_path):
    trained = PPOAgent(model=tiny_model_dir, **{**SMALL, "lr": 1e-2})
    transitions = sampled_episode(trained)
    trained.train(transitions)
    trained.policy.save(tmp_path / "sft")  # what an SFT run leaves in its checkpoint

    agent = PPOAgent(model=tiny_model_dir, init_adapter=str(tmp_path / "sft"), **SMALL)
    assert agent.policy.reference == "adapter:reference"
    fresh = [t.without_annotations() for t in transitions]
    agent.annotate_values(fresh)
    with torch.no_grad():
        start_logp = agent.forward(fresh).logp
        trained_logp = trained.forward(fresh).logp
    torch.testing.assert_close(start_logp, trained_logp, rtol=0, atol=1e-5)  # π starts as the saved adapter
    assert all(np.allclose(t.kl, 0.0, atol=1e-6) for t in fresh)  # ... and ρ is that same adapter
    reference_before = {n: p.detach().clone() for n, p in agent.policy.model.named_parameters() if ".reference." in n}
    assert reference_before and not any(p.requires_grad for n, p in agent.policy.model.named_parameters()
                                         if ".reference." in n)
    agent.train(fresh)
    for name, p in agent.policy.model.named_parameters():
        if name in reference_before:
            assert torch.equal(p, reference_before[name]), f"the reference moved: {name}"
