"""How the tiny code model (`agents.tiny`) writes programs: five-attempt episodes of `DataSciCode-v0` per task,
sampled in lockstep, with first-attempt validity, fix rate, episode success, distinct-program rate and mean
normalized score; `etpo model build-tiny` prints them (`summary_line` is its last line)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from agents.tiny import (
    BUILD_THREADS,
    EVAL_MAX_ROWS,
    GENERATION_TOKENS,
    no_library_progress_bars,
    sandbox_slots,
)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: five-attempt episodes (first-attempt validity, fix rate, success, diversity, score)
# ----------------------------------------------------------------------------------------------------------------
def evaluate_samples(model_dir: Any, task_names: list[str] | None = None, n_samples: int = 8,
                     seed: int = 0, sandbox: Any = "auto", temperature: float = 1.0,
                     max_new_tokens: int = GENERATION_TOKENS, max_attempts: int = 5, mode: str = "fix",
                     prompt_style: str = "paper", log: Any = None) -> list[dict]:
    """Run `n_samples` episodes of `DataSciCode-v0` per task (`max_attempts` attempts, fix mode by default) with the
    model sampling each action; every program is scored by the env through `tasks.evaluate` (the one evaluator).

    `model_dir` is a model directory (or hub name) or a live `LMPolicy` (e.g. a learner's `.policy` mid-training).
    Prompts are encoded as the learners do (`encode_observation`, tail kept to fit `max_prompt_tokens`).

    The episodes of all tasks run in lockstep, one batched generate call per attempt, sampled from a stream seeded
    by `seed` afresh on each call and with torch's thread count fixed (`BUILD_THREADS`): the same model, seed,
    task list and `n_samples` give the same figures (a different task list draws different samples). The programs
    of an attempt run side by side on the sandbox's slots.

    Per task: `validity` (first attempts that ran), `fix_rate` (attempts after a failed one that ran; None when no
    episode failed), `fix_attempts`/`fixes` (their counts), `episode_success` (episodes with a program that ran),
    `distinct` (distinct first-attempt programs), `mean_normalized_valid` (mean normalized score of the programs
    that ended successful episodes), `mean_normalized_all` (the same with a failed episode counted as 0),
    `best_normalized`.
    """
    import tasks
    from agents.lm import LMPolicy

    names = task_names or tasks.names(suite="bundled")
    if isinstance(model_dir, LMPolicy):
        policy = model_dir
    else:
        with no_library_progress_bars():
            policy = LMPolicy.from_pretrained(model_dir)
    own_sandbox = isinstance(sandbox, str)
    if own_sandbox:
        from sandbox import make_sandbox

        sandbox = make_sandbox(sandbox)
    try:
        episodes = sample_episodes(policy, [tasks.get(name, max_rows=EVAL_MAX_ROWS) for name in names], sandbox,
                                   n_samples, seed, temperature, max_new_tokens, max_attempts, mode, prompt_style,
                                   log)
    finally:
        if own_sandbox:
            sandbox.close()
    return [_episode_row(name, episodes[i * n_samples:(i + 1) * n_samples]) for i, name in enumerate(names)]


def sample_episodes(policy: Any, task_list: list[Any], sandbox: Any, n_samples: int = 8, seed: int = 0,
                    temperature: float = 1.0, max_new_tokens: int = GENERATION_TOKENS, max_attempts: int = 5,
                    mode: str = "fix", prompt_style: str = "paper", log: Any = None) -> list[list[dict]]:
    """`n_samples` episodes per task, task by task (see `evaluate_samples`); per episode, per attempt: status,
    program, normalized score."""
    import torch

    from agents.lm import GenerationSettings
    from etpo_env.env import DataSciCodeEnv

    say = log or (lambda msg: None)
    envs = [DataSciCodeEnv(task=task, sandbox=sandbox, max_attempts=max_attempts, mode=mode, prompt_style=prompt_style)
            for task in task_list for _ in range(n_samples)]
    gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    stream = torch.Generator(device=policy.device).manual_seed(seed)
    try:
        with _torch_threads(BUILD_THREADS), ThreadPoolExecutor(max_workers=sandbox_slots(sandbox)) as pool:
            steps = [env.reset(seed=seed) for env in envs]
            episodes: list[list[dict]] = [[] for _ in envs]
            active = list(range(len(envs)))
            attempt = 0
            while active:
                attempt += 1
                say(f"evaluation: attempt {attempt}/{max_attempts}, {len(active)} episodes")
                prompts = [policy.encode_observation(steps[i][0], steps[i][1],
                                                     max_length=policy.max_prompt_tokens(gen)) for i in active]
                outs = policy.generate(prompts, gen, generator=stream)
                results = list(pool.map(lambda i_out: envs[i_out[0]].step(i_out[1].text), zip(active, outs)))
                still = []
                for i, (obs, _, terminated, truncated, info) in zip(active, results):
                    steps[i] = (obs, info)
                    episodes[i].append({"status": info["status"], "program": info["program"],
                                        "normalized": info.get("normalized_score")})
                    if not (terminated or truncated):
                        still.append(i)
                active = still
    finally:
        for env in envs:
            env.close()
    return episodes


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside the block. One thread is also the fastest for a model this
    small: on a loaded machine extra threads wait for each other (a batch of generation took 8x longer with 2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _episode_row(name: str, episodes: list[list[dict]]) -> dict:
    n = len(episodes)
    later = [a for ep in episodes for a in ep[1:]]  # in fix mode every later attempt follows a failed one
    fixes = sum(a["status"] == "ok" for a in later)
    finals = [max((a["normalized"] for a in ep if a["status"] == "ok" and a["normalized"] is not None),
                  default=None) for ep in episodes]
    valid = [f for f in finals if f is not None]
    return {
        "task": name, "samples": n, "episodes": n,
        "validity": sum(ep[0]["status"] == "ok" for ep in episodes) / n,
        "fix_attempts": len(later), "fixes": fixes, "fix_rate": fixes / len(later) if later else None,
        "episode_success": sum(any(a["status"] == "ok" for a in ep) for ep in episodes) / n,
        "mean_attempts": sum(len(ep) for ep in episodes) / n,
        "distinct": len({ep[0]["program"] for ep in episodes}) / n,
        "mean_normalized_valid": sum(valid) / len(valid) if valid else None,
        "mean_normalized_all": sum(valid) / n,
        "best_normalized": max(valid, default=None),
    }


def summary(rows: list[dict]) -> dict:
    """Means over tasks of first-attempt validity and episode success; the fix rate pooled over all attempts made
    after a failure (0 when there were none)."""
    n = max(1, len(rows))
    attempts = sum(r.get("fix_attempts", 0) for r in rows)
    return {"validity": sum(r["validity"] for r in rows) / n,
            "fix_rate": sum(r.get("fixes", 0) for r in rows) / attempts if attempts else 0.0,
            "episode_success": sum(r.get("episode_success", r["validity"]) for r in rows) / n,
            "distinct": sum(r["distinct"] for r in rows) / n,
            "mean_normalized_all": sum(r["mean_normalized_all"] for r in rows) / n}


def summary_line(rows: list[dict]) -> str:
    """The last line `etpo model build-tiny` prints."""
    s = summary(rows)
    return (f"mean: first-attempt validity {s['validity']:.2f}, fix rate {s['fix_rate']:.2f}, "
            f"episode success {s['episode_success']:.2f}")
