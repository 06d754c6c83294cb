"""DataSciCode-v0 end to end with the real local sandbox and the real tasks evaluator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import etpo_env
import tasks
from etpo_env import prompts
from etpo_env.env import DataSciCodeEnv
from etpo_env.program import extract_program
from etpo_env.spaces import MAX_ACTION_CHARS
from etpo_env.wrappers import EpisodeRecorder, NormalizeReward
from sandbox import Job, Limits

TASK = "breast_cancer"
HONEST = """from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)"""
WEAK = """from sklearn.tree import DecisionTreeClassifier
return DecisionTreeClassifier(max_depth=1, random_state=0).fit(X, y)"""
FAILING = "raise ValueError('bad hyperparameter 42')"


@pytest.fixture(scope="module")
def task():
    return tasks.get(TASK)


@pytest.fixture(scope="module")
def honest_score(task, local_sandbox):
    """The evaluator's own score for HONEST: the env must report exactly this."""
    from etpo_env.program import extract_program

    return tasks.evaluate(task, extract_program(HONEST), local_sandbox, part="dev", seed=0).score


def make_env(local_sandbox, task, **kwargs):
    return gym.make("DataSciCode-v0", task=task, sandbox=local_sandbox, **kwargs)


# ---------------------------------------------------------------- registration, defaults, lifecycle
def test_registered_after_import_with_defaults():
    assert etpo_env.ENV_ID in gym.registry
    env = gym.make("DataSciCode-v0")
    raw = env.unwrapped
    assert isinstance(raw, DataSciCodeEnv)
    assert raw.task.name == tasks.DEFAULT_TASK
    assert (raw.max_attempts, raw.mode, raw.reward_kind, raw.prompt_style) == (5, "fix", "metric", "paper")
    assert raw.config.sandbox == "auto"
    assert raw.sandbox is None  # nothing started before reset
    env.close()
    env.close()  # idempotent
    assert raw.sandbox is None


def test_module_prefixed_id_imports_the_package():
    code = (
        "import sys, gymnasium as gym\n"
        "assert 'etpo_env' not in sys.modules\n"
        "env = gym.make('etpo_env:DataSciCode-v0', task='breast_cancer')\n"
        "print(type(env.unwrapped).__name__, env.unwrapped.sandbox)\n"
        "env.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DataSciCodeEnv", "None"]


def test_bad_kwargs_are_rejected(local_sandbox, task):
    for kwargs in ({"mode": "solve"}, {"reward": "bleu"}, {"prompt_style": "fancy"}, {"max_attempts": 0},
                   {"render_mode": "human"}, {"input_format": "arrow"}):
        with pytest.raises(ValueError):
            DataSciCodeEnv(task=task, sandbox=local_sandbox, **kwargs)
    with pytest.raises(ValueError, match="limits"):
        DataSciCodeEnv(task=task, sandbox=local_sandbox, limits=Limits())


@pytest.mark.sandbox
def test_check_env_passes_without_skips():
    # names only, so check_env can re-make the env from its spec (which deep-copies the kwargs)
    env = gym.make("DataSciCode-v0", task=TASK, sandbox="local")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    gym_warnings = [str(w.message) for w in caught if "gymnasium" in w.filename or "env_checker" in str(w.message)]
    assert gym_warnings == []
    env.close()


@pytest.mark.sandbox
def test_env_owned_sandbox_starts_at_reset_and_closes(task):
    env = DataSciCodeEnv(task=task, sandbox="local")
    assert env.sandbox is None
    env.reset(seed=0)
    sandbox = env.sandbox
    assert sandbox is not None
    env.close()
    env.close()
    assert env.sandbox is None
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.run(Job(program="", folds=[]))  # closed by the env that created it


def test_shared_sandbox_is_not_closed_by_the_env(local_sandbox, task):
    env = DataSciCodeEnv(task=task, sandbox=local_sandbox)
    env.reset(seed=0)
    env.close()
    assert not local_sandbox._closed


