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
(`--set lam=0 --set sampled_correction=0` reproduces the paper). Why: the env reward sits on the last of ~200 tokens, and a one-step backup
moves it back one token per target refresh, so the tokens that decide a program (its first lines) never see it
within any budget a user can run; at λ = 1 every token regresses on the action's soft return in the first update.
On-policy every λ has the same fixed point (tested on an enumerable toy).

Critic loss: Huber (or MSE) between Q_φ(uʲ, wʲ) and the detached yʲ, averaged over valid tokens.

Policy improvement, an expectation under π over the whole vocabulary with ρ and Q detached:

    L_π = mean_u Σ_w π_θ(w|u)·[β·(log π_θ(w|u) − log ρ(w|u)) − Q_φ(u,w)]  =  mean_u [β·KL(π_θ‖ρ) − E_π Q_φ]

whose minimiser at every state is π(w|u) ∝ ρ(w|u)·exp(Q_φ(u,w)/β). At the fixed point the token-level solution is the
sequence-level soft-optimal policy π*(a|s) ∝ ρ(a|s)·exp(Q*(s,a)/β), because per-token KLs add up to the sequence KL
(the chain rule; tested).

Second deviation (ETPOConfig.sampled_correction, c; default 1, 0 reproduces the paper): the policy loss adds, at
every sampled token, the critic's error there as a score-function term,

    L_π += c · mean_j −(yʲ − Q_φ(uʲ, wʲ)) · log π_θ(wʲ|uʲ)

With c = 1 the policy gradient is an unbiased estimate of the soft objective's gradient under the true Q^π, with Q_φ as
control variate (`sampled_correction_per_state`, tested on an enumerable toy); with Q_φ exact the term averages to 0.
Why: a critic over a 50k-token vocabulary learns slowly which of ~200 tokens decided a program's fate, and without
the term the policy cannot move further than the critic has learned. The term is clipped as PPO clips its surrogate
(ETPOConfig.correction_clip, ε): with r = π_θ(wʲ|uʲ)/π_old(wʲ|uʲ) against the policy at the start of the update,
−min(r·δ, clip(r, 1 − ε, 1 + ε)·δ) with δ = yʲ − Q_φ(uʲ, wʲ), the same gradient as above at r = 1, and none once a
token's ratio has left the region in the direction δ pushes it: the epochs of one update cannot push the same
sampled tokens without limit. Q_φ in δ is the online critic at each step (ETPOConfig.correction_residual="step");
"update" reads it once, before the update's first step, as PPO fixes its advantages (measured level; README).
The dueling critic Q = V + A can be centred under π (ETPOConfig.advantage_centring="policy": Q = V + A − E_π A, so
E_π Q = V; measured faster and less stable, not the default; README).

At a sampling temperature T ≠ 1, π and ρ above are the tempered distributions softmax(logits/T), π being what is
sampled (as PPO's policy); top-k/top-p filters are refused, since every sum here runs over the whole vocabulary.

How it is laid out (read in this order)
---------------------------------------
1. `agents.etpo.objective`: pure math on logits (`soft_value`, `soft_bellman_targets`, `critic_loss`, `policy_loss`, `token_kl`, ...).
2. `agents.etpo.update`: the update. `TokenModels` (anything that turns token ids into hidden states and heads per role: the LM learner
   of `agent`, or a tabular table in the tests) with a `Critic`, packing of transitions, the target pass, and `etpo_update` which does the
   optimiser steps. Full-vocabulary tensors exist only for one chunk of token states at a time: hidden states are
   gathered at action positions, then heads are applied `chunk_size` rows at a time under activation checkpointing,
   so the backward pass never holds (tokens × V) floats either (unless they are few: `KEPT_HEAD_ELEMENTS`).
3. `agents.etpo.agent`: `ETPOConfig` (every hyperparameter, documented), the critics (`DuelingCritic`,
   `HeadCritic`, `LMHeadCritic`) and `ETPOAgent`: the update on a language model, inside the
   shared learner shell (agents/learner.py: learn → collect → train, counters, logging, checkpoints, resume).

Not reproduced from the public reference implementation (on purpose): a uniform mean over the vocabulary in the
policy step (which makes its gradient independent of Q); ρ absent from the policy step; the within-action KL read
from the next environment step; fp16 weights without fp32 masters; four full model copies; full-vocabulary tensors
kept in host memory; no resume.
"""

from agents.etpo.agent import (
    DuelingCritic,
    ETPOAgent,
    ETPOConfig,
    HeadCritic,
    LMHeadCritic,
    LMTokenModels,
    critic_state_bytes,
    lm_policy_from_config,
)
from agents.etpo.objective import (
    critic_loss_per_token,
    discounted_returns,
    dueling_critic_loss_per_token,
    pearson,
    policy_loss_per_state,
    sampled_correction_per_state,
    soft_bellman_targets,
    soft_lambda_returns,
    soft_optimal_policy,
    soft_value,
    token_entropy,
    token_kl,
)
from agents.etpo.update import (
    KEPT_HEAD_ELEMENTS,
    Critic,
    Lion,
    Packed,
    TokenModels,
    UpdateSettings,
    ValueAdvantageCritic,
    compute_targets,
    critic_pass,
    ema_update,
    etpo_backward,
    etpo_losses,
    etpo_update,
    gathered_rows,
    make_optimizer,
    pack,
    policy_pass,
    realised_returns,
    reference_rows,
    state_values,
)

__all__ = [
    "KEPT_HEAD_ELEMENTS", "Critic", "DuelingCritic", "ETPOAgent", "ETPOConfig", "HeadCritic", "LMHeadCritic",
    "LMTokenModels", "Lion", "Packed", "TokenModels", "UpdateSettings", "ValueAdvantageCritic", "compute_targets",
    "critic_loss_per_token", "critic_pass", "critic_state_bytes", "discounted_returns", "dueling_critic_loss_per_token",
    "ema_update", "etpo_backward", "etpo_losses", "etpo_update", "gathered_rows", "lm_policy_from_config",
    "make_optimizer", "pack", "pearson", "policy_loss_per_state", "policy_pass", "realised_returns", "reference_rows",
    "sampled_correction_per_state", "soft_bellman_targets", "soft_lambda_returns", "soft_optimal_policy",
    "soft_value", "state_values", "token_entropy", "token_kl",
]
