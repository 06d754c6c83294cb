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

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agents.learner import NUM_ENVS_HELP, Learner, LearnerConfig
from agents.lm import GenerationSettings, default_lora_config


@dataclass
class SFTConfig(LearnerConfig):
    recipe: Literal["demos", "self-improve"] = field(default="self-improve", metadata={
        "help": "demos: fine-tune on `data` only; self-improve: sample, keep the best, fine-tune, repeat."})
    data: str | None = field(default=None, metadata={
        "help": "JSONL demonstrations (prompt + program/action/completion); used first in either mode."})
    min_reward: float | None = field(default=None, metadata={"help": "Drop demonstration lines below this reward."})
    lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (else all weights)."})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per optimizer step."})
    epochs: int = field(default=2, metadata={"help": "Passes over the demonstration file."})
    max_seq_len: int = field(default=1024, metadata={"help": "Tokens per sequence (prompt truncated from the left)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    rollout_steps: int = field(default=8, metadata={"help": "Self-improve: env steps sampled per round."})
    num_envs: int = field(default=8, metadata={"help": NUM_ENVS_HELP})
    keep_fraction: float = field(default=0.25, metadata={
        "help": "Self-improve: share of each round's valid programs kept (best rewards first)."})
    best_size: int = field(default=64, metadata={"help": "Self-improve: most kept (best) programs trained on."})
    steps_per_round: int = field(default=4, metadata={"help": "Self-improve: optimizer steps per round."})
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={
        "help": "How programs are sampled in self-improve mode and when acting (the same defaults as ETPO and PPO, "
                "so the three start from the same policy: equal step-0 evaluations in a benchmark)."})


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
class SFTAgent(Learner):
    """Fine-tunes an `LMPolicy` on demonstrations and/or its own best programs; acts by sampling from it.

    In the learner shell's terms (agents/learner.py): demonstrations are fitted before the first collection, each
    self-improvement round collects `rollout_steps` env steps and `train` keeps the best and fine-tunes on them.
    """

    config_class = SFTConfig

    def adapters(self) -> tuple[dict[str, Any] | None, str]:
        cfg = self.config
        return ({"policy": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)} if cfg.lora else None), "base"

    def setup(self) -> None:
        import torch

        cfg = self.config
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = random.Random(cfg.seed)
        self.best: list[tuple[float, list[int], list[int]]] = []  # (reward, prompt ids, action ids), best first
        self.sft_steps_done = 0
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
        self.sft_steps_done += n_steps
        return {"nll_before": before, "nll_after": mean_nll(self.policy, examples), "sft_steps": float(n_steps),
                "loss_first": losses[0], "loss_last": losses[-1], "demonstrations": float(len(examples))}

    def prepare(self, logger: Any) -> dict[str, float]:
        """Demonstrations first (once per agent, if `data`)."""
        cfg = self.config
        if not cfg.data or self.demos_done:
            return {}
        stats = self.fit_demonstrations(load_demonstrations(cfg.data, cfg.min_reward))
        self.demos_done = True
        if logger is not None:
            logger.log({**stats, "phase_demos": 1.0}, step=self.counters["env_steps"])
        return stats

    @property
    def collects(self) -> bool:
        return self.config.recipe == "self-improve"

    def train(self, buffer: Sequence[Any]) -> dict[str, float]:
        """One self-improvement round on a sampled buffer: keep the best programs, fine-tune on the best kept so far."""
        cfg = self.config
        kept = select_best(buffer, cfg.keep_fraction)
        self.best = merge_best(self.best, kept, cfg.best_size)
        tick = time.perf_counter()
        losses: list[float] = []
        if self.best:
            examples = [(p, a) for _, p, a in self.best]
            losses = sft_steps(self.policy, examples, self.optimizer, self.params, cfg.steps_per_round,
                               cfg.batch_size, cfg.max_grad_norm, self.rng)
            self.sft_steps_done += len(losses)
        return {
            "kept": float(len(kept)), "best_kept": float(len(self.best)),
            "best_kept_reward_mean": float(np.mean([r for r, _, _ in self.best])) if self.best else 0.0,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "sft_steps": float(self.sft_steps_done), "time_update_s": time.perf_counter() - tick,
        }

    # -- persistence ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rng": self.rng.getstate(), "best": self.best,
                "demos_done": self.demos_done, "sft_steps": self.sft_steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["rng"])
        self.best, self.demos_done, self.sft_steps_done = state["best"], state["demos_done"], state["sft_steps"]


def select_best(buffer: Sequence[Any], keep_fraction: float) -> list[tuple[float, list[int], list[int]]]:
    """The best `keep_fraction` (at least one) of the programs that ran ("ok"), as (reward, prompt ids, action ids)."""
    valid = [t for t in buffer if t.info.get("status") == "ok"]
    valid.sort(key=lambda t: t.reward, reverse=True)
    n_keep = max(1, math.ceil(keep_fraction * len(valid))) if valid else 0
    return [(float(t.reward), t.obs_ids.tolist(), t.action_ids.tolist()) for t in valid[:n_keep]]


def merge_best(best: list, new: list, size: int) -> list:
    """Best-first list of distinct actions (by token ids), at most `size` entries."""
    by_action: dict[tuple[int, ...], tuple[float, list[int], list[int]]] = {}
    for entry in [*best, *new]:
        key = tuple(entry[2])
        if key not in by_action or entry[0] > by_action[key][0]:
            by_action[key] = entry
    return sorted(by_action.values(), key=lambda e: e[0], reverse=True)[:size]