# ---------------------------------------------------------------- scripted episodes
def test_fix_mode_episode_rewards_and_feedback(local_sandbox, task, honest_score):
    env = make_env(local_sandbox, task, mode="fix")
    obs, info = env.reset(seed=0)
    assert obs == prompts.initial_prompt(task, "paper")
    assert info["messages"][-1] == {"role": "user", "content": obs} and info["attempt"] == 0

    obs, reward, terminated, truncated, info = env.step(FAILING)
    assert (reward, terminated, truncated) == (-1.0, False, False)
    assert info["status"] == "runtime_error" and info["error_type"] == "ValueError"
    assert "bad hyperparameter 42" in info["message"]
    assert info["score"] is None and info["split_scores"] == [] and info["best_score"] is None
    assert info["program"].startswith("def build_model(X, y):") and FAILING in info["program"]
    assert info["isolation"] == "local" and info["attempt"] == 1
    # the feedback asks for a fix and carries the error and the failing code
    assert "Your previous code failed." in obs and "bad hyperparameter 42" in obs
    assert FAILING in obs and "Fix the error" in obs and "4 attempts left" in obs

    obs, reward, terminated, truncated, info = env.step(f"```python\n{HONEST}\n```")
    assert info["status"] == "ok" and terminated and not truncated  # fix mode ends at the first program that runs
    assert reward == pytest.approx(honest_score) and info["score"] == pytest.approx(honest_score)
    assert len(info["split_scores"]) == len(task.dev_splits(seed=0))
    assert info["best_score"] == info["score"] and info["best_program"] == info["program"]
    assert 0.9 < reward <= 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(HONEST)
    env.close()


def test_fix_mode_ends_when_attempts_run_out(local_sandbox, task):
    env = make_env(local_sandbox, task, max_attempts=2)
    env.reset(seed=0)
    results = [env.step(FAILING)[1:3] for _ in range(2)]
    assert results == [(-1.0, False), (-1.0, True)]
    env.close()


def test_refine_mode_improvement_reward(local_sandbox, task, honest_score):
    env = make_env(local_sandbox, task, mode="refine", reward="improvement", max_attempts=4)
    env.reset(seed=0)
    _, r_weak, term, _, info_weak = env.step(WEAK)
    weak = info_weak["score"]
    assert info_weak["status"] == "ok" and not term  # refine mode keeps going after a success
    floor = task.baseline_score if task.baseline_score is not None else 0.5
    assert r_weak == pytest.approx(max(weak - floor, 0.0))

    obs, r_fail, term, _, info = env.step(FAILING)
    assert r_fail == -1.0 and not term and info["best_score"] == weak
    assert "Your last program failed." in obs and "best program so far scored ROC AUC" in obs
    assert "max_depth=1" in obs  # the best program is shown for refinement

    obs, r_honest, term, _, info = env.step(HONEST)
    assert r_honest == pytest.approx(honest_score - weak) and honest_score > weak
    assert info["best_score"] == pytest.approx(honest_score) and not term
    assert f"ROC AUC {honest_score:.4f}" in obs and "Improve it" in obs

    _, r_again, term, _, _ = env.step(WEAK)  # no improvement over the best: zero, episode over by attempts
    assert r_again == 0.0 and term
    env.close()


def test_normalized_reward_uses_the_task_scale(local_sandbox, task, honest_score):
    if task.normalize(honest_score) is None:
        with pytest.raises(ValueError, match="normalized"):
            DataSciCodeEnv(task=task, sandbox=local_sandbox, reward="normalized")
        return
    env = make_env(local_sandbox, task, reward="normalized")
    env.reset(seed=0)
    _, reward, _, _, info = env.step(HONEST)
    assert reward == pytest.approx(task.normalize(honest_score))
    assert info["normalized_score"] == pytest.approx(reward)
    env.close()


