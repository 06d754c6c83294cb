"""ETPO: Entropy-regularized Token-level Policy Optimization (arXiv 2402.06700), readable top to bottom.

The algorithm
-------------
An environment action a_t is a token sequence w¹…wⁿ. Each token is an action of a token-level MDP whose state is
uʲ = (s_t, w¹…wʲ⁻¹). Three functions of a token state, all over the whole vocabulary V:

- π_θ(·|u): the policy (the LM with the trainable "policy" LoRA adapter),
- ρ(·|u):  the reference (the base LM with adapters off, or a frozen reference adapter),
- Q_φ(u,·) ∈ ℝ^|V|: the critic (the LM with its own "critic" LoRA adapter and a vocabulary-sized Q output), and its
  target Q_φ̄, an exponential moving average of the critic parameters φ (critic parameters only).

Soft value of a token state (entropy-regularised towards ρ):

    V(u) = Σ_w π(w|u)·Q_φ̄(u,w) − β·KL(π(·|u) ‖ ρ(·|u))

Per-token soft Bellman targets for the tokens of action a_t (no reward and no discount inside an action), the
paper's one-step backup:

    yʲ = V(uʲ⁺¹)                                   for j < n
    yⁿ = r_t + γ·(1 − done_t)·V(u¹_{t+1})          (u¹_{t+1}: the first token state of the next env step)

Deviation from the paper (ETPOConfig.lam, default 1): the targets are soft λ-returns along the sampled path, over the
tokens of an action and across actions (`soft_lambda_returns`),

    yʲ = rʲ + dʲ·[(1 − λ)·V(uʲ⁺¹) + λ·(yʲ⁺¹ − β·KL(π‖ρ)(uʲ⁺¹))]

(rʲ, dʲ: the reward and discount after token j, as above). λ = 0 is the one-step backup above, bit for bit
(`--set lam=0` reproduces the paper). Why: the env reward sits on the last of ~200 tokens, and a one-step backup
moves it back one token per target refresh, so the tokens that decide a program (its first lines) never see it
within any budget a user can run; at λ = 1 every token regresses on the action's soft return in the first update.
On-policy every λ has the same fixed point (tested on an enumerable toy).

Critic loss: Huber (or MSE) between Q_φ(uʲ, wʲ) and the detached yʲ, averaged over valid tokens.

Policy improvement, an expectation under π over the whole vocabulary with ρ and Q detached:

    L_π = mean_u Σ_w π_θ(w|u)·[β·(log π_θ(w|u) − log ρ(w|u)) − Q_φ(u,w)]  =  mean_u [β·KL(π_θ‖ρ) − E_π Q_φ]

whose minimiser at every state is π(w|u) ∝ ρ(w|u)·exp(Q_φ(u,w)/β). At the fixed point the token-level solution is the
sequence-level soft-optimal policy π*(a|s) ∝ ρ(a|s)·exp(Q*(s,a)/β), because per-token KLs add up to the sequence KL
(the chain rule; tested).

At a sampling temperature T ≠ 1, π and ρ above are the tempered distributions softmax(logits/T), π being what is
sampled (as PPO's policy); top-k/top-p filters are refused, since every sum here runs over the whole vocabulary.

How it is laid out
------------------
1. Pure math on logits (`soft_value`, `soft_bellman_targets`, `critic_loss`, `policy_loss`, `token_kl`, ...).
2. The update: `TokenModels` (anything that turns token ids into hidden states and heads per role: the LM learner
   below, or a tabular table in the tests), packing of transitions, the target pass, and `etpo_update` which does the
   optimiser steps. Full-vocabulary tensors exist only for one chunk of token states at a time: hidden states are
   gathered at action positions, then heads are applied `chunk_size` rows at a time under activation checkpointing,
   so the backward pass never holds (tokens × V) floats either (unless they are few: `KEPT_HEAD_ELEMENTS`).
3. `ETPOConfig` (every hyperparameter, documented) and `ETPOAgent`: the update on a language model, inside the
   shared learner shell (agents/learner.py: learn → collect → train, counters, logging, checkpoints, resume).

Not reproduced from the public reference implementation (on purpose): a uniform mean over the vocabulary in the
policy step (which makes its gradient independent of Q); ρ absent from the policy step; the within-action KL read
from the next environment step; fp16 weights without fp32 masters; four full model copies; full-vocabulary tensors
kept in host memory; no resume.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from agents.learner import (
    NUM_ENVS_HELP,
    Learner,
    LearnerConfig,
    check_sampled_generation,
    first_and_last_tenth,
)
from agents.lm import GenerationSettings, load_causal_lm, peft_wrapping, tempered
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


# ----------------------------------------------------------------------------------------------------------------
# Optimiser helpers: Lion (optional) and the EMA target.
# ----------------------------------------------------------------------------------------------------------------


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated momentum.

    Written out here (twelve lines) because torch ships no Lion and the update is simpler than a new dependency.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((exp_avg * beta1 + p.grad * (1 - beta1)).sign_(), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return None


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'lion', got {name!r}")


@torch.no_grad()
def ema_update(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], rate: float) -> None:
    """target ← (1 − rate)·target + rate·online (Polyak averaging of the critic parameters)."""
    for t, o in zip(target, online, strict=True):
        t.lerp_(o.detach().to(t.dtype), rate)


# ----------------------------------------------------------------------------------------------------------------
# 2. The update, shared by the LM learner and the tabular toy problems in the tests.
# ----------------------------------------------------------------------------------------------------------------

Role = Literal["policy", "reference", "critic", "target"]


class Critic(torch.nn.Module):
    """Q_φ(u, ·) ∈ ℝ^|V| from the critic's features h, and how Q_φ is regressed on the targets y.

    One class per kind of critic (`ETPOConfig.critic`: `DuelingCritic`, `HeadCritic`, `LMHeadCritic`); the update
    calls only `q_rows` and `loss_sum`, so a new kind is a new class, never a branch in the update. A module: its own
    parameters (if any; the critic adapter's are the model's) train with the critic and travel in checkpoints.
    """

    row_width: int | None = None  # width of the rows `loss_sum` forms per token state (None: the vocabulary's)

    def q_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, H] features → Q_φ(u, ·) [n, V], float32."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.q_rows(hidden)

    def loss_sum(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, kind: str,
                 delta: float) -> torch.Tensor:
        """Summed regression loss over n token states: Q_φ(uʲ, wʲ) on yʲ (`critic_loss_per_token`)."""
        return critic_loss_per_token(_taken(self.q_rows(hidden), tokens), targets, kind, delta).sum()


class ValueAdvantageCritic(Critic):
    """A critic Q(u, w) = V(u) + A(u, w) whose two parts are regressed as `dueling_critic_loss_per_token` says."""

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, H] → V [n] and A [n, V]."""
        raise NotImplementedError

    def split_taken(self, hidden: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V [n] and A [n] at the taken tokens (all the loss reads); a subclass that can skip the [n, V] rows does."""
        value, advantage = self.split(hidden)
        return value, _taken(advantage, tokens)

    def q_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        value, advantage = self.split(hidden)
        return value.float()[:, None] + advantage.float()

    def loss_sum(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, kind: str,
                 delta: float) -> torch.Tensor:
        value, advantage = self.split_taken(hidden, tokens)
        return dueling_critic_loss_per_token(value, advantage, targets, kind, delta).sum()


class TokenModels(Protocol):
    """What the update needs from a model: features per role, heads that map them to V-sized rows, and the critic.

    Roles: "policy" → π_θ logits, "reference" → ρ logits, "target" → Q_φ̄ (the EMA critic); the online critic Q_φ is
    `critic` on the "critic" role's features. `rows` is called under torch.no_grad() for "reference" and "target"
    (and for everything in the target pass).
    """

    critic: Critic
    vocab_size: int  # the width V of the heads' rows: small updates keep the heads' graphs (`_over_chunks`)

    def rows(self, role: Role, packed: Packed) -> torch.Tensor:
        """The features [N, H] of `packed`'s token states (`gathered_rows` where nothing is shared)."""

    def head(self, role: Role, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] → [N, V] (logits for policy/reference, Q values for critic/target)."""

    def policy_parameters(self) -> list[torch.nn.Parameter]: ...

    def critic_parameters(self) -> list[torch.nn.Parameter]: ...

    def target_parameters(self) -> list[torch.Tensor]: ...


@dataclass
class Packed:
    """A right-padded batch of token sequences and the positions whose outputs score each action token."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    row_batch: torch.Tensor  # [N] which sequence each token state belongs to
    row_pos: torch.Tensor  # [N] position whose output predicts the token (state uʲ = ids[:pos + 1])
    tokens: torch.Tensor  # [N] the action token taken in that state
    lengths: list[int]  # token states per sequence, in order (sum = N)
    pairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # the (obs_ids, action_ids) packed


def pack(sequences: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, device: torch.device | str) -> Packed:
    """(obs_ids, action_ids) pairs → one padded batch. An empty action gives one row: the state right after obs.

    The one-row form is how V(u¹) of a next observation (bootstrap after truncation) is evaluated.
    """
    ids = [np.concatenate([np.asarray(o, dtype=np.int64), np.asarray(a, dtype=np.int64)]) for o, a in sequences]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    row_batch, row_pos, tokens, lengths = [], [], [], []
    for b, ((obs, action), seq) in enumerate(zip(sequences, ids, strict=True)):
        if len(obs) == 0:
            raise ValueError("a transition needs at least one observation token")
        input_ids[b, : len(seq)] = torch.from_numpy(seq)
        mask[b, : len(seq)] = 1
        n = max(len(action), 1)
        row_batch += [b] * n
        row_pos += list(range(len(obs) - 1, len(obs) - 1 + n))
        tokens += [int(t) for t in action] if len(action) else [0]
        lengths.append(n)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Packed(input_ids.to(device), mask.to(device), as_long(row_batch), as_long(row_pos), as_long(tokens),
                  lengths, list(sequences))


def gathered_rows(hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], packed: Packed) -> torch.Tensor:
    """Features of `packed`'s token states ([N, H]) gathered from `hidden(input_ids, attention_mask)` [B, L, H] over
    the padded batch, whose position p predicts token p + 1: for models that share nothing between pairs."""
    return hidden(packed.input_ids, packed.attention_mask)[packed.row_batch, packed.row_pos]


