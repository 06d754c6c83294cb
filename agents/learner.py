"""The one learner shell (as Stable-Baselines3's base algorithm): everything ETPO, PPO and SFT share, so each of their
modules holds only its algorithm.

    class MyLearner(Learner):
        config_class = MyConfig                     # a dataclass with seed, device, rollout_steps, generation, ...

        def adapters(self) -> dict: ...             # the LoRA adapters of the policy, and the reference
        def setup(self) -> None: ...                # optimisers, heads: state made fresh or restored by `load`
        def train(self, buffer) -> dict: ...        # one update on a rollout buffer; returns diagnostics
        def state_dict(self) -> dict: ...           # learner-specific state for checkpoints (and load_state_dict)

What the shell owns:
- construction: config (a `config_class` instance, keyword overrides allowed), model path (`"tiny"` = the offline
  tiny model), device, seeding, the `LMPolicy` with the learner's adapters;
- one set of counters: `updates`, `env_steps`, `tokens`, `episodes` (over the learner's life, across resumes);
- `learn(env, budget, callbacks, out_dir)`: until `budget` env steps in total, `collect` `rollout_steps` env steps
  with the shared `RolloutCollector`, then `train(buffer)`; handed a single env, the collector steps the config's
  `num_envs` envs at once (the env and siblings spawned from it, its wrappers shared: a budget wrapper still
  counts every step, exactly) and generates each round's actions in one batched call; logs every update (console, progress bar, TensorBoard,
  metrics.jsonl through `RunLogger`), runs callbacks (one returning `False` stops training), checkpoints on the
  config's `checkpoints` schedule (every `checkpoint_every` updates and/or `checkpoint_minutes`, always at the end),
  keeping the latest `keep_checkpoints`;
- `save`/`load`: atomic (written beside, then swapped in), with a format check, the config, the policy's adapters,
  the learner's state and every RNG (Python, numpy, torch CPU and CUDA); `load` + `learn` resumes exactly.
- `reset`/`act`: sampling from the policy with the config's `generation` settings.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from agents.config import load_config, replace_directory, save_config, with_fields
from agents.lm import (
    GenerationSettings,
    LMPolicy,
    RuntimeSettings,
    default_lora_config,
    kl_divergence,
    load_options,
    overlaps_generation,
    tempered,
    token_logprobs,
)
from agents.logging import RunLogger
from agents.rollout import RolloutCollector
from agents.tiny import resolve_model

# A callback receives each update's statistics; returning False stops training after that update.
Callback = Callable[[dict[str, float]], Any]

CHECKPOINT_FORMAT = 2  # bump when the checkpoint layout changes; `load` refuses other formats
COUNTERS = ("updates", "env_steps", "tokens", "episodes")
LATEST = "checkpoint"  # <out_dir>/checkpoint is the latest checkpoint; older kept ones are checkpoint-<updates>


@dataclass
class CheckpointSettings:
    """When `learn` with an output directory writes checkpoints and how many it keeps (the `checkpoints` section
    of every learner config). The defaults suit large models, whose checkpoint (adapters, critic or value head,
    EMA target, both optimisers' moments) is large and slow to write: by time, not after every update."""

    checkpoint_every: int = field(default=0, metadata={
        "help": "Checkpoint every N updates (SFT: rounds); 0 = by time only. Always at the end of `learn`."})
    checkpoint_minutes: float = field(default=30.0, metadata={
        "help": "Also checkpoint when this many minutes have passed since the last checkpoint (0 = never by time)."})
    keep_checkpoints: int = field(default=1, metadata={
        "help": "Checkpoints kept: the latest in <out>/checkpoint, the ones before it as <out>/checkpoint-<updates> "
                "(1 = the latest only; older ones beyond the count are deleted)."})

    def __post_init__(self):
        if self.checkpoint_every < 0 or self.checkpoint_minutes < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"checkpoint_every and checkpoint_minutes must be >= 0 and keep_checkpoints >= 1; got "
                             f"{self.checkpoint_every}, {self.checkpoint_minutes}, {self.keep_checkpoints}")

    def due(self, updates: int, seconds_since_last: float) -> bool:
        """Whether a checkpoint is due after update number `updates` (the end of `learn` always writes one)."""
        by_count = self.checkpoint_every > 0 and updates % self.checkpoint_every == 0
        return by_count or 0 < self.checkpoint_minutes * 60 <= seconds_since_last


