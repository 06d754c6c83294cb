"""The record of one benchmark cell: a dataclass the run fills in, written by `CellRecord.to_json`, its one
serialiser (what `runs/*.json`, `results.json` and a Ray worker's return value hold; the schema is described in
`agents.benchmark.report`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from agents.benchmark.config import SCHEMA, agent_label


class _NotRecorded:
    def __repr__(self) -> str:
        return "NOT_RECORDED"


NOT_RECORDED: Any = _NotRecorded()  # agent settings that could not be made (the cell fails and says why)


@dataclass
class CellRecord:
    """One (agent, task, seed) cell: what ran, what it measured, and why it stopped if it failed."""

    agent_spec: str
    task: str
    seed: int
    budget: int
    eval_every: int
    eval_episodes: int
    schema: int = SCHEMA
    agent: str = ""  # the agent's label (from agent_spec)
    learner: bool = False  # whether the agent has `learn` (trained between evaluation points)
    error: str | None = None  # the exception of a crashed agent, or why a cell never ran
    learn_budgets: list[int] = field(default_factory=list)  # the cumulative budgets `learn` was called with
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # one `point_summary` per evaluation point
    agent_settings: Any = NOT_RECORDED  # the config the agent ran under (None: an agent without one)
    traceback: str | None = None
    budget_note: str | None = None  # a learner that asked for steps past its budget
    attempts: int | None = None  # how often a cell lost on a cluster ran
    env_steps: int = 0
    episodes: int = 0
    rewards: list[float] = field(default_factory=list)  # per training env step
    dev_scores: list[float | None] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    search_result: dict[str, Any] | None = None  # the best-on-dev program of training, scored on test
    metrics: dict[str, Any] = field(default_factory=dict)  # `statistics.run_metrics`: the curve and summary numbers
    wall_time_s: float = 0.0

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("traceback", "budget_note", "attempts")

    def __post_init__(self) -> None:
        self.agent = self.agent or agent_label(self.agent_spec)

    def to_json(self) -> dict[str, Any]:
        """The record as plain data: every field at the top level, `metrics` merged in, optional fields omitted
        when they hold nothing."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metrics"}
        for name in self.OMITTED_WHEN_NONE:
            if out[name] is None:
                del out[name]
        if out["agent_settings"] is NOT_RECORDED:
            del out["agent_settings"]
        out.update(self.metrics)
        return out