@torch.no_grad()
def reference_rows(models: TokenModels, transitions: Sequence[Any], batch_size: int, pad_id: int,
                   device: Any) -> list[torch.Tensor]:
    """ρ's features at every action token state of `transitions` ([n_i, H] each). ρ never changes during an update,
    so one pass serves every epoch's targets and policy steps (its [N, H] rows are kept, never [N, V] logits)."""
    rows: list[torch.Tensor] = []
    for s in range(0, len(transitions), batch_size):
        packed = pack([(t.obs_ids, t.action_ids) for t in transitions[s: s + batch_size]], pad_id, device)
        rows += list(torch.split(models.rows("reference", packed), packed.lengths))
    return rows


@torch.no_grad()
def state_values(models: TokenModels, packed: Packed, beta: float, chunk_size: int,
                 h_rho: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V(u) and KL(π‖ρ)(u) for every row, with the current π, ρ and the target critic Q_φ̄, `chunk_size` rows of V
    at a time (`h_rho`: ρ's features of these rows when already known, see `reference_rows`). The KL is what the
    λ-returns subtract along the sampled path."""
    h_pi, h_tgt = (models.rows(role, packed) for role in ("policy", "target"))
    h_rho = models.rows("reference", packed) if h_rho is None else h_rho
    values, kls = [], []
    for s in range(0, h_pi.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        pi_logits, rho_logits = models.head("policy", h_pi[sl]), models.head("reference", h_rho[sl])
        values.append(soft_value(pi_logits, rho_logits, models.head("target", h_tgt[sl]), beta))
        kls.append(token_kl(pi_logits, rho_logits))
    return torch.cat(values).float(), torch.cat(kls).float()


def _taken(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The sampled token's entry of each [n, V] row."""
    return rows.gather(-1, tokens[:, None]).squeeze(-1)


def _policy_chunk(models: TokenModels, beta: float, h_pi: torch.Tensor, h_rho: torch.Tensor, h_q: torch.Tensor,
                  tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed policy loss of one chunk of rows (Q held fixed: no graph into the critic), plus detached per-row
    diagnostics [5, n]."""
    pi_logits = models.head("policy", h_pi)
    rho_logits = models.head("reference", h_rho)
    with torch.no_grad():
        q = models.critic.q_rows(h_q)
    policy_sum = policy_loss_per_state(pi_logits, rho_logits, q, beta).sum()
    with torch.no_grad():
        diag = torch.stack([token_kl(pi_logits, rho_logits), token_entropy(pi_logits), _taken(q, tokens),
                            (q * F.softmax(pi_logits.float(), -1)).sum(-1), q.mean(-1)])
    return policy_sum, diag


KEPT_HEAD_ELEMENTS = 1 << 24  # rows × V up to which a head's graph is kept for backward (64 MB per [rows, V] fp32)


def _over_chunks(fn: Callable[..., Any], chunk_size: int, *rows: torch.Tensor, vocab_size: int | None = None
                 ) -> list[Any]:
    """`fn` on `chunk_size` rows of every tensor at a time. When a graph is being built over a large vocabulary,
    each chunk runs under activation checkpointing (backward recomputes its [chunk, V] rows instead of keeping them
    all alive); when all rows × `vocab_size` fit in KEPT_HEAD_ELEMENTS the graphs are kept, since recomputing them
    would cost as much again as the heads' forward (an unknown vocabulary is always checkpointed)."""
    grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    recompute = grad and (vocab_size is None or rows[0].shape[0] * vocab_size > KEPT_HEAD_ELEMENTS)
    out = []
    for s in range(0, rows[0].shape[0], chunk_size):
        parts = [r[s: s + chunk_size] for r in rows]
        out.append(checkpoint(fn, *parts, use_reentrant=False) if recompute else fn(*parts))
    return out


def critic_pass(models: TokenModels, packed: Packed, targets: torch.Tensor, chunk_size: int,
                critic_kind: str = "huber", huber_delta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean critic loss over the rows of `packed` (with its graph) and the critic's features, detached."""
    h_q = models.rows("critic", packed)
    fn = lambda h, t, y: models.critic.loss_sum(h, t, y, critic_kind, huber_delta)  # noqa: E731
    width = models.critic.row_width or models.vocab_size
    sums = _over_chunks(fn, chunk_size, h_q, packed.tokens, targets.to(h_q.device), vocab_size=width)
    return sum(sums[1:], sums[0]) / h_q.shape[0], h_q.detach()


def policy_pass(models: TokenModels, packed: Packed, h_q: torch.Tensor, beta: float, chunk_size: int,
                h_rho: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean policy loss over the rows of `packed` (with its graph) given the critic's features `h_q` (and ρ's,
    `h_rho`, when already known), plus the per-row diagnostics (KL to ρ, entropy, Q of the taken token, E_π Q,
    mean Q over the vocabulary)."""
    h_pi = models.rows("policy", packed)
    if h_rho is None:
        with torch.no_grad():
            h_rho = models.rows("reference", packed)
    fn = lambda hp, hr, hq, t: _policy_chunk(models, beta, hp, hr, hq, t)  # noqa: E731
    outs = _over_chunks(fn, chunk_size, h_pi, h_rho, h_q, packed.tokens, vocab_size=models.vocab_size)
    d = torch.cat([diag for _, diag in outs], dim=1).cpu()
    info = {"kl": d[0], "entropy": d[1], "q_taken": d[2], "q_expected": d[3], "q_vocab_mean": d[4]}
    losses = [loss for loss, _ in outs]
    return sum(losses[1:], losses[0]) / h_pi.shape[0], info


def etpo_losses(models: TokenModels, packed: Packed, targets: torch.Tensor, beta: float, chunk_size: int,
                critic_kind: str = "huber", huber_delta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mean policy loss and mean critic loss over the rows of `packed` (both with graphs), plus diagnostics.

    Each chunk runs under activation checkpointing, so backward recomputes the chunk's [chunk, V] rows instead of
    keeping all of them alive: peak memory is O(chunk × V), not O(tokens × V).
    """
    crit, h_q = critic_pass(models, packed, targets, chunk_size, critic_kind, huber_delta)
    pol, info = policy_pass(models, packed, h_q, beta, chunk_size)
    return pol, crit, info


def etpo_backward(models: TokenModels, packed: Packed, targets: torch.Tensor, beta: float, chunk_size: int,
                  critic_kind: str = "huber", huber_delta: float = 1.0, h_rho: torch.Tensor | None = None
                  ) -> tuple[float, float, dict]:
    """The gradients of both losses of `etpo_losses` (the same gradients), one network at a time: the critic's
    forward and backward, its graph freed, then the policy's. The two graphs never coexist, so the peak is the
    larger one instead of their sum. Returns the two mean losses and the diagnostics."""
    crit, h_q = critic_pass(models, packed, targets, chunk_size, critic_kind, huber_delta)
    crit.backward()
    crit = float(crit.detach())  # drops the last reference to the critic's graph
    pol, info = policy_pass(models, packed, h_q, beta, chunk_size, h_rho)
    pol.backward()
    return float(pol.detach()), crit, info


def next_state_values(models: TokenModels, transitions: Sequence[Any], values: list[torch.Tensor], beta: float,
                      chunk_size: int, pad_id: int, device: Any) -> tuple[list[float], list[bool], int]:
    """V(u¹_{t+1}) per transition and its `done` flag for the targets.

    The next env step's first token state is already in `values` when that step is in the buffer (`next_index`); after
    a time-limit truncation it is evaluated from `next_obs_ids` (truncation is not termination: we bootstrap).
    A transition with neither (the collector stopped mid-episode without a next observation) is treated as terminal
    and counted in the returned number so the caller can report it.
    """
    next_values, dones, missing, bootstrap = [0.0] * len(transitions), [True] * len(transitions), 0, []
    for i, tr in enumerate(transitions):
        if tr.terminated:
            continue
        if tr.next_index is not None:
            next_values[i], dones[i] = float(values[tr.next_index][0]), False
        elif getattr(tr, "next_obs_ids", None) is not None:
            bootstrap.append(i)
        else:
            missing += 1
    if bootstrap:
        packed = pack([(transitions[i].next_obs_ids, np.zeros(0, np.int64)) for i in bootstrap], pad_id, device)
        boot, _ = state_values(models, packed, beta, chunk_size)
        for j, i in enumerate(bootstrap):
            next_values[i], dones[i] = float(boot[j]), False
    return next_values, dones, missing


def compute_targets(models: TokenModels, transitions: Sequence[Any], beta: float, gamma: float, chunk_size: int,
                    batch_size: int, pad_id: int, device: Any, ref_rows: Sequence[torch.Tensor] | None = None,
                    lam: float = 0.0) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The target pass over a whole rollout buffer: V(uʲ) and KL(uʲ) of every token state, then the soft
    λ-return targets (`ref_rows`: ρ's features per transition, from `reference_rows`, when already known)."""
    values: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    for s in range(0, len(transitions), batch_size):
        chunk = transitions[s: s + batch_size]
        packed = pack([(t.obs_ids, t.action_ids) for t in chunk], pad_id, device)
        h_rho = None if ref_rows is None else torch.cat(list(ref_rows[s: s + batch_size]))
        value, kl = state_values(models, packed, beta, chunk_size, h_rho)
        values += list(torch.split(value.cpu(), packed.lengths))
        kls += list(torch.split(kl.cpu(), packed.lengths))
    next_values, dones, missing = next_state_values(models, transitions, values, beta, chunk_size, pad_id, device)
    targets = soft_bellman_targets(values, [float(t.reward) for t in transitions], next_values, dones, gamma,
                                   lam=lam, beta=beta, state_kls=kls,
                                   next_index=[t.next_index for t in transitions])
    return values, targets, missing


@dataclass
class UpdateSettings:
    """The subset of ETPOConfig the update needs (so the toy tests can drive `etpo_update` without an LM)."""

    beta: float
    gamma: float
    lam: float = 0.0
    epochs: int = 1
    minibatch_size: int = 8
    inference_batch_size: int = 8
    chunk_size: int = 256
    critic_loss: str = "huber"
    huber_delta: float = 1.0
    ema_rate: float = 0.05
    max_grad_norm: float = 1.0
    pad_id: int = 0


def grad_norm(params: Sequence[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def etpo_update(models: TokenModels, transitions: Sequence[Any], settings: UpdateSettings,
                policy_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer,
                rng: random.Random, device: Any = "cpu", first_q_out: dict[int, float] | None = None
                ) -> dict[str, float]:
    """One ETPO update on a rollout buffer: ρ's features once (`reference_rows`), then `epochs` passes; each
    recomputes targets, then steps per minibatch.

    Every optimiser step moves the policy (policy loss) and the critic (critic loss) together, then the EMA target;
    their gradients are taken one network at a time (`etpo_backward`), so only one graph is alive at once.
    Returns scalar diagnostics averaged over the steps; `first_q_out` (if given) receives Q_φ(u¹, w¹) of each
    transition from the last pass (for the correlation of Q with realised returns).
    """
    policy_params, critic_params = models.policy_parameters(), models.critic_parameters()
    stats: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        stats.setdefault(key, []).append(float(value))

    t0 = time.perf_counter()
    ref_rows = reference_rows(models, transitions, settings.inference_batch_size, settings.pad_id, device)
    record("time/reference_s", time.perf_counter() - t0)
    for _ in range(settings.epochs):
        t0 = time.perf_counter()
        _, targets, missing = compute_targets(models, transitions, settings.beta, settings.gamma, settings.chunk_size,
                                              settings.inference_batch_size, settings.pad_id, device, ref_rows,
                                              settings.lam)
        record("time/targets_s", time.perf_counter() - t0)
        record("targets/unbootstrapped", missing)
        order = list(range(len(transitions)))
        rng.shuffle(order)
        for s in range(0, len(order), settings.minibatch_size):
            idx = order[s: s + settings.minibatch_size]
            t0 = time.perf_counter()
            packed = pack([(transitions[i].obs_ids, transitions[i].action_ids) for i in idx], settings.pad_id, device)
            y = torch.cat([targets[i] for i in idx])
            policy_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            pol_loss, crit_loss, diag = etpo_backward(models, packed, y, settings.beta, settings.chunk_size,
                                                      settings.critic_loss, settings.huber_delta,
                                                      torch.cat([ref_rows[i] for i in idx]))
            record("grad_norm/policy", grad_norm(policy_params))
            record("grad_norm/critic", grad_norm(critic_params))
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(policy_params, settings.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic_params, settings.max_grad_norm)
            policy_opt.step()
            critic_opt.step()
            ema_update(models.target_parameters(), critic_params, settings.ema_rate)
            if first_q_out is not None:
                for i, q_rows in zip(idx, torch.split(diag["q_taken"], packed.lengths), strict=True):
                    first_q_out[i] = float(q_rows[0])
            record("time/step_s", time.perf_counter() - t0)
            record("loss/policy", pol_loss)
            record("loss/critic", crit_loss)
            record("kl", diag["kl"].mean())
            record("entropy", diag["entropy"].mean())
            record("q/taken_mean", diag["q_taken"].mean())
            record("q/taken_std", diag["q_taken"].std() if diag["q_taken"].numel() > 1 else 0.0)
            record("q/expected_mean", diag["q_expected"].mean())
            record("q/vocab_mean", diag["q_vocab_mean"].mean())
            record("targets/mean", y.mean())
            record("targets/std", y.std() if y.numel() > 1 else 0.0)
            record("q/abs_td_error", (diag["q_taken"] - y.cpu()).abs().mean())
            # where the learning signal lands: the critic's error and the taken token's advantage under Q, on the
            # first and the last tenth of each action's tokens
            td = torch.split((diag["q_taken"] - y.cpu()).abs(), packed.lengths)
            advantage = torch.split((diag["q_taken"] - diag["q_expected"]).abs(), packed.lengths)
            for name, parts in (("td_error", td), ("advantage", advantage)):
                first, last = first_and_last_tenth(parts)
                record(f"signal/{name}_first_tenth", first)
                record(f"signal/{name}_last_tenth", last)
            record("tokens_updated", len(y))
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["tokens_updated"] = float(np.sum(stats.get("tokens_updated", [0])))
    return out


def realised_returns(transitions: Sequence[Any], gamma: float) -> list[float]:
    """Discounted return actually collected from each transition to the end of its chain in the buffer."""
    out = [0.0] * len(transitions)
    for chain in episode_chains(transitions):
        rets = discounted_returns([transitions[i].reward for i in chain], [transitions[i].terminated for i in chain],
                                  gamma)
        for i, r in zip(chain, rets, strict=True):
            out[i] = r
    return out


# ----------------------------------------------------------------------------------------------------------------
# 3. The learner on a language model.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ETPOConfig(LearnerConfig):
    """Every hyperparameter of ETPO (one schema for Python and `etpo train --agent etpo`).

    Defaults learn on the tiny model on CPU; for 0.5B–7B models lower the learning rates (1e-5–1e-4).
    """

    # the objective
    beta: float = field(default=0.05, metadata={"help": "β: KL-to-reference weight (temperature of π ∝ ρ·exp(Q/β))."})
    gamma: float = field(default=0.9, metadata={"help": "γ: discount between env steps (none inside an action)."})
    lam: float = field(default=1.0, metadata={
        "help": "λ of the soft λ-return targets, over the tokens of an action and across actions (see "
                "soft_lambda_returns). 0 = the paper's one-step backup yʲ = V(uʲ⁺¹), which moves an end-of-action "
                "reward back one token per target refresh; 1 = the Monte-Carlo soft return, which credits every "
                "token of an action at once."})
    # critic
    critic: Literal["dueling", "head", "lm_head"] = field(default="dueling", metadata={
        "help": "Critic Q(u,·) ∈ R^|V| on the critic adapter's features h. dueling = V(u) + A(u,·): a scalar value "
                "head plus a rank-`critic_rank` map of h read out through the LM's frozen output embedding, A zero "
                "at the start (π = ρ is optimal then) and regressed on y − V, so untried tokens sit at V(u) instead "
                "of an arbitrary 0; its size does not grow with the vocabulary. head = a new zero-initialised "
                "V×H linear head (large at big vocabularies; untried tokens stay at Q = 0). lm_head = the LM's output "
                "layer under the critic adapter, times critic_scale (the paper's choice)."})
    critic_rank: int = field(default=64, metadata={"help": "Rank of the dueling critic's advantage map."})
    critic_scale: float = field(default=0.1, metadata={"help": "Scale of the LM-head logits used as Q (critic=lm_head)."})
    critic_loss: Literal["huber", "mse"] = field(default="huber", metadata={"help": "Critic regression loss."})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold δ."})
    ema_rate: float = field(default=0.05, metadata={"help": "τ: target critic φ̄ ← (1−τ)·φ̄ + τ·φ after each step."})
    # optimisation
    optimizer: Literal["adamw", "lion"] = field(default="adamw", metadata={"help": "adamw or lion."})
    policy_lr: float = field(default=2e-4, metadata={"help": "Learning rate of the policy adapter."})
    critic_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the critic adapter and Q head."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (both optimisers)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip per optimiser (0 = off)."})
    epochs: int = field(default=4, metadata={
        "help": "Passes over each rollout batch; targets are recomputed per pass. 4 (was 2): the start-of-program "
                "keyword probe reached 0.8 in 107 env steps instead of 176 (3 seeds; bench/learnability.py; README)."})
    minibatch_size: int = field(default=4, metadata={"help": "Transitions (actions) per optimiser step."})
    inference_batch_size: int = field(default=16, metadata={
        "help": "Transitions per no-gradient pass (ρ's features, the target pass): larger than a minibatch, since "
                "no graph is kept (a prompt the transitions share runs once per pass)."})
    # rollouts
    rollout_steps: int = field(default=16, metadata={"help": "Env steps (sandboxed programs) per update."})
    num_envs: int = field(default=16, metadata={"help": NUM_ENVS_HELP})
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={
        "help": "How actions are sampled. ETPO trains the sampled distribution: π = softmax(logits/temperature) "
                "and ρ at the same temperature (any temperature > 0); top_k/top_p are refused (the update sums over "
                "the whole vocabulary, so filtered samples would be off-policy)."})
    # model
    reference: str = field(default="base", metadata={"help": "Reference ρ: base (adapters off) or adapter:<name>."})

    def __post_init__(self):
        super().__post_init__()  # critic, critic_loss, optimizer: one of their choices
        if self.beta <= 0:
            raise ValueError("beta must be > 0 (it is the temperature of the soft-optimal policy)")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0 or not 0.0 < self.ema_rate <= 1.0:
            raise ValueError("gamma and lam must lie in [0, 1] and ema_rate in (0, 1]")
        check_sampled_generation(self.generation, "ETPO")
        if min(self.epochs, self.minibatch_size, self.inference_batch_size, self.rollout_steps, self.num_envs, self.chunk_size,
               self.critic_rank, self.generation.max_new_tokens) < 1:
            raise ValueError("epochs, minibatch_size, inference_batch_size, rollout_steps, num_envs, chunk_size, critic_rank and "
                             "max_new_tokens must be >= 1")

    def update_settings(self, pad_id: int) -> UpdateSettings:
        return UpdateSettings(beta=self.beta, gamma=self.gamma, lam=self.lam, epochs=self.epochs, minibatch_size=self.minibatch_size,
                              inference_batch_size=self.inference_batch_size,
                              chunk_size=self.chunk_size, critic_loss=self.critic_loss, huber_delta=self.huber_delta,
                              ema_rate=self.ema_rate, max_grad_norm=self.max_grad_norm, pad_id=pad_id)


class DuelingCritic(ValueAdvantageCritic):
    """Q(u, w) = V(u) + A(u, w) over the critic adapter's features h (see ETPOConfig.critic).

    V(u) = vᵀh + b, a scalar. A(u, ·) = E·(U·(D·h)): a rank-r map of h read out through the LM's frozen output
    embedding E (V×H, the base model's own; not a parameter here, not copied), so every token's advantage comes
    from features shared across the vocabulary and the critic's size is 2·H·r + H + 1 whatever |V|. U and v start
    at zero: Q = 0 and A = 0 at the start.
    """

    def __init__(self, hidden_size: int, rank: int, output_weight: torch.Tensor):
        super().__init__()
        self.value = torch.nn.Linear(hidden_size, 1)
        self.down = torch.nn.Linear(hidden_size, rank, bias=False)
        self.up = torch.nn.Linear(rank, hidden_size, bias=False)
        for zero in (self.value.weight, self.value.bias, self.up.weight):
            torch.nn.init.zeros_(zero)
        self._readout = [output_weight]  # a list keeps the frozen embedding out of parameters() and state_dict()

    row_width = 1  # the loss reads V and A at the taken tokens only (`split_taken`)

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.float()
        (embedding,) = self._readout
        direction = self.up(self.down(hidden))
        return self.value(hidden).squeeze(-1), F.linear(direction.to(embedding.dtype), embedding).float()

    def split_taken(self, hidden: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V(u) and A(u, w) at the taken tokens only ([N] each): each row's direction dotted with its token's
        output embedding, the entry `split` would give, without forming [N, V] rows (the critic loss reads
        nothing else, so its cost no longer grows with the vocabulary)."""
        hidden = hidden.float()
        (embedding,) = self._readout
        direction = self.up(self.down(hidden)).to(embedding.dtype).float()
        return self.value(hidden).squeeze(-1), (direction * embedding[tokens].float()).sum(-1)


class HeadCritic(Critic):
    """Q(u, ·) = W·h + b, a new V×H linear head, zero at the start (untried tokens stay at Q = 0; see
    ETPOConfig.critic). Made on the policy's device: never a V×H fp32 copy on the host."""

    def __init__(self, hidden_size: int, vocab_size: int, device: torch.device | str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size, hidden_size, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size, device=device))

    def q_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight, self.bias)


class LMHeadCritic(Critic):
    """Q(u, ·) = scale · the LM's output layer on the critic adapter's features (the paper's choice): no parameters
    of its own, the critic adapter (and any LoRA on the output layer) carries what it learns."""

    def __init__(self, output: Callable[[torch.Tensor], torch.Tensor], scale: float):
        super().__init__()
        self._output = [output]  # a list keeps the LM's layer out of this module's parameters and state_dict
        self.scale = scale

    def q_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        (output,) = self._output
        return self.scale * output(hidden).float()


_ADAPTER_OF = {"policy": "policy", "reference": None, "critic": "critic", "target": "critic"}  # role -> adapter


class LMTokenModels:
    """`TokenModels` over one LMPolicy: π = "policy" adapter, ρ = reference, Q_φ = "critic" adapter + Q head.

    The target critic Q_φ̄ is not a third adapter: its EMA tensors are swapped into the critic's parameters for the
    duration of a no-grad forward (pointer swaps, no copy), so only one extra copy of the critic's own parameters
    exists — never of the base model.
    """

    def __init__(self, policy: Any, cfg: ETPOConfig):
        self.policy, self.cfg = policy, cfg
        hf = policy.hf_model
        output = hf.get_output_embeddings()
        base_output = getattr(output, "base_layer", output)  # the frozen weight under any LoRA on the output layer
        self.vocab_size = int(base_output.weight.shape[0])  # the width of every head's rows
        # π and ρ score with the model's own logits (its final transform, e.g. softcapping, as generation does);
        # the critic that reuses the output layer takes its raw result
        if hasattr(output, "lora_A"):  # LoRA on the output layer: each role needs its own adapter state
            self._lm_heads = {"policy": policy.head("policy"), "reference": policy.head(None)}
            critic_output = policy.head("critic", transform=False)
        else:  # the output layer is shared and frozen: apply it directly, no adapter switching per chunk
            policy.check_head()
            shared = lambda h: policy.final_logits(output(h))  # noqa: E731
            self._lm_heads, critic_output = {"policy": shared, "reference": shared}, output
        for role in ("policy", "reference"):  # π is the sampled distribution softmax(logits/T), ρ at the same T
            self._lm_heads[role] = tempered(self._lm_heads[role], float(cfg.generation.temperature))
        self.critic = self._make_critic(cfg, hf.config.hidden_size, base_output.weight.detach(), critic_output)
        self.critic.to(policy.device, torch.float32)
        # listed once: the target critic is swapped in for every target head chunk, and a walk over the model's
        # parameters each time cost more than the swap
        self._policy_params = policy.trainable_parameters("policy")
        self._critic_params = policy.trainable_parameters("critic") + list(self.critic.parameters())
        self.target = [p.detach().clone() for p in self.critic_parameters()]

    def _make_critic(self, cfg: ETPOConfig, hidden_size: int, output_weight: torch.Tensor,
                     critic_output: Callable[[torch.Tensor], torch.Tensor]) -> Critic:
        """The one place the kind of critic is read (ETPOConfig.critic)."""
        if cfg.critic == "dueling":
            return DuelingCritic(hidden_size, cfg.critic_rank, output_weight)
        if cfg.critic == "head":
            return HeadCritic(hidden_size, self.vocab_size, self.policy.device)
        return LMHeadCritic(critic_output, cfg.critic_scale)

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._policy_params)

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._critic_params)

    def target_parameters(self) -> list[torch.Tensor]:
        return self.target

    def _swap_target(self) -> None:
        for p, t in zip(self.critic_parameters(), self.target, strict=True):
            p.data, t.data = t.data, p.data

    def _with_target(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("the target critic is evaluated without gradients only")
        self._swap_target()
        try:
            return fn()
        finally:
            self._swap_target()

    def hidden(self, role: Role, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids → [B, L, H] features of the whole padded batch (`rows` is what the update uses)."""
        run = lambda: self.policy.hidden_states(input_ids, attention_mask, _ADAPTER_OF[role])  # noqa: E731
        return self._with_target(run) if role == "target" else run()

    def rows(self, role: Role, packed: Packed) -> torch.Tensor:
        """The features of `packed`'s token states from `LMPolicy.action_states` (a prompt that several of its
        pairs share runs once)."""
        prompts, actions = [list(o) for o, _ in packed.pairs], [list(a) for _, a in packed.pairs]
        run = lambda: self.policy.action_states(prompts, actions, _ADAPTER_OF[role])  # noqa: E731
        return self._with_target(run) if role == "target" else run()

    def head(self, role: Role, hidden: torch.Tensor) -> torch.Tensor:
        if role in ("policy", "reference"):
            return self._lm_heads[role](hidden)
        run = lambda: self.critic.q_rows(hidden)  # noqa: E731
        return self._with_target(run) if role == "target" else run()


def critic_state_bytes(models: LMTokenModels) -> int:
    """Memory of the critic's training state: its trainable parameters in fp32 with their gradients and AdamW's
    two moments (4 copies), plus the EMA target. The base model and the policy adapter are not counted."""
    trainable = sum(p.numel() for p in models.critic_parameters()) * 4 * 4
    return trainable + sum(t.numel() * t.element_size() for t in models.target)


def lm_policy_from_config(hf_config: Any, lora_r: int = 8, lora_alpha: int = 16, device: str = "cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """An LMPolicy with "policy" and "critic" LoRA adapters over a randomly initialised model built from a
    transformers config (no download): for benchmarks of shapes no local checkpoint has."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from agents.lm import LMPolicy, default_lora_config

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config)
    finally:
        torch.set_default_dtype(default)
    with peft_wrapping():
        model = get_peft_model(model, default_lora_config(r=lora_r, alpha=lora_alpha), adapter_name="policy")
    model.add_adapter("critic", default_lora_config(r=lora_r, alpha=lora_alpha))
    model.set_adapter("policy")
    for name, p in model.named_parameters():
        p.requires_grad_(".policy." in name or ".critic." in name)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)  # only the pad id is needed for updates
    policy = LMPolicy(model, tokenizer, device=device, name_or_path=f"<config:{hf_config.model_type}>")
    policy.upcast_trainable_to_fp32()
    return policy


