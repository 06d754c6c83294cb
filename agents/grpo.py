"""GRPO / RLOO: critic-free policy optimisation with a group baseline, readable top to bottom.

The algorithm
-------------
Sample G actions a_1..a_G (code strings) for the same observation s, score each with the environment, and use the
other samples as the baseline instead of a learned value function. With R_i the reward credited to action i:

  GRPO advantage     A_i = (R_i − mean(R)) / (std(R) + ε)     std over the group, population form (ddof 0)
                     scale_rewards = false:  A_i = R_i − mean(R)            (Dr. GRPO: no std scaling, which
                                                                           over-weights near-unanimous groups)
  RLOO advantage     A_i = R_i − (1/(G−1))·Σ_{j≠i} R_j  =  G/(G−1)·(R_i − mean(R))       (leave-one-out baseline:
                                                                           independent of a_i, so unbiased)
  group of one       A = 0 for both (no other sample to compare with: the action carries no signal)

Every token of action i gets the same A_i. The per-token loss is PPO's clipped surrogate plus a KL penalty to the
reference ρ inside the loss (not in the reward, as GRPO does):

  ratio              r_t = π_θ(a_t|u_t) / π_old(a_t|u_t)
  ℓ_t                −min(r_t·A, clip(r_t, 1−ε, 1+ε)·A)  +  β·k3_t
  k3                 k3_t = exp(log ρ_t − log π_θ,t) − (log ρ_t − log π_θ,t) − 1      (Schulman's estimator of
                     KL(π‖ρ): unbiased, ≥ 0; its gradient w.r.t. log π_θ,t is 1 − ρ_t/π_θ,t). β = 0 skips the
                     reference pass entirely.
  aggregation        loss = Σ_{i,t} w_{i,t}·ℓ_{i,t} over a minibatch of B actions of n_i tokens:
                     "sequence"  w = 1/(B·n_i)   mean over each action's tokens, then over actions (GRPO)
                     "token"     w = 1/Σ_i n_i   mean over all tokens of the minibatch (DAPO)
                     "constant"  w = 1/(B·L)     L = generation.max_new_tokens (Dr. GRPO: no length bias)

π_old and ρ are the sampled distribution and the reference at the sampling temperature T, softmax(logits/T), as
in PPO; their log-probs are recomputed without gradients at the start of `train` by `GRPOAgent.score`, the very
function the update differentiates, so the first minibatch's ratio is 1 (to float rounding). `iterations` passes
over the batch in shuffled minibatches; AdamW on the "policy" LoRA adapter with gradient-norm clipping.
Top-k/top-p filtering is not reproduced and is refused.

What forms a group
------------------
The collector steps `num_envs` envs at once and generates each round's actions in one batched call. Envs that
start an episode see the same first prompt, so a group is found, not declared: the transitions of one buffer
whose observation token ids are identical (`group_by = "prompt"`, key `tuple(obs_ids)`). Each action is credited
with its own env reward. Later attempts of a multi-attempt episode see feedback prompts that quote their own
earlier program and result, so they are mostly unique: groups of one, advantage 0, no learning signal. That is
the right answer for single-step episodes; for multi-attempt episodes use:

`group_by = "episode"`: each transition is credited with its episode chain's discounted return from that step,
G_k = r_k + γ·r_{k+1} + … (chains are followed by `next_index`; a chain cut by the end of the rollout, or truncated,
uses the rewards collected: there is no critic to bootstrap from), and grouped by the observation of the FIRST step
of its chain together with its step index k in the chain: attempt k of every episode that began from the same
prompt forms one group, whatever feedback it saw. Grouping by position as well as by the first prompt is the
deliberate choice: the returns-to-go of different positions are not comparable (G_0 sums more rewards than G_2),
so one pooled baseline would hand every first attempt a positive and every last attempt a negative advantage
regardless of what was written; and with RLOO, a baseline taken over the same position of *other* episodes stays
independent of the action. A chain that began in an earlier rollout starts here at a feedback prompt of its own,
so its steps form groups of one (advantage 0).

What it saves against ETPO and PPO
----------------------------------
No critic or value head: no critic forward or backward pass, no value loss, no EMA target network, no bootstrap
values, and one optimiser over the policy adapter only. The price is samples: a baseline needs several actions
per observation (G = num_envs at each round's shared prompt), and credit inside an action is uniform (every
token gets the action's advantage; `signal/advantage_first_tenth` equals `signal/advantage_last_tenth`).

References: Shao et al. 2024, DeepSeekMath (GRPO, arXiv 2402.03300); Liu et al. 2025, Understanding R1-Zero-Like
Training (Dr. GRPO, arXiv 2503.20783); Yu et al. 2025, DAPO (token-level loss, arXiv 2503.14476); Ahmadian et al.
2024, Back to Basics: Revisiting REINFORCE-Style Optimization (RLOO, arXiv 2402.14740), after Kool et al. 2019;
Schulman 2020, Approximating KL Divergence (k3). TRL's GRPOTrainer is the reference implementation (it scales by
the sample std, ddof 1, which differs from the population std here by √(G/(G−1)), a constant factor).

How it is laid out
------------------
1. Pure math (`group_advantages`, `returns_to_go`, `group_keys`, `form_groups`, `k3_kl`, `token_weights`,
   `grpo_loss`) — what the tests check by hand.
2. From a buffer to per-token advantages (`compute_group_advantages`) and the update (`grpo_update`) over any
   `score(transitions) -> log π per token` (the LM, or a tabular table in the tests).
3. `GRPOConfig` and `GRPOAgent`, inside the shared learner shell (agents/learner.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from agents.learner import (
    NUM_ENVS_HELP,
    Learner,
    LearnerConfig,
    action_pass,
    check_sampled_generation,
    first_and_last_tenth,
    reference_scores,
)
from agents.lm import GenerationSettings, entropy
from agents.ppo import action_mask, clipped_policy_loss, pad_tokens
from agents.rollout import episode_chains, fill_per_token

GroupBy = Literal["prompt", "episode"]
AdvantageKind = Literal["grpo", "rloo"]
LossNorm = Literal["sequence", "token", "constant"]

# ---------------------------------------------------------------------------------------------------------------
# 1. Pure math
# ---------------------------------------------------------------------------------------------------------------


def group_advantages(rewards: Sequence[float], kind: AdvantageKind = "grpo", scale_rewards: bool = True,
                     eps: float = 1e-4) -> np.ndarray:
    """Advantages of one group's actions from their rewards.

    grpo: (R − mean) / (std + eps), std the population one (ddof 0); without `scale_rewards`, R − mean.
    rloo: R_i − mean of the other G − 1 rewards (`scale_rewards` does not apply). A group of one, or of equal
    rewards, gets exactly 0 (not the float residue of R − mean, which the std scaling would blow up).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.size == 0:
        raise ValueError(f"a group needs a 1-d array of at least one reward, got shape {rewards.shape}")
    if (rewards == rewards[0]).all():
        return np.zeros(rewards.size)
    centred = rewards - rewards.mean()
    if kind == "grpo":
        return centred / (rewards.std() + eps) if scale_rewards else centred
    if kind == "rloo":
        g = rewards.size
        return g / (g - 1) * centred  # R_i − (ΣR − R_i)/(G−1) = G/(G−1)·(R_i − mean)
    raise ValueError(f"unknown advantage kind {kind!r}; use 'grpo' or 'rloo'")


