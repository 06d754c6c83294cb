"""ETPO's update over any `TokenModels` (the LM learner, or a tabular table in the tests): packing,
the target pass, the critic and policy passes a chunk of token states at a time, and the optimiser steps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from agents.etpo.objective import (
    critic_loss_per_token,
    discounted_returns,
    dueling_critic_loss_per_token,
    policy_loss_per_state,
    sampled_correction_per_state,
    soft_bellman_targets,
    soft_value,
    token_entropy,
    token_kl,
)
from agents.learner import (
    first_and_last_tenth,
)
from agents.ppo import ratio_diagnostics
from agents.rollout import episode_chains

# ----------------------------------------------------------------------------------------------------------------
# 2. The update, shared by the LM learner and the tabular toy problems in the tests.
# ----------------------------------------------------------------------------------------------------------------

Role = Literal["policy", "reference", "critic", "target"]


class Critic(torch.nn.Module):
    """Q_φ(u, ·) ∈ ℝ^|V| from the critic's features h, and how Q_φ is regressed on the targets y.

    One class per kind of critic (`ETPOConfig.critic`: `DuelingCritic`, `HeadCritic`, `LMHeadCritic`); the update
    calls only `policy_summary`, `q_rows` and `loss_sum`, so a new kind is a new class, never a branch in the update.
    A module: its own parameters (if any; the critic adapter's are the model's) train with the critic and travel in
    checkpoints.

    A critic whose Q depends on π at the state (a dueling critic centred under π) says so through `policy_summary`:
    what it reads of π there, computed once per target pass from π's logits and handed back to `q_rows` and
    `loss_sum` with the same rows (None, the default: Q does not read π).
    """

    row_width: int | None = None  # width of the rows `loss_sum` forms per token state (None: the vocabulary's)

    def policy_summary(self, policy_logits: torch.Tensor) -> torch.Tensor | None:
        """[n, V] logits of π → what Q reads of π at these states ([n, ·]), or None when it reads nothing."""
        return None

    def q_rows(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        """[n, H] features (and π's `policy_summary` of the same states) → Q_φ(u, ·) [n, V], float32."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        return self.q_rows(hidden, summary)

    def loss_sum(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, kind: str,
                 delta: float, summary: torch.Tensor | None = None) -> torch.Tensor:
        """Summed regression loss over n token states: Q_φ(uʲ, wʲ) on yʲ (`critic_loss_per_token`)."""
        return critic_loss_per_token(_taken(self.q_rows(hidden, summary), tokens), targets, kind, delta).sum()


class ValueAdvantageCritic(Critic):
    """A critic Q(u, w) = V(u) + A(u, w) whose two parts are regressed as `dueling_critic_loss_per_token` says."""

    def split(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, H] → V [n] and A [n, V]."""
        raise NotImplementedError

    def split_taken(self, hidden: torch.Tensor, tokens: torch.Tensor, summary: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """V [n] and A [n] at the taken tokens (all the loss reads); a subclass that can skip the [n, V] rows does."""
        value, advantage = self.split(hidden, summary)
        return value, _taken(advantage, tokens)

    def q_rows(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        value, advantage = self.split(hidden, summary)
        return value.float()[:, None] + advantage.float()

    def loss_sum(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, kind: str,
                 delta: float, summary: torch.Tensor | None = None) -> torch.Tensor:
        value, advantage = self.split_taken(hidden, tokens, summary)
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

    def head(self, role: Role, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        """[N, H] → [N, V] (logits for policy/reference, Q values for critic/target; `summary`: π's
        `Critic.policy_summary` of these rows, for a critic that reads π)."""

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


def _per_token_over_buffer(transitions: Sequence[Any], batch_size: int, pad_id: int, device: Any,
                           fn: Callable[[Packed, slice], torch.Tensor]) -> list[torch.Tensor]:
    """`fn`'s per-row values ([N] for a packed batch and the slice of `transitions` it packs) for every action token
    of `transitions` ([n_i] each, on the CPU), `batch_size` transitions per pass."""
    out: list[torch.Tensor] = []
    for s in range(0, len(transitions), batch_size):
        packed = pack([(t.obs_ids, t.action_ids) for t in transitions[s: s + batch_size]], pad_id, device)
        out += list(torch.split(fn(packed, slice(s, s + batch_size)).cpu(), packed.lengths))
    return out


@torch.no_grad()
def taken_logprobs(models: TokenModels, transitions: Sequence[Any], batch_size: int, pad_id: int, chunk_size: int,
                   device: Any) -> list[torch.Tensor]:
    """log π(wʲ|uʲ) of every action token of `transitions` under the current policy ([n_i] each): π_old of the
    clipped sampled correction, taken by the very head the update differentiates, so the first step's ratio is 1."""
    def logp(packed: Packed, _: slice) -> torch.Tensor:
        h_pi = models.rows("policy", packed)
        return torch.cat([_taken(F.log_softmax(models.head("policy", h_pi[c: c + chunk_size]).float(), -1),
                                 packed.tokens[c: c + chunk_size]) for c in range(0, h_pi.shape[0], chunk_size)])
    return _per_token_over_buffer(transitions, batch_size, pad_id, device, logp)


@torch.no_grad()
def taken_q_values(models: TokenModels, transitions: Sequence[Any], batch_size: int, pad_id: int, chunk_size: int,
                   device: Any, summaries: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Q_φ(uʲ, wʲ) of every action token of `transitions` under the online critic as it is now ([n_i] each): the
    baseline of the sampled correction's residuals when they are fixed for the update (correction_residual="update").
    `summaries`: π's `Critic.policy_summary` per transition, for a critic that reads π."""
    def q_taken(packed: Packed, part: slice) -> torch.Tensor:
        h_q = models.rows("critic", packed)
        summary = None if summaries is None else torch.cat(list(summaries[part]))
        return torch.cat([_taken(models.critic.q_rows(h_q[c: c + chunk_size], _rows_of(summary, c, chunk_size)),
                                 packed.tokens[c: c + chunk_size]) for c in range(0, h_q.shape[0], chunk_size)])
    return _per_token_over_buffer(transitions, batch_size, pad_id, device, q_taken)


def _rows_of(rows: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """rows[start: start + count], or None for an absent row (e.g. no policy summary)."""
    return None if rows is None else rows[start: start + count]


def _to(rows: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    """rows on `device`, or None for an absent row."""
    return None if rows is None else rows.to(device)


@torch.no_grad()
def state_values(models: TokenModels, packed: Packed, beta: float, chunk_size: int,
                 h_rho: torch.Tensor | None = None, summaries_out: list[torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """V(u) and KL(π‖ρ)(u) for every row, with the current π, ρ and the target critic Q_φ̄, `chunk_size` rows of V
    at a time (`h_rho`: ρ's features of these rows when already known, see `reference_rows`). The KL is what the
    λ-returns subtract along the sampled path. `summaries_out` (if given) receives π's `Critic.policy_summary` of
    the rows, a chunk at a time, when the critic reads π."""
    h_pi, h_tgt = (models.rows(role, packed) for role in ("policy", "target"))
    h_rho = models.rows("reference", packed) if h_rho is None else h_rho
    values, kls = [], []
    for s in range(0, h_pi.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        pi_logits, rho_logits = models.head("policy", h_pi[sl]), models.head("reference", h_rho[sl])
        summary = _summarise(models, pi_logits, summaries_out)
        values.append(soft_value(pi_logits, rho_logits, models.head("target", h_tgt[sl], summary), beta))
        kls.append(token_kl(pi_logits, rho_logits))
    return torch.cat(values).float(), torch.cat(kls).float()


@torch.no_grad()
def state_kls(models: TokenModels, packed: Packed, chunk_size: int, h_rho: torch.Tensor | None = None,
              summaries_out: list[torch.Tensor] | None = None) -> torch.Tensor:
    """KL(π‖ρ)(u) for every row, without the target critic: all a λ = 1 target pass reads along the path (V(uʲ)
    has weight 1 − λ = 0 there; only the bootstrap after a chain's last step reads V, see `next_state_values`).
    `summaries_out`: as in `state_values`."""
    h_pi = models.rows("policy", packed)
    h_rho = models.rows("reference", packed) if h_rho is None else h_rho
    kls = []
    for s in range(0, h_pi.shape[0], chunk_size):
        pi_logits = models.head("policy", h_pi[s: s + chunk_size])
        _summarise(models, pi_logits, summaries_out)
        kls.append(token_kl(pi_logits, models.head("reference", h_rho[s: s + chunk_size])))
    return torch.cat(kls).float()


def _summarise(models: TokenModels, pi_logits: torch.Tensor, out: list[torch.Tensor] | None) -> torch.Tensor | None:
    """The critic's `policy_summary` of these rows (None when it reads nothing of π), appended to `out` if given."""
    summary = models.critic.policy_summary(pi_logits)
    if summary is not None and out is not None:
        out.append(summary)
    return summary


def _taken(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The sampled token's entry of each [n, V] row."""
    return rows.gather(-1, tokens[:, None]).squeeze(-1)


def _policy_chunk(models: TokenModels, beta: float, sampled_correction: float, correction_clip: float,
                  residuals_given: bool, h_pi: torch.Tensor, h_rho: torch.Tensor, h_q: torch.Tensor,
                  tokens: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor | None = None,
                  summary: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed policy loss of one chunk of rows (Q held fixed: no graph into the critic), plus `sampled_correction`
    times the sampled correction of the critic's error towards `targets` (`sampled_correction_per_state`, clipped at
    `correction_clip` against `old_logp` when given), plus detached per-row diagnostics [6, n]. With
    `residuals_given`, `targets` are the correction's residuals themselves (fixed for the update); `summary`: π's
    `Critic.policy_summary` of these rows from the target pass, for a critic that reads π."""
    pi_logits = models.head("policy", h_pi)
    rho_logits = models.head("reference", h_rho)
    with torch.no_grad():
        q = models.critic.q_rows(h_q, summary)
        q_taken = _taken(q, tokens)
    policy_sum = policy_loss_per_state(pi_logits, rho_logits, q, beta).sum()
    if sampled_correction:
        residuals = targets.float() if residuals_given else targets.float() - q_taken
        correction = sampled_correction_per_state(pi_logits, tokens, residuals, old_logp, correction_clip)
        policy_sum = policy_sum + sampled_correction * correction.sum()
    with torch.no_grad():
        diag = torch.stack([token_kl(pi_logits, rho_logits), token_entropy(pi_logits), q_taken,
                            (q * F.softmax(pi_logits.float(), -1)).sum(-1), q.mean(-1),
                            _taken(F.log_softmax(pi_logits.float(), -1), tokens)])
    return policy_sum, diag


KEPT_HEAD_ELEMENTS = 1 << 24  # rows × V up to which a head's graph is kept for backward (64 MB per [rows, V] fp32)


def _over_chunks(fn: Callable[..., Any], chunk_size: int, *rows: torch.Tensor | None, vocab_size: int | None = None
                 ) -> list[Any]:
    """`fn` on `chunk_size` rows of every tensor at a time (an absent row, None, stays None; the first is a
    tensor). When a graph is being built over a large vocabulary, each chunk runs under activation checkpointing
    (backward recomputes its [chunk, V] rows instead of keeping them all alive); when all rows × `vocab_size` fit in
    KEPT_HEAD_ELEMENTS the graphs are kept, since recomputing them would cost as much again as the heads' forward (an
    unknown vocabulary is always checkpointed)."""
    grad = torch.is_grad_enabled() and any(r is not None and r.requires_grad for r in rows)
    recompute = grad and (vocab_size is None or rows[0].shape[0] * vocab_size > KEPT_HEAD_ELEMENTS)
    out = []
    for s in range(0, rows[0].shape[0], chunk_size):
        parts = [_rows_of(r, s, chunk_size) for r in rows]
        out.append(checkpoint(fn, *parts, use_reentrant=False) if recompute else fn(*parts))
    return out


def critic_pass(models: TokenModels, packed: Packed, targets: torch.Tensor, chunk_size: int,
                critic_kind: str = "huber", huber_delta: float = 1.0, summary: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean critic loss over the rows of `packed` (with its graph) and the critic's features, detached
    (`summary`: π's `Critic.policy_summary` of the rows, for a critic that reads π)."""
    h_q = models.rows("critic", packed)
    fn = lambda h, t, y, s: models.critic.loss_sum(h, t, y, critic_kind, huber_delta, s)  # noqa: E731
    width = models.critic.row_width or models.vocab_size
    sums = _over_chunks(fn, chunk_size, h_q, packed.tokens, targets.to(h_q.device), _to(summary, h_q.device),
                        vocab_size=width)
    return sum(sums[1:], sums[0]) / h_q.shape[0], h_q.detach()


def policy_pass(models: TokenModels, packed: Packed, h_q: torch.Tensor, targets: torch.Tensor, beta: float,
                chunk_size: int, h_rho: torch.Tensor | None = None, sampled_correction: float = 0.0,
                correction_clip: float = 0.0, old_logp: torch.Tensor | None = None,
                residuals: torch.Tensor | None = None, summary: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean policy loss over the rows of `packed` (with its graph) given the critic's features `h_q` (and ρ's,
    `h_rho`, when already known), plus the per-row diagnostics (KL to ρ, entropy, Q of the taken token, E_π Q,
    mean Q over the vocabulary, log π of the taken token). `sampled_correction` > 0 adds the sampled correction
    towards the `targets`, clipped at `correction_clip` against `old_logp` (log π_old of the taken tokens) when given;
    `residuals` (y − Q_φ at the taken tokens, fixed for the update) replace its y − Q_φ under the current critic;
    `summary`: as in `critic_pass`."""
    h_pi = models.rows("policy", packed)
    if h_rho is None:
        with torch.no_grad():
            h_rho = models.rows("reference", packed)
    correction_rows = targets if residuals is None else residuals
    rows = [h_pi, h_rho, h_q, packed.tokens, correction_rows.to(h_q.device), _to(old_logp, h_q.device),
            _to(summary, h_q.device)]
    given = residuals is not None
    fn = lambda *chunk: _policy_chunk(models, beta, sampled_correction, correction_clip, given, *chunk)  # noqa: E731
    outs = _over_chunks(fn, chunk_size, *rows, vocab_size=models.vocab_size)
    d = torch.cat([diag for _, diag in outs], dim=1).cpu()
    info = {"kl": d[0], "entropy": d[1], "q_taken": d[2], "q_expected": d[3], "q_vocab_mean": d[4], "logp_taken": d[5]}
    losses = [loss for loss, _ in outs]
    return sum(losses[1:], losses[0]) / h_pi.shape[0], info


def etpo_losses(models: TokenModels, packed: Packed, targets: torch.Tensor, beta: float, chunk_size: int,
                critic_kind: str = "huber", huber_delta: float = 1.0, sampled_correction: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mean policy loss and mean critic loss over the rows of `packed` (both with graphs), plus diagnostics.

    Each chunk runs under activation checkpointing, so backward recomputes the chunk's [chunk, V] rows instead of
    keeping all of them alive: peak memory is O(chunk × V), not O(tokens × V).
    """
    crit, h_q = critic_pass(models, packed, targets, chunk_size, critic_kind, huber_delta)
    pol, info = policy_pass(models, packed, h_q, targets, beta, chunk_size, sampled_correction=sampled_correction)
    return pol, crit, info


def etpo_backward(models: TokenModels, packed: Packed, targets: torch.Tensor, beta: float, chunk_size: int,
                  critic_kind: str = "huber", huber_delta: float = 1.0, h_rho: torch.Tensor | None = None,
                  sampled_correction: float = 0.0, correction_clip: float = 0.0,
                  old_logp: torch.Tensor | None = None, residuals: torch.Tensor | None = None,
                  summary: torch.Tensor | None = None) -> tuple[float, float, dict]:
    """The gradients of both losses of `etpo_losses` (the same gradients), one network at a time: the critic's
    forward and backward, its graph freed, then the policy's. The two graphs never coexist, so the peak is the
    larger one instead of their sum. Returns the two mean losses and the diagnostics (`residuals`, `summary`: see
    `policy_pass`)."""
    crit, h_q = critic_pass(models, packed, targets, chunk_size, critic_kind, huber_delta, summary)
    crit.backward()
    crit = float(crit.detach())  # drops the last reference to the critic's graph
    pol, info = policy_pass(models, packed, h_q, targets, beta, chunk_size, h_rho, sampled_correction,
                            correction_clip, old_logp, residuals, summary)
    pol.backward()
    return float(pol.detach()), crit, info


def next_state_values(models: TokenModels, transitions: Sequence[Any], values: list[torch.Tensor] | None,
                      beta: float, chunk_size: int, pad_id: int, device: Any) -> tuple[list[float], list[bool], int]:
    """V(u¹_{t+1}) per transition and its `done` flag for the targets.

    The next env step's first token state is already in `values` when that step is in the buffer (`next_index`; with
    `values` None, as at λ = 1, where the chain goes on through that step and never reads its V, it is left at 0);
    after a time-limit truncation it is evaluated from `next_obs_ids` (truncation is not termination: we bootstrap).
    A transition with neither (the collector stopped mid-episode without a next observation) is treated as terminal
    and counted in the returned number so the caller can report it.
    """
    next_values, dones, missing, bootstrap = [0.0] * len(transitions), [True] * len(transitions), 0, []
    for i, tr in enumerate(transitions):
        if tr.terminated:
            continue
        if tr.next_index is not None:
            next_values[i], dones[i] = (0.0 if values is None else float(values[tr.next_index][0])), False
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
                    lam: float = 0.0, summaries_out: list[torch.Tensor] | None = None
                    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor], int]:
    """The target pass over a whole rollout buffer: V(uʲ) and KL(uʲ) of every token state, then the soft
    λ-return targets (`ref_rows`: ρ's features per transition, from `reference_rows`, when already known).

    At λ = 1 the path's V(uʲ) have weight 1 − λ = 0, so the target critic is not run over the buffer (0.69 → 0.50 s
    a pass on titanic's 16-step updates): only the KLs are computed, V only where a chain is bootstrapped, and the values returned are None.
    The targets are the same numbers, bit for bit (0·V = 0). `summaries_out` (if given) receives π's
    `Critic.policy_summary` per transition ([n_i, ·] each) when the critic reads π: the π its Q is centred under
    until the next target pass."""
    needs_values = lam < 1.0
    values: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    for s in range(0, len(transitions), batch_size):
        chunk = transitions[s: s + batch_size]
        packed = pack([(t.obs_ids, t.action_ids) for t in chunk], pad_id, device)
        h_rho = None if ref_rows is None else torch.cat(list(ref_rows[s: s + batch_size]))
        summaries: list[torch.Tensor] = []
        if needs_values:
            value, kl = state_values(models, packed, beta, chunk_size, h_rho, summaries)
            values += list(torch.split(value.cpu(), packed.lengths))
        else:
            kl = state_kls(models, packed, chunk_size, h_rho, summaries)
        kls += list(torch.split(kl.cpu(), packed.lengths))
        if summaries and summaries_out is not None:
            summaries_out += list(torch.split(torch.cat(summaries), packed.lengths))
    next_values, dones, missing = next_state_values(models, transitions, values if needs_values else None, beta,
                                                    chunk_size, pad_id, device)
    path_values = values if needs_values else [torch.zeros_like(kl) for kl in kls]  # never read at λ = 1
    targets = soft_bellman_targets(path_values, [float(t.reward) for t in transitions], next_values, dones, gamma,
                                   lam=lam, beta=beta, state_kls=kls,
                                   next_index=[t.next_index for t in transitions])
    return (values if needs_values else None), targets, missing


@dataclass
class UpdateSettings:
    """The subset of ETPOConfig the update needs (so the toy tests can drive `etpo_update` without an LM)."""

    beta: float
    gamma: float
    lam: float = 0.0
    sampled_correction: float = 0.0
    correction_clip: float = 0.0
    target_refresh: str = "epoch"  # "epoch" or "update" (ETPOConfig.target_refresh)
    correction_residual: str = "step"  # "step" or "update" (ETPOConfig.correction_residual)
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
    """One ETPO update on a rollout buffer: ρ's features once (`reference_rows`), then `epochs` passes, each
    stepping per minibatch; the targets are computed before the first pass and, with `target_refresh="epoch"`,
    again before every later one. With `correction_residual="update"` the sampled correction's residuals
    y − Q_φ(u, w) are taken once, before the first step, and serve every epoch.

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
    clipped = settings.sampled_correction > 0 and settings.correction_clip > 0
    old_logp = (taken_logprobs(models, transitions, settings.inference_batch_size, settings.pad_id,
                               settings.chunk_size, device) if clipped else None)
    frozen = settings.sampled_correction > 0 and settings.correction_residual == "update"
    residuals: list[torch.Tensor] = []
    summaries: list[torch.Tensor] = []  # π's policy_summary per transition, for a critic that reads π
    for epoch in range(settings.epochs):
        if epoch == 0 or settings.target_refresh == "epoch":
            t0 = time.perf_counter()
            summaries = []
            _, targets, missing = compute_targets(models, transitions, settings.beta, settings.gamma,
                                                  settings.chunk_size, settings.inference_batch_size, settings.pad_id,
                                                  device, ref_rows, settings.lam, summaries)
            record("time/targets_s", time.perf_counter() - t0)
            record("targets/unbootstrapped", missing)
        if epoch == 0 and frozen:
            # the residuals of the critic that enters the update, before it regresses on this batch (PPO fixes its
            # advantages the same way): a baseline fitted to the very samples it corrects absorbs their signal
            q_before = taken_q_values(models, transitions, settings.inference_batch_size, settings.pad_id,
                                      settings.chunk_size, device, summaries or None)
            residuals = [y_i - q_i for y_i, q_i in zip(targets, q_before, strict=True)]
        order = list(range(len(transitions)))
        rng.shuffle(order)
        for s in range(0, len(order), settings.minibatch_size):
            idx = order[s: s + settings.minibatch_size]
            t0 = time.perf_counter()
            packed = pack([(transitions[i].obs_ids, transitions[i].action_ids) for i in idx], settings.pad_id, device)
            y = torch.cat([targets[i] for i in idx])
            old = torch.cat([old_logp[i] for i in idx]) if old_logp is not None else None
            fixed = torch.cat([residuals[i] for i in idx]) if frozen else None
            summary = torch.cat([summaries[i] for i in idx]) if summaries else None
            policy_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            pol_loss, crit_loss, diag = etpo_backward(models, packed, y, settings.beta, settings.chunk_size,
                                                      settings.critic_loss, settings.huber_delta,
                                                      torch.cat([ref_rows[i] for i in idx]), settings.sampled_correction,
                                                      settings.correction_clip, old, fixed, summary)
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
            if old is not None:  # how far the policy has moved from the one that sampled (PPO's diagnostics)
                approx_kl, outside = ratio_diagnostics(diag["logp_taken"] - old, settings.correction_clip)
                record("approx_kl", approx_kl.mean())
                record("clip_fraction", outside.mean())
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