def test_paper_preset_prompt_and_reward_rule(local_sandbox, task):
    env = make_env(local_sandbox, task)  # defaults: paper prompt, metric reward, fix mode, 5 attempts
    obs, _ = env.reset(seed=0)
    assert task.describe("paper") in obs
    assert not any(name in obs for name in task.feature_table()["name"])  # shape only: no column names
    assert obs.rstrip().endswith("def build_model(X, y):")
    rewards = [env.step(FAILING)[1] for _ in range(4)]
    _, last, terminated, _, _ = env.step("return None")  # a model-less return also fails
    assert rewards == [-1.0] * 4 and last == -1.0 and terminated
    env.close()


def test_rich_prompt_has_the_feature_table(local_sandbox, task):
    env = make_env(local_sandbox, task, prompt_style="rich")
    obs, _ = env.reset(seed=0)
    assert all(name in obs for name in task.feature_table()["name"])
    env.close()


# ---------------------------------------------------------------- bad actions and hostile programs
def test_bad_actions_are_failed_steps_not_runs(local_sandbox, task):
    env = make_env(local_sandbox, task, max_attempts=5)
    env.reset(seed=0)
    for action, words in [("", "empty"), ("\x00\x01binary", "non-text"), ("x" * (MAX_ACTION_CHARS + 1), "limit")]:
        obs, reward, terminated, _, info = env.step(action)
        assert (info["status"], reward, terminated) == ("invalid_action", -1.0, False)
        assert words in info["message"] and words in obs and info["program"] == ""
    with pytest.raises(TypeError, match="must be str"):
        env.step(b"return 1")
    assert env.unwrapped.attempt == 3  # the TypeError did not use an attempt
    env.close()


@pytest.fixture(scope="module")
def strict_env(task):
    """An env with its own sandbox and short limits, so hostile programs fail fast."""
    env = DataSciCodeEnv(task=task, sandbox="local", limits=Limits(wall_time_s=4.0, cpu_time_s=3), max_attempts=2)
    yield env
    env.close()


HOSTILE = {
    "busy_loop": ("while True:\n    pass", {"timeout"}),
    "sleep": ("import time\ntime.sleep(60)", {"timeout"}),
    "huge_allocation": ("block = bytearray(10**11)", {"memory_exceeded"}),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nwhile True:\n    pass",
                    {"runtime_error", "killed_by_signal"}),
    "exit": ("import os\nos._exit(0)", {"runtime_error"}),
    "stdout_flood": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
                     {"output_exceeded"}),
    "nan_model": ("class M:\n    def predict_proba(self, X):\n        return [[float('nan'), 1.0]] * len(X)\n"
                  "return M()", {"invalid_output"}),
    "recursion": ("def f(n):\n    return f(n + 1)\nreturn f(0)", {"runtime_error"}),
}


@pytest.mark.sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_a_failed_step_and_next_honest_step_scores(strict_env, name):
    body, statuses = HOSTILE[name]
    strict_env.reset(seed=0)
    obs, reward, terminated, _, info = strict_env.step(body)
    assert info["status"] in statuses, (info["status"], info["message"])
    assert reward == -1.0 and not terminated and info["message"]
    _, reward, terminated, _, info = strict_env.step(HONEST)
    assert info["status"] == "ok" and reward > 0.9 and terminated, info["message"]


