"""`BenchConfig`: one benchmark, agents × tasks × seeds, each cell with the same env-step budget and `EnvConfig`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from etpo_env.config import NOT_ON_COMMAND_LINE, EnvConfig

SELECTS = ("best", "final")
# Env fields a cell does not take from the config: the task is the cell's, the sandbox is shared by every cell.
_PER_CELL = NOT_ON_COMMAND_LINE | {"sandbox"}


@dataclass
class BenchConfig:
    """One benchmark: every agent runs on every task for every seed, each with `budget` env steps."""

    agents: list[str]  # registry names (etpo, ppo, sft, prompting, scripted, random) or "pkg.module:Class"
    tasks: list[str]  # task names (suites already expanded)
    seeds: list[int]  # one run per seed; seeds the env, numpy, random and torch
    budget: int  # env steps per (agent, task, seed); every agent gets exactly this many
    model: str = "tiny"  # "tiny" (built offline and cached) or a path / Hugging Face name for LM agents
    sandbox: str = "auto"  # the sandbox shared by all runs: a backend name, or the isolation of a given instance
    out: str = "results"  # output folder (also the resume state)
    env: EnvConfig = field(default_factory=EnvConfig)  # every cell's env (its task and sandbox are the cell's)
    select: str = "best"  # program scored on test: "best" on dev during the run, or "final" (last successful)
    # Learner-config fields set for every agent whose config has them (`--set key=value`); values are typed by the
    # field (a string is parsed as on the command line).
    agent_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1 env step, got {self.budget}")
        if not self.agents or not self.tasks or not self.seeds:
            raise ValueError("need at least one agent, one task and one seed")
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        for name in self.agents:
            if "__" in agent_label(name):
                raise ValueError(f"agent name {name!r} may not contain '__' (used in run file names)")

    def env_settings(self) -> dict[str, Any]:
        """The env fields every cell shares, by name (the same for every run of this benchmark)."""
        return {f.name: getattr(self.env, f.name) for f in dataclasses.fields(self.env) if f.name not in _PER_CELL}

    def to_dict(self) -> dict[str, Any]:
        """The flat record written to config.json and results.json (env fields beside the benchmark's own)."""
        head = {key: getattr(self, key) for key in ("agents", "tasks", "seeds", "budget", "model", "sandbox", "out")}
        return {**head, **self.env_settings(), "select": self.select, "agent_options": dict(self.agent_options)}

    def comparable_fields(self) -> dict[str, Any]:
        """Settings that must match for cells from an earlier run to be comparable with new ones."""
        return {"budget": self.budget, "model": self.model, **self.env_settings(), "select": self.select,
                "agent_options": dict(self.agent_options)}


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword options of `run_benchmark` -> (BenchConfig fields, EnvConfig fields); anything else is a TypeError."""
    bench_names = {f.name for f in dataclasses.fields(BenchConfig)}
    env_names = {f.name for f in dataclasses.fields(EnvConfig)} - _PER_CELL
    unknown = sorted(set(options) - bench_names - env_names)
    if unknown:
        raise TypeError(f"unknown benchmark option(s) {unknown}; known: {sorted(bench_names | env_names)}")
    return ({k: v for k, v in options.items() if k in bench_names},
            {k: v for k, v in options.items() if k in env_names})


def agent_label(spec: str) -> str:
    """Short, file-name-safe label: `my_pkg.my_module:MyAgent` -> `MyAgent`; registry names stay as they are."""
    label = spec.rsplit(":", 1)[-1] if ":" in spec else spec
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def run_file_name(agent: str, task: str, seed: int) -> str:
    return f"{agent_label(agent)}__{task}__seed{seed}.json"
