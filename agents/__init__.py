"""Agents that act in DataSciCode-v0: the LM policy, ETPO, PPO, GRPO, SFT, prompting, the benchmark and the `etpo` CLI.

Imports here stay light (no torch) so the CLI starts fast; heavy modules load on first use. The one agent registry
and factory live in `agents.registry` (re-exported here).
"""

from __future__ import annotations

from agents.registry import AGENTS, build_agent, config_class_of, resolve_agent_class

__all__ = ["AGENTS", "build_agent", "config_class_of", "resolve_agent_class"]
