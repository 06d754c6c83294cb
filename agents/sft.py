"""SFT baseline: supervised fine-tuning (LoRA or full) on (prompt, program) demonstrations, and a self-improving mode
(sample, keep the best-scoring programs, fine-tune on them, repeat) that spends the same env-step budget as the RL
learners.

    agent = SFTAgent(model="tiny", config=SFTConfig(recipe="demos", data="episodes.jsonl"))
    agent.learn(env, budget=0)                 # demos recipe: fit on the file; no env steps
    agent = SFTAgent(model="tiny")             # self-improve recipe (default)
    agent.learn(env, budget=64)                # every sampled program is one env step of the budget

Demonstration files are JSONL with a ``prompt`` and a ``program`` (or ``action`` / ``completion``) per line — the
env's `EpisodeRecorder` output qualifies; lines with ``info.status != "ok"`` or reward below `min_reward` are
dropped. The loss is the mean negative log-likelihood of the completion tokens (prompt tokens are context only).

A short loop instead of TRL's SFTTrainer: TRL is not a dependency here, and the self-improving mode trains on the
sampled token ids themselves (no decode/re-encode), which the loop does directly through `LMPolicy.sequence_logprobs`
(chunked over the vocabulary).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agents.policy import SamplingActor


@dataclass
class SFTConfig:
    recipe: Literal["demos", "self-improve"] = field(default="self-improve", metadata={
        "help": "demos: fine-tune on `data` only; self-improve: sample, keep the best, fine-tune, repeat."})
    data: str | None = field(default=None, metadata={
        "help": "JSONL demonstrations (prompt + program/action/completion); used first in either mode."})
    min_reward: float | None = field(default=None, metadata={"help": "Drop demonstration lines below this reward."})
    lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (else all weights)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per optimizer step."})
    epochs: int = field(default=2, metadata={"help": "Passes over the demonstration file."})
    max_seq_len: int = field(default=1024, metadata={"help": "Tokens per sequence (prompt truncated from the left)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    samples_per_round: int = field(default=8, metadata={"help": "Self-improve: env steps sampled per round."})
    keep_fraction: float = field(default=0.25, metadata={
        "help": "Self-improve: share of each round's valid programs kept (best rewards first)."})
    pool_size: int = field(default=64, metadata={"help": "Self-improve: most kept programs trained on."})
    steps_per_round: int = field(default=4, metadata={"help": "Self-improve: optimizer steps per round."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(default=384, metadata={"help": "Most tokens per program."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    chunk_size: int = field(default=256, metadata={"help": "Positions per whole-vocabulary chunk."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, shuffling and adapter init."})


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def load_demonstrations(path: str | Path, min_reward: float | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from JSONL; failed or low-reward lines (when marked) are skipped."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        prompt = record.get("prompt")
        # the raw action (recorder lines) is what a model wrote after the prompt; a full program also works
        completion = next((record[k] for k in ("completion", "action", "program") if k in record), None)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"{path}:{n}: each line needs a 'prompt' and a 'program'/'action'/'completion' string")
        status = (record.get("info") or {}).get("status")
        if status is not None and status != "ok":
            continue
        if min_reward is not None and record.get("reward") is not None and record["reward"] < min_reward:
            continue
        pairs.append((prompt, completion))
    return pairs


def encode_pairs(policy: Any, pairs: Sequence[tuple[str, str]], max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids per pair: (prompt ids, completion ids + EOS), the prompt cut from the left to fit."""
    eos = policy.tokenizer.eos_token_id
    out = []
    for prompt, completion in pairs:
        c = policy.encode(completion) + ([eos] if eos is not None else [])
        c = c[: max_seq_len - 1]
        p = policy.encode(prompt, max_length=max(1, max_seq_len - len(c)))
        out.append((p, c))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loss and one step (pure with respect to everything but the policy and optimizer)