@pytest.mark.sandbox
def test_hostile_program_cannot_touch_host_files(strict_env, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    body = (f"import os\nopen({str(victim)!r}, 'w').write('changed')\nos.remove({str(victim)!r})\n"
            f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\nraise RuntimeError('done')")
    strict_env.reset(seed=0)
    _, reward, _, _, info = strict_env.step(body)
    assert reward == -1.0 and info["status"] != "ok"
    assert victim.read_text() == "untouched" and sorted(os.listdir(tmp_path)) == ["victim.txt"]
    _, reward, _, _, info = strict_env.step(HONEST)
    assert info["status"] == "ok" and reward > 0.9


# ---------------------------------------------------------------- wrappers, rendering, vectorisation
def test_episode_recorder_writes_sft_ready_jsonl(local_sandbox, task, tmp_path, honest_score):
    path = tmp_path / "episodes.jsonl"
    env = EpisodeRecorder(make_env(local_sandbox, task), path)
    first_obs, _ = env.reset(seed=0)
    second_obs, *_ = env.step(FAILING)
    env.step(HONEST)
    env.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(rec["episode"], rec["t"]) for rec in lines] == [(0, 1), (0, 2)]
    assert lines[0]["prompt"] == first_obs and lines[1]["prompt"] == second_obs  # the prompt each action answered
    assert lines[1]["messages"][-1]["content"] == second_obs
    assert lines[0]["action"] == FAILING and lines[0]["reward"] == -1.0
    assert lines[0]["info"]["status"] == "runtime_error" and lines[1]["info"]["status"] == "ok"
    assert lines[1]["reward"] == pytest.approx(honest_score) and lines[1]["terminated"] is True
    assert HONEST.splitlines()[-1] in lines[1]["program"] and lines[1]["task"] == TASK


def test_normalize_reward_wrapper_scales_the_env_reward(local_sandbox, task):
    env = NormalizeReward(make_env(local_sandbox, task, max_attempts=2), gamma=0.9, epsilon=1e-8)
    env.reset(seed=0)
    _, reward, *_ = env.step(FAILING)
    # Gymnasium's running statistics start at mean 0, var 1, count 1e-4; one update with the return -1 gives
    # var = (1e-4 + 1e-4 / 1.0001) / 1.0001, and the reward -1 is divided by sqrt(var + eps).
    var = (1e-4 + 1e-4 / 1.0001) / 1.0001
    assert reward == pytest.approx(-1.0 / (var + 1e-8) ** 0.5)
    env.close()


def test_render_ansi_shows_program_and_result(local_sandbox, task):
    env = make_env(local_sandbox, task, render_mode="ansi")
    obs, _ = env.reset(seed=0)
    assert env.render() == obs
    env.step(FAILING)
    text = env.render()
    assert FAILING in text and "runtime_error" in text and "attempt 1/5" in text and "reward: -1.0000" in text
    env.close()


def test_record_timings_is_opt_in(local_sandbox, task):
    env = make_env(local_sandbox, task, record_timings=True)
    env.reset(seed=0)
    info = env.step(FAILING)[-1]
    assert info["duration_s"] > 0
    env.close()
    env = make_env(local_sandbox, task)
    env.reset(seed=0)
    assert "duration_s" not in env.step(FAILING)[-1]
    env.close()


@pytest.mark.parametrize("shared_memory", [True, False])
def test_make_vec_async_two_envs(honest_score, shared_memory):
    envs = gym.make_vec("DataSciCode-v0", num_envs=2, vectorization_mode="async", task=TASK, sandbox="local",
                        vector_kwargs={"shared_memory": shared_memory})
    try:
        obs, infos = envs.reset(seed=0)
        assert obs == (prompts.initial_prompt(tasks.get(TASK), "paper"),) * 2
        obs, rewards, terminated, truncated, infos = envs.step((HONEST, FAILING))
        assert rewards[0] == pytest.approx(honest_score) and rewards[1] == -1.0
        assert list(terminated) == [True, False] and not truncated.any()
        assert list(infos["status"]) == ["ok", "runtime_error"]
        assert isinstance(obs, tuple) and "bad hyperparameter 42" in obs[1] and "ROC AUC" in obs[0]
    finally:
        envs.close()


def test_pooled_vector_env_shares_a_sandbox(local_sandbox, honest_score):
    envs = gym.make_vec("DataSciCode-v0", num_envs=3, vectorization_mode="vector_entry_point", task=TASK,
                        sandbox=local_sandbox)
    try:
        envs.reset(seed=0)
        assert all(env.sandbox is local_sandbox for env in envs.unwrapped.envs)
        obs, rewards, terminated, _, infos = envs.step((HONEST, FAILING, HONEST))
        assert rewards == pytest.approx([honest_score, -1.0, honest_score])
        assert list(terminated) == [True, False, True]
        obs, rewards, *_ = envs.step((HONEST, HONEST, HONEST))  # next-step autoreset of envs 0 and 2
        assert rewards == pytest.approx([0.0, honest_score, 0.0])
    finally:
        envs.close()
    assert not local_sandbox._closed


class _MeteredSandbox:
    """A sandbox proxy that counts jobs, makes each last at least `delay` seconds and records how many overlap."""

    def __init__(self, inner, delay: float = 0.0):
        import threading

        self.inner, self.delay = inner, delay
        self.jobs: list[str] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def run(self, job):
        import time

        with self._lock:
            self.jobs.append(job.program)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            started = time.perf_counter()
            result = self.inner.run(job)
            time.sleep(max(0.0, self.delay - (time.perf_counter() - started)))
            return result
        finally:
            with self._lock:
                self.running -= 1

    def close(self):
        pass


def _fenced(body: str) -> str:
    return "def build_model(X, y):\n" + "\n".join("    " + line for line in body.splitlines()) + "\n"


def test_a_prefetched_step_runs_its_program_once_and_equals_a_plain_step(local_sandbox):
    metered = _MeteredSandbox(local_sandbox)
    plain_env, env = (DataSciCodeEnv(task=TASK, sandbox=metered, max_attempts=3, mode="refine") for _ in range(2))
    plain_env.reset(seed=0)
    env.reset(seed=0)
    plain = plain_env.step(_fenced(HONEST))
    metered.jobs.clear()
    env.prefetch(_fenced(HONEST))
    prefetched = env.step(_fenced(HONEST))
    assert len(metered.jobs) == 1  # the step took the prefetched run instead of running the program again
    assert prefetched[:4] == plain[:4] and prefetched[4]["split_scores"] == plain[4]["split_scores"]
    # a prefetch for another action is never used: the step runs its own program
    env.prefetch(_fenced(HONEST))
    info = env.step(_fenced(FAILING))[4]
    assert info["status"] == "runtime_error" and "bad hyperparameter 42" in info["message"]
    assert metered.jobs[-1] == extract_program(_fenced(FAILING))
    # prefetching a non-string is ignored (step is the one that refuses it)
    env.prefetch(None)
    with pytest.raises(TypeError):
        env.step(None)
    env.close()
    plain_env.close()


def test_a_reset_drops_the_run_prefetched_in_the_episode_before(local_sandbox):
    """With episode-seeded fits, a run begun before a reset scored other fits: the new episode never takes it."""
    resampled = tasks.get(TASK, split=tasks.SplitProtocol(n_splits=3, resample_fraction=0.8))
    env, fresh = (DataSciCodeEnv(task=resampled, sandbox=local_sandbox, split_seed=None) for _ in range(2))
    env.reset(seed=0)
    before = env.step(_fenced(HONEST))[4]["split_scores"]
    env.reset(seed=0)
    env.prefetch(_fenced(HONEST))
    env.reset(seed=1)
    fresh.reset(seed=1)
    expected = fresh.step(_fenced(HONEST))[4]["split_scores"]
    assert expected != before  # the two episodes score on different splits
    assert env.step(_fenced(HONEST))[4]["split_scores"] == expected
    env.close()
    fresh.close()


def test_prefetched_envs_run_their_programs_side_by_side(local_sandbox):
    metered = _MeteredSandbox(local_sandbox, delay=0.4)
    envs = [DataSciCodeEnv(task=TASK, sandbox=metered, max_attempts=1) for _ in range(4)]
    for env in envs:
        env.reset(seed=0)
    for env in envs:
        env.prefetch(_fenced(WEAK))
    results = [env.step(_fenced(WEAK)) for env in envs]
    assert all(r[4]["status"] == "ok" for r in results) and len(metered.jobs) == 4
    assert metered.most_running >= 2
    for env in envs:
        env.close()
