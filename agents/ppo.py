"""Token-level PPO with a KL penalty to a reference policy: the RLHF-style baseline ETPO is compared against.

Every generated token is one PPO step. For an episode whose actions a_1..a_K (code strings) have n_1..n_K tokens:

  per-token reward   r_j = -β·k(π_old, ρ)_j  (+ R_k, the environment reward, on the last token of a_k only)
                     k = k1: log π - log ρ          k = k3: (ρ/π - 1) - log(ρ/π)   (Schulman's unbiased, ≥ 0)
  value              V(u_j), a scalar head on the LM's last hidden state at token state u_j (prompt + prefix)
  TD error           δ_j = r_j + d_j·V(u_{j+1}) - V(u_j)
  GAE                A_j = δ_j + d_j·λ_j·A_{j+1},    return target  G_j = A_j + V(u_j)
                     λ_j = λ_in (lam_in_action, default 1) between the tokens of an action, λ (lam) from an
                     action's last token to the next action: the env reward then reaches an action's first token
                     undecayed (with λ = 0.95 on every token, 0.95^190 ≈ 6e-5 of it would)
  discount d_j       naive token-level backup:  γ after every token
                     action-decomposed backup:  1 inside an action, γ only from an action's last token to the
                                                next action's first token (no discount inside an action; the env
                                                reward still arrives only at the last token)
                     0 after the last token of a terminated episode; a truncated episode (or one cut by the end
                     of a rollout) bootstraps from V(s'). Default: decomposed with γ = 0.9, ETPO's discounting.
  policy loss        -E[min(r_t·Â, clip(r_t, 1-ε, 1+ε)·Â)],  r_t = π_θ/π_old per token, Â whitened over the batch
  value loss         ½·E[max((V-G)², (V_old + clip(V-V_old, ±ε_v) - G)²)]
  total              policy + c_v·value - c_H·entropy;  several epochs of shuffled minibatches, gradient-norm
                     clipping, and an early stop once the approximate KL(π_old‖π_θ) passes a target.
  adaptive β         (Ziegler et al. 2019) β ← β·(1 + clip(KL/KL_target - 1, ±0.2)·n_tokens/horizon)
  temperature T      π is the distribution actions are sampled from, softmax(logits/T); its log-probs (π_old in
                     the ratio, π in k) and ρ's are taken at the same T (as TRL does), all recomputed without
                     gradients right before the update by the very function the update differentiates, so the
                     first minibatch's ratio is 1. Top-k/top-p filtering is not reproduced and is refused.

The pure functions at the top hold all of the math and are what the tests check by hand. `ppo_update` runs the
epochs/minibatches on any `forward(transitions)` (the LM, or a tiny tabular model in the tests), and `PPOAgent`
wires it to the shared LMPolicy, RolloutCollector and RunLogger.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from agents.learner import (
    Learner,
    LearnerConfig,
    action_pass,
    check_sampled_generation,
    first_and_last_tenth,
    reference_scores,
)
from agents.lm import GenerationSettings, default_lora_config, entropy, pad_sequences
from agents.rollout import episode_chains, fill_per_token

KLEstimator = Literal["k1", "k3"]

# ---------------------------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------------------------


def kl_per_token(logp: np.ndarray, ref_logp: np.ndarray, estimator: KLEstimator = "k1") -> np.ndarray:
    """Per-token estimate of KL(π‖ρ) from log-probs of tokens sampled from π.

    k1 = log π - log ρ (unbiased, can be negative); k3 = (ρ/π - 1) - log(ρ/π) (unbiased, never negative).
    """
    log_ratio = np.asarray(ref_logp, dtype=np.float64) - np.asarray(logp, dtype=np.float64)  # log ρ/π
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return np.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def token_rewards(kl: np.ndarray, env_reward: float, kl_coef: float) -> np.ndarray:
    """Rewards of one action's tokens: -β·KL on every token, the environment reward added on the last one."""
    rewards = -kl_coef * np.asarray(kl, dtype=np.float64)
    if rewards.size == 0:
        raise ValueError("an action must have at least one token")
    rewards[-1] += env_reward
    return rewards


