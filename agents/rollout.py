"""Shared rollout machinery: one collector runs an `LMPolicy` against an env (or a gymnasium vector env) and fills a
buffer of token ids and per-token scalars. Every learner (ETPO, PPO, SFT's self-improving mode) uses it.

What a transition holds — ids and scalars only, never vocabulary-wide tensors (see `RolloutBuffer.bytes_per_token`):
the observation ids the policy conditioned on, the sampled action ids, log π at sampling and log ρ (reference) per
action token, the env reward (credited at the action's last token), episode boundaries (terminated / truncated,
episode id, step index, the buffer index of the episode's next transition), and named per-token arrays a learner
fills in before its update (log π_old, values, advantages, returns, ...).

Observation ids are produced once, from the env's text, by `policy.encode_observation` (left-truncated to fit the
context); action ids are the sampled ids themselves. Nothing inside a trajectory is re-tokenised from decoded text.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from agents.lm import GenerationSettings
from etpo_env.info import SUMMARY_KEYS, StepInfo
from etpo_env.vector import SiblingVectorEnv, vectorize


@dataclass
class Transition:
    obs_ids: np.ndarray  # int32[m]: the prompt the policy saw
    action_ids: np.ndarray  # int32[n]: the sampled tokens
    logp: np.ndarray  # float32[n]: log π(a_j | s, a_<j) at sampling time
    ref_logp: np.ndarray  # float32[n]: log ρ(a_j | s, a_<j), the reference policy
    reward: float  # env reward, credited at the action's last token
    terminated: bool
    truncated: bool
    episode_id: int
    t: int  # step index within the episode
    next_index: int | None = None  # buffer index of this episode's next transition
    next_obs_ids: np.ndarray | None = None  # int32: the next observation when the episode goes on outside the buffer
    info: dict[str, Any] = field(default_factory=dict)  # small scalars from the env (status, score, attempt)
    # Per action token, float32[n], filled in by a learner before its update (None until then):
    old_logp: np.ndarray | None = None  # log π_old at the sampling temperature, recomputed (PPO, GRPO)
    values: np.ndarray | None = None  # V(u_j), the value before each token (PPO)
    token_rewards: np.ndarray | None = None  # r_j = −β·KL, plus the env reward on the last token (PPO)
    advantages: np.ndarray | None = None  # the advantage each token is credited with (PPO, GRPO)
    returns: np.ndarray | None = None  # the value targets G_j (PPO)
    kl: np.ndarray | None = None  # exact whole-vocabulary KL(π_old‖ρ) (diagnostic)
    entropy: np.ndarray | None = None  # entropy of π_old (diagnostic)

    ANNOTATIONS: ClassVar[tuple[str, ...]] = ("old_logp", "values", "token_rewards", "advantages", "returns", "kl",
                                               "entropy")

    @property
    def n_tokens(self) -> int:
        return int(len(self.action_ids))

    def per_token(self, name: str) -> np.ndarray:
        """The per-token array `name` (`logp`, `ref_logp` or an annotation), which must have been filled in."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the transition has no {name!r}: the learner fills it in before its update")
        return value

    def without_annotations(self) -> Transition:
        """A copy as the collector made it (every learner annotation cleared)."""
        return dataclasses.replace(self, **dict.fromkeys(self.ANNOTATIONS))

    def nbytes(self) -> int:
        arrays = [self.obs_ids, self.action_ids, self.logp, self.ref_logp, self.next_obs_ids,
                  *(getattr(self, name) for name in self.ANNOTATIONS)]
        return int(sum(np.asarray(a).nbytes for a in arrays if a is not None))


def fill_per_token(transitions: Sequence[Transition], **arrays: np.ndarray) -> None:
    """Set per-token fields of `transitions` (an annotation or `ref_logp`) from one array per field that covers them
    all: padded [len(transitions), longest action] (row i, its first n_i entries) or flat over their action tokens
    in order. Each transition gets its own float32 copy."""
    lengths = [t.n_tokens for t in transitions]
    offsets = np.cumsum([0, *lengths])
    for name, array in arrays.items():
        if name not in (*Transition.ANNOTATIONS, "ref_logp"):
            raise ValueError(f"{name!r} is not a per-token field a learner fills in")
        for i, t in enumerate(transitions):
            row = array[i, : lengths[i]] if array.ndim == 2 else array[offsets[i]: offsets[i + 1]]
            setattr(t, name, row.astype(np.float32))