class ETPOAgent(Learner):
    """ETPO on an `LMPolicy`: one base model carrying a "policy" and a "critic" LoRA adapter (see the module doc).

    The learner shell (agents/learner.py) collects `rollout_steps` env steps; `train` is one ETPO update on them.
    """

    config_class = ETPOConfig

    def adapters(self) -> tuple[dict[str, Any], str]:
        from agents.lm import default_lora_config

        cfg = self.config
        return ({"policy": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha),
                 "critic": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)}, cfg.reference)

    def setup(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.models = LMTokenModels(self.policy, cfg)
        self.policy_opt = make_optimizer(self.models.policy_parameters(), cfg.optimizer, cfg.policy_lr,
                                         cfg.weight_decay)
        self.critic_opt = make_optimizer(self.models.critic_parameters(), cfg.optimizer, cfg.critic_lr,
                                         cfg.weight_decay)
        self.rng = random.Random(cfg.seed)  # minibatch order
        self.best_reward = -math.inf

    def train(self, buffer: Sequence[Any]) -> dict[str, float]:
        """One ETPO update on a rollout buffer (the soft Bellman targets, the critic and policy steps), with the
        diagnostics a reviewer needs."""
        cfg = self.config
        transitions = list(buffer)
        tick = time.perf_counter()
        first_q: dict[int, float] = {}
        update = etpo_update(self.models, transitions, cfg.update_settings(self.policy.pad_id), self.policy_opt,
                             self.critic_opt, self.rng, device=self.policy.device, first_q_out=first_q)
        time_update = time.perf_counter() - tick

        n_tokens = sum(len(t.action_ids) for t in transitions)
        rewards = np.array([t.reward for t in transitions], dtype=np.float64)
        self.best_reward = max(self.best_reward, float(rewards.max()))
        returns = realised_returns(transitions, cfg.gamma)
        q_first = [first_q.get(i, float("nan")) for i in range(len(transitions))]
        statuses = [t.info.get("status") for t in transitions]
        return {
            "reward_mean": float(rewards.mean()),
            "success_rate": float(np.mean([s == "ok" for s in statuses])) if any(statuses) else float("nan"),
            "best_reward": self.best_reward,
            "q_return_corr": pearson(torch.tensor(q_first), torch.tensor(returns)),
            "tokens_per_action": n_tokens / len(transitions),
            "kl_to_reference": update.get("kl", float("nan")),  # the name every learner logs KL(π‖ρ) per token under
            "time_update_s": time_update,
            "update_tokens_per_s": update.get("tokens_updated", 0.0) / time_update if time_update > 0 else 0.0,
            **update,
        }

    def state_dict(self) -> dict[str, Any]:
        """Q head, EMA target, both optimisers, the minibatch RNG and the best reward (adapters travel with the
        policy)."""
        return {
            "q_head": self.models.critic.state_dict(),  # the critic's own parameters (none for lm_head)
            "target": [t.cpu() for t in self.models.target],
            "policy_opt": self.policy_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "best_reward": self.best_reward,
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.critic.load_state_dict(state["q_head"] or {})  # None: a checkpoint of an lm_head critic
        with torch.no_grad():
            for t, saved in zip(self.models.target, state["target"], strict=True):
                t.copy_(saved)
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.best_reward = float(state["best_reward"])
        self.rng.setstate(state["rng"])

    def export_policy(self, directory: str | Path) -> Path:
        """Write π alone as a plain transformers model (policy adapter merged into the base) plus tokenizer, for
        `etpo serve`, `agents.tiny.evaluate_samples` or any `from_pretrained` user. The agent is left untouched."""
        from peft import PeftModel

        directory = Path(directory)
        adapter_dir = directory / "_policy_adapter"
        self.policy.model.save_pretrained(str(adapter_dir), selected_adapters=["policy"])
        if not (adapter_dir / "adapter_config.json").exists():
            adapter_dir = adapter_dir / "policy"  # peft puts non-default adapters in a sub-directory
        dtype = self.policy.weights_dtype  # a 4-bit run exports a merged model in its compute dtype
        base = load_causal_lm(self.model_path, dtype=dtype)
        with peft_wrapping():
            merged = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="policy").merge_and_unload()
        merged.save_pretrained(str(directory))
        self.policy.tokenizer.save_pretrained(str(directory))
        shutil.rmtree(directory / "_policy_adapter")
        return directory
