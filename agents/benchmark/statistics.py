"""Statistics of a benchmark (pure functions).

- `run_metrics`: one cell's evaluation curve and its summary numbers (final, step-0, area under the curve, success
  rate, attempts to success, search score), and the same final / step-0 / gain / area for the measures where
  learning shows first (`LEARNING_METRICS`: first-attempt validity, episode return, attempts to the first program
  that ran);
- `mean_ci`: means with Student-t 95% intervals, per task (over seeds) and overall (per seed the mean over tasks);
  `paired` differences (final minus step 0) use the same interval over seeds;
- aggregates over tasks and seeds: IQM and mean (`rliable.metrics`) with stratified-bootstrap percentile intervals
  (runs resampled within each task, as `rliable.library.get_interval_estimates`), the probability of improvement,
  and performance profiles. The bootstrap is written here with a seeded numpy generator because
  `rliable.library` needs `arch`, whose releases compatible with `rliable` do not import under pandas 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# An episode whose final program failed (or where nothing ran) counts as a constant predictor: ROC AUC 0.5. Means
# then reflect both quality and reliability; the success rate is reported beside them.
CHANCE_SCORE = 0.5
BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0
REFERENCE_AGENT = "etpo"  # the agent whose probability of improvement over each other agent is reported
# The primary metric is the normalized test score of each evaluation episode's final program: what a user of the
# agent gets, on rows no reward ever scored. Beside it, where a learner's change shows first (a policy must first
# write programs that run before their scores can rise), each with its final, step-0, gain and area:
LEARNING_METRICS = {  # prefix -> evaluation-point key
    "validity": "first_attempt_validity",  # share of episodes whose first program ran
    "return": "episode_return",  # the env's reward summed over the episode (what the learners maximise)
    "attempts": "attempts_to_first_run",  # attempts until the first program that ran (episodes where one did)
}
LEARNING_LABELS = {"validity": "first-attempt validity", "return": "episode return",
                   "attempts": "attempts to the first program that ran"}
CURVE_KEYS = ("score", "normalized", "success_rate", "attempts_to_success", *LEARNING_METRICS.values())
PER_RUN = ("final", "step0", "auc", "gain", "search", "success_rate", "attempts_to_success",
           *(f"{prefix}_{part}" for prefix in LEARNING_METRICS for part in ("final", "step0", "gain", "auc")))
SCALED = ("final", "step0", "gain", "auc", "search")  # normalized, with a raw `<key>_score` twin
SCALE_LABELS = {"normalized": "normalized test score", "score": "test score"}


def scale_of(runs: Iterable[Mapping[str, Any]]) -> str:
    """"normalized" when every run has normalized scores (every task has stored reference scores for its rows),
    else "score": one scale for the whole benchmark, never a mix of the two."""
    runs = list(runs)
    return "normalized" if runs and all(r.get("final") is not None for r in runs) else "score"


def metric(run: Mapping[str, Any], key: str, scale: str) -> Any:
    """A run's `key` on `scale` (the raw `<key>_score` twin for scale "score")."""
    return run[f"{key}_score"] if scale == "score" and key in SCALED else run.get(key)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided `confidence` interval of the mean, Student t with n-1 dof.

    One value has no spread estimate: the half-width is NaN (printed as "n/a"), never a made-up zero.
    """
    from scipy import stats

    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
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


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------
def eval_points(budget: int, every: int) -> list[int]:
    return sorted({*range(0, budget, every), budget})


def run_metrics(record: Mapping[str, Any], missing: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation curve over every point of the schedule and the run's summary numbers.

    A point not measured is filled: by the last measurement when the agent could not change any more (it does not
    learn, or its learning stopped at the budget), by `missing` (nothing ran) when the run failed before it.
    Scores are normalized test scores where the task has reference scores (`normalized`), else None; the `_score`
    twins are the raw test metric.
    """
    measured = {p["point"]: p for p in record["evaluations"]}
    keys = CURVE_KEYS
    curve, last = [], None
    for point in eval_points(record["budget"], record["eval_every"]):
        if point in measured:
            last = measured[point]
            curve.append({"point": point, "measured": True, **{k: last.get(k) for k in keys}})
        elif last is not None and not record.get("error"):
            curve.append({"point": point, "measured": False, **{k: last.get(k) for k in keys}})
        else:
            curve.append({"point": point, "measured": False, **{k: missing.get(k) for k in keys}})
    first, final = curve[0], curve[-1]
    search = record["search_result"]
    return {
        "curve": curve,
        "final": final["normalized"], "final_score": final["score"],
        "step0": first["normalized"], "step0_score": first["score"],
        "gain": None if final["normalized"] is None else final["normalized"] - first["normalized"],
        "gain_score": final["score"] - first["score"],
        "auc": _mean_or_none([p["normalized"] for p in curve]), "auc_score": _mean([p["score"] for p in curve]),
        "success_rate": final["success_rate"], "attempts_to_success": final["attempts_to_success"],
        "search": search["normalized"], "search_score": search["score"],
        **{name: value for prefix, key in LEARNING_METRICS.items()
           for name, value in _learning_summary(prefix, [p[key] for p in curve]).items()},
    }


