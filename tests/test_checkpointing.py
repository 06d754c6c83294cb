"""Gradient checkpointing changes memory, never gradients: for every network of ETPO (policy and critic adapters on
one base) and PPO (policy and value adapters), gradients with checkpointing on equal those with it off, and the
layers really are recomputed (PPO used to run in eval mode, where transformers does not checkpoint); and whole
training runs that differ only in checkpointing save the same tensors (adapters, heads, EMA target, optimisers)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.etpo import ETPOAgent, etpo_losses, pack
from agents.ppo import PPOAgent
from agents.rollout import Transition

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]




def perturb_adapters(policy, seed: int = 0) -> None:
    """LoRA B starts at zero, so every adapter computes the base model at first and replaying a layer under the
    wrong adapter would go unseen. Give each adapter its own non-zero weights (the same for every agent built)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(policy.model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def transitions(policy, n: int = 3) -> list[Transition]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        obs = policy.encode(f"def build_model(X, y):  # attempt {i}")
        action = rng.integers(5, 200, size=4 + i).astype(np.int32)
        out.append(Transition(obs_ids=np.asarray(obs, np.int32), action_ids=action, logp=np.zeros(len(action), np.float32),
                              ref_logp=np.zeros(len(action), np.float32), reward=1.0, terminated=True, truncated=False,
                              episode_id=i, t=0))
    return out


class LayerCalls:
    """Counts calls of every decoder layer's first attention projection: a recomputed layer calls it again."""

    def __init__(self, policy):
        self.count = 0
        modules = [m for n, m in policy.hf_model.named_modules() if n.endswith("self_attn.q_proj")]
        assert modules
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, *_):
        self.count += 1

    def close(self):
        for h in self.handles:
            h.remove()


def etpo_gradients(model_dir, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    agent = ETPOAgent(model=model_dir, device="cpu", lora_r=4, lora_alpha=8, seed=0, chunk_size=5,
                      gradient_checkpointing=checkpointing)
    perturb_adapters(agent.policy)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in agent.models.critic.parameters():
            p.normal_(0, 0.1, generator=generator)
    batch = transitions(agent.policy)
    packed = pack([(t.obs_ids, t.action_ids) for t in batch], agent.policy.pad_id, "cpu")
    targets = torch.linspace(-1, 1, len(packed.tokens))
    calls = LayerCalls(agent.policy)
    policy_loss, critic_loss, _ = etpo_losses(agent.models, packed, targets, beta=0.1, chunk_size=5)
    forward_calls = calls.count
    (policy_loss + critic_loss).backward()
    total_calls = calls.count
    calls.close()
    params = agent.models.policy_parameters() + agent.models.critic_parameters()
    names = {id(p): n for n, p in agent.policy.model.named_parameters()}
    names.update({id(p): f"q_head.{n}" for n, p in agent.models.critic.named_parameters()})
    return {names[id(p)]: p.grad.clone() for p in params if p.grad is not None}, forward_calls, total_calls


def ppo_gradients(model_dir, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    agent = PPOAgent(model=model_dir, device="cpu", lora_r=4, lora_alpha=8, seed=0, value_model="adapter",
                     gradient_checkpointing=checkpointing)
    perturb_adapters(agent.policy)
    calls = LayerCalls(agent.policy)
    out = agent.forward(transitions(agent.policy))
    forward_calls = calls.count
    (out.logp.sum() + out.values.sum()).backward()
    total_calls = calls.count
    calls.close()
    params = agent.policy_params + agent.value_params
    names = {id(p): n for n, p in agent.policy.model.named_parameters()}
    names.update({id(p): f"value_head.{n}" for n, p in agent.value_head.named_parameters()})
    return {names[id(p)]: p.grad.clone() for p in params if p.grad is not None}, forward_calls, total_calls


@pytest.mark.parametrize("gradients", [etpo_gradients, ppo_gradients], ids=["etpo", "ppo"])
def test_checkpointing_leaves_every_gradient_unchanged(tiny_model_dir, gradients):
    plain, plain_forward, plain_total = gradients(tiny_model_dir, checkpointing=False)
    checkpointed, ckpt_forward, ckpt_total = gradients(tiny_model_dir, checkpointing=True)
    assert plain_total == plain_forward  # without checkpointing nothing runs again in backward
    assert ckpt_total > ckpt_forward  # with it, the layers are recomputed during backward
    assert plain.keys() == checkpointed.keys()
    networks = {"policy": 0, "critic": 0, "value": 0}
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        for network in networks:
            if "lora_" in name and f".{network}." in name and grad.abs().sum() > 0:
                networks[network] += 1
    # both networks of each learner had real gradients to compare
    assert sum(count > 0 for count in networks.values()) == 2, networks


class ScoredEnv(gym.Env):
    """Two-step episodes rewarded by the share of digits in the action: deterministic and sandbox-free, with
    rewards that differ between actions (so every network of a learner gets gradients)."""

    observation_space = gym.spaces.Text(max_length=200)
    action_space = gym.spaces.Text(max_length=2000)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return "def build_model(X, y):\n", {}

    def step(self, action):
        self.t += 1
        reward = sum(c.isdigit() for c in action) / max(len(action), 1) - 0.1
        return "again:\n", float(reward), self.t >= 2, False, {"status": "ok"}

    def spawn(self):
        """A sibling for batched collection (`etpo_env.vector.vectorize`)."""
        return ScoredEnv()


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a learner's checkpoint: each adapter's weights and the trainer state (heads, EMA target,
    optimiser moments, RNG states), by path."""
    from safetensors.torch import load_file

    found = {}
    for path in sorted(directory.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            found[f"{path.relative_to(directory)}:{name}"] = tensor

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}[{i}]", item)

    walk("trainer", torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False))
    return found


@pytest.mark.parametrize("agent_class,options", [
    (ETPOAgent, dict(minibatch_size=2, epochs=2, rollout_steps=4, chunk_size=7)),
    (PPOAgent, dict(minibatch_size=2, epochs=2, rollout_steps=4, value_model="adapter")),
], ids=["etpo", "ppo"])
def test_learners_that_differ_only_in_checkpointing_save_the_same_tensors(tiny_model_dir, tmp_path, agent_class,
                                                                          options):
    saved = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        agent = agent_class(model=tiny_model_dir, device="cpu", max_new_tokens=10, lora_r=4, lora_alpha=8, seed=0,
                            num_envs=2, gradient_checkpointing=checkpointing, **options)
        assert agent.policy.gradient_checkpointing == checkpointing
        out = tmp_path / f"checkpointing-{checkpointing}"
        agent.learn(ScoredEnv(), 8, out_dir=out)
        saved[checkpointing] = saved_tensors(out / "checkpoint")
    plain, checkpointed = saved[False], saved[True]
    assert plain.keys() == checkpointed.keys()
    assert sum("lora_" in name for name in plain) >= 4  # both adapters' weights are among the compared tensors
    moved = 0
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
        moved += "lora_B" in name and bool(tensor.abs().sum() > 0)  # LoRA B starts at zero: nonzero = trained
    assert moved >= 2, "both networks' adapters were trained"