NUM_ENVS_HELP = ("Envs collected from at once when handed a single env: etpo_env.vector.vectorize makes them, the env "
                 "and siblings under its wrappers (its config and sandbox; a budget wrapper counts every step, "
                 "exactly); their actions are generated in one batched call and their programs run side by side on "
                 "the sandbox's slots. 1 = the env alone; a vector env is used as it is; a wrapper that cannot be "
                 "replicated is an error that says what to do. Generation time per call hardly grows with its rows "
                 "on a small model, so rows are nearly free tokens.")  # LearnerConfig.num_envs


@dataclass
class LearnerConfig:
    """The fields every learner's config shares; each algorithm's config extends it with only its own (as TRL's
    configs extend one base). The shell reads these by name: the adapters' shape, the model's runtime, the chunk of
    the whole-vocabulary reductions, the seed and the checkpoint schedule; the collector reads the rollout, the envs
    and the generation settings."""

    rollout_steps: int = field(default=16, metadata={"help": "Env steps (sandboxed programs) collected per update."})
    num_envs: int = field(default=16, metadata={"help": NUM_ENVS_HELP})
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={
        "help": "How actions are sampled (in training and when acting)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the learner's adapters (policy; critic or value "
                                                     "adapter where the learner has one)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata={
        "help": "Device, dtype, attention kernel, quantisation, gradient checkpointing."})
    chunk_size: int = field(default=256, metadata={"help": "Token states per whole-vocabulary chunk."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, minibatch order, adapter init and env resets."})
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings, metadata={
        "help": "When checkpoints are written (updates, minutes; always at the end) and how many are kept."})

    def __post_init__(self) -> None:
        """Every field typed `Literal[...]` holds one of its choices; subclasses call this, then check the rest."""
        for name, hint in typing.get_type_hints(type(self)).items():
            if typing.get_origin(hint) is Literal and getattr(self, name) not in typing.get_args(hint):
                raise ValueError(f"{name} must be one of {typing.get_args(hint)}, got {getattr(self, name)!r}")

    def require_at_least_one(self, *names: str) -> None:
        """ValueError naming the fields when any of these counts is below 1."""
        low = [name for name in names if getattr(self, name) < 1]
        if low:
            raise ValueError(f"{', '.join(low)} must be at least 1")


def check_sampled_generation(gen: Any, learner: str) -> None:
    """Refuse sampling settings a learner that trains the distribution it samples cannot reproduce: greedy decoding
    (temperature 0) and top-k/top-p filters (its update scores tokens under softmax(logits/T) over the whole
    vocabulary, so filtered samples would be off-policy)."""
    if not isinstance(gen, GenerationSettings):
        return
    if not gen.temperature > 0:
        raise ValueError(f"{learner} needs generation.temperature > 0 (got {gen.temperature}): it trains the "
                         "distribution it samples from, and greedy decoding is not one")
    if gen.top_k or gen.top_p < 1.0:
        raise ValueError(f"{learner} does not support top_k/top_p sampling (got top_k={gen.top_k}, top_p={gen.top_p}):"
                         " its update scores tokens under softmax(logits/temperature) over the whole vocabulary, so "
                         "filtered samples would make it off-policy; set generation.top_k=0 and generation.top_p=1.0 "
                         "(a lower temperature is supported)")


def first_and_last_tenth(per_action: Iterable[Any]) -> tuple[float, float]:
    """Mean of |x| over the first and over the last tenth (at least one token) of each action's per-token values:
    where a learner's signal (advantages, TD errors) lands by token position, the diagnostic that shows whether
    credit reaches the start of an action."""
    first, last = [], []
    for values in per_action:
        values = np.abs(np.asarray(values, dtype=np.float64)).ravel()
        if values.size == 0:
            continue
        k = max(1, int(np.ceil(values.size / 10)))
        first.append(values[:k])
        last.append(values[-k:])
    if not first:
        return float("nan"), float("nan")
    return float(np.concatenate(first).mean()), float(np.concatenate(last).mean())


@dataclass
class ActionPass:
    """One pass of the policy over a batch's actions (PPO and GRPO score with it): log π per action token at the
    sampling temperature, padded to [B, longest action] and differentiable, with what entropy, KL and value
    computations reuse."""

    logp: torch.Tensor  # [B, T]
    hidden: torch.Tensor  # [B, T, H]: the hidden state each action token is predicted from
    rows: torch.Tensor  # hidden[mask]: the action tokens' states, flat
    head: Callable[[torch.Tensor], torch.Tensor]  # hidden -> tempered logits
    mask: torch.Tensor  # [B, T]: real action tokens
    targets: torch.Tensor  # [B, T]: the action tokens
    obs_ids: list
    action_ids: list


def action_pass(policy: Any, transitions: Any, adapter: str | None, temperature: float, chunk_size: int) -> ActionPass:
    """log π(a_t | s, a_<t) of every action token of `transitions` under `adapter`, at `temperature`."""
    obs_ids = [t.obs_ids for t in transitions]
    action_ids = [t.action_ids for t in transitions]
    hidden, targets, mask = policy.action_hidden(obs_ids, action_ids, adapter)
    head = tempered(policy.head(adapter), temperature)
    rows = hidden[mask]
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(
        mask, token_logprobs(rows, targets[mask], head, chunk_size))
    return ActionPass(logp, hidden, rows, head, mask, targets, obs_ids, action_ids)


@torch.no_grad()
def reference_scores(policy: Any, scored: ActionPass, temperature: float, chunk_size: int,
                     exact_kl: bool) -> dict[str, torch.Tensor]:
    """Flat over the action tokens of `scored`: log ρ ("ref_logp", ρ = adapters off) and, with `exact_kl`, the
    whole-vocabulary KL(π‖ρ) per token ("kl"), both at `temperature`."""
    ref_rows = policy.action_hidden(scored.obs_ids, scored.action_ids, None)[0][scored.mask]
    ref_head = tempered(policy.head(None), temperature)
    found = {"ref_logp": token_logprobs(ref_rows, scored.targets[scored.mask], ref_head, chunk_size)}
    if exact_kl:
        found["kl"] = kl_divergence(scored.rows.detach(), ref_rows, scored.head, ref_head, chunk_size)
    return found


class Learner:
    """Base class of the LM learners: learn → (collect → train)*, counters, logging, checkpoints, resume."""

    config_class: ClassVar[type]
    needs_reference_logprobs: ClassVar[bool] = False  # the collector scores sampled tokens under ρ too

    def __init__(self, model: str | Path = "tiny", config: Any = None, *, policy: Any = None,
                 saved_policy: Path | None = None, **overrides: Any):
        """The one constructor. `model`: `"tiny"` or any `from_pretrained` name or path (fresh adapters, seeded by
        the config's seed); `policy`: an existing `LMPolicy` that already carries the learner's adapters
        (`from_policy`); `saved_policy`: a policy folder `save` wrote, re-attached to `model` (`load`)."""
        self.config = with_fields(config or self.config_class(), overrides)
        if policy is not None:
            self.model_path = str(policy.name_or_path)
            missing = set(self.adapters()[0]) - set(policy.adapter_names)
            if missing:
                raise ValueError(f"the policy lacks adapter(s) {sorted(missing)} that {type(self).__name__} needs")
        elif saved_policy is not None:
            self.model_path = str(model)
            policy = self._load_policy(saved_policy)
        else:
            self.model_path = str(resolve_model(model))
            torch.manual_seed(self.config.seed)  # fresh adapter weights come from torch's global RNG
            policy = self._load_policy(None)
        self.policy = policy
        self._init_state()

    @classmethod
    def from_policy(cls, policy: Any, config: Any = None, **overrides: Any) -> Learner:
        """A learner over an existing `LMPolicy` that already carries its adapters (benchmarks of model shapes built
        in memory)."""
        return cls(config=config, policy=policy, **overrides)

    # -- what a learner defines ----------------------------------------------------------------------------------
    def adapters(self) -> tuple[dict[str, Any] | None, str]:
        """(adapters for `LMPolicy.from_pretrained`, reference spec): by default one fresh "policy" LoRA adapter,
        ρ = the base model."""
        cfg = self.config
        return {"policy": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)}, "base"

    def setup(self) -> None:
        """Create the learner's training state (optimisers, heads, RNGs); called on construction and on `load`."""

    def train(self, buffer: Any) -> dict[str, float]:
        """One update on a freshly collected buffer; returns scalar diagnostics."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The learner's own state for checkpoints (the shell adds counters, RNGs and the policy)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @property
    def rollout_steps(self) -> int:
        """Env steps collected per update."""
        return int(self.config.rollout_steps)

    def prepare(self, logger: Any) -> dict[str, float]:
        """Work before the first collection of a `learn` call that needs no env steps (SFT's demonstrations);
        returns its diagnostics."""
        return {}

    @property
    def collects(self) -> bool:
        """Whether `learn` collects env steps at all (False for SFT's demonstrations-only recipe)."""
        return True

    # -- the shell ---------------------------------------------------------------------------------------------
    @property
    def generation(self) -> GenerationSettings:
        return self.config.generation

    def reset(self) -> None:
        pass

    def act(self, obs: str, info: dict | None = None) -> str:
        return self.act_batch([obs], [info or {}])[0]

    def act_batch(self, observations: list[str], infos: list[dict], generator: Any = None) -> list[str]:
        """One action per observation, generated in one batched call (the benchmark's lock-step evaluation uses
        it with a sampling `generator` of its own, leaving the policy's seeded stream to training)."""
        gen = self.generation
        limit = self.policy.max_prompt_tokens(gen)
        prompts = [self.policy.encode_observation(o, i, max_length=limit) for o, i in zip(observations, infos)]
        return [g.text for g in self.policy.generate(prompts, gen, generator=generator)]

    def _load_policy(self, saved: Path | None) -> Any:
        options = {**load_options(self.config.runtime), "chunk_size": self.config.chunk_size}
        if saved is not None:
            return LMPolicy.load(saved, base=self.model_path, **options)
        adapters, reference = self.adapters()
        return LMPolicy.from_pretrained(self.model_path, adapters=adapters, reference=reference, **options)

    def _init_state(self) -> None:
        self.policy.train_without_dropout()  # checkpointing applies; updates score tokens exactly as sampling did
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._collector = None
        self.setup()

    def collector_for(self, env: Any) -> Any:
        """The shared collector, kept across `learn` calls on the same env (episodes carry over). A new env gets a
        new collector seeded by the env steps done, so a resumed run sees new episodes instead of replaying."""
        if self._collector is None or self._collector.env is not env:
            if self._collector is not None:
                self._collector.close()
            self._collector = RolloutCollector(self.policy, env, self.generation,
                                               seed=self.config.seed + self.counters["env_steps"],
                                               compute_ref_logp=self.needs_reference_logprobs,
                                               num_envs=self.num_envs,
                                               overlap=overlaps_generation(self.config.runtime, self.policy.device))
        return self._collector

    @property
    def num_envs(self) -> int:
        """Envs collected from at once when `learn` is handed a single env (the config's `num_envs`)."""
        return int(self.config.num_envs)

    def learn(self, env: Any, budget: int, callbacks: Callback | Iterable[Callback] | None = None,
              out_dir: str | Path | None = None) -> dict[str, float]:
        """Collect `rollout_steps` env steps and `train` on them until `budget` env steps in total.

        `budget` counts env steps over the learner's life (a resumed learner continues its count). With `out_dir`,
        diagnostics go to a RunLogger there and checkpoints to `out_dir/checkpoint`. Returns the latest diagnostics
        (of `prepare` and of the last update) with the counters.
        """
        callbacks = [callbacks] if callable(callbacks) else list(callbacks or [])
        logger = _make_logger(out_dir, budget - self.counters["env_steps"])
        schedule: CheckpointSettings = self.config.checkpoints
        saved_at: int | None = None  # the update count of the last checkpoint this call wrote
        last_save = time.monotonic()
        try:
            summary = self.prepare(logger)
            if self.collects:
                while self.counters["env_steps"] < budget:
                    stats = self.update_once(env, min(self.rollout_steps, budget - self.counters["env_steps"]))
                    summary.update(stats)
                    if logger is not None:
                        logger.log(stats, step=self.counters["env_steps"])
                    answers = [callback(stats) for callback in callbacks]  # every callback sees every update
                    if out_dir is not None and schedule.due(self.counters["updates"], time.monotonic() - last_save):
                        self.save_checkpoint(out_dir)
                        saved_at, last_save = self.counters["updates"], time.monotonic()
                    if any(answer is False for answer in answers):
                        break
        finally:
            if logger is not None:
                logger.close()
        if out_dir is not None and saved_at != self.counters["updates"]:  # not written twice for one state
            self.save_checkpoint(out_dir)
        return {**summary, **{k: float(v) for k, v in self.counters.items()}}

    def update_once(self, env: Any, n_steps: int) -> dict[str, float]:
        """Collect `n_steps` env steps, train on them, count them; returns collection and update diagnostics."""
        started = time.perf_counter()
        if self.policy.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.policy.device)
        buffer, collect_stats = self.collector_for(env).collect(n_steps)
        stats = self.train(buffer)
        self.counters["updates"] += 1
        self.counters["env_steps"] += len(buffer)
        self.counters["tokens"] += buffer.token_count()
        self.counters["episodes"] += sum(bool(t.terminated or t.truncated) for t in buffer)
        return {
            **{k: float(v) for k, v in collect_stats.items()
               if isinstance(v, (int, float)) and k not in ("env_steps", "episodes")},
            **stats,
            "env_steps_iteration": float(len(buffer)),
            "episodes_iteration": float(collect_stats.get("episodes", 0.0)),
            "peak_memory_mb": peak_memory_mb(self.policy.device),
            **{k: float(v) for k, v in self.counters.items()},
            "time_total_s": time.perf_counter() - started,
        }

    # -- persistence ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, out_dir: str | Path) -> Path:
        """Write the latest checkpoint to `out_dir/checkpoint`; with `keep_checkpoints` > 1 the one it replaces is
        kept as `checkpoint-<its updates>`, and kept ones beyond the count are deleted, oldest first."""
        latest = Path(out_dir) / LATEST
        keep = self.config.checkpoints.keep_checkpoints
        previous = saved_updates(latest)
        keep_previous = keep > 1 and previous is not None and previous != self.counters["updates"]
        self.save(latest, keep_previous_as=latest.with_name(f"{LATEST}-{previous}") if keep_previous else None)
        kept = kept_checkpoints(out_dir)
        for old in kept[:len(kept) - (keep - 1)]:  # all of them when only the latest is kept
            shutil.rmtree(old)
        return latest

    def save(self, directory: str | Path, keep_previous_as: Path | None = None) -> None:
        """Everything needed to resume, written atomically: a crash mid-save leaves the previous checkpoint (the new
        one is written beside it, then swapped in; with `keep_previous_as` the previous one is moved there)."""
        directory = Path(directory)
        staged = directory.with_name(directory.name + ".tmp")
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        self.policy.save(staged / "policy")
        save_config(self.config, staged / "config.json")
        torch.save({
            "format": CHECKPOINT_FORMAT,
            "learner": type(self).__name__,
            "model_path": self.model_path,
            "counters": dict(self.counters),
            "learner_state": self.state_dict(),
            "rng": rng_states(),
        }, staged / "trainer.pt")
        (staged / "progress.json").write_text(json.dumps(dict(self.counters)) + "\n")  # readable without torch
        replace_directory(staged, directory, keep_as=keep_previous_as)

    @classmethod
    def load(cls, directory: str | Path, **overrides: Any) -> Learner:
        """Rebuild a learner saved by `save` (config overrides allowed, e.g. device) and restore all its state."""
        directory = Path(directory)
        state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)  # our own file
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{directory}: unsupported checkpoint format {found!r} (this version reads "
                             f"{CHECKPOINT_FORMAT}); retrain or use the version that wrote it")
        if state.get("learner") != cls.__name__:
            raise ValueError(f"{directory} holds a {state.get('learner')} checkpoint, not a {cls.__name__} one")
        learner = cls(state["model_path"], load_config(cls.config_class, directory / "config.json"),
                      saved_policy=directory / "policy", **overrides)
        learner.load_state_dict(state["learner_state"])
        learner.counters = dict(state["counters"])
        set_rng_states(state["rng"])
        return learner