def episode_chains(transitions: Any) -> list[list[int]]:
    """Indices of `transitions` grouped by episode chain (following `next_index`), each in time order."""
    successors = {t.next_index for t in transitions if t.next_index is not None}
    chains = []
    for start in range(len(transitions)):
        if start in successors:
            continue
        chain, index = [], start
        while index is not None:
            chain.append(index)
            index = transitions[index].next_index
        chains.append(chain)
    return chains


class RolloutBuffer(list):
    """A list of `Transition`s in collection order, with helpers for token counts and minibatches."""

    def token_count(self) -> int:
        return sum(t.n_tokens for t in self)

    def bytes_per_token(self) -> float:
        """Bytes held per action token (ids + per-token scalars): a few dozen, independent of the vocabulary."""
        return sum(t.nbytes() for t in self) / max(self.token_count(), 1)

    def episodes(self) -> list[list[int]]:
        """Buffer indices grouped by episode chain (following next_index), each in time order."""
        return episode_chains(self)

    def minibatches(self, batch_size: int, shuffle: bool = True, seed: int | None = None,
                    rng: random.Random | None = None) -> Iterator[list[Transition]]:
        """Transitions in groups of `batch_size` (the last may be smaller), shuffled by `rng`/`seed`."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        order = list(range(len(self)))
        if shuffle:
            (rng or random.Random(seed)).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [self[i] for i in order[start:start + batch_size]]

    def rewards(self) -> np.ndarray:
        return np.array([t.reward for t in self], dtype=np.float64)


_INFO_KEYS = SUMMARY_KEYS  # the small scalars of `etpo_env.info.StepInfo` a transition keeps


def _small_info(info: StepInfo | dict) -> dict:
    return {k: info[k] for k in _INFO_KEYS if k in info and not isinstance(info[k], np.ndarray)}


def _sub_info(infos: dict, i: int) -> dict:
    """Env i's entries of a vector env's dict-of-arrays info (gymnasium marks presence with `_key`)."""
    out = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        present = infos.get("_" + key)
        if present is not None and not bool(present[i]):
            continue
        try:
            out[key] = value[i]
        except (TypeError, IndexError, KeyError):
            out[key] = value
    return out


@dataclass
class _Round:
    """The envs of one round with their prompts, sampled actions and (optionally) log ρ per action token."""

    active: list[int]
    prompts: dict[int, list[int]]
    generations: dict[int, Any]
    ref: dict[int, np.ndarray]

    @property
    def actions(self) -> dict[int, str]:
        return {i: self.generations[i].text for i in self.active}


@dataclass
class _Collection:
    """What one `collect` call accumulates: the buffer, episode links, counts and phase timers."""

    started: float
    buffer: RolloutBuffer = field(default_factory=RolloutBuffer)
    last_index: dict[int, int] = field(default_factory=dict)  # episode id -> buffer index of its latest transition
    gen_time: float = 0.0
    ref_time: float = 0.0
    env_time: float = 0.0
    tokens: int = 0
    episodes: int = 0
    returns: list[float] = field(default_factory=list)

    def timed(self, step: Any, actions: dict[int, str]) -> Any:
        """`step(actions)`, its wall time added to the sandbox phase."""
        tick = time.perf_counter()
        try:
            return step(actions)
        finally:
            self.env_time += time.perf_counter() - tick


class RolloutCollector:
    """Runs `policy` in `env` (a gymnasium Env or VectorEnv) and returns filled `RolloutBuffer`s.

    Episodes carry over between `collect` calls: a call that stops mid-episode resumes it next time (the same
    episode id; `next_obs_ids` of the buffer's last transition holds the observation to bootstrap from).

    The collector always steps a vector env. A single env becomes one the documented way,
    `etpo_env.vector.vectorize(env, num_envs)`: a `SiblingVectorEnv` of the env and `num_envs − 1` siblings under
    the same wrappers, whose stateful wrappers share their state (an `EnvStepBudget` counts every sub-env's steps
    against one budget, an `EpisodeRecorder` writes them to one file); a wrapper that cannot be replicated is an
    error that says what to do. Each round generates the actions of all sub-envs it steps in one batched call; the
    vector env runs their programs side by side and steps the sub-envs in index order, so the records stay
    deterministic. With a `SiblingVectorEnv`, a round steps only as many sub-envs as the `collect` call has steps
    left (the others get a `None` action), so a collection never takes more env steps than asked, and a finished
    episode's sub-env is reset only when it is next stepped, so no episode is begun that is not played. With
    `overlap`, its sub-envs form two halves that take turns, so one half's actions are generated while the other
    half's programs run (`_collect_overlapped`, through the vector env's `step_async`/`step_wait`): it pays where
    generation and the sandbox use different hardware (a GPU policy), not on a CPU they share.
    Any other vector env (`gym.make_vec`, `ThreadedVectorEnv`) is used as it is, under its own autoreset mode: every
    sub-env acts each round.
    """

    def __init__(self, policy: Any, env: Any, gen: Any = None, adapter: str | None = "policy",
                 compute_ref_logp: bool = True, seed: int | None = None, use_chat_template: bool | None = None,
                 num_envs: int = 1, overlap: bool = False):
        self.policy = policy
        self.env = env  # as handed over (a learner keeps one collector per env)
        self.vec = vectorize(env, max(1, int(num_envs)))
        self.owns_vec = self.vec is not env
        self.lazy = isinstance(self.vec, SiblingVectorEnv)  # resets on demand, steps some sub-envs per round
        self.gen = gen or GenerationSettings()
        self.adapter = adapter
        self.compute_ref_logp = compute_ref_logp
        self.use_chat_template = use_chat_template
        self.num_envs = int(self.vec.num_envs)
        self.overlap = overlap
        self._seed = seed
        self._obs: list[str] | None = None
        self._infos: list[dict] = []
        self._episode_ids: list[int] = []
        self._steps: list[int] = []
        self._next_episode = 0
        self._awaiting_autoreset = [False] * self.num_envs
        self._seeded = [False] * self.num_envs
        self._pending_reset: list[bool] = []  # sub-envs whose next episode begins when they are next stepped
        self.totals = {"env_steps": 0, "episodes": 0, "tokens": 0}

    # -- env plumbing --------------------------------------------------------------------------------------------
    def _reset_all(self) -> None:
        if self.lazy:  # sub-env 0 now (its siblings are made from it); the others when they first act
            self._obs, self._infos = [""] * self.num_envs, [{}] * self.num_envs
            self._episode_ids, self._steps = [-1] * self.num_envs, [0] * self.num_envs
            self._pending_reset = [True] * self.num_envs
            self._reset_some([0])
            return
        obs, info = self.vec.reset(seed=self._seed)
        self._obs = [str(o) for o in obs]
        self._infos = [_sub_info(info, i) for i in range(self.num_envs)]
        self._episode_ids = [self._new_episode() for _ in range(self.num_envs)]
        self._steps = [0] * self.num_envs

    def _reset_some(self, indices: list[int]) -> None:
        """Begin the next episode of sub-envs `indices`; a sub-env's first reset takes the collector's seed + i (as
        gymnasium's vector envs seed their sub-envs)."""
        seeds: list[int | None] = [None] * self.num_envs
        for i in indices:
            if not self._seeded[i]:
                self._seeded[i] = True
                seeds[i] = None if self._seed is None else self._seed + i
        mask = np.isin(np.arange(self.num_envs), indices)
        obs, infos = self.vec.reset(seed=seeds, options={"reset_mask": mask})
        for i in indices:
            self._obs[i], self._infos[i] = obs[i], _sub_info(infos, i)
            self._episode_ids[i], self._steps[i] = self._new_episode(), 0
            self._pending_reset[i] = False

    def close(self) -> None:
        """Close the vector env this collector made (its siblings; the env it was given stays its owner's)."""
        if self.owns_vec:
            self.vec.close()

    def _new_episode(self) -> int:
        self._next_episode += 1
        return self._next_episode - 1

    def _round_envs(self, steps_left: int, candidates: list[int] | None = None) -> list[int]:
        """The sub-envs that act this round: with autoreset, those not awaiting it; otherwise (or of
        `candidates`) as many as steps are left, in index order, each reset first if its last episode ended."""
        if not self.lazy:
            return [i for i in range(self.num_envs) if not self._awaiting_autoreset[i]]
        chosen = (list(range(self.num_envs)) if candidates is None else candidates)[:steps_left]
        pending = [i for i in chosen if self._pending_reset[i]]
        if pending:
            self._reset_some(pending)
        return chosen

    def _vector_actions(self, actions: dict[int, str]) -> tuple:
        """One action per sub-env: a `SiblingVectorEnv` leaves out (None) those not acting; another vector env
        steps all, "" for those awaiting autoreset (the action is ignored)."""
        absent = None if self.lazy else ""
        return tuple(actions.get(i, absent) for i in range(self.num_envs))

    def _results(self, step_result: tuple, stepped: list[int]) -> dict[int, tuple[str, float, bool, bool, dict]]:
        obs, rewards, terms, truncs, infos = step_result
        return {i: (str(obs[i]), float(rewards[i]), bool(terms[i]), bool(truncs[i]), _sub_info(infos, i))
                for i in stepped}

    def _step_env(self, actions: dict[int, str]) -> dict[int, tuple[str, float, bool, bool, dict]]:
        """Step the sub-envs named in `actions` (another vector env: all of them)."""
        stepped = list(actions) if self.lazy else list(range(self.num_envs))
        return self._results(self.vec.step(self._vector_actions(actions)), stepped)

    def _start_programs(self, actions: dict[int, str]) -> None:
        """Start the programs of the sub-envs named in `actions` (a `SiblingVectorEnv`'s `step_async`)."""
        self.vec.step_async(self._vector_actions(actions))

    def _finish_programs(self, actions: dict[int, str]) -> dict[int, tuple[str, float, bool, bool, dict]]:
        """Finish the oldest started step (`step_wait`): the sub-envs of `actions`, one after another."""
        return self._results(self.vec.step_wait(), list(actions))

    def _autoreset_mode(self) -> str:
        mode = getattr(self.vec, "metadata", {}).get("autoreset_mode")
        return str(getattr(mode, "value", mode) or "NextStep")

    # -- collection ------------------------------------------------------------------------------------------------
    def encode(self, obs: str, info: dict) -> list[int]:
        return self.policy.encode_observation(obs, info, max_length=self.policy.max_prompt_tokens(self.gen),
                                              use_chat_template=self.use_chat_template)

    def collect(self, n_env_steps: int) -> tuple[RolloutBuffer, dict[str, float]]:
        """Collect at least `n_env_steps` env steps (exactly that many from a single env and its siblings; a
        vector env steps all sub-envs together, so up to num_envs − 1 more). Returns the buffer and timing/reward
        statistics."""
        if n_env_steps < 1:
            raise ValueError("n_env_steps must be >= 1")
        if self._obs is None:
            self._reset_all()
        run = _Collection(started=time.perf_counter())
        if self._overlaps():
            self._collect_overlapped(n_env_steps, run)
        else:
            while len(run.buffer) < n_env_steps:
                batch = self._generate(self._round_envs(n_env_steps - len(run.buffer)), run)
                self._record(batch, run.timed(self._step_env, batch.actions), run)
        buffer = run.buffer
        # chains cut by the end of this collect: the env goes on, so give learners the state to bootstrap from
        for i in range(self.num_envs):
            if self._pending_reset and self._pending_reset[i]:
                continue  # its episode ended (or never began): nothing to bootstrap
            index = run.last_index.get(self._episode_ids[i])
            if index is not None and not (buffer[index].terminated or buffer[index].truncated):
                buffer[index].next_obs_ids = np.asarray(self.encode(self._obs[i], self._infos[i]), dtype=np.int32)
        elapsed = time.perf_counter() - run.started
        self.totals["env_steps"] += len(buffer)
        self.totals["episodes"] += run.episodes
        self.totals["tokens"] += run.tokens
        return buffer, self._stats(buffer, elapsed, run.gen_time, run.ref_time, run.env_time, run.tokens,
                                   run.episodes, run.returns)

    def _overlaps(self) -> bool:
        return bool(self.overlap) and self.lazy and self.num_envs >= 2

    def _collect_overlapped(self, n_env_steps: int, run: _Collection) -> None:
        """Two halves of the envs take turns: while one half's programs run on the sandbox, the other half's
        actions are generated and its programs started; then the first half is stepped (taking its results) and
        generates again. Envs are still stepped one after another in a fixed order, and a half starts only as
        many envs as steps are left after those already started."""
        half = self.num_envs // 2
        halves = [list(range(half)), list(range(half, self.num_envs))]
        started: list[_Round | None] = [None, None]
        turn = 0
        while len(run.buffer) < n_env_steps or any(started):
            batch = started[turn]
            if batch is not None:
                started[turn] = None
                self._record(batch, run.timed(self._finish_programs, batch.actions), run)
            left = n_env_steps - len(run.buffer) - sum(len(b.active) for b in started if b is not None)
            if left > 0:
                batch = self._generate(self._round_envs(left, halves[turn]), run)
                self._start_programs(batch.actions)
                started[turn] = batch
            turn = 1 - turn

    def _generate(self, active: list[int], run: _Collection) -> _Round:
        """The actions of envs `active`, generated as one batch (and their log ρ, when asked for)."""
        import torch

        prompts = {i: self.encode(self._obs[i], self._infos[i]) for i in active}
        tick = time.perf_counter()
        generations = dict(zip(active, self.policy.generate([prompts[i] for i in active], self.gen,
                                                            adapter=self.adapter)))
        run.gen_time += time.perf_counter() - tick
        run.tokens += sum(len(g.action_ids) for g in generations.values())
        tick = time.perf_counter()
        ref = {}
        if self.compute_ref_logp and active:
            with torch.no_grad():
                lps = self.policy.sequence_logprobs([prompts[i] for i in active],
                                                    [generations[i].action_ids for i in active], adapter=None)
            ref = {i: lp.float().cpu().numpy() for i, lp in zip(active, lps)}
        run.ref_time += time.perf_counter() - tick
        return _Round(active, prompts, generations, ref)

    def _record(self, batch: _Round, results: dict[int, tuple[str, float, bool, bool, dict]],
                run: _Collection) -> None:
        """Append the transitions of one stepped round to `run.buffer`, in env order."""
        buffer = run.buffer
        for i, (obs, reward, terminated, truncated, info) in results.items():
            if self._awaiting_autoreset[i]:  # this sub-env was reset by the step; the action was ignored
                self._awaiting_autoreset[i] = False
                self._obs[i], self._infos[i] = obs, info
                self._episode_ids[i], self._steps[i] = self._new_episode(), 0
                continue
            g = batch.generations[i]
            episode = self._episode_ids[i]
            transition = Transition(
                obs_ids=np.asarray(batch.prompts[i], dtype=np.int32),
                action_ids=np.asarray(g.action_ids, dtype=np.int32),
                logp=np.asarray(g.logp, dtype=np.float32),
                ref_logp=batch.ref.get(i, np.zeros(len(g.action_ids), np.float32)).astype(np.float32),
                reward=float(reward), terminated=bool(terminated), truncated=bool(truncated),
                episode_id=episode, t=self._steps[i], info=_small_info(info),
            )
            if episode in run.last_index:
                buffer[run.last_index[episode]].next_index = len(buffer)
            run.last_index[episode] = len(buffer)
            buffer.append(transition)
            self._steps[i] += 1
            if terminated or truncated:
                run.episodes += 1
                run.returns.append(self._episode_return(buffer, episode))
                if truncated:
                    transition.next_obs_ids = np.asarray(self.encode(*self._final_obs(obs, info)), dtype=np.int32)
                self._begin_next_episode(i, obs, info)
            else:
                self._obs[i], self._infos[i] = obs, info

    def _final_obs(self, obs: str, info: dict) -> tuple[str, dict]:
        if not self.lazy and self._autoreset_mode().lower().startswith("same") and "final_obs" in info:
            return str(info["final_obs"]), dict(info.get("final_info") or {})
        return obs, info

    def _begin_next_episode(self, i: int, obs: str, info: dict) -> None:
        if self.lazy:
            self._pending_reset[i] = True  # reset when next stepped: no episode is begun that is not played
        elif self._autoreset_mode().lower().startswith("same"):
            self._obs[i], self._infos[i] = obs, info  # already the next episode's first observation
            self._episode_ids[i], self._steps[i] = self._new_episode(), 0
        else:  # NextStep autoreset: the next vector step resets this sub-env and ignores its action
            self._awaiting_autoreset[i] = True

    @staticmethod
    def _episode_return(buffer: RolloutBuffer, episode: int) -> float:
        return float(sum(t.reward for t in buffer if t.episode_id == episode))

    @staticmethod
    def _stats(buffer: RolloutBuffer, elapsed: float, gen_time: float, ref_time: float, env_time: float,
               gen_tokens: int, episodes: int, returns: list[float]) -> dict[str, float]:
        rewards = buffer.rewards()
        statuses = [t.info.get("status") for t in buffer]
        scores = [t.info["score"] for t in buffer if t.info.get("score") is not None]
        stats = {
            "env_steps": float(len(buffer)),
            "episodes": float(episodes),
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "reward_max": float(rewards.max()) if len(rewards) else 0.0,
            "valid_rate": float(np.mean([s == "ok" for s in statuses])) if statuses else 0.0,
            "generated_tokens": float(gen_tokens),
            "time_generation_s": gen_time,
            "time_reference_s": ref_time,
            "time_sandbox_s": env_time,
            "time_collect_s": elapsed,
            "tokens_per_s": gen_tokens / gen_time if gen_time > 0 else 0.0,
            "env_steps_per_s": len(buffer) / elapsed if elapsed > 0 else 0.0,
            "buffer_bytes_per_token": buffer.bytes_per_token(),
        }
        if returns:
            stats["episode_return_mean"] = float(np.mean(returns))
        if scores:
            stats["score_max"] = float(max(scores))
            stats["score_mean"] = float(np.mean(scores))
        return stats
