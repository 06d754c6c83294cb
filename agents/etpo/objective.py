"""ETPO's pure math: soft values, the policy and critic losses, the soft λ-return targets (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from agents.ppo import clipped_surrogate
from agents.rollout import episode_chains

# ----------------------------------------------------------------------------------------------------------------
# 1. Pure math. Every function takes logits / Q rows of shape [N, V] (one row per token state) and returns [N].
# ----------------------------------------------------------------------------------------------------------------


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π(·|u) ‖ ρ(·|u)) per row, from unnormalised logits."""
    log_pi = F.log_softmax(policy_logits.float(), dim=-1)
    log_rho = F.log_softmax(ref_logits.float(), dim=-1)
    return (log_pi.exp() * (log_pi - log_rho)).sum(-1)


def token_entropy(policy_logits: torch.Tensor) -> torch.Tensor:
    """H(π(·|u)) per row."""
    log_pi = F.log_softmax(policy_logits.float(), dim=-1)
    return -(log_pi.exp() * log_pi).sum(-1)


def soft_value(policy_logits: torch.Tensor, ref_logits: torch.Tensor, q_values: torch.Tensor,
               beta: float) -> torch.Tensor:
    """V(u) = Σ_w π(w|u)·Q(u,w) − β·KL(π(·|u) ‖ ρ(·|u)) per row."""
    log_pi = F.log_softmax(policy_logits.float(), dim=-1)
    log_rho = F.log_softmax(ref_logits.float(), dim=-1)
    pi = log_pi.exp()
    return (pi * (q_values.float() - beta * (log_pi - log_rho))).sum(-1)