def returns_to_go(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """G_k = r_k + γ·G_{k+1} along one episode chain (0 after its last collected step)."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for k in range(len(rewards) - 1, -1, -1):
        running = float(rewards[k]) + gamma * running
        out[k] = running
    return out


def group_keys(transitions: Sequence[Any], group_by: GroupBy) -> list[Hashable]:
    """The group key of each transition.

    prompt:  the observation's token ids.
    episode: (the token ids of the first observation of its chain, its position in the chain).
    """
    if group_by == "prompt":
        return [tuple(int(i) for i in t.obs_ids) for t in transitions]
    if group_by == "episode":
        keys: list[Hashable] = [None] * len(transitions)
        for chain in episode_chains(transitions):
            first = tuple(int(i) for i in transitions[chain[0]].obs_ids)
            for position, index in enumerate(chain):
                keys[index] = (first, position)
        return keys
    raise ValueError(f"unknown group_by {group_by!r}; use 'prompt' or 'episode'")


def form_groups(transitions: Sequence[Any], group_by: GroupBy) -> list[list[int]]:
    """Buffer indices by group, groups in order of their first member, members in buffer order."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(group_keys(transitions, group_by)):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def action_credits(transitions: Sequence[Any], group_by: GroupBy, gamma: float = 1.0) -> np.ndarray:
    """The reward each action is judged by: its env reward (prompt), or its chain's return from it on (episode)."""
    if group_by == "prompt":
        return np.array([float(t.reward) for t in transitions], dtype=np.float64)
    credits = np.zeros(len(transitions), dtype=np.float64)
    for chain in episode_chains(transitions):
        credits[chain] = returns_to_go([transitions[i].reward for i in chain], gamma)
    return credits


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖ρ) at tokens sampled from π: exp(log ρ − log π) − (log ρ − log π) − 1."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def token_weights(mask: torch.Tensor, loss_norm: LossNorm, max_tokens: int) -> torch.Tensor:
    """w[i, t] with loss = Σ w·ℓ over valid tokens: 1/(B·n_i) (sequence), 1/Σn (token), 1/(B·L) (constant)."""
    batch = mask.shape[0]
    if loss_norm == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp_min(1)
        return (1.0 / (batch * lengths)).expand_as(mask) * mask
    if loss_norm == "token":
        return mask / mask.sum().clamp_min(1)
    if loss_norm == "constant":
        return mask / (batch * max_tokens)
    raise ValueError(f"unknown loss_norm {loss_norm!r}; use 'sequence', 'token' or 'constant'")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip: float, kl_coef: float, loss_norm: LossNorm, max_tokens: int
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one minibatch (padded [B, N] tensors) and its diagnostics.

    Returns (loss, {"policy_loss": the surrogate part, "kl_loss": Σ w·k3 (before β), "approx_kl", "clip_fraction"}).
    `ref_logp` may be None when `kl_coef` is 0.
    """
    weights = token_weights(mask, loss_norm, max_tokens)
    # clipped_policy_loss takes a masked mean of min(r·A, clip(r)·A); that term is positively homogeneous in A, so
    # advantages scaled by w·(number of valid tokens) turn the mean into Σ w·surrogate.
    scale = weights * mask.sum().clamp_min(1)
    policy_loss, stats = clipped_policy_loss(logp, old_logp, advantages * scale, mask, clip)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs")
        kl_loss = (weights * k3_kl(logp, ref_logp)).sum()
    else:
        kl_loss = torch.zeros((), device=logp.device)
    return policy_loss + kl_coef * kl_loss, {"policy_loss": policy_loss, "kl_loss": kl_loss, **stats}


# ---------------------------------------------------------------------------------------------------------------
# 2. From a rollout buffer to per-token advantages, and the update over any score(transitions) -> log π
# ---------------------------------------------------------------------------------------------------------------


def compute_group_advantages(transitions: Sequence[Any], *, group_by: GroupBy, kind: AdvantageKind,
                             scale_rewards: bool, gamma: float = 1.0, eps: float = 1e-4) -> dict[str, float]:
    """Fill `advantages` of every transition (its group advantage on each of its tokens); return the
    group statistics: groups, group_size_mean, zero_advantage_share (share of actions whose advantage is exactly 0)."""
    credits = action_credits(transitions, group_by, gamma)
    groups = form_groups(transitions, group_by)
    advantages = np.zeros(len(transitions), dtype=np.float64)
    for members in groups:
        advantages[members] = group_advantages(credits[members], kind, scale_rewards, eps)
    for t, advantage in zip(transitions, advantages, strict=True):
        t.advantages = np.full(len(t.action_ids), advantage, dtype=np.float32)
    return {"groups": float(len(groups)), "group_size_mean": len(transitions) / max(len(groups), 1),
            "zero_advantage_share": float(np.mean(advantages == 0.0)) if len(advantages) else 0.0}


def grpo_update(transitions: Sequence[Any], score: Callable[[Sequence[Any]], torch.Tensor],
                optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], *, iterations: int,
                minibatch_size: int, clip: float, kl_coef: float, loss_norm: LossNorm, max_tokens: int,
                max_grad_norm: float, generator: torch.Generator, device: torch.device | str = "cpu"
                ) -> dict[str, float]:
    """`iterations` passes over the batch in shuffled minibatches, one clipped gradient step each.

    `score(batch)` returns log π_θ per action token, padded to [B, longest action] (differentiable). Transitions
    carry `advantages` and `old_logp`, and `ref_logp` at the sampling temperature when `kl_coef` > 0. Returns the mean of
    each diagnostic over the steps taken.
    """
    if iterations < 1 or minibatch_size < 1 or not transitions:
        raise ValueError("grpo_update needs iterations >= 1, minibatch_size >= 1 and at least one transition")
    sums: dict[str, float] = {}
    n_steps = 0
    for _ in range(iterations):
        order = torch.randperm(len(transitions), generator=generator).tolist()
        for start in range(0, len(order), minibatch_size):
            batch = [transitions[i] for i in order[start: start + minibatch_size]]
            mask = action_mask(batch, device)
            ref_logp = pad_tokens(batch, "ref_logp", device) if kl_coef > 0 else None
            loss, stats = grpo_loss(score(batch), pad_tokens(batch, "old_logp", device), ref_logp,
                                    pad_tokens(batch, "advantages", device), mask, clip=clip, kl_coef=kl_coef,
                                    loss_norm=loss_norm, max_tokens=max_tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            step_stats = {"loss": loss.item(), **{k: v.item() for k, v in stats.items()},
                          "grad_norm": float(grad_norm)}
            for key, value in step_stats.items():
                sums[key] = sums.get(key, 0.0) + value
            n_steps += 1
    result = {key: value / n_steps for key, value in sums.items()}
    result["gradient_steps"] = float(n_steps)
    return result


# ---------------------------------------------------------------------------------------------------------------
# 3. Configuration and the learner
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig(LearnerConfig):
    """Every hyperparameter of the GRPO/RLOO learner (one schema for Python and `etpo train --agent grpo`)."""

    # rollouts
    num_envs: int = field(default=16, metadata={"help": NUM_ENVS_HELP + " Envs starting an episode share its "
                                                               "first prompt: this is the group size G there."})
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={
        "help": "How actions are sampled. GRPO trains the sampled distribution softmax(logits/temperature) (any "
                "temperature > 0); top_k/top_p are refused (training does not reproduce them)."})
    # groups and advantages
    group_by: GroupBy = field(default="prompt", metadata={
        "help": "prompt: a group = the buffer's actions with identical observation ids, each judged by its own "
                "env reward (feedback prompts of later attempts are mostly unique: groups of one, advantage 0). "
                "episode: each action judged by its episode's discounted return from it on, grouped by the "
                "episode's first observation and the step's position in the episode."})
    advantage: AdvantageKind = field(default="grpo", metadata={
        "help": "grpo: (R − group mean) / (group std + std_eps); rloo: R − mean of the other G−1 rewards."})
    scale_rewards: bool = field(default=True, metadata={
        "help": "grpo: divide by the group's std (false = R − mean only, as Dr. GRPO recommends). rloo: unused."})
    std_eps: float = field(default=1e-4, metadata={"help": "ε added to the group std (grpo with scale_rewards)."})
    gamma: float = field(default=1.0, metadata={
        "help": "γ of the return from a step on (group_by=episode): G_k = r_k + γ·G_{k+1}. Unused by prompt."})
    # loss
    kl_coef: float = field(default=0.04, metadata={
        "help": "β: weight of the per-token k3 KL(π‖ρ) in the loss (0 = none, and no reference pass)."})
    loss_norm: LossNorm = field(default="sequence", metadata={
        "help": "sequence: mean over each action's tokens, then over actions (GRPO); token: mean over the "
                "minibatch's tokens (DAPO); constant: token sum / (actions × max_new_tokens) (Dr. GRPO)."})
    clip: float = field(default=0.2, metadata={"help": "ε: policy ratio clip range."})
    # optimisation
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the policy adapter."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    iterations: int = field(default=4, metadata={
        "help": "Passes over each batch (GRPO's μ; TRL's default is 1). 4 by bench/learnability.py (start "
                "probe, 256 env steps, 3 seeds): 0.91/0.95/0.94 against 0.75/0.63 with 1 pass, at about 1.8x "
                "the update time."})
    minibatch_size: int = field(default=4, metadata={"help": "Actions per gradient step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip per step."})
    # diagnostics
    exact_kl_diagnostic: bool = field(default=False, metadata={
        "help": "Log the exact whole-vocabulary KL(π‖ρ) per token as kl_to_reference (else the mean k3 "
                "estimate); runs the reference pass even with kl_coef = 0."})

    def __post_init__(self):
        super().__post_init__()  # group_by, advantage, loss_norm: one of their choices
        self.require_at_least_one("iterations", "minibatch_size", "rollout_steps", "num_envs")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.kl_coef < 0 or self.clip <= 0 or self.std_eps <= 0:
            raise ValueError(f"kl_coef must be >= 0, clip and std_eps > 0; got {self.kl_coef}, {self.clip}, "
                             f"{self.std_eps}")
        check_sampled_generation(self.generation, "GRPO")


class GRPOAgent(Learner):
    """GRPO (or RLOO) on an `LMPolicy`: one "policy" LoRA adapter, ρ = the base model, no critic.

    The learner shell (agents/learner.py) collects `rollout_steps` env steps; `train` forms the groups, computes
    advantages, scores π_old (and ρ) once, and runs the clipped updates.
    """

    config_class = GRPOConfig
    needs_reference_logprobs = False  # log ρ (at the sampling temperature) is recomputed in `annotate`

    def setup(self) -> None:
        cfg = self.config
        self.policy_params = self.policy.trainable_parameters("policy")
        self.optimizer = torch.optim.AdamW(self.policy_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    @property
    def uses_reference(self) -> bool:
        """Whether `train` scores tokens under ρ: for the KL term, or for the exact KL diagnostic."""
        return self.config.kl_coef > 0 or self.config.exact_kl_diagnostic

    # -- model passes -----------------------------------------------------------------------------------------------
    def score(self, transitions: Sequence[Any], reference: bool = False, with_entropy: bool = False
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """log π_θ per action token at the sampling temperature, padded to [B, longest action] (differentiable):
        the one function both the no-grad pass before the update and the update use.

        Also returns, flat over action tokens and without gradients: "entropy" of π_θ (`with_entropy`); "ref_logp"
        (log ρ) and, with `exact_kl_diagnostic`, the whole-vocabulary "kl" KL(π_θ‖ρ) (`reference`)."""
        cfg, temperature = self.config, float(self.config.generation.temperature)
        scored = action_pass(self.policy, transitions, "policy", temperature, cfg.chunk_size)
        extra: dict[str, torch.Tensor] = {}
        if with_entropy:
            with torch.no_grad():
                extra["entropy"] = entropy(scored.rows.detach(), scored.head, cfg.chunk_size)
        if reference:
            extra.update(reference_scores(self.policy, scored, temperature, cfg.chunk_size, cfg.exact_kl_diagnostic))
        return scored.logp, extra

    @torch.no_grad()
    def annotate(self, transitions: Sequence[Any]) -> None:
        """Store per action token, in minibatch-sized chunks: log π_old (`old_logp`), the entropy of π_old
        (`entropy`) and, when the reference is used, log ρ (`ref_logp`) and the exact KL (`kl`, if asked for)."""
        size = self.config.minibatch_size
        for start in range(0, len(transitions), size):
            batch = transitions[start: start + size]
            logp, extra = self.score(batch, reference=self.uses_reference, with_entropy=True)  # entropy (ref_logp, kl)
            fill_per_token(batch, old_logp=logp.cpu().numpy(),
                           **{key: value.float().cpu().numpy() for key, value in extra.items()})

    # -- learning ---------------------------------------------------------------------------------------------------
    def train(self, transitions: Sequence[Any]) -> dict[str, float]:
        """One GRPO update on collected transitions: groups and advantages, π_old (and ρ), the clipped updates."""
        cfg = self.config
        tick = time.perf_counter()
        group_stats = compute_group_advantages(transitions, group_by=cfg.group_by, kind=cfg.advantage,
                                               scale_rewards=cfg.scale_rewards, gamma=cfg.gamma, eps=cfg.std_eps)
        self.annotate(transitions)
        time_score = time.perf_counter() - tick

        tick = time.perf_counter()
        update_stats = grpo_update(
            transitions, lambda batch: self.score(batch)[0], self.optimizer, self.policy_params,
            iterations=cfg.iterations, minibatch_size=cfg.minibatch_size, clip=cfg.clip, kl_coef=cfg.kl_coef,
            loss_norm=cfg.loss_norm, max_tokens=cfg.generation.max_new_tokens, max_grad_norm=cfg.max_grad_norm,
            generator=self.generator, device=self.policy.device)
        time_update = time.perf_counter() - tick

        def token_mean(key: str) -> float:
            return float(np.concatenate([t.per_token(key) for t in transitions]).astype(np.float64).mean())

        reference: dict[str, float] = {}
        if cfg.exact_kl_diagnostic:
            reference["kl_to_reference"] = token_mean("kl")  # exact KL(π_old‖ρ) per token
        elif self.uses_reference:
            reference["kl_to_reference"] = float(np.mean(np.concatenate([
                k3_kl(torch.from_numpy(t.per_token("old_logp")), torch.from_numpy(t.ref_logp)).numpy()
                for t in transitions])))  # mean k3 of π_old against ρ
        n_tokens = sum(len(t.action_ids) for t in transitions)
        rewards = np.array([t.reward for t in transitions], dtype=np.float64)
        first, last = first_and_last_tenth(t.per_token("advantages") for t in transitions)
        return {  # reward_mean and reward_max: the collector's (agents/rollout.py), one computation for every learner
            "reward_std": float(rewards.std()),
            **group_stats,
            **update_stats,
            **reference,
            "entropy": token_mean("entropy"),  # of π_old, per token, over the whole vocabulary
            "signal/advantage_first_tenth": first,  # uniform over an action's tokens: first = last
            "signal/advantage_last_tenth": last,
            "tokens_per_action": n_tokens / len(transitions),
            "time_score_s": time_score,
            "time_update_s": time_update,
            "buffer_bytes_per_token": sum(t.nbytes() for t in transitions) / max(n_tokens, 1),
        }

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and the minibatch generator (the adapter travels with the policy)."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
