"""PPO is on-policy for the distribution it samples: at temperature T it trains softmax(logits/T), its π_old (and ρ)
are recomputed by the update's own function, so the first minibatch's ratio is exactly 1; top-k/top-p sampling,
which training does not reproduce, is refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.lm import GenerationSettings
from agents.ppo import PPOAgent, PPOConfig
from agents.rollout import Transition

TEMPERATURE = 0.7
SMALL = dict(device="cpu", num_envs=1, max_new_tokens=10, lora_r=4, lora_alpha=8, seed=0, temperature=TEMPERATURE)
PROMPTS = ["def build_model(X, y):\n", "Task: predict the class of each row.\n", "import numpy as np\n"]


def sampled_episode(agent: PPOAgent) -> list[Transition]:
    """A three-step episode sampled at the agent's own generation settings (rewards 0, 0.5, 1)."""
    policy = agent.policy
    prompts = [policy.encode(p) for p in PROMPTS]
    gens = policy.generate(prompts, agent.config.generation)
    return [Transition(obs_ids=np.asarray(p, np.int32), action_ids=np.asarray(g.action_ids, np.int32),
                       logp=np.asarray(g.logp, np.float32), ref_logp=np.zeros(len(g.action_ids), np.float32),
                       reward=0.5 * t, terminated=t == 2, truncated=False, episode_id=0, t=t,
                       next_index=None if t == 2 else t + 1)
            for t, (p, g) in enumerate(zip(prompts, gens, strict=True))]


def _perturb(agent: PPOAgent) -> None:
    """A fresh LoRA adapter is the identity (π = ρ): move it so π and ρ differ."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in agent.policy.model.named_parameters():
            if ".policy." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _tempered_logp(agent: PPOAgent, t: Transition, adapter) -> np.ndarray:
    """log softmax(logits/T) of the sampled tokens, from one direct forward pass of the model."""
    obs, action = list(t.obs_ids), list(t.action_ids)
    with torch.no_grad():
        logits = agent.policy.logits(torch.tensor([obs + action]), adapter=adapter)[0, len(obs) - 1: -1]
    return F.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, torch.tensor(action)[:, None]).squeeze(
        -1).numpy()


def test_ppo_trains_the_tempered_distribution_and_its_first_ratio_is_one(tiny_model_dir):
    agent = PPOAgent(model=tiny_model_dir, epochs=1, minibatch_size=8, **SMALL)
    assert agent.config.generation.temperature == TEMPERATURE
    _perturb(agent)
    transitions = sampled_episode(agent)
    agent.annotate_values(transitions)
    with torch.no_grad():
        out = agent.forward(transitions)
    for i, t in enumerate(transitions):
        n = len(t.action_ids)
        policy_logp, reference_logp = _tempered_logp(agent, t, "policy"), _tempered_logp(agent, t, None)
        np.testing.assert_allclose(out.logp[i, :n].numpy(), policy_logp, atol=1e-5)  # the update's π_θ
        np.testing.assert_allclose(t.old_logp, policy_logp, atol=1e-5)  # π_old: the same distribution
        np.testing.assert_allclose(t.ref_logp, reference_logp, atol=1e-5)  # ρ at the same temperature
        assert not np.allclose(policy_logp, reference_logp, atol=1e-3)
    stats = agent.train(transitions)  # one minibatch holding every action: its ratio is π_θ/π_old before the step
    assert stats["gradient_steps"] == 1
    assert stats["clip_fraction"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-7


@pytest.mark.parametrize("setting, match", [(dict(top_k=5), "top_k"), (dict(top_p=0.9), "top_p"),
                                            (dict(temperature=0.0), "temperature")])
def test_config_refuses_sampling_that_training_does_not_reproduce(setting, match):
    with pytest.raises(ValueError, match=match) as error:
        PPOConfig(generation=GenerationSettings(**setting))
    assert "PPO" in str(error.value)
    PPOConfig(generation=GenerationSettings(temperature=0.5))  # any temperature > 0 is fine
    with pytest.raises(ValueError, match=match):  # also through the flat overrides the learners and CLI use
        from agents.config import with_fields

        with_fields(PPOConfig(), setting)


@pytest.mark.parametrize("value_model", ["shared", "adapter"])
def test_bootstrap_value_is_read_at_the_last_observation_token(tiny_model_dir, value_model):
    """V(s') after a truncation is the value head on the state the next action's first token is sampled in: the
    last token of s' (right-padded batch of observations of different lengths)."""
    agent = PPOAgent(model=tiny_model_dir, value_model=value_model, **{**SMALL, "temperature": 1.0})
    if value_model == "adapter":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a fresh value adapter is the identity: move it so its features differ
            for name, p in agent.policy.model.named_parameters():
                if ".value." in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
    observations = [agent.policy.encode(p) for p in PROMPTS]
    assert len({len(o) for o in observations}) == len(observations)
    got = agent.state_values(observations)
    adapter = "value" if value_model == "adapter" else "policy"
    early = []
    for obs, value in zip(observations, got, strict=True):
        with torch.no_grad():
            hidden = agent.policy.hidden_states(torch.tensor([obs]), adapter=adapter)[0]
            expected = agent.value_head(hidden.float()).squeeze(-1)
        assert value == pytest.approx(float(expected[-1]), abs=1e-6)
        early.append(abs(float(expected[-2]) - float(expected[-1])))
    assert max(early) > 1e-3  # read one position early, V(s') would be another number
    # ... and the same number the annotate pass gives the first token of an action taken in s'
    transitions = [Transition(obs_ids=np.asarray(o, np.int32), action_ids=np.asarray([5, 6], np.int32),
                              logp=np.zeros(2, np.float32), ref_logp=np.zeros(2, np.float32), reward=0.0,
                              terminated=True, truncated=False, episode_id=i, t=0, next_index=None)
                   for i, o in enumerate(observations)]
    agent.annotate_values(transitions)
    for t, value in zip(transitions, got, strict=True):
        assert float(t.values[0]) == pytest.approx(value, abs=1e-5)