# ----------------------------------------------------------------------------------------------------------------
# Helpers (pure or nearly)
# ----------------------------------------------------------------------------------------------------------------
def saved_updates(directory: Path) -> int | None:
    """The update count a checkpoint directory was written at (None when there is none)."""
    progress = directory / "progress.json"
    if progress.exists():
        return int(json.loads(progress.read_text())["updates"])
    if (directory / "trainer.pt").exists():  # written before progress.json existed
        return int(torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)["counters"]["updates"])
    return None


def kept_checkpoints(out_dir: str | Path) -> list[Path]:
    """The older checkpoints kept beside the latest (`checkpoint-<updates>`), in the order they were written (a new
    run in the same directory counts its updates from 0 again, so the number alone does not order them)."""
    def written(path: Path) -> tuple[float, int]:
        state = path / "trainer.pt"
        return (state if state.exists() else path).stat().st_mtime, int(path.name.rsplit("-", 1)[1])

    return sorted((p for p in Path(out_dir).glob(f"{LATEST}-*")
                   if p.is_dir() and re.fullmatch(rf"{LATEST}-\d+", p.name)), key=written)


def rng_states() -> dict[str, Any]:
    """Every global RNG a run draws from: Python, numpy, torch CPU and (when present) CUDA."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this update: CUDA allocations on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _make_logger(out_dir: str | Path | None, total: int):
    """The shared RunLogger (console lines, progress bar over env steps, TensorBoard, metrics.jsonl) in `out_dir`."""
    if out_dir is None:
        return None
    return RunLogger(out_dir, total=max(total, 0) or None)
