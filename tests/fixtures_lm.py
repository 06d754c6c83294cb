"""Language-model fixtures shared by the test suite (owned by the agents package)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A very small causal LM + BPE tokenizer built from nothing in seconds (the "test" preset of agents.tiny)."""
    from agents.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(path, preset="test", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    """An `LMPolicy` over the tiny model with a "policy" LoRA adapter (reference = adapters disabled)."""
    from agents.policy import LMPolicy, default_lora_config

    return LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)})
