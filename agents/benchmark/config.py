"""`BenchConfig`: one benchmark, agents × tasks × seeds, each cell with the same env-step budget, evaluation
schedule and `EnvConfig`; `SCHEMA`, the version of the results files it writes."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from etpo_env.config import NOT_ON_COMMAND_LINE, EnvConfig

# Version of config.json, the per-cell files and results.json (documented in `agents.benchmark.report`). Version 1
# (no "schema" field) scored the best-on-dev program of the budget; version 2 evaluates the policy at fixed points.
SCHEMA = 3
# Env fields a cell does not take from the config: the task is the cell's, the sandbox is shared by every cell.
_PER_CELL = NOT_ON_COMMAND_LINE | {"sandbox"}


@dataclass
class BenchConfig:
    """One benchmark: every agent runs on every task for every seed, each with `budget` training env steps, and
    is evaluated on `eval_episodes` fresh episodes at env step 0, every `eval_every` steps and at `budget`."""

    agents: list[str]  # registry names (etpo, ppo, sft, prompting, scripted, random) or "pkg.module:Class"
    tasks: list[str]  # task names (suites already expanded)
    seeds: list[int]  # one run per seed; seeds the env, numpy, random and torch
    budget: int  # training env steps per (agent, task, seed); every learner gets exactly this many
    eval_every: int | None = None  # env steps between evaluation points (None: a quarter of the budget)
    eval_episodes: int = 5  # fresh evaluation episodes per evaluation point
    model: str = "tiny"  # "tiny" (built offline and cached) or a path / Hugging Face name for LM agents
    sandbox: str = "auto"  # the sandbox shared by all runs: a backend name, or the isolation of a given instance
    out: str = "results"  # output folder (also the resume state)
    env: EnvConfig = field(default_factory=EnvConfig)  # every cell's env (its task and sandbox are the cell's)
    # Learner-config fields set for every agent whose config has them (`--set key=value`); values are typed by the
    # field (a string is parsed as on the command line).
    agent_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1 env step, got {self.budget}")
        if not self.agents or not self.tasks or not self.seeds:
            raise ValueError("need at least one agent, one task and one seed")
        if self.eval_every is None:
            self.eval_every = max(1, -(-self.budget // 4))
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1 env step, got {self.eval_every}")
        if self.eval_episodes < 1:
            raise ValueError(f"eval_episodes must be at least 1, got {self.eval_episodes}")
        for name in self.agents:
            if "__" in agent_label(name):
                raise ValueError(f"agent name {name!r} may not contain '__' (used in run file names)")

    @property
    def eval_points(self) -> list[int]:
        """Training env steps at which the policy is evaluated: 0, every `eval_every`, and `budget`."""
        return sorted({*range(0, self.budget, self.eval_every), self.budget})

    def env_settings(self) -> dict[str, Any]:
        """The env fields every cell shares, by name (the same for every run of this benchmark)."""
        return {f.name: getattr(self.env, f.name) for f in dataclasses.fields(self.env) if f.name not in _PER_CELL}

    def to_dict(self) -> dict[str, Any]:
        """The flat record written to config.json and results.json (env fields beside the benchmark's own)."""
        head = {key: getattr(self, key) for key in ("agents", "tasks", "seeds", "budget", "eval_every",
                                                    "eval_episodes", "model", "sandbox", "out")}
        return {**head, "eval_points": self.eval_points, **self.env_settings(),
                "agent_options": dict(self.agent_options)}

    def comparable_fields(self) -> dict[str, Any]:
        """Settings that must match for cells from an earlier run to be comparable with new ones."""
        return {"schema": SCHEMA, "budget": self.budget, "eval_every": self.eval_every,
                "eval_episodes": self.eval_episodes, "model": self.model, **self.env_settings(),
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
