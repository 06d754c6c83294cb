"""Whole-vocabulary reductions computed `chunk_size` positions at a time (pure functions).

Logits are B×T×V floats (V ~ 50k–150k for real models): the output embedding is applied to `chunk_size` positions
at a time, under activation checkpointing when gradients are on, so neither the forward nor the backward pass
ever holds more than chunk_size × V logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 256  # positions per whole-vocabulary chunk: 256 × 150k vocab × 4 B ≈ 150 MB at most

# ----------------------------------------------------------------------------------------------------------------
# Chunked whole-vocabulary reductions (pure functions)
# ----------------------------------------------------------------------------------------------------------------
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # hidden [c, H] -> logits [c, V]


def logits_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map a causal LM applies to its output layer's result to get its logits, read from its config (None when
    there is none), written as the models write it so `head()` reproduces `model(...).logits`:
    Cohere's `logit_scale` (×), Falcon-H1's `lm_head_multiplier` (×), Granite's `logits_scaling` (÷), then the
    tanh soft cap of Gemma 2/3 (`final_logit_softcapping`) or RecurrentGemma (`logits_soft_cap`). A model that does
    something else is caught by `LMPolicy.check_head`.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for key in ("logit_scale", "lm_head_multiplier"):
        value = getattr(text, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            steps.append(lambda x, v=value: x * v)
    value = getattr(text, "logits_scaling", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
        steps.append(lambda x, v=value: x / v)
    cap = getattr(text, "final_logit_softcapping", None) or getattr(text, "logits_soft_cap", None)
    if cap:
        steps.append(lambda x, c=float(cap): torch.tanh(x / c) * c)
    if not steps:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    return transform


def chunked_map(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Apply `fn` to row-chunks of `inputs` (all [N, ...]) and concatenate the per-row results.

    With gradients on, each chunk runs under activation checkpointing: only its inputs are saved and the V-wide
    intermediates are recomputed in backward, so memory stays O(chunk_size × V) in both passes.
    """
    n = inputs[0].shape[0]
    if n == 0:
        return inputs[0].new_zeros((0,), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    outs = []
    for start in range(0, n, chunk_size):
        parts = tuple(x[start:start + chunk_size] for x in inputs)
        if needs_grad:
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    return torch.cat(outs, dim=0)


def token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: LogitsFn,
                   chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(head(h))[target] per row. hidden [N, H], targets [N] -> [N]."""

    def fn(h, t):
        logits = head(h).float()
        return logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    return chunked_map(fn, hidden, targets, chunk_size=chunk_size)


def entropy(hidden: torch.Tensor, head: LogitsFn, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """H(π(·|s)) per row, in nats. hidden [N, H] -> [N]."""

    def fn(h):
        logp = F.log_softmax(head(h).float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return chunked_map(fn, hidden, chunk_size=chunk_size)


def kl_divergence(hidden_p: torch.Tensor, hidden_q: torch.Tensor, head_p: LogitsFn, head_q: LogitsFn | None = None,
                  chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KL(p || q) = Σ_a p(a) (log p(a) − log q(a)) per row, over the whole vocabulary. -> [N]."""
    head_q = head_q or head_p

    def fn(hp, hq):
        logp = F.log_softmax(head_p(hp).float(), dim=-1)
        logq = F.log_softmax(head_q(hq).float(), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1)

    return chunked_map(fn, hidden_p, hidden_q, chunk_size=chunk_size)


def expectation(hidden_p: torch.Tensor, head_p: LogitsFn, hidden_v: torch.Tensor, head_v: LogitsFn,
                chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """E_{a~p}[v(a)] = Σ_a softmax(head_p(h_p))(a) · head_v(h_v)(a) per row: e.g. Σ_a π(a|s) Q(s,a). -> [N]."""

    def fn(hp, hv):
        probs = F.softmax(head_p(hp).float(), dim=-1)
        return (probs * head_v(hv).float()).sum(-1)

    return chunked_map(fn, hidden_p, hidden_v, chunk_size=chunk_size)


def logsumexp(hidden: torch.Tensor, head: LogitsFn, scale: float = 1.0, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """scale · log Σ_a exp(head(h)(a) / scale) per row (a soft maximum, e.g. a soft value). -> [N]."""

    def fn(h):
        return scale * torch.logsumexp(head(h).float() / scale, dim=-1)

    return chunked_map(fn, hidden, chunk_size=chunk_size)


def tempered(head: LogitsFn, temperature: float) -> LogitsFn:
    """hidden -> the logits of the distribution actions are sampled from, softmax(logits / T): what a learner that
    trains its sampled distribution scores tokens under (π and ρ at the same T)."""
    if temperature == 1.0:
        return head
    return lambda h: head(h).float() / temperature