# ----------------------------------------------------------------------------------------------------------------
def nll_loss(policy: Any, batch: Sequence[tuple[Sequence[int], Sequence[int]]], adapter: str = "policy"):
    """Mean negative log-likelihood per completion token over the batch."""
    logp, mask = policy.sequence_logprobs([list(p) for p, _ in batch], [list(c) for _, c in batch],
                                          adapter=adapter, padded=True)
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def sft_steps(policy: Any, examples: Sequence[tuple[list[int], list[int]]], optimizer: Any, params: list,
              n_steps: int, batch_size: int, max_grad_norm: float, rng: random.Random) -> list[float]:
    """`n_steps` optimizer steps on shuffled minibatches drawn without replacement (reshuffled each pass)."""
    import torch

    losses, order = [], []
    policy.model.train()
    for _ in range(n_steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(min(batch_size, len(order)))]
        loss = nll_loss(policy, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    policy.model.eval()
    return losses


def mean_nll(policy: Any, examples: Sequence[tuple[list[int], list[int]]], batch_size: int = 8) -> float:
    """Token-weighted mean NLL of the completions (no gradients): the number SFT should lower."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            n = sum(len(c) for _, c in batch)
            total += float(nll_loss(policy, batch)) * n
            tokens += n
    return total / max(tokens, 1)


# ----------------------------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------------------------
class SFTAgent(SamplingActor):
    """Fine-tunes an `LMPolicy` on demonstrations and/or its own best programs; acts by sampling from it."""

    config_class = SFTConfig

    def __init__(self, model: str | Path = "tiny", config: SFTConfig | None = None, **overrides: Any):
        import torch

        from agents.policy import LMPolicy, default_lora_config, resolve_device
        from agents.tiny import resolve_model

        self.config = dataclasses.replace(config or SFTConfig(), **overrides)
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.model_path = str(resolve_model(model))
        adapters = {"policy": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)} if cfg.lora else None
        self.policy = LMPolicy.from_pretrained(self.model_path, adapters=adapters, device=resolve_device(cfg.device),
                                               gradient_checkpointing=cfg.gradient_checkpointing,
                                               chunk_size=cfg.chunk_size)
        self._init_training_state()

    def _init_training_state(self) -> None:
        import torch

        cfg = self.config
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = random.Random(cfg.seed)
        self.pool: list[tuple[float, list[int], list[int]]] = []  # (reward, prompt ids, action ids), best first
        self.counters = {"env_steps": 0, "rounds": 0, "sft_steps": 0}
        self.demos_done = False

    # -- learning -------------------------------------------------------------------------------------------------
    def fit_demonstrations(self, pairs: Sequence[tuple[str, str]], epochs: int | None = None) -> dict[str, float]:
        """Fine-tune on (prompt, completion) text pairs; returns the NLL before and after and the step losses."""
        cfg = self.config
        examples = encode_pairs(self.policy, pairs, cfg.max_seq_len)
        if not examples:
            raise ValueError("no demonstrations to train on (all filtered out?)")
        before = mean_nll(self.policy, examples)
        n_steps = math.ceil(len(examples) / cfg.batch_size) * (epochs if epochs is not None else cfg.epochs)
        losses = sft_steps(self.policy, examples, self.optimizer, self.params, n_steps, cfg.batch_size,
                           cfg.max_grad_norm, self.rng)
        self.counters["sft_steps"] += n_steps
        return {"nll_before": before, "nll_after": mean_nll(self.policy, examples), "sft_steps": float(n_steps),
                "loss_first": losses[0], "loss_last": losses[-1], "demonstrations": float(len(examples))}

    def learn(self, env: Any, budget: int, callback: Callable[[dict], Any] | None = None,
              out_dir: str | Path | None = None) -> dict:
        """Demonstrations first (if `data`), then — in self-improve mode — rounds of sampling `samples_per_round`
        env steps, keeping the best valid programs and fine-tuning on them, until `budget` env steps are spent."""
        from agents.rollout import RolloutCollector

        cfg = self.config
        logger = _make_logger(out_dir, budget)
        summary: dict[str, float] = {}
        try:
            if cfg.data and not self.demos_done:
                summary.update(self.fit_demonstrations(load_demonstrations(cfg.data, cfg.min_reward)))
                self.demos_done = True
                if logger:
                    logger.log({**summary, "phase_demos": 1.0}, step=self.counters["env_steps"])
            if cfg.recipe == "self-improve":
                collector = RolloutCollector(self.policy, env, self.generation, compute_ref_logp=False,
                                             seed=cfg.seed)
                while self.counters["env_steps"] < budget:
                    stats = self.round(collector, min(cfg.samples_per_round, budget - self.counters["env_steps"]))
                    summary.update(stats)
                    if logger:
                        logger.log(stats, step=self.counters["env_steps"])
                    if callback is not None:
                        callback(stats)
        finally:
            if logger:
                logger.close()
        if out_dir is not None:
            self.save(Path(out_dir) / "checkpoint")
        return {**summary, **{k: float(v) for k, v in self.counters.items()}}

    def round(self, collector: Any, n_steps: int) -> dict[str, float]:
        """One self-improvement round: sample, select, fine-tune."""
        cfg = self.config
        started = time.perf_counter()
        buffer, stats = collector.collect(n_steps)
        self.counters["env_steps"] += len(buffer)
        kept = select_best(buffer, cfg.keep_fraction)
        self.pool = merge_pool(self.pool, kept, cfg.pool_size)
        tick = time.perf_counter()
        losses: list[float] = []
        if self.pool:
            examples = [(p, a) for _, p, a in self.pool]
            losses = sft_steps(self.policy, examples, self.optimizer, self.params, cfg.steps_per_round,
                               cfg.batch_size, cfg.max_grad_norm, self.rng)
            self.counters["sft_steps"] += len(losses)
        self.counters["rounds"] += 1
        return {
            **{k: v for k, v in stats.items() if k != "env_steps"},
            "kept": float(len(kept)), "pool": float(len(self.pool)),
            "pool_reward_mean": float(np.mean([r for r, _, _ in self.pool])) if self.pool else 0.0,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "time_update_s": time.perf_counter() - tick, "time_round_s": time.perf_counter() - started,
            "env_steps_iteration": float(len(buffer)),
        }

    # -- persistence ------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        import torch

        from agents.config import save_config

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.policy.save(directory / "policy")
        save_config(self.config, directory / "config.json")
        state = {"optimizer": self.optimizer.state_dict(), "counters": self.counters, "rng": self.rng.getstate(),
                 "pool": self.pool, "demos_done": self.demos_done, "model_path": self.model_path}
        torch.save(state, directory / "state.pt")

    @classmethod
    def load(cls, directory: str | Path, **overrides: Any) -> SFTAgent:
        import torch

        from agents.config import load_config
        from agents.policy import LMPolicy

        directory = Path(directory)
        config = dataclasses.replace(load_config(SFTConfig, directory / "config.json"), **overrides)
        agent = cls.__new__(cls)
        agent.config = config
        state = torch.load(directory / "state.pt", weights_only=False)  # our own file, written by save()
        agent.model_path = state["model_path"]
        agent.policy = LMPolicy.load(directory / "policy", device=config.device)
        agent._init_training_state()
        agent.optimizer.load_state_dict(state["optimizer"])
        agent.counters, agent.pool, agent.demos_done = state["counters"], state["pool"], state["demos_done"]
        agent.rng.setstate(state["rng"])
        return agent


def select_best(buffer: Sequence[Any], keep_fraction: float) -> list[tuple[float, list[int], list[int]]]:
    """The best `keep_fraction` (at least one) of the programs that ran ("ok"), as (reward, prompt ids, action ids)."""
    valid = [t for t in buffer if t.info.get("status") == "ok"]
    valid.sort(key=lambda t: t.reward, reverse=True)
    n_keep = max(1, math.ceil(keep_fraction * len(valid))) if valid else 0
    return [(float(t.reward), t.obs_ids.tolist(), t.action_ids.tolist()) for t in valid[:n_keep]]


def merge_pool(pool: list, new: list, size: int) -> list:
    """Best-first pool of distinct actions (by token ids), at most `size` entries."""
    best: dict[tuple[int, ...], tuple[float, list[int], list[int]]] = {}
    for entry in [*pool, *new]:
        key = tuple(entry[2])
        if key not in best or entry[0] > best[key][0]:
            best[key] = entry
    return sorted(best.values(), key=lambda e: e[0], reverse=True)[:size]


def _make_logger(out_dir: str | Path | None, total: int):
    if out_dir is None:
        return None
    from agents.logging import RunLogger

    return RunLogger(out_dir, total=total)
