"""`EnvConfig`: the one description of a `DataSciCode-v0` env, taken by the env, `etpo train` and `etpo bench`.

    env = gym.make("DataSciCode-v0", config=EnvConfig(task="titanic", mode="refine"))
    env = gym.make("DataSciCode-v0", task="titanic", mode="refine")            # the same: keywords fill a config

Every field carries `metadata={"help": ...}`; the CLI turns the fields into options (`--max-attempts`, `--mode`,
...) with `agents.config.add_dataclass_arguments`, so an option is declared here once. Choice lists are the
canonical constants of the package that owns them (`sandbox.factory.BACKENDS`, `prompts.STYLES`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from etpo_env.prompts import STYLES
from etpo_env.spaces import MAX_ACTION_CHARS
from sandbox.factory import BACKENDS

MODES = ("fix", "refine")
SPLITS = ("holdout", "paper")  # tasks.splits.PROTOCOLS (not imported: importing tasks loads scikit-learn)
REWARDS = ("metric", "normalized", "improvement")

# Fields that hold objects (a `tasks.Task`, `sandbox.Limits`) or that each command names its own way (`--task`,
# `--tasks`): the command line does not get an option for them.
NOT_ON_COMMAND_LINE = frozenset({"task", "limits"})


@dataclass
class EnvConfig:
    """Settings of one `DataSciCodeEnv`; validated on construction (a bad value raises ValueError)."""

    task: Any = field(default=None, metadata={
        "help": "A task name from `tasks.names()` or a `tasks.Task` (default: `tasks.DEFAULT_TASK`)."})
    sandbox: Literal[BACKENDS] = field(default="auto", metadata={  # type: ignore[valid-type]
        "help": "Sandbox backend, created at the first reset and closed by close(); in Python also a shared "
                "sandbox instance (e.g. a SandboxPool), which the env uses but never closes."})
    max_attempts: int = field(default=5, metadata={"help": "Programs per episode (5, as the ETPO paper)."})
    mode: Literal[MODES] = field(default="fix", metadata={  # type: ignore[valid-type]
        "help": "fix: the episode ends at the first program that runs (as the paper); refine: keep asking for a "
                "better program until the attempts are used up."})
    reward: Literal[REWARDS] = field(default="metric", metadata={  # type: ignore[valid-type]
        "help": "metric: mean dev ROC AUC (failure_reward on failure); normalized: 0 = baseline, 1 = reference "
                "(needs the task's stored scores); improvement: how much the step raised the best score so far, "
                "starting from the task's baseline (0.5 when none is stored)."})
    prompt_style: Literal[STYLES] = field(default="paper", metadata={  # type: ignore[valid-type]
        "help": "paper: dataset shape only (as the ETPO paper); rich: a feature table."})
    input_format: str = field(default="pandas", metadata={
        "help": "What X is inside build_model, one of tasks.task.INPUT_FORMATS (pandas, numpy); task names only."})
    limits: Any = field(default=None, metadata={
        "help": "`sandbox.Limits` for a sandbox the env creates (not allowed with a sandbox instance)."})
    max_rows: int = field(default=2000, metadata={"help": "Row cap when loading a task by name."})
    split: Literal[SPLITS] = field(default="holdout", metadata={  # type: ignore[valid-type]
        "help": "holdout: fitting, reward and test rows are disjoint and only fitting rows' labels enter a sandbox "
                "(no channel between runs can carry a scored label); paper: the ETPO paper's 5 random 50/50 "
                "splits of the dev part, OPEN TO CROSS-FOLD CHANNELS (scored labels are fitted in other folds), "
                "for reproducing the paper only. Task names only."})
    split_seed: int | None = field(default=0, metadata={
        "help": "Seed of the fits a reward is scored from (holdout with one fit: no effect; paper: the splits): "
                "an int keeps rewards comparable across episodes; none draws a new seed from the env's "
                "generator at every reset."})
    failure_reward: float = field(default=-1.0, metadata={
        "help": "Reward of a failed step (a program that does not run, or an invalid action)."})
    max_action_chars: int = field(default=MAX_ACTION_CHARS, metadata={
        "help": "Longer actions are failed steps (invalid_action) and are not run."})
    record_timings: bool = field(default=False, metadata={
        "help": "Add duration_s and peak_memory_mb to info (they differ between identical runs)."})

    def __post_init__(self) -> None:
        from tasks.task import INPUT_FORMATS  # deferred: importing tasks.task loads scikit-learn

        if isinstance(self.sandbox, str):
            _check_choice("sandbox", self.sandbox, BACKENDS)
        elif not callable(getattr(self.sandbox, "run", None)):
            raise ValueError(f"sandbox must be a backend name or a sandbox instance, got {self.sandbox!r}")
        elif self.limits is not None:
            raise ValueError("limits apply to a sandbox the env creates; set them on the shared sandbox instead")
        _check_choice("mode", self.mode, MODES)
        _check_choice("split", self.split, SPLITS)
        _check_choice("reward", self.reward, REWARDS)
        _check_choice("prompt_style", self.prompt_style, STYLES)
        _check_choice("input_format", self.input_format, INPUT_FORMATS)
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.max_action_chars < 1:
            raise ValueError(f"max_action_chars must be at least 1, got {self.max_action_chars}")

    def replace(self, **changes: Any) -> EnvConfig:
        """A validated copy with `changes` applied (an unknown name raises TypeError, as a dataclass does)."""
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
