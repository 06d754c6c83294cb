"""Sampling actions: the batched decode loop with a preallocated KV cache, stop strings, and the sampler.
A mixin of `LMPolicy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from agents.lm.batching import pad_sequences, positions_from_mask
from agents.lm.caches import cache_argument, full_attention_only, growing_cache
from agents.lm.settings import Generation, GenerationSettings

FINISH_REASONS = ("length", "eos", "stop")
COMPACT_FRACTION = 0.25  # finished rows leave the decode batch once they are this share of it (it copies the cache)


class Decoding:
    """`LMPolicy.generate` and what only it uses."""

    # -- generation ---------------------------------------------------------------------------------------------
    def eos_ids(self) -> list[int]:
        """Every id that ends an action: the tokenizer's EOS and the model's generation_config EOS list."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return sorted(int(i) for i in ids if i is not None)

    @torch.inference_mode()  # no autograd bookkeeping at all: ~10% per decode step on CPU
    def generate(self, prompt_ids: Sequence[Sequence[int]], gen: GenerationSettings | None = None,
                 adapter: str | None = "policy", generator: torch.Generator | None = None) -> list[Generation]:
        """Sample one action per prompt, all prompts as one batch with a KV cache, recording each sampled token's
        log π as it goes.

        Hand-written rather than `model.generate` so per-token log-probs are kept as scalars at each step (the
        `output_logits` route would hold max_new_tokens × B × V floats) and stop strings end each row exactly.
        Book-keeping stays on the device: one host sync per step (are all rows done?), none per row. With
        `merge_for_generation`, the adapter is folded into float32 base weights for the call (`_merged`).
        """
        gen = gen or GenerationSettings()
        if not prompt_ids:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt: the policy needs at least one token to condition on")
        budget = self.context_length - max(len(p) for p in prompt_ids)
        if budget <= 0:
            raise ValueError(f"prompt of {max(len(p) for p in prompt_ids)} tokens leaves no room in a context of "
                             f"{self.context_length}; truncate with encode(..., max_length=max_prompt_tokens(gen))")
        max_new = min(gen.max_new_tokens, budget)
        if generator is None and gen.seed is not None:
            generator = self._sampling_stream(int(gen.seed))
        eos = torch.tensor(self.eos_ids() if gen.stop_at_eos else [], dtype=torch.long, device=self.device)
        stop_window = max((len(s) for s in gen.stop), default=0) + 8  # tokens decoded to look for a stop string

        ids, mask = pad_sequences(prompt_ids, self.pad_id, "left", self.device)
        batch = ids.shape[0]
        tokens = torch.full((batch, max_new), self.pad_id, dtype=torch.long, device=self.device)
        logps = torch.zeros((batch, max_new), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        reasons = torch.zeros(batch, dtype=torch.long, device=self.device)  # index into FINISH_REASONS
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        live = torch.arange(batch, device=self.device)  # the rows still in the decode batch (finished ones leave)
        was_training = self.model.training
        self.model.eval()
        try:
            name = self._adapter_or_default(adapter)
            with self.use_adapter(name) as module, self._merged(name) as merged:
                module = self.hf_model if merged else module  # merged: the plain model, no peft layers around it
                cache_key = cache_argument(self.hf_model)
                prompt_width = mask.shape[1]
                logits, cache = self._prefill(module, prompt_ids, cache_key, prompt_width + max_new)
                positions = positions_from_mask(mask)[:, -1:]
                mask = torch.cat([mask, mask.new_ones((batch, max_new))], 1)  # step k attends to prompt_width + k
                for step in range(max_new):
                    # one uniform per prompt and step, whichever rows are still decoding: a row's tokens do not
                    # depend on when the others finished
                    uniform = (torch.rand((batch, 1), generator=generator, device=self.device)[live]
                               if gen.temperature > 0 else None)
                    logits = logits.float()
                    token = sample_tokens(logits, gen, uniform=uniform)
                    active = ~done[live]
                    tokens[live, step] = torch.where(active, token, self.pad_id)
                    logps[live, step] = F.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
                    lengths[live] += active
                    ended = active & torch.isin(token, eos)
                    reasons[live[ended]] = FINISH_REASONS.index("eos")
                    if gen.stop:
                        candidates = torch.zeros_like(done)
                        candidates[live] = active & ~ended
                        stopped = self._stopped_rows(tokens, lengths, candidates, gen.stop, stop_window)
                        reasons[stopped] = FINISH_REASONS.index("stop")
                        ended |= stopped[live]
                    done[live[ended]] = True
                    finished = int(done[live].sum())
                    if step + 1 == max_new or finished == len(live):
                        break  # no further token is sampled: its forward would be wasted
                    if finished and finished >= COMPACT_FRACTION * len(live):  # they leave the batch and its cache
                        keep = (~done[live]).nonzero().squeeze(1)
                        live, token, positions, mask = live[keep], token[keep], positions[keep], mask[keep]
                        cache.reorder_cache(keep)
                    token = torch.where(done[live], torch.full_like(token, self.pad_id), token)
                    positions = positions + 1
                    out = module(input_ids=token[:, None], attention_mask=mask[:, : prompt_width + step + 1],
                                 position_ids=positions, use_cache=True, **{cache_key: cache})
                    logits, cache = out.logits[:, -1, :], getattr(out, cache_key)
        finally:
            self.model.train(was_training)
        tokens, logps, lengths, reasons = (t.cpu() for t in (tokens, logps, lengths, reasons))
        out_generations = []
        for i in range(batch):
            action = tokens[i, : int(lengths[i])].tolist()
            out_generations.append(Generation(action, self.decode(action), logps[i, : len(action)].numpy().copy(),
                                              FINISH_REASONS[int(reasons[i])]))
        return out_generations

    def _prefill(self, module: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], cache_key: str,
                 length: int) -> tuple[torch.Tensor, Any]:
        """The prompts' pass: last-position logits [B, V] and the KV cache, preallocated for `length` positions
        (`_preallocated_cache`: each decode step writes its keys and values in place, where the default cache
        copies the whole cache at every step). Identical prompts (siblings of one env start from the same
        first prompt) are run once and their cache rows copied (the cache's `reorder_cache`), the same numbers at a
        fraction of the work."""
        first: dict[tuple[int, ...], int] = {}
        index = [first.setdefault(tuple(p), len(first)) for p in prompt_ids]
        unique = list(first) if len(first) < len(prompt_ids) else list(prompt_ids)
        ids, mask = pad_sequences(unique, self.pad_id, "left", self.device)  # one width: the longest prompt's
        out = module(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
                     logits_to_keep=1, **{cache_key: self._preallocated_cache(length)})
        logits, cache = out.logits[:, -1, :], getattr(out, cache_key)
        if len(unique) < len(prompt_ids):
            rows = torch.tensor(index, device=self.device)
            cache.reorder_cache(rows)
            logits = logits.index_select(0, rows)
        return logits, cache

    def _preallocated_cache(self, length: int) -> Any:
        """A KV cache allocated once for `length` positions: `growing_cache` where every layer attends to the
        whole sequence, transformers' `StaticCache` for models with other layer kinds that can take one, else None
        (the model's default cache)."""
        from transformers import StaticCache

        if full_attention_only(self.hf_model.config):
            return growing_cache(self.hf_model.config.num_hidden_layers, length)
        if not getattr(self.hf_model, "_can_compile_fullgraph", False):
            return None
        return StaticCache(config=self.hf_model.config, max_cache_len=length)

    def _sampling_stream(self, seed: int) -> torch.Generator:
        stream = self._streams.get(seed)
        if stream is None:
            stream = self._streams[seed] = torch.Generator(device=self.device).manual_seed(seed)
        return stream

    def _stopped_rows(self, tokens: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor,
                      stops: Sequence[str], window: int) -> torch.Tensor:
        """Rows among `candidates` whose last `window` tokens contain a stop string (decoded text)."""
        stopped = torch.zeros_like(candidates)
        for i in candidates.nonzero().flatten().tolist():
            n = int(lengths[i])
            tail = self.tokenizer.decode(tokens[i, max(0, n - window): n].tolist(), skip_special_tokens=True)
            stopped[i] = any(s and s in tail for s in stops)
        return stopped


def sample_tokens(logits: torch.Tensor, gen: GenerationSettings, generator: torch.Generator | None = None,
                  uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row from [B, V] logits with temperature, top-k and top-p (transformers' warpers), drawn by
    inverting each row's cumulative distribution at one uniform number (`inverse_cdf_sample`; `uniform` [B, 1]
    gives them, else they are drawn from `generator`)."""
    if gen.temperature <= 0:
        return logits.argmax(-1)
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits / gen.temperature
    if gen.top_k and gen.top_k > 0:
        scores = TopKLogitsWarper(top_k=gen.top_k)(None, scores)
    if gen.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=gen.top_p)(None, scores)
    return inverse_cdf_sample(F.softmax(scores, dim=-1), generator, uniform)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of [B, V] probabilities: the first index whose cumulative mass exceeds u·total, u uniform
    on [0, 1). Exactly the categorical distribution, and one random number per row where `torch.multinomial` on
    CPU costs ~10x more per decode step at a batch of 8. A zero-probability index (filtered by top-k/top-p) can
    never be drawn: its cumulative mass equals its predecessor's, which is met first."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    u = uniform.to(cdf.dtype) * total
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u·total can round up to total itself: the row's last index of positive mass is the answer then
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
    return torch.minimum(index, last)
