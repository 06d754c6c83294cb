"""Statistics of a benchmark (pure functions): means with Student-t confidence intervals, per task and overall."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# A failed run (no program ever succeeded on dev, or the chosen program failed on test) counts as a constant
# predictor: ROC AUC 0.5. Means then reflect both quality and reliability; the success rate is reported beside them.
CHANCE_SCORE = 0.5


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided `confidence` interval of the mean, Student t with n-1 dof.

    One value has no spread estimate: the half-width is NaN (printed as "n/a"), never a made-up zero.
    """
    from scipy import stats

    values = [float(v) for v in values if not math.isnan(float(v))]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(variance / n)
    return mean, half


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean:.{digits}f} ± n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(runs: Iterable[dict[str, Any]], agents: Sequence[str], tasks: Sequence[str]) -> dict[str, list[dict]]:
    """Rows per (task, agent) and overall per agent. Overall: per seed, the mean over tasks; then CI over seeds."""
    runs = list(runs)
    per_task = []
    for task in tasks:
        for agent in agents:
            cell = [r for r in runs if r["task"] == task and r["agent"] == agent]
            if cell:
                per_task.append(_summary_row(cell, task=task, agent=agent))
    overall = []
    for agent in agents:
        mine = [r for r in runs if r["agent"] == agent and r["task"] in tasks]
        seeds = sorted({r["seed"] for r in mine})
        # A seed enters the overall mean only when it has every task, so each overall value averages the same tasks.
        complete = [s for s in seeds if {r["task"] for r in mine if r["seed"] == s} >= set(tasks)]
        if not complete:
            continue
        by_seed = {s: [r for r in mine if r["seed"] == s] for s in complete}
        score = mean_ci([_mean([r["score"] for r in rs]) for rs in by_seed.values()])
        normalized = mean_ci([_mean(_known([r["normalized"] for r in rs])) for rs in by_seed.values()])
        used = [r for rs in by_seed.values() for r in rs]
        overall.append({
            "task": "overall", "agent": agent, "n": len(complete),
            "score": score[0], "score_ci": score[1], "normalized": normalized[0], "normalized_ci": normalized[1],
            "success_rate": _mean([float(r["success"]) for r in used]),
            "env_steps": _mean([sum(r["env_steps"] for r in rs) for rs in by_seed.values()]),
            "wall_time_s": _mean([sum(r["wall_time_s"] for r in rs) for rs in by_seed.values()]),
        })
    return {"per_task": per_task, "overall": overall}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _known(values: Iterable[float | None]) -> list[float]:
    """Normalized scores exist only for tasks with stored reference scores; the others are left out."""
    return [v for v in values if v is not None and not math.isnan(v)]


def _summary_row(cell: list[dict], *, task: str, agent: str) -> dict[str, Any]:
    score = mean_ci([r["score"] for r in cell])
    normalized = mean_ci(_known(r["normalized"] for r in cell))
    return {
        "task": task, "agent": agent, "n": len(cell),
        "score": score[0], "score_ci": score[1], "normalized": normalized[0], "normalized_ci": normalized[1],
        "success_rate": _mean([float(r["success"]) for r in cell]),
        "env_steps": _mean([r["env_steps"] for r in cell]),
        "wall_time_s": _mean([r["wall_time_s"] for r in cell]),
    }
