"""How learners load their model: dtype (auto = bf16 on CUDA, fp32 on CPU; trainable parameters always fp32),
attention kernel pass-through, optional 4-bit loading, all set from the learner config's `runtime`."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import pytest
import torch

from agents.config import apply_overrides, leaf_fields
from agents.etpo import ETPOAgent, ETPOConfig
from agents.lm import RuntimeSettings, load_options, resolve_dtype
from agents.ppo import PPOConfig
from agents.prompting import PromptingConfig, ZeroShotConfig
from agents.sft import SFTConfig


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        RuntimeSettings(dtype="fp8")


@pytest.mark.parametrize("config_cls", [ETPOConfig, PPOConfig, SFTConfig, PromptingConfig, ZeroShotConfig])
def test_every_learner_config_exposes_the_runtime_fields_by_name(config_cls):
    names = leaf_fields(config_cls)
    assert {"device", "dtype", "attn_implementation", "quantization", "gradient_checkpointing"} <= set(names)
    config = apply_overrides(config_cls(), ["dtype=bfloat16", "attn_implementation=eager", "device=cpu"])
    assert config.runtime == RuntimeSettings(device="cpu", dtype="bfloat16", attn_implementation="eager")
    options = load_options(config.runtime)
    assert options["dtype"] is torch.bfloat16 and options["attn_implementation"] == "eager"


def test_the_prompting_baselines_local_model_loads_with_its_runtime(tiny_model_dir):
    from agents.prompting import PromptingAgent

    config = apply_overrides(PromptingConfig(strategy="zero-shot"), ["dtype=bfloat16", "device=cpu"])
    agent = PromptingAgent(model=tiny_model_dir, config=config)
    assert {p.dtype for p in agent.backend.policy.hf_model.parameters()} == {torch.bfloat16}


def test_a_served_model_loads_frozen_in_the_dtype_asked_for(tiny_model_dir):
    from agents.cli import build_parser
    from agents.serve import load_policy_for_serving

    policy = load_policy_for_serving(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in policy.hf_model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in policy.hf_model.parameters())
    args = build_parser().parse_args(["serve", "--model", "tiny", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_four_bit_loading_without_bitsandbytes_says_what_to_install():
    with pytest.raises(ImportError, match=r"etpo-gym\[quantization\]"):
        load_options(RuntimeSettings(quantization="4bit"))


class OneStepEnv(gym.Env):
    observation_space = gym.spaces.Text(max_length=200)
    action_space = gym.spaces.Text(max_length=2000)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "def build_model(X, y):\n", {}

    def step(self, action):
        return "done", float(len(action) % 3), True, False, {"status": "ok"}


@pytest.mark.slow
def test_a_bf16_base_trains_with_fp32_trainable_parameters(tiny_model_dir):
    torch.set_num_threads(1)
    agent = ETPOAgent(model=tiny_model_dir, device="cpu", dtype="bfloat16", attn_implementation="eager",
                      max_new_tokens=6, lora_r=4, lora_alpha=8, rollout_steps=2, num_envs=1, minibatch_size=2, epochs=1, seed=0)
    model = agent.policy.hf_model
    frozen = {p.dtype for n, p in agent.policy.model.named_parameters() if not p.requires_grad}
    trainable = {p.dtype for p in agent.models.policy_parameters() + agent.models.critic_parameters()}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    assert model.config._attn_implementation == "eager"
    before = [p.detach().clone() for p in agent.models.critic_parameters()]
    summary = agent.learn(OneStepEnv(), budget=2)
    assert summary["updates"] == 1 and torch.isfinite(torch.tensor(summary["loss/critic"]))
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, agent.models.critic_parameters()))