def token_discounts(n_tokens: int, gamma: float, decomposed: bool, end: float) -> np.ndarray:
    """Discount applied after each token of one action.

    `end` is the factor after the action's last token: γ when the episode goes on (or is truncated and bootstraps
    from V(s')), 0 when it terminated. Inside the action: γ for the naive backup, 1 for the decomposed one.
    """
    discounts = np.full(n_tokens, 1.0 if decomposed else gamma, dtype=np.float64)
    discounts[-1] = end
    return discounts


def gae(rewards: np.ndarray, values: np.ndarray, discounts: np.ndarray, lam: float | np.ndarray,
        bootstrap_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over one flat token sequence (one episode chain).

    values[j] = V(u_j); discounts[j] multiplies V(u_{j+1}) (and the trace) after step j; the value after the last
    step is `bootstrap_value` (ignored when the last discount is 0); `lam` is one λ or λ_j per step (the trace's
    decay from step j + 1 back to step j). Returns (advantages, return targets).
    Written as a loop because the discount varies per step (scipy's lfilter needs constant coefficients).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    discounts = np.asarray(discounts, dtype=np.float64)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), rewards.shape)
    if not (rewards.shape == values.shape == discounts.shape and rewards.ndim == 1):
        raise ValueError(f"shape mismatch: rewards {rewards.shape}, values {values.shape}, discounts {discounts.shape}")
    next_values = np.append(values[1:], bootstrap_value)
    deltas = rewards + discounts * next_values - values
    advantages = np.empty_like(deltas)
    running = 0.0
    for j in range(len(deltas) - 1, -1, -1):
        running = deltas[j] + discounts[j] * lam[j] * running
        advantages[j] = running
    return advantages, advantages + values


def episode_gae(action_lengths: Sequence[int], env_rewards: Sequence[float], kl: np.ndarray, values: np.ndarray,
                *, kl_coef: float, gamma: float, lam: float, decomposed: bool, terminated: bool,
                bootstrap_value: float = 0.0, lam_in_action: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rewards, advantages and returns for one episode chain (its actions' tokens concatenated).

    `kl`, `values` are flat over all tokens of the chain. If the chain ends without termination (truncated, or
    cut by the end of a rollout), the value after its last token is `bootstrap_value` = V(s'). The trace decays by
    `lam_in_action` between the tokens of one action (None: `lam`) and by `lam` from an action to the next.
    """
    rewards, discounts, lams = [], [], []
    for k, (n, r) in enumerate(zip(action_lengths, env_rewards, strict=True)):
        start = sum(action_lengths[:k])
        rewards.append(token_rewards(kl[start:start + n], r, kl_coef))
        last = k == len(action_lengths) - 1
        end = 0.0 if (last and terminated) else gamma
        discounts.append(token_discounts(n, gamma, decomposed, end))
        lams.append(np.r_[np.full(n - 1, lam if lam_in_action is None else lam_in_action), lam])
    flat_rewards = np.concatenate(rewards)
    advantages, returns = gae(flat_rewards, values, np.concatenate(discounts), np.concatenate(lams),
                              0.0 if terminated else bootstrap_value)
    return flat_rewards, advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """min(r·Â, clip(r, 1-ε, 1+ε)·Â) per token (to maximise), r = exp(log_ratio) = π_θ/π_old."""
    ratio = torch.exp(log_ratio)
    return torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages)


@torch.no_grad()
def ratio_diagnostics(log_ratio: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: k3 of KL(π_old‖π_θ), (r - 1) - log r, and 1.0 where the ratio left [1-ε, 1+ε] (else 0.0)."""
    ratio = torch.exp(log_ratio)
    return (ratio - 1.0) - log_ratio, ((ratio - 1.0).abs() > clip).float()


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (to minimise) plus the diagnostics computed from the same ratios.

    approx_kl is k3 of KL(π_old‖π_θ) = E[(r - 1) - log r]; clip_fraction is the share of tokens whose ratio left
    [1-ε, 1+ε].
    """
    log_ratio = logp - old_logp
    loss = -masked_mean(clipped_surrogate(log_ratio, advantages, clip), mask)
    approx_kl, clipped = ratio_diagnostics(log_ratio, clip)
    return loss, {"approx_kl": masked_mean(approx_kl, mask), "clip_fraction": masked_mean(clipped, mask)}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float | None) -> torch.Tensor:
    """½·max((V - G)², (V_old + clip(V - V_old, ±ε_v) - G)²); plain ½(V - G)² when `clip` is None."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum(unclipped, (clipped_values - returns) ** 2), mask)


def explained_variance(predicted: np.ndarray, target: np.ndarray) -> float:
    """1 - Var(target - predicted) / Var(target): 1 is perfect, 0 no better than a constant; NaN if Var(target)=0."""
    predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    var = target.var()
    return float("nan") if var == 0 else float(1.0 - (target - predicted).var() / var)


@dataclass
class AdaptiveKLController:
    """Proportional controller for the KL coefficient (Ziegler et al. 2019, "Fine-tuning LMs from human prefs").

    After each batch: β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n_tokens/horizon). With `target` None β is fixed.
    """

    value: float
    target: float | None = None
    horizon: float = 10_000.0

    def update(self, current_kl: float, n_tokens: int) -> float:
        if self.target is not None and math.isfinite(current_kl):
            error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
            self.value *= 1.0 + error * n_tokens / self.horizon
        return self.value


# ---------------------------------------------------------------------------------------------------------------
# From a rollout buffer to per-token advantages (episode chains follow Transition.next_index)
# ---------------------------------------------------------------------------------------------------------------


def compute_advantages(transitions: Sequence[Any], bootstrap_values: dict[int, float], *, kl_coef: float,
                       gamma: float, lam: float, decomposed: bool, kl_estimator: KLEstimator,
                       lam_in_action: float | None = None) -> dict[str, float]:
    """Fill `token_rewards`, `advantages` and `returns` of every transition from its `values`.

    `bootstrap_values[i]` is V(s') for a chain whose last transition i did not terminate (truncated, or cut by
    the end of the rollout); missing entries count as 0. The KL penalty compares `old_logp` (log π_old, recomputed at
    the sampling temperature) with `ref_logp` (log ρ at the same temperature).
    Returns the mean per-token KL estimate to the reference.
    """
    kl_sum, kl_tokens = 0.0, 0
    for chain in episode_chains(transitions):
        steps = [transitions[i] for i in chain]
        kl = np.concatenate([kl_per_token(t.per_token("old_logp"), t.ref_logp, kl_estimator) for t in steps])
        values = np.concatenate([np.asarray(t.per_token("values"), np.float64) for t in steps])
        lengths = [len(t.action_ids) for t in steps]
        rewards, advantages, returns = episode_gae(
            lengths, [float(t.reward) for t in steps], kl, values, kl_coef=kl_coef, gamma=gamma, lam=lam,
            decomposed=decomposed, terminated=bool(steps[-1].terminated),
            bootstrap_value=float(bootstrap_values.get(chain[-1], 0.0)), lam_in_action=lam_in_action)
        offsets = np.cumsum([0, *lengths])
        for t, a, b in zip(steps, offsets[:-1], offsets[1:], strict=True):
            t.token_rewards = rewards[a:b].astype(np.float32)
            t.advantages = advantages[a:b].astype(np.float32)
            t.returns = returns[a:b].astype(np.float32)
        kl_sum += float(kl.sum())
        kl_tokens += kl.size
    return {"kl_estimate": kl_sum / max(kl_tokens, 1)}


# ---------------------------------------------------------------------------------------------------------------
# The update: epochs of shuffled minibatches over any forward(transitions) -> ForwardOutput
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ForwardOutput:
    """Per action token, padded to (batch, longest action): log π_θ, V_φ, and entropy of π_θ (or None)."""

    logp: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor | None = None


def pad_tokens(transitions: Sequence[Any], name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack one per-token array of the transitions (`Transition.per_token(name)`) right-padded with zeros to
    (batch, longest)."""
    rows = [t.per_token(name) for t in transitions]
    out = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out).to(device)


def action_mask(transitions: Sequence[Any], device: torch.device | str = "cpu") -> torch.Tensor:
    lengths = torch.tensor([len(t.action_ids) for t in transitions])
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float().to(device)


@dataclass
class PPOUpdateSettings:
    """The subset of PPOConfig the update needs (so the toy tests can drive `ppo_update` without an LM); see the
    config's fields for each one's meaning."""

    epochs: int = 4
    minibatch_size: int = 4
    clip: float = 0.2
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    target_kl: float | None = 0.1
    normalize_advantages: bool = True


def ppo_update(transitions: Sequence[Any], forward: Callable[[Sequence[Any]], ForwardOutput],
               optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], settings: PPOUpdateSettings,
               generator: torch.Generator, device: torch.device | str = "cpu") -> dict[str, float]:
    """Several epochs of clipped-PPO minibatch steps; stops (before stepping) once a minibatch's approx-KL(π_old‖π_θ)
    exceeds 1.5·target_kl, as Stable-Baselines3 does.

    Advantages are whitened over the whole batch (not per minibatch: small minibatches make that noisy).
    Transitions must carry `old_logp` (π_old), `values`, `advantages` and `returns`.
    """
    epochs, minibatch_size, clip = settings.epochs, settings.minibatch_size, settings.clip
    if epochs < 1 or minibatch_size < 1 or not transitions:
        raise ValueError("ppo_update needs epochs >= 1, minibatch_size >= 1 and at least one transition")
    if settings.normalize_advantages:
        flat = np.concatenate([t.per_token("advantages") for t in transitions]).astype(np.float64)
        mean, std = flat.mean(), flat.std()
    else:
        mean, std = 0.0, 1.0
    sums: dict[str, float] = {}
    n_steps, stopped_early = 0, False
    for _epoch in range(epochs):
        order = torch.randperm(len(transitions), generator=generator).tolist()
        for start in range(0, len(order), minibatch_size):
            batch = [transitions[i] for i in order[start: start + minibatch_size]]
            mask = action_mask(batch, device)
            old_logp = pad_tokens(batch, "old_logp", device)
            advantages = (pad_tokens(batch, "advantages", device) - mean) / (std + 1e-8) * mask
            out = forward(batch)
            policy_loss, stats = clipped_policy_loss(out.logp, old_logp, advantages, mask, clip)
            value_loss = clipped_value_loss(out.values, pad_tokens(batch, "values", device),
                                            pad_tokens(batch, "returns", device), mask, settings.value_clip)
            entropy = masked_mean(out.entropy, mask) if out.entropy is not None else torch.zeros((), device=device)
            approx_kl = stats["approx_kl"].item()
            if settings.target_kl is not None and approx_kl > 1.5 * settings.target_kl:
                stopped_early = True  # as SB3: this minibatch already sees a policy too far from π_old; no step
                break
            loss = policy_loss + settings.value_coef * value_loss - settings.entropy_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            step_stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                          "entropy": entropy.item(), "approx_kl": approx_kl,
                          "clip_fraction": stats["clip_fraction"].item(), "grad_norm": float(grad_norm)}
            for key, value in step_stats.items():
                sums[key] = sums.get(key, 0.0) + value
            n_steps += 1
        if stopped_early:
            break
    result = {key: value / max(n_steps, 1) for key, value in sums.items()}
    result.update(gradient_steps=float(n_steps), epochs_run=float(_epoch + 1), stopped_early=float(stopped_early))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig(LearnerConfig):
    """Every hyperparameter of the PPO learner (one schema for Python and `etpo train --agent ppo`)."""

    # rollouts
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={
        "help": "How actions are sampled. PPO trains the sampled distribution softmax(logits/temperature) (any "
                "temperature > 0); top_k/top_p are refused (training does not reproduce them)."})
    # reward shaping: KL penalty to the reference policy ρ
    kl_coef: float = field(default=0.05, metadata={"help": "β: per-token KL penalty coefficient (initial value "
                                                           "when the adaptive controller is on)."})
    kl_estimator: KLEstimator = field(default="k1", metadata={"help": "Per-token KL estimator in the reward: k1 = log π/ρ, "
                                                             "k3 = (ρ/π - 1) - log ρ/π (never negative)."})
    kl_target: float | None = field(default=None, metadata={"help": "Target KL per token for the adaptive β "
                                                                    "controller (None = fixed β)."})
    kl_horizon: float = field(default=10_000.0, metadata={"help": "Adaptive controller horizon, in tokens."})
    # advantage estimation
    gamma: float = field(default=0.9, metadata={"help": "γ: discount between env steps with the decomposed backup "
                                                        "(ETPO's default), after every token with the naive one."})
    lam: float = field(default=0.95, metadata={"help": "λ of GAE from one action to the next (between env steps)."})
    lam_in_action: float = field(default=1.0, metadata={
        "help": "λ of GAE between the tokens of one action. The env reward sits on an action's last token, ~200 "
                "tokens after its first: at 0.95 the trace reaching the first token is 0.95^200 ≈ 4e-5 of it, so "
                "only the value function's (slow) backup could carry credit there; 1 gives every token of the "
                "action the action's own return minus V (the intra-action credit of Wen et al.'s POAD/BAD)."})
    decomposed_backup: bool = field(default=True, metadata={"help": "Action-decomposed backup: no discount inside "
                                                                    "an action, γ only between actions. false = "
                                                                    "naive token-level backup (γ after every token; "
                                                                    "identical when γ = 1, as in RLHF)."})
    normalize_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over each batch."})
    # optimisation
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the policy adapter."})
    value_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the value head (and value "
                                                            "adapter)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    epochs: int = field(default=4, metadata={"help": "Passes over each batch."})
    minibatch_size: int = field(default=4, metadata={"help": "Actions per gradient step."})
    clip: float = field(default=0.2, metadata={"help": "ε: policy ratio clip range."})
    value_clip: float | None = field(default=0.2, metadata={"help": "ε_v: value clip range around the rollout "
                                                                    "values (None = unclipped value loss)."})
    value_coef: float = field(default=0.5, metadata={"help": "c_v: weight of the value loss."})
    entropy_coef: float = field(default=0.0, metadata={"help": "c_H: entropy bonus weight (the KL penalty usually "
                                                               "suffices)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip per step."})
    target_kl: float | None = field(default=0.1, metadata={"help": "Stop an update's epochs once a minibatch's "
                                                                   "approx KL(π_old‖π_θ) > 1.5×this (None = off)."})
    # model
    value_model: Literal["shared", "adapter"] = field(default="adapter", metadata={
        "help": "adapter: the value head on a LoRA adapter of its own; shared: on the policy adapter's features "
                "(one forward pass, but the value loss then shapes the policy's features). adapter (was shared): on "
                "the env's own reward (titanic, B = 512, 3 seeds) first-attempt validity +0.22 and episode return "
                "+0.60 where shared lost 0.42 of return on both of 2 seeds; keyword probes +0.08 on average paired "
                "by seed, entropy growth lower; about 1.5x the update time (bench/learnability.py; README)."})
    init_adapter: str | None = field(default=None, metadata={"help": "Start π from this saved LoRA adapter "
                                                                     "(e.g. an SFT run's checkpoint/policy/policy); "
                                                                     "ρ is then a frozen copy of it. None: a fresh "
                                                                     "adapter, ρ = the base model."})
    exact_kl_diagnostic: bool = field(default=True, metadata={"help": "Also log the exact whole-vocabulary "
                                                                      "KL(π‖ρ) per token (one more no-grad "
                                                                      "reference pass per iteration)."})

    def __post_init__(self):
        super().__post_init__()  # kl_estimator, value_model: one of their choices
        self.require_at_least_one("epochs", "minibatch_size", "rollout_steps", "num_envs")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0 and 0.0 <= self.lam_in_action <= 1.0):
            raise ValueError("gamma, lam and lam_in_action must lie in [0, 1]")
        check_sampled_generation(self.generation, "PPO")

    def update_settings(self) -> PPOUpdateSettings:
        return PPOUpdateSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PPOUpdateSettings)})


# ---------------------------------------------------------------------------------------------------------------
# The learner
# ---------------------------------------------------------------------------------------------------------------

class PPOAgent(Learner):
    """Token-level PPO on an `LMPolicy`: a "policy" LoRA adapter, ρ = the reference, a scalar value head.

    `value_model="shared"` puts the head on the policy adapter's last hidden state (one forward pass, the value
    loss also shapes the shared features); `"adapter"` gives the value its own LoRA adapter on the same base.
    The learner shell (agents/learner.py) collects `rollout_steps` env steps; `train` is one PPO update on them.
    """

    config_class = PPOConfig
    needs_reference_logprobs = False  # log ρ (at the sampling temperature) is recomputed in annotate_values

    def adapters(self) -> tuple[dict[str, Any], str]:
        cfg = self.config
        if cfg.init_adapter:
            start = str(_adapter_dir(cfg.init_adapter))
            adapters: dict[str, Any] = {"reference": start, "policy": start}
            reference = "adapter:reference"
        else:
            adapters, reference = {"policy": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)}, "base"
        if cfg.value_model == "adapter":
            adapters["value"] = default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)
        return adapters, reference

    def setup(self) -> None:
        cfg = self.config
        hidden_size = self.policy.hf_model.config.hidden_size
        self.value_head = torch.nn.Linear(hidden_size, 1).to(self.policy.device)
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        torch.nn.init.zeros_(self.value_head.bias)
        value_params = list(self.value_head.parameters())
        if cfg.value_model == "adapter":
            value_params += self.policy.trainable_parameters("value")
        self.policy_params = self.policy.trainable_parameters("policy")
        self.value_params = value_params
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": cfg.lr}, {"params": self.value_params, "lr": cfg.value_lr}],
            weight_decay=cfg.weight_decay)
        self.kl_controller = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    # -- model passes -----------------------------------------------------------------------------------------------
    def _values(self, hidden_policy: torch.Tensor, obs_ids, action_ids) -> torch.Tensor:
        if self.config.value_model == "adapter":
            hidden_policy = self.policy.action_hidden(obs_ids, action_ids, "value")[0]
        return self.value_head(hidden_policy.float()).squeeze(-1)

    def forward(self, transitions: Sequence[Any]) -> ForwardOutput:
        """Per action token: log π_θ, V, entropy of π_θ (differentiable; whole-vocabulary work in chunks), π_θ being
        the sampled distribution softmax(logits/temperature)."""
        return self._score(transitions)[0]

    def _score(self, transitions: Sequence[Any], reference: bool = False, with_entropy: bool = True
               ) -> tuple[ForwardOutput, dict[str, torch.Tensor] | None]:
        """`forward`, and what annotate_values also needs. The one function both the update and the no-grad
        pass before it use, so π_old is exactly the π_θ the first minibatch starts from.

        With `reference`, also returns flat (over action tokens) log ρ ("ref_logp") and, with
        `exact_kl_diagnostic`, the whole-vocabulary KL(π‖ρ) ("kl"), both at the sampling temperature."""
        cfg, temperature = self.config, float(self.config.generation.temperature)
        scored = action_pass(self.policy, transitions, "policy", temperature, cfg.chunk_size)
        ent = None
        if with_entropy:
            if cfg.entropy_coef > 0:
                token_entropy = entropy(scored.rows, scored.head, cfg.chunk_size)
            else:  # diagnostic only: no graph through the vocabulary
                with torch.no_grad():
                    token_entropy = entropy(scored.rows.detach(), scored.head, cfg.chunk_size)
            ent = scored.hidden.new_zeros(scored.mask.shape, dtype=torch.float32).masked_scatter(
                scored.mask, token_entropy)
        values = self._values(scored.hidden, scored.obs_ids, scored.action_ids) * scored.mask
        out = ForwardOutput(logp=scored.logp, values=values, entropy=ent)
        if not reference:
            return out, None
        return out, reference_scores(self.policy, scored, temperature, cfg.chunk_size, cfg.exact_kl_diagnostic)

    @torch.no_grad()
    def state_values(self, obs_ids: Sequence[Sequence[int]]) -> list[float]:
        """V(s) of observations (the state before an action's first token): bootstrap values after truncation."""
        adapter = "value" if self.config.value_model == "adapter" else "policy"
        ids, mask = pad_sequences([list(o) for o in obs_ids], self.policy.pad_id, "right", self.policy.device)
        hidden = self.policy.hidden_states(ids, mask, adapter)
        last = mask.sum(1) - 1
        return self.value_head(hidden[torch.arange(len(last)), last].float()).squeeze(-1).tolist()

    @torch.no_grad()
    def annotate_values(self, transitions: Sequence[Any], batch_size: int = 8) -> dict[int, float]:
        """Store, per action token, V(u_j) in `values`, log π_old in `old_logp` and log ρ in `ref_logp` (both at the
        sampling temperature, by `_score`, the function the update uses); return
        bootstrap V(s') per unfinished chain.

        With `exact_kl_diagnostic`, also stores the exact whole-vocabulary KL(π‖ρ) per token in `kl`.
        """
        for start in range(0, len(transitions), batch_size):
            batch = transitions[start: start + batch_size]
            out, extra = self._score(batch, reference=True, with_entropy=False)  # extra: ref_logp (and kl)
            fill_per_token(batch, values=out.values.cpu().numpy(), old_logp=out.logp.cpu().numpy(),
                           **{key: value.cpu().numpy() for key, value in extra.items()})
        unfinished = [i for i in (chain[-1] for chain in episode_chains(transitions))
                      if not transitions[i].terminated and transitions[i].next_obs_ids is not None]
        if not unfinished:
            return {}
        values = self.state_values([transitions[i].next_obs_ids for i in unfinished])
        return dict(zip(unfinished, values, strict=True))

    # -- learning ---------------------------------------------------------------------------------------------------
    def train(self, transitions: Sequence[Any]) -> dict[str, float]:
        """One PPO update on collected transitions: values, per-token rewards and GAE, the PPO epochs; then adapt β."""
        cfg = self.config
        tick = time.perf_counter()
        bootstrap = self.annotate_values(transitions)
        kl_coef = self.kl_controller.value
        kl_estimate = compute_advantages(transitions, bootstrap, kl_coef=kl_coef, gamma=cfg.gamma, lam=cfg.lam,
                                         decomposed=cfg.decomposed_backup, kl_estimator=cfg.kl_estimator,
                                         lam_in_action=cfg.lam_in_action)["kl_estimate"]
        time_advantages = time.perf_counter() - tick

        tick = time.perf_counter()
        update_stats = ppo_update(transitions, self.forward, self.optimizer, self.policy_params + self.value_params,
                                  cfg.update_settings(), self.generator, self.policy.device)
        time_update = time.perf_counter() - tick

        n_tokens = sum(len(t.action_ids) for t in transitions)
        self.kl_controller.update(kl_estimate, n_tokens)
        # kl_to_reference: exact whole-vocabulary KL(π_old‖ρ) per token when enabled, else the reward's estimate.
        if cfg.exact_kl_diagnostic:
            kl_to_reference = float(np.concatenate([t.per_token("kl") for t in transitions]).mean())
        else:
            kl_to_reference = kl_estimate
        values = np.concatenate([t.per_token("values") for t in transitions])
        returns = np.concatenate([t.per_token("returns") for t in transitions])
        first, last = first_and_last_tenth(t.per_token("advantages") for t in transitions)
        return {  # reward_mean and reward_max: the collector's (agents/rollout.py), one computation for every learner
            "signal/advantage_first_tenth": first,  # raw |advantage| (before whitening) by token position
            "signal/advantage_last_tenth": last,
            "kl_to_reference": kl_to_reference,
            "kl_estimate": kl_estimate,
            "kl_coef": kl_coef,
            "explained_variance": explained_variance(values, returns),
            "value_mean": float(values.mean()),
            "return_mean": float(returns.mean()),
            "tokens_per_action": n_tokens / len(transitions),
            **update_stats,
            "time_advantages_s": time_advantages,
            "time_update_s": time_update,
            # bytes held per action token once PPO's per-token annotations (values, advantages, ...) are filled in
            "buffer_bytes_per_token": sum(t.nbytes() for t in transitions) / max(n_tokens, 1),
        }

    def state_dict(self) -> dict[str, Any]:
        """Value head, optimizer, KL controller and the minibatch generator (adapters travel with the policy)."""
        return {"value_head": self.value_head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "kl_coef": self.kl_controller.value, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.value = float(state["kl_coef"])
        self.generator.set_state(state["generator"])


def _adapter_dir(path: str | Path) -> Path:
    """A saved LoRA adapter: the folder with adapter_config.json, or an LMPolicy.save folder holding "policy"."""
    path = Path(path)
    for candidate in (path, path / "policy", path / "policy" / "policy"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {path} or its policy/ sub-folder")
