"""Agents that act in DataSciCode-v0: the LM policy, ETPO, PPO, SFT and prompting.

Imports here stay light (no torch) so the CLI starts fast; heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# Registry of learners: name -> "module:Class". `load_agent` also accepts any "module:Class" spec directly.
LEARNERS: dict[str, str] = {
    "etpo": "agents.etpo:ETPOAgent",
    "ppo": "agents.ppo:PPOAgent",
    "sft": "agents.sft:SFTAgent",
    "prompting": "agents.prompting:PromptingAgent",
    "zero-shot": "agents.prompting:ZeroShotPromptingAgent",
}

# Reference agents that need no model; handy for `--agent` in benchmarks and tests.
REFERENCE_AGENTS: dict[str, str] = {
    "random": "agents.base:RandomProgramAgent",
    "scripted": "agents.base:ScriptedAgent",
}


def resolve_agent_class(spec: str) -> type:
    """Return the class named by a registry name (`etpo`, `random`, ...) or a `package.module:Class` spec."""
    target = LEARNERS.get(spec) or REFERENCE_AGENTS.get(spec) or spec
    if ":" not in target:
        known = ", ".join(sorted({*LEARNERS, *REFERENCE_AGENTS}))
        raise ValueError(f"unknown agent {spec!r}: use one of {known} or 'package.module:Class'")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ValueError(f"{module_name!r} has no attribute {attr!r} (from agent spec {spec!r})") from exc
    return obj


def load_agent(spec: str, **kwargs: Any) -> Any:
    """Instantiate an agent by registry name or `package.module:Class`, passing `kwargs` to its constructor."""
    return resolve_agent_class(spec)(**kwargs)


__all__ = ["LEARNERS", "REFERENCE_AGENTS", "load_agent", "resolve_agent_class"]
