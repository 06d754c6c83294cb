"""Token-level PPO with a KL penalty to a reference policy: the RLHF-style baseline ETPO is compared against.

Every generated token is one PPO step. For an episode whose actions a_1..a_K (code strings) have n_1..n_K tokens:

  per-token reward   r_j = -β·k(π_old, ρ)_j  (+ R_k, the environment reward, on the last token of a_k only)
                     k = k1: log π - log ρ          k = k3: (ρ/π - 1) - log(ρ/π)   (Schulman's unbiased, ≥ 0)
  value              V(u_j), a scalar head on the LM's last hidden state at token state u_j (prompt + prefix)
  TD error           δ_j = r_j + d_j·V(u_{j+1}) - V(u_j)
  GAE                A_j = δ_j + d_j·λ·A_{j+1},      return target  G_j = A_j + V(u_j)
  discount d_j       naive token-level backup:  γ after every token
                     action-decomposed backup:  1 inside an action, γ only from an action's last token to the
                                                next action's first token (no discount inside an action; the env
                                                reward still arrives only at the last token)
                     0 after the last token of a terminated episode; a truncated episode bootstraps from V(s').
  policy loss        -E[min(ρ_t·Â, clip(ρ_t, 1-ε, 1+ε)·Â)],  ρ_t = π_θ/π_old per token, Â whitened per batch
  value loss         ½·E[max((V-G)², (V_old + clip(V-V_old, ±ε_v) - G)²)]
  total              policy + c_v·value - c_H·entropy;  several epochs of shuffled minibatches, gradient-norm
                     clipping, and an early stop once the approximate KL(π_old‖π_θ) passes a target.
  adaptive β         (Ziegler et al. 2019) β ← β·(1 + clip(KL/KL_target - 1, ±0.2)·n_tokens/horizon)

The pure functions at the top hold all of the math and are what the tests check by hand. `ppo_update` runs the
epochs/minibatches on any `forward(transitions)` (the LM, or a tiny tabular model in the tests), and `PPOAgent`
wires it to the shared LMPolicy, RolloutCollector and RunLogger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

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


def gae(rewards: np.ndarray, values: np.ndarray, discounts: np.ndarray, lam: float,
        bootstrap_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over one flat token sequence (one episode chain).

    values[j] = V(u_j); discounts[j] multiplies V(u_{j+1}) (and the trace) after step j; the value after the last
    step is `bootstrap_value` (ignored when the last discount is 0). Returns (advantages, return targets).
    Written as a loop because the discount varies per step (scipy's lfilter needs constant coefficients).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    discounts = np.asarray(discounts, dtype=np.float64)
    if not (rewards.shape == values.shape == discounts.shape and rewards.ndim == 1):
        raise ValueError(f"shape mismatch: rewards {rewards.shape}, values {values.shape}, discounts {discounts.shape}")
    next_values = np.append(values[1:], bootstrap_value)
    deltas = rewards + discounts * next_values - values
    advantages = np.empty_like(deltas)
    running = 0.0
    for j in range(len(deltas) - 1, -1, -1):
        running = deltas[j] + discounts[j] * lam * running
        advantages[j] = running
    return advantages, advantages + values


def episode_gae(action_lengths: Sequence[int], env_rewards: Sequence[float], kl: np.ndarray, values: np.ndarray,
                *, kl_coef: float, gamma: float, lam: float, decomposed: bool, terminated: bool,
                bootstrap_value: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rewards, advantages and returns for one episode chain (its actions' tokens concatenated).

    `kl`, `values` are flat over all tokens of the chain. If the chain ends without termination (truncated, or
    cut by the end of a rollout), the value after its last token is `bootstrap_value` = V(s').
    """
    rewards, discounts = [], []
    for k, (n, r) in enumerate(zip(action_lengths, env_rewards, strict=True)):
        start = sum(action_lengths[:k])
        rewards.append(token_rewards(kl[start:start + n], r, kl_coef))
        last = k == len(action_lengths) - 1
        end = 0.0 if (last and terminated) else gamma
        discounts.append(token_discounts(n, gamma, decomposed, end))
    flat_rewards = np.concatenate(rewards)
    advantages, returns = gae(flat_rewards, values, np.concatenate(discounts), lam,
                              0.0 if terminated else bootstrap_value)
    return flat_rewards, advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean, unit-variance over the valid entries (a constant batch becomes zeros, not NaN)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (to minimise) plus the diagnostics computed from the same ratios.

    approx_kl is k3 of KL(π_old‖π_θ) = E[(r - 1) - log r]; clip_fraction is the share of tokens whose ratio left
    [1-ε, 1+ε].
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return loss, {"approx_kl": approx_kl, "clip_fraction": clip_fraction}


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


