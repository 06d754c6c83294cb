"""Language-model fixtures shared by the test suite (owned by the agents package)."""

from __future__ import annotations

import gymnasium as gym
import pytest


@pytest.fixture
def single_torch_thread():
    """One torch thread for the test (`pytestmark = pytest.mark.usefixtures("single_torch_thread")`): tensors this
    small gain nothing from a thread pool, which only adds contention (10x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A very small causal LM + BPE tokenizer built from nothing in seconds (the "test" preset of agents.tiny).

    Also pins torch to one intra-op thread: models this small gain nothing from threading, and on a busy shared
    CPU OpenMP's spinning threads made each tiny matmul ~25x slower (measured: 14 s vs 0.6 s for 6 SFT steps).
    """
    import torch

    from agents.tiny import build_tiny_model

    torch.set_num_threads(1)

    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(path, preset="test", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    """An `LMPolicy` over the tiny model with a "policy" LoRA adapter (reference = adapters disabled)."""
    from agents.lm import LMPolicy, default_lora_config

    return LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)})


class ScriptedTextEnv(gym.Env):
    """Prompts name the step; reward = number of characters in the action; episodes last `length` steps and are
    truncated instead of terminated when `truncate` is set. Records what it saw."""

    metadata = {"render_modes": []}

    def __init__(self, length: int = 3, truncate: bool = False, tag: str = "A"):
        self.observation_space = gym.spaces.Text(max_length=10_000)
        self.action_space = gym.spaces.Text(max_length=10_000)
        self.length, self.truncate, self.tag = length, truncate, tag
        self.emitted: list[str] = []
        self.received: list[str] = []
        self.episode = -1

    def _obs(self) -> str:
        obs = f"Task {self.tag} episode {self.episode} step {self.t}\ndef build_model(X, y):"
        self.emitted.append(obs)
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {"attempt": 0}

    def step(self, action):
        self.received.append(action)
        self.t += 1
        done = self.t >= self.length
        info = {"status": "ok" if len(action) % 2 == 0 else "runtime_error", "score": float(len(action)) / 100,
                "attempt": self.t}
        return self._obs(), float(len(action)), done and not self.truncate, done and self.truncate, info