def _learning_summary(prefix: str, values: list[float | None]) -> dict[str, float | None]:
    """final, step-0, gain (final − step 0) and area (mean over the points) of one curve; None where unmeasured."""
    first, final = values[0], values[-1]
    return {f"{prefix}_final": final, f"{prefix}_step0": first,
            f"{prefix}_gain": None if first is None or final is None else final - first,
            f"{prefix}_auc": _mean_or_none(values)}


# ----------------------------------------------------------------------------------------------------------------
# Per task and overall: mean ± t-interval over seeds
# ----------------------------------------------------------------------------------------------------------------
def summarize(runs: Iterable[dict[str, Any]], agents: Sequence[str], tasks: Sequence[str],
              reference: str = REFERENCE_AGENT, reps: int = BOOTSTRAP_REPS,
              seed: int = BOOTSTRAP_SEED, groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Rows per (task, agent); overall per agent (per seed the mean over tasks, then the CI over seeds); the
    bootstrap aggregates over tasks and seeds; the probability that `reference` beats each other agent. With
    `groups` (name -> tasks, e.g. the suites the tasks come from) of which at least two have runs, also
    `by_group`: the same comparison of `final` within each group (`group_summary`)."""
    runs = list(runs)
    scale = scale_of(runs)
    per_task = [_row(cell, scale, task=task, agent=agent) for task in tasks for agent in agents
                if (cell := [r for r in runs if r["task"] == task and r["agent"] == agent])]
    overall = [row for agent in agents if (row := _overall_row(runs, agent, tasks, scale)) is not None]
    matrices = score_matrices(runs, agents, tasks, "final", scale)
    return {
        "scale": scale,
        "per_task": per_task,
        "overall": overall,
        "aggregates": {key: aggregate_estimates(score_matrices(runs, agents, tasks, key, scale), reps=reps,
                                                seed=seed) for key in AGGREGATED},
        "probability_of_improvement": probability_of_improvement_estimates(matrices, reference, reps=reps,
                                                                           seed=seed),
        "probability_of_improvement_by_metric": {
            key: probability_of_improvement_estimates(score_matrices(runs, agents, tasks, key, scale), reference,
                                                      reps=reps, seed=seed)
            for key in AGGREGATED if key != "final"},
        "task_shares": task_share_estimates(matrices, score_matrices(runs, agents, tasks, "gain", scale), reference,
                                            reps=reps, seed=seed),
        "aggregate_tasks": _matrix_tasks(runs, agents, tasks),
        "by_group": _by_group(runs, agents, groups or {}, scale, reference, reps, seed),
    }


def group_summary(runs: list[dict], agents: Sequence[str], tasks: Sequence[str], scale: str = "normalized",
                  reference: str = REFERENCE_AGENT, reps: int = BOOTSTRAP_REPS,
                  seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Who beats whom on `final` within a set of tasks (one suite): the aggregates of the final score and of its
    gain over step 0, the probability that `reference` beats each agent, and the task shares. Suites differ in
    headroom (the bundled tasks are near their reference at step 0, the hard ones are not), so a ranking pooled over
    both can hide one that holds in each, or the reverse."""
    finals = score_matrices(runs, agents, tasks, "final", scale)
    gains = score_matrices(runs, agents, tasks, "gain", scale)
    return {
        "tasks": _matrix_tasks(runs, agents, tasks),
        "final": aggregate_estimates(finals, reps=reps, seed=seed),
        "gain": aggregate_estimates(gains, reps=reps, seed=seed),
        "probability_of_improvement": probability_of_improvement_estimates(finals, reference, reps=reps, seed=seed),
        "task_shares": task_share_estimates(finals, gains, reference, reps=reps, seed=seed),
    }


def _by_group(runs: list[dict], agents: Sequence[str], groups: Mapping[str, Sequence[str]], scale: str,
              reference: str, reps: int, seed: int) -> dict[str, dict[str, Any]]:
    """`group_summary` of each group with aggregates, when at least two have them (one group is the whole table:
    a benchmark on one suite bootstraps nothing here)."""
    candidates = {name: tasks for name, tasks in groups.items() if _matrix_tasks(runs, agents, tasks)}
    if len(candidates) < 2:
        return {}
    found = {name: group for name, tasks in candidates.items()
             if (group := group_summary(runs, agents, tasks, scale, reference, reps, seed))["final"]}
    return found if len(found) >= 2 else {}


# Run metrics aggregated over tasks and seeds (IQM, mean, probability of improvement): the primary final score and
# its area, and the final and gain of each learning metric.
AGGREGATED = ("final", "auc", "validity_final", "validity_gain", "return_final", "return_gain")


def _row(cell: list[dict], scale: str, *, task: str, agent: str) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "agent": agent, "n": len(cell)}
    for key in PER_RUN:
        row[key], row[f"{key}_ci"] = mean_ci([v for r in cell if (v := metric(r, key, scale)) is not None])
    row["final_score"], row["final_score_ci"] = mean_ci([r["final_score"] for r in cell])
    row["env_steps"] = _mean([r["env_steps"] for r in cell])
    row["wall_time_s"] = _mean([r["wall_time_s"] for r in cell])
    return row