def episode_chains(transitions: Sequence[Any]) -> list[list[int]]:
    """Buffer indices grouped into episode chains, each in time order (a chain may start mid-episode)."""
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


def compute_advantages(transitions: Sequence[Any], bootstrap_values: dict[int, float], *, kl_coef: float,
                       gamma: float, lam: float, decomposed: bool, kl_estimator: KLEstimator) -> dict[str, float]:
    """Fill `extras["rewards" | "advantages" | "returns"]` of every transition from `extras["values"]`.

    `bootstrap_values[i]` is V(s') for a chain whose last transition i did not terminate (truncated, or cut by
    the end of the rollout); missing entries count as 0. Returns the mean per-token KL estimate to the reference.
    """
    kl_sum, kl_tokens = 0.0, 0
    for chain in episode_chains(transitions):
        steps = [transitions[i] for i in chain]
        kl = np.concatenate([kl_per_token(t.logp, t.ref_logp, kl_estimator) for t in steps])
        values = np.concatenate([np.asarray(t.extras["values"], np.float64) for t in steps])
        lengths = [len(t.action_ids) for t in steps]
        rewards, advantages, returns = episode_gae(
            lengths, [float(t.reward) for t in steps], kl, values, kl_coef=kl_coef, gamma=gamma, lam=lam,
            decomposed=decomposed, terminated=bool(steps[-1].terminated),
            bootstrap_value=float(bootstrap_values.get(chain[-1], 0.0)))
        offsets = np.cumsum([0, *lengths])
        for t, a, b in zip(steps, offsets[:-1], offsets[1:], strict=True):
            t.extras["rewards"] = rewards[a:b].astype(np.float32)
            t.extras["advantages"] = advantages[a:b].astype(np.float32)
            t.extras["returns"] = returns[a:b].astype(np.float32)
        kl_sum += float(kl.sum())
        kl_tokens += kl.size
    return {"kl_to_reference": kl_sum / max(kl_tokens, 1)}


# ---------------------------------------------------------------------------------------------------------------
# The update: epochs of shuffled minibatches over any forward(transitions) -> ForwardOutput
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ForwardOutput:
    """Per action token, padded to (batch, longest action): log π_θ, V_φ, and entropy of π_θ (or None)."""

    logp: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor | None = None


def pad_extras(transitions: Sequence[Any], key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack one per-token scalar (`logp` or an `extras` key) right-padded with zeros to (batch, longest)."""
    rows = [t.logp if key == "logp" else t.extras[key] for t in transitions]
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(np.asarray(row, np.float32))
    return out.to(device)


def action_mask(transitions: Sequence[Any], device: torch.device | str = "cpu") -> torch.Tensor:
    lengths = torch.tensor([len(t.action_ids) for t in transitions])
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float().to(device)


def ppo_update(transitions: Sequence[Any], forward: Callable[[Sequence[Any]], ForwardOutput],
               optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], *, epochs: int,
               minibatch_size: int, clip: float, value_clip: float | None, value_coef: float, entropy_coef: float,
               max_grad_norm: float, target_kl: float | None, normalize_advantages: bool,
               generator: torch.Generator, device: torch.device | str = "cpu") -> dict[str, float]:
    """Several epochs of clipped-PPO minibatch steps; stops (before stepping) once a minibatch's approx-KL(π_old‖π_θ)
    exceeds 1.5·target_kl, as Stable-Baselines3 does.

    Advantages are whitened over the whole batch (not per minibatch: small minibatches make that noisy).
    Transitions must carry extras values/advantages/returns and the sampling-time `logp`.
    """
    if normalize_advantages:
        flat = np.concatenate([t.extras["advantages"] for t in transitions]).astype(np.float64)
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
            old_logp = pad_extras(batch, "logp", device)
            advantages = (pad_extras(batch, "advantages", device) - mean) / (std + 1e-8) * mask
            out = forward(batch)
            policy_loss, stats = clipped_policy_loss(out.logp, old_logp, advantages, mask, clip)
            value_loss = clipped_value_loss(out.values, pad_extras(batch, "values", device),
                                            pad_extras(batch, "returns", device), mask, value_clip)
            entropy = masked_mean(out.entropy, mask) if out.entropy is not None else torch.zeros((), device=device)
            approx_kl = stats["approx_kl"].item()
            if target_kl is not None and approx_kl > 1.5 * target_kl:
                stopped_early = True  # as SB3: this minibatch already sees a policy too far from π_old; no step
                break
            loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
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
