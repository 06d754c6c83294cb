"""The language-model policy, split by concern.

- `settings`: how actions are generated (`GenerationSettings`), where the model runs (`RuntimeSettings`), a sample
  (`Generation`);
- `batching`: padding token ids, position ids, devices;
- `reductions`: whole-vocabulary reductions (log-probs, entropy, KL, expectations) a chunk of positions at a time;
- `loading`: loading a causal LM and attaching named LoRA adapters to its one base;
- `caches`: the KV caches the policy writes itself (decode, shared prompt);
- `roles`: which adapter, or the reference ρ, a pass runs under (a mixin of `LMPolicy`);
- `decoding`: the batched decode loop and the sampler (a mixin of `LMPolicy`);
- `policy`: `LMPolicy`, which holds the model and ties the above together.
"""

from agents.lm.batching import pad_sequences, positions_from_mask, resolve_device
from agents.lm.decoding import inverse_cdf_sample, sample_tokens
from agents.lm.loading import default_lora_config, load_causal_lm, peft_wrapping
from agents.lm.policy import LMPolicy
from agents.lm.reductions import (
    DEFAULT_CHUNK,
    LogitsFn,
    chunked_map,
    entropy,
    expectation,
    kl_divergence,
    logits_transform,
    logsumexp,
    tempered,
    token_logprobs,
)
from agents.lm.settings import (
    Generation,
    GenerationSettings,
    RuntimeSettings,
    load_options,
    overlaps_generation,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_CHUNK", "Generation", "GenerationSettings", "LMPolicy", "LogitsFn", "RuntimeSettings", "chunked_map",
    "default_lora_config", "entropy", "expectation", "inverse_cdf_sample", "kl_divergence", "load_causal_lm",
    "load_options", "logits_transform", "logsumexp", "overlaps_generation", "pad_sequences", "peft_wrapping",
    "positions_from_mask", "resolve_device", "resolve_dtype", "sample_tokens", "tempered", "token_logprobs",
]