def _overall_row(runs: list[dict], agent: str, tasks: Sequence[str], scale: str) -> dict[str, Any] | None:
    """Per seed, the mean over tasks (only seeds with every task, so each value averages the same tasks)."""
    by_seed = _complete_seeds([r for r in runs if r["agent"] == agent and r["task"] in tasks], tasks)
    if not by_seed:
        return None
    row: dict[str, Any] = {"task": "overall", "agent": agent, "n": len(by_seed)}
    for key in (*PER_RUN, "final_score"):
        per_seed = [_mean_or_none([metric(r, key, scale) for r in rs]) for rs in by_seed.values()]
        row[key], row[f"{key}_ci"] = mean_ci([v for v in per_seed if v is not None])
    row["env_steps"] = _mean([sum(r["env_steps"] for r in rs) for rs in by_seed.values()])
    row["wall_time_s"] = _mean([sum(r["wall_time_s"] for r in rs) for rs in by_seed.values()])
    return row


def _complete_seeds(runs: list[dict], tasks: Sequence[str]) -> dict[int, list[dict]]:
    by_seed: dict[int, list[dict]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        by_seed.setdefault(run["seed"], []).append(run)
    return {s: rs for s, rs in by_seed.items() if {r["task"] for r in rs} >= set(tasks)}


# ----------------------------------------------------------------------------------------------------------------
# Aggregates over tasks and seeds (rliable's estimators, stratified bootstrap)
# ----------------------------------------------------------------------------------------------------------------
def _matrix_tasks(runs: list[dict], agents: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """Tasks every agent has runs on."""
    return [t for t in tasks if all(any(r["task"] == t and r["agent"] == a for r in runs) for a in agents)]


def score_matrices(runs: list[dict], agents: Sequence[str], tasks: Sequence[str], key: str,
                   scale: str = "normalized") -> dict[str, np.ndarray]:
    """agent -> (seeds × tasks) array of `key` on `scale`, over the tasks every agent ran and the seeds every agent
    ran on all of them (rliable's layout: one row per run, one column per task)."""
    used = _matrix_tasks(runs, agents, tasks)
    if not used:
        return {}
    seed_sets = [set(_complete_seeds([r for r in runs if r["agent"] == a and r["task"] in used], used))
                 for a in agents]
    seeds = sorted(set.intersection(*seed_sets)) if seed_sets else []
    if not seeds:
        return {}
    cell = {(r["agent"], r["task"], r["seed"]): metric(r, key, scale) for r in runs}
    if any(cell[(a, t, s)] is None for a in agents for t in used for s in seeds):
        return {}  # no normalized scores on some task: aggregate on scale "score"
    return {a: np.array([[cell[(a, t, s)] for t in used] for s in seeds], dtype=float) for a in agents}


def stratified_bootstrap(matrix: np.ndarray, statistic: Callable[[np.ndarray], float], reps: int,
                         rng: np.random.Generator) -> np.ndarray:
    """`statistic` of `reps` resamples of a (runs × tasks) matrix, runs drawn with replacement within each task."""
    runs, tasks = matrix.shape
    rows = rng.integers(0, runs, size=(reps, runs, tasks))
    return np.array([statistic(matrix[r, np.arange(tasks)]) for r in rows])


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    low, high = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def aggregate_estimates(matrices: Mapping[str, np.ndarray], reps: int = BOOTSTRAP_REPS,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, Any]]:
    """agent -> {"iqm": (value, low, high), "mean": ..., "n_runs", "n_tasks"}: interquartile mean and mean over all
    runs and tasks with 95% stratified-bootstrap percentile intervals (every agent resampled with the same seed)."""
    from rliable import metrics

    estimators = {"iqm": metrics.aggregate_iqm, "mean": metrics.aggregate_mean}
    found: dict[str, dict[str, Any]] = {}
    for agent, matrix in matrices.items():
        row: dict[str, Any] = {"n_runs": int(matrix.shape[0]), "n_tasks": int(matrix.shape[1])}
        for name, estimator in estimators.items():
            samples = stratified_bootstrap(matrix, estimator, reps, np.random.default_rng(seed))
            row[name] = (float(estimator(matrix)), *percentile_interval(samples))
        found[agent] = row
    return found


def probability_of_improvement_estimates(matrices: Mapping[str, np.ndarray], reference: str,
                                         reps: int = BOOTSTRAP_REPS,
                                         seed: int = BOOTSTRAP_SEED) -> dict[str, tuple[float, float, float]]:
    """other agent -> P(reference > other) (rliable: Mann-Whitney per task, averaged over tasks) with a 95% interval
    from resampling both agents' runs independently within each task (each resample scored by `pairwise_improvement`,
    the same statistic)."""
    from rliable import metrics

    if reference not in matrices:
        return {}
    mine = matrices[reference]
    found = {}
    for other, theirs in matrices.items():
        if other == reference:
            continue
        rng = np.random.default_rng(seed)
        samples = [pairwise_improvement(_resample(mine, rng), _resample(theirs, rng)) for _ in range(reps)]
        found[other] = (float(metrics.probability_of_improvement(mine, theirs)),
                        *percentile_interval(np.array(samples)))
    return found


def pairwise_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """rliable's probability of improvement of X over Y, P(X > Y): per task (column) the share of (run of x, run of
    y) pairs where x is higher, a tie counting ½ (the Mann-Whitney U over n·m), averaged over tasks.

    Written out because the bootstrap needs it thousands of times: `rliable.metrics.probability_of_improvement` calls
    `scipy.stats.mannwhitneyu` once per task (about 1.5 ms each, mostly argument checking), which made
    P(etpo > agent) for every metric take most of a 20-task report's ten minutes. The point estimate still comes
    from rliable; a test checks that the two agree, ties included."""
    diff = x[:, None, :] - y[None, :, :]  # [runs of x, runs of y, tasks]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean(axis=(0, 1)).mean())


def task_share_estimates(finals: Mapping[str, np.ndarray], gains: Mapping[str, np.ndarray], reference: str,
                         reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> dict[str, tuple[float, float, float]]:
    """The paper's form of claim ("improved performance on 70% of tasks") as shares of tasks, each with a 95%
    interval from resampling every agent's runs within each task (the tasks are the suite, fixed; the seeds vary):
    "step 0" -> the share of tasks where `reference`'s mean gain (final − step 0) is above 0; each other agent -> the
    share of tasks where `reference`'s mean final is above that agent's. A tie counts ½."""
    if reference not in finals or reference not in gains:
        return {}
    found = {}
    comparisons = {"step 0": (gains[reference], None),
                   **{other: (finals[reference], theirs) for other, theirs in finals.items() if other != reference}}
    for name, (mine, theirs) in comparisons.items():
        rng = np.random.default_rng(seed)
        samples = [_share_above(_resample(mine, rng), None if theirs is None else _resample(theirs, rng))
                   for _ in range(reps)]
        found[name] = (_share_above(mine, theirs), *percentile_interval(np.array(samples)))
    return found


def _share_above(mine: np.ndarray, theirs: np.ndarray | None) -> float:
    """The share of tasks (columns) where the mean over runs of `mine` is above that of `theirs` (above 0 for None);
    a tie counts ½."""
    a = mine.mean(0)
    b = np.zeros_like(a) if theirs is None else theirs.mean(0)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def _resample(matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    runs, tasks = matrix.shape
    return matrix[rng.integers(0, runs, size=(runs, tasks)), np.arange(tasks)]


def performance_profile(matrices: Mapping[str, np.ndarray], taus: np.ndarray, reps: int = BOOTSTRAP_REPS,
                        seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, np.ndarray]]:
    """agent -> {"profile", "low", "high"}: the share of (run, task) scores above each τ (rliable's score
    distribution) with a 95% stratified-bootstrap band."""
    found = {}
    for agent, matrix in matrices.items():
        def profile(m: np.ndarray) -> np.ndarray:
            return (m.reshape(-1, 1) > taus.reshape(1, -1)).mean(axis=0)

        samples = stratified_bootstrap(matrix, profile, reps, np.random.default_rng(seed))
        low, high = np.percentile(samples, [2.5, 97.5], axis=0)
        found[agent] = {"profile": profile(matrix), "low": low, "high": high}
    return found


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean, or None where any value is missing (a task without reference scores has no normalized value)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)