def policy_loss_per_state(policy_logits: torch.Tensor, ref_logits: torch.Tensor, q_values: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """Σ_w π_θ(w|u)·[β·(log π_θ − log ρ) − Q(u,w)] per row; ρ and Q are detached here, gradients reach π_θ only.

    Equal to −soft_value with ρ and Q held fixed; its minimiser over π is ρ·exp(Q/β)/Z.
    """
    log_pi = F.log_softmax(policy_logits.float(), dim=-1)
    log_rho = F.log_softmax(ref_logits.detach().float(), dim=-1)
    return (log_pi.exp() * (beta * (log_pi - log_rho) - q_values.detach().float())).sum(-1)


def sampled_correction_per_state(policy_logits: torch.Tensor, tokens: torch.Tensor, residuals: torch.Tensor,
                                 old_logp: torch.Tensor | None = None, clip: float = 0.0) -> torch.Tensor:
    """−(yʲ − Q_φ(uʲ, wʲ))·log π_θ(wʲ|uʲ) per row: the critic's error at the sampled token, as a score-function term.

    `policy_loss_per_state` follows Q_φ alone, so where Q_φ is wrong (or has not yet learned which tokens of a long
    program mattered) the policy cannot move. Added to it, this term makes the gradient an unbiased estimate of the
    soft objective's gradient under the true Q^π, with Q_φ as control variate: for w ~ π(·|u),
    E_w[(Q^π(u,w) − Q_φ(u,w))·∇log π(w|u)] = Σ_w ∇π(w|u)·(Q^π − Q_φ)(u,w), exactly what using Q_φ for Q^π left out,
    and 0 when Q_φ = Q^π (both tested on an enumerable toy). yʲ (the λ-return target) is the sampled estimate of
    Q^π(uʲ, wʲ); the residuals are detached here.

    With `old_logp` (log π_old(wʲ|uʲ), the policy the tokens were sampled from) and `clip` = ε > 0, the term is
    PPO's clipped surrogate with the residual as advantage, −min(r·δ, clip(r, 1 − ε, 1 + ε)·δ), r = π_θ/π_old: at
    r = 1 (the first step on fresh samples) its gradient is the unclipped term's, −δ·∇log π; once a token's ratio has
    left [1 − ε, 1 + ε] in the direction δ pushes it, the term stops pushing. Without it, the epochs of an update
    push the same sampled tokens again and again (a failed program's tokens down, with no limit).
    """
    log_pi = F.log_softmax(policy_logits.float(), dim=-1)
    logp_taken = log_pi.gather(-1, tokens[:, None]).squeeze(-1)
    residuals = residuals.detach().float()
    if old_logp is None or clip <= 0:
        return -residuals * logp_taken
    return -clipped_surrogate(logp_taken - old_logp.detach().float(), residuals, clip)


def critic_loss_per_token(q_taken: torch.Tensor, targets: torch.Tensor, kind: str = "huber",
                          huber_delta: float = 1.0) -> torch.Tensor:
    """Regression of Q_φ(uʲ, wʲ) on the detached target yʲ, per token ("huber" or "mse", both with a ½ factor)."""
    targets = targets.detach().float()
    if kind == "huber":
        return F.huber_loss(q_taken.float(), targets, reduction="none", delta=huber_delta)
    if kind == "mse":
        return 0.5 * (q_taken.float() - targets) ** 2
    raise ValueError(f"critic loss must be 'huber' or 'mse', got {kind!r}")


def dueling_critic_loss_per_token(value: torch.Tensor, advantage_taken: torch.Tensor, targets: torch.Tensor,
                                  kind: str = "huber", huber_delta: float = 1.0) -> torch.Tensor:
    """Regression of a critic Q(u,w) = V(u) + A(u,w) on y, split so that each part has one meaning.

    V(u) regresses on y (every sampled token of a state teaches V); A(u,w) regresses on the residual y − V(u) with
    V held fixed. So V is the state's value under the sampled data and A how much better the taken token did; a
    token never sampled keeps A ≈ 0, i.e. Q ≈ V(u): "as good as what was tried", never an arbitrary constant.
    Q = V + A still fits y (at the optimum V + A = y).
    """
    return (critic_loss_per_token(value, targets, kind, huber_delta)
            + critic_loss_per_token(value.detach().float() + advantage_taken.float(), targets, kind, huber_delta))


def soft_optimal_policy(ref_logits: torch.Tensor, q_values: torch.Tensor, beta: float) -> torch.Tensor:
    """ρ·exp(Q/β)/Z per row: the policy that minimises `policy_loss_per_state` (used in tests and diagnostics)."""
    return F.softmax(F.log_softmax(ref_logits.float(), -1) + q_values.float() / beta, dim=-1)


def soft_lambda_returns(values: np.ndarray, kls: np.ndarray, rewards: np.ndarray, discounts: np.ndarray,
                        beta: float, lam: float, bootstrap_value: float = 0.0) -> np.ndarray:
    """Soft λ-returns over one flat chain of token states (the tokens of an episode's actions, in order).

    values[j] = V(uʲ) and kls[j] = KL(π‖ρ)(uʲ) at the state *before* token j; rewards[j] is paid after token j (the
    env reward on an action's last token, 0 inside it); discounts[j] multiplies what follows token j (1 inside an
    action, γ after its last token, 0 once the episode terminated). With V(u_N) = `bootstrap_value` after the last
    token, the target of Q(uʲ, wʲ) is

        Gʲ = rʲ + dʲ·[(1 − λ)·V(uʲ⁺¹) + λ·(Gʲ⁺¹ − β·KL(uʲ⁺¹))],   and after the last token: r + d·V(u_N).

    V(u) = E_π Q(u,·) − β·KL(u) is the soft value; Gʲ⁺¹ − β·KL(uʲ⁺¹) is its one-sample estimate along the sampled
    path (the exact per-state KL, not a sampled log-ratio: lower variance, same mean). λ = 0 is the one-step soft
    Bellman backup of the paper (Gʲ = rʲ + dʲ·V(uʲ⁺¹)); λ = 1 the Monte-Carlo soft return (rewards minus β times the
    KLs of the states that follow, discounted between actions). On-policy every λ has the same fixed point, the
    soft Q of π (Peng's Q(λ) with an entropy term); λ > 0 moves an end-of-action reward to the first token in one
    target pass instead of one token per pass. Written as a loop: the discount and the bootstrap vary per step.
    """
    values, kls = np.asarray(values, np.float64), np.asarray(kls, np.float64)
    rewards, discounts = np.asarray(rewards, np.float64), np.asarray(discounts, np.float64)
    if not (values.shape == kls.shape == rewards.shape == discounts.shape and values.ndim == 1):
        raise ValueError(f"shape mismatch: values {values.shape}, kls {kls.shape}, rewards {rewards.shape}, "
                         f"discounts {discounts.shape}")
    returns = np.empty_like(values)
    following = float(bootstrap_value)  # the estimate of V at the state after token j, from the path onwards
    for j in range(len(values) - 1, -1, -1):
        returns[j] = rewards[j] + discounts[j] * following
        following = (1.0 - lam) * values[j] + lam * (returns[j] - beta * kls[j])
    return returns


def soft_bellman_targets(state_values: Sequence[torch.Tensor], rewards: Sequence[float],
                         next_values: Sequence[float], dones: Sequence[bool], gamma: float, *, lam: float = 0.0,
                         beta: float = 0.0, state_kls: Sequence[torch.Tensor] | None = None,
                         next_index: Sequence[int | None] | None = None) -> list[torch.Tensor]:
    """Per-token targets of each transition: soft λ-returns (`soft_lambda_returns`) along episode chains.

    state_values[i] / state_kls[i]: V(uʲ) and KL(π‖ρ)(uʲ) for the n_i token states of transition i;
    next_values[i]: V(u¹_{t+1}) of the next env step (ignored when dones[i]); next_index[i]: the buffer index of
    that next step when it is in the buffer (its tokens then continue the chain for λ > 0).
    λ = 0 gives the paper's one-step targets yʲ = V(uʲ⁺¹) for j < n and yⁿ = r + γ·(1 − done)·V(u¹_{t+1}).
    """
    n = len(state_values)
    next_index = list(next_index) if next_index is not None else [None] * n
    kls = list(state_kls) if state_kls is not None else [torch.zeros_like(v) for v in state_values]
    if lam > 0 and state_kls is None:
        raise ValueError("λ > 0 needs the KL of every token state (state_kls)")
    targets: list[torch.Tensor | None] = [None] * n
    for chain in episode_chains([SimpleNamespace(next_index=k) for k in next_index]):
        lengths = [len(state_values[i]) for i in chain]
        token_rewards, discounts = [], []
        for i, length in zip(chain, lengths, strict=True):
            token_rewards.append(np.r_[np.zeros(length - 1), float(rewards[i])])
            discounts.append(np.r_[np.ones(length - 1), 0.0 if dones[i] else gamma])
        last = chain[-1]
        returns = soft_lambda_returns(torch.cat([state_values[i].double().cpu() for i in chain]).numpy(),
                                      torch.cat([kls[i].double().cpu() for i in chain]).numpy(),
                                      np.concatenate(token_rewards), np.concatenate(discounts), beta, lam,
                                      0.0 if dones[last] else float(next_values[last]))
        for i, part in zip(chain, np.split(returns, np.cumsum(lengths)[:-1]), strict=True):
            targets[i] = torch.from_numpy(part).float()
    return targets


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Correlation of two 1-D tensors; nan when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def discounted_returns(rewards: Sequence[float], dones: Sequence[bool], gamma: float) -> list[float]:
    """Realised return from each env step to the end of its episode segment (for the corr(Q, return) diagnostic).

    `rewards`/`dones` are the steps of one episode in order.
    """
    out, running = [0.0] * len(rewards), 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + gamma * (0.0 if dones[i] else running)
        out[i] = running
    return out
