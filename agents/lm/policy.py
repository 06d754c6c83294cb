"""`LMPolicy`: one Hugging Face causal LM, named LoRA adapters on one shared base, a reference policy ρ, generation that
keeps token ids, per-token log-probs, and whole-vocabulary reductions computed in chunks.

Reference policy ρ (the KL anchor of ETPO/PPO) — a documented switch, `reference=`:
- ``"base"`` (default): ρ is the base model with every adapter disabled (peft's `disable_adapter()`); π is the
  "policy" adapter. No second copy of the weights is held.
- ``"adapter:<name>"``: ρ is a frozen adapter, e.g. an SFT adapter training starts from. Load the same saved adapter
  twice, as "reference" (frozen) and "policy" (trainable), so π starts equal to ρ:
  ``LMPolicy.from_pretrained(base, adapters={"reference": sft_dir, "policy": sft_dir}, reference="adapter:reference")``.
- ``"copy"``: full fine-tuning (no adapters) with a frozen deep copy of the initial weights as ρ.

Token ids are the currency: `generate` returns the sampled ids and their log-probs; learners re-score those same ids
with `sequence_logprobs` and never re-tokenise decoded text.

Chunked reductions: logits are B×T×V floats (V ~ 50k–150k for real models); here the model is run with
`logits_to_keep=1` to get final hidden states, and the output embedding is applied to `chunk_size` positions at a
time, under activation checkpointing when gradients are on, so neither the forward nor the backward pass ever holds
more than chunk_size × V logits.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.lm.batching import pad_sequences, positions_from_mask, resolve_device
from agents.lm.caches import cache_argument, cache_kept_under_checkpointing, full_attention_only, prefix_cache
from agents.lm.decoding import Decoding
from agents.lm.loading import attach_adapters, decoder_of, load_causal_lm, reference_adapter_name
from agents.lm.reductions import DEFAULT_CHUNK, LogitsFn, logits_transform, token_logprobs
from agents.lm.roles import AdapterRoles
from agents.lm.settings import GenerationSettings


class LMPolicy(AdapterRoles, Decoding):
    """A causal LM with named adapters. See the module docstring for the reference-policy switch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, reference: str = "base",
                 device: torch.device | str = "cpu", default_adapter: str | None = None,
                 name_or_path: str = "", chunk_size: int = DEFAULT_CHUNK, merge_for_generation: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.reference = reference
        self.name_or_path = name_or_path
        self.chunk_size = chunk_size
        self.merge_for_generation = merge_for_generation  # see RuntimeSettings.merge_for_generation
        self.adapter_names: list[str] = list(getattr(model, "peft_config", {}) or {})
        self.default_adapter = default_adapter or ("policy" if "policy" in self.adapter_names else
                                                   (self.adapter_names[0] if self.adapter_names else None))
        self._reference_model: torch.nn.Module | None = None
        self._checkpointing = False
        self._role: str | None = None  # adapter name (or REFERENCE) of the enclosing use_adapter; None outside
        self._streams: dict[int, torch.Generator] = {}  # seed -> sampling stream (see GenerationSettings.seed)
        self._validate_reference()
        if reference == "copy":
            self._reference_model = copy.deepcopy(model).eval()
            self._reference_model.requires_grad_(False)
        # requires_grad per parameter, fixed here: peft's set_adapter would otherwise toggle it on every switch.
        self._trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        # (parameter, trainable) once: re-enabling adapters happens several times per update step
        self._grad_flags = [(p, self._trainable[name]) for name, p in model.named_parameters()]
        self.pad_id = self._pick_pad_id()
        config = getattr(self.hf_model, "config", None)
        self.logits_transform = logits_transform(config) if config is not None else None
        self._head_checked = False
        self._prompt_sharing_failed = False  # set once a model ignored the shared prompt's cache (see action_states)

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, adapters: dict[str, Any] | None = None,
                        reference: str = "base", device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                        chunk_size: int = DEFAULT_CHUNK, merge_for_generation: bool = True,
                        trainable: bool = True, **model_kwargs: Any) -> LMPolicy:
        """Load any causal LM by hub name or local path.

        `adapters` maps a name to a `peft.LoraConfig` (fresh adapter) or a path to a saved adapter (loaded). An
        adapter whose name is the reference one (`reference="adapter:<name>"`) is frozen; others are trainable.
        Trainable parameters are kept in fp32 whatever the base dtype. `trainable=False` (serving, prompting)
        freezes every parameter, so the whole model stays in `dtype`.
        """
        from transformers import AutoTokenizer

        device = resolve_device(device)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        if "quantization_config" in model_kwargs:  # bitsandbytes places the quantised weights itself
            model_kwargs.setdefault("device_map", {"": str(device)})
            model = load_causal_lm(name_or_path, dtype=dtype, **model_kwargs)
        else:
            model = load_causal_lm(name_or_path, dtype=dtype, **model_kwargs).to(device)
        if adapters:
            model = attach_adapters(model, adapters, frozen=reference_adapter_name(reference))
        policy = cls(model, tokenizer, reference=reference, device=device, name_or_path=str(name_or_path),
                     chunk_size=chunk_size, merge_for_generation=merge_for_generation)
        if not trainable:
            model.requires_grad_(False)
        policy.upcast_trainable_to_fp32()
        policy.set_gradient_checkpointing(gradient_checkpointing)
        return policy

    def _validate_reference(self) -> None:
        ref_adapter = reference_adapter_name(self.reference)
        if self.reference not in ("base", "copy") and ref_adapter is None:
            raise ValueError(f"reference must be 'base', 'copy' or 'adapter:<name>', got {self.reference!r}")
        if ref_adapter is not None and ref_adapter not in self.adapter_names:
            raise ValueError(f"reference adapter {ref_adapter!r} is not loaded (adapters: {self.adapter_names})")

    def _pick_pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of the base model's floating-point weights: the frozen ones, not the fp32 trainable adapters;
        for a 4-bit base (whose packed weights are uint8) the dtype of its unquantised layers, the compute dtype."""
        for p in self.hf_model.parameters():
            if not p.requires_grad and p.is_floating_point():
                return p.dtype
        return torch.float32

    def upcast_trainable_to_fp32(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

    def train_without_dropout(self) -> None:
        """Training mode (so checkpointing applies) with every dropout off: an RL update must score tokens exactly
        as sampling did (as TRL's `disable_dropout_in_model`)."""
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        config = self.hf_model.config
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying transformers model (inside any peft wrapper)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def context_length(self) -> int:
        cfg = self.hf_model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if value:
                return int(value)
        return 2048

    # -- tokens -------------------------------------------------------------------------------------------------------
    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of `text` (no special tokens added); with `max_length`, the last `max_length` ids are kept."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_length is not None and len(ids) > max_length:
            ids = ids[len(ids) - max_length:]
        return list(ids)

    def encode_observation(self, obs: str, info: dict | None = None, max_length: int | None = None,
                           use_chat_template: bool | None = None) -> list[int]:
        """Prompt ids for an env observation: the chat template over `info["messages"]` when the tokenizer has
        one (instruct models), else the plain prompt text. Truncated from the left to fit `max_length`."""
        messages = (info or {}).get("messages")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template is None:
            use_chat_template = has_template and bool(messages)
        if use_chat_template and messages:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
            if max_length is not None and len(ids) > max_length:
                ids = ids[len(ids) - max_length:]
            return ids
        return self.encode(obs, max_length=max_length)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def max_prompt_tokens(self, gen: GenerationSettings) -> int:
        return max(1, self.context_length - gen.max_new_tokens)

    # -- forward passes -----------------------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               adapter: str | None = "policy") -> torch.Tensor:
        """Full [B, T, V] logits (for short inputs and tests; learners use the chunked paths)."""
        return self._forward(input_ids, attention_mask, adapter).logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      adapter: str | None = "policy") -> torch.Tensor:
        """Final-layer hidden states [B, T, H] (after the final norm): the decoder's `last_hidden_state`, so
        neither T×V logits nor every layer's states (`output_hidden_states=True` keeps them all) are made. A model
        without a separate decoder (`get_decoder`) falls back to the last of its hidden states."""
        return self._forward(input_ids, attention_mask, adapter, decoder_only=True)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, adapter: str | None,
                 decoder_only: bool = False, **kwargs: Any) -> Any:
        """One full-sequence pass under `adapter` (None = the reference), positions taken from the mask. With
        `decoder_only`, the pass stops at the decoder and returns its final hidden states [B, T, H]."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=positions_from_mask(attention_mask), use_cache=False)
        with self.use_adapter(self._adapter_or_default(adapter)) as module:
            if not decoder_only:
                return module(**inputs, **kwargs)
            decoder = decoder_of(module)
            if decoder is None:
                return module(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            return decoder(**inputs).last_hidden_state

    def head(self, adapter: str | None = "policy", transform: bool = True) -> LogitsFn:
        """hidden [c, H] -> logits [c, V] for `adapter`: the output layer (LoRA on it honoured), then the model's
        own final transform (`logits_transform`: softcapping, logit scales), so the scores are those generation
        samples from. `transform=False` gives the output layer alone (e.g. a critic that reuses it)."""
        adapter = self._adapter_or_default(adapter)
        if transform:
            self.check_head()
        final = self.logits_transform if transform else None

        def apply(h: torch.Tensor) -> torch.Tensor:
            with self.use_adapter(adapter) as module:
                base = module.get_base_model() if hasattr(module, "get_base_model") else module
                logits = base.get_output_embeddings()(h)
            return final(logits) if final is not None else logits

        return apply

    def final_logits(self, output: torch.Tensor) -> torch.Tensor:
        """The model's logits from its output layer's result (`logits_transform`; identity for most models)."""
        return self.logits_transform(output) if self.logits_transform is not None else output

    @torch.no_grad()
    def check_head(self, force: bool = False) -> float:
        """Check once that `head()` on the final hidden states reproduces `model(...).logits` on a short probe;
        raise if it does not (the model transforms its logits in a way `logits_transform` does not know, and the
        learners would train another distribution than generation samples). Returns the largest difference."""
        if (self._head_checked and not force) or self.device.type == "meta":  # meta: shapes only, nothing to run
            return 0.0
        self._head_checked = True  # set first: head() below must not recurse into the check
        vocab = int(self.hf_model.get_output_embeddings().weight.shape[0])
        ids = (torch.arange(4, device=self.device)[None, :] * 7 + 1) % vocab
        was_training = self.model.training
        self.model.eval()
        try:
            out = self._forward(ids, None, "policy", output_hidden_states=True)
            mine = self.head("policy")(out.hidden_states[-1][0]).float()
        finally:
            self.model.train(was_training)
        theirs = out.logits[0].float()
        diff = float((mine - theirs).abs().max())
        exact = out.logits.dtype == torch.float32
        tolerance = (1e-4 if exact else 3e-2) * (1.0 + float(theirs.abs().max()))
        if not diff <= tolerance:
            self._head_checked = False
            kind = getattr(self.hf_model.config, "model_type", type(self.hf_model).__name__)
            raise ValueError(f"LMPolicy.head() does not reproduce the logits of this {kind} model (largest "
                             f"difference {diff:.3g}, tolerance {tolerance:.3g}): it transforms its output layer's "
                             f"result in a way agents.lm.reductions.logits_transform does not know; add it there")
        return diff

    def action_hidden(self, prompt_ids: Sequence[Sequence[int]], action_ids: Sequence[Sequence[int]],
                      adapter: str | None = "policy") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states that predict each action token: (hidden [B, N, H], targets [B, N], mask [B, N]), row i
        holding action i's states (`action_states`: a prompt shared by several pairs runs once) right-padded."""
        states = self.action_states(prompt_ids, action_ids, adapter)
        blocks = torch.split(states, [max(len(a), 1) for a in action_ids])
        hidden = torch.nn.utils.rnn.pad_sequence([b[: len(a)] for b, a in zip(blocks, action_ids)], batch_first=True)
        n_max = hidden.shape[1]
        targets = torch.full((len(action_ids), n_max), self.pad_id, dtype=torch.long, device=self.device)
        amask = torch.zeros((len(action_ids), n_max), dtype=torch.bool, device=self.device)
        for i, a in enumerate(action_ids):
            targets[i, : len(a)] = torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)
            amask[i, : len(a)] = True
        return hidden, targets, amask

    def action_states(self, prompt_ids: Sequence[Sequence[int]], action_ids: Sequence[Sequence[int]],
                      adapter: str | None = "policy") -> torch.Tensor:
        """Final hidden states of the token states that predict each action token, [Σ n_i, H] in pair order: n_i =
        len(action_i) rows for pair i (row j is position len(prompt_i) − 1 + j), one row — the state right after the
        prompt — for an empty action. Differentiable.

        Pairs that share a prompt (siblings' first attempts all start from it) run that prompt once: its keys and
        values, kept by `prefix_cache`, serve every action of the group, and its outputs give each action's first
        state. The states equal those of the full sequences (to float rounding) and so do their gradients, which
        flow back through the one prompt pass — under activation checkpointing too — at a fraction of the work.
        Pairs with a prompt of their own run together as one right-padded batch.
        """
        if len(prompt_ids) != len(action_ids):
            raise ValueError("prompt_ids and action_ids must have the same length")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token (the first action token needs a state)")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(prompt_ids):
            groups.setdefault(tuple(int(t) for t in prompt), []).append(i)
        shared = [g for g in groups.values() if len(g) > 1] if self._can_share_prompts() else []
        alone = sorted(set(range(len(prompt_ids))) - {i for g in shared for i in g})
        rows: list[torch.Tensor | None] = [None] * len(prompt_ids)
        if alone:
            full = [list(prompt_ids[i]) + list(action_ids[i]) for i in alone]
            ids, mask = pad_sequences(full, self.pad_id, "right", self.device)
            hidden = self.hidden_states(ids, mask, adapter)
            for b, i in enumerate(alone):
                start = len(prompt_ids[i]) - 1
                rows[i] = hidden[b, start: start + max(len(action_ids[i]), 1)]
        for group in shared:
            states = self._shared_prompt_states(prompt_ids[group[0]], [action_ids[i] for i in group], adapter)
            if states is None:  # the model did not read the cache: whole sequences for this group and from now on
                self._prompt_sharing_failed = True
                states = self.action_states([prompt_ids[i] for i in group], [action_ids[i] for i in group], adapter)
                states = torch.split(states, [max(len(action_ids[i]), 1) for i in group])
            for i, block in zip(group, states):
                rows[i] = block
        return torch.cat(rows)

    def _can_share_prompts(self) -> bool:
        """Whether `action_states` may run a shared prompt once: a decoder that takes a cache, full attention in
        every layer (no sliding windows or recurrent layers, whose caches differ) and an eager or sdpa kernel; not
        after a model was seen to ignore the cache."""
        if self._prompt_sharing_failed:
            return False
        config = self.hf_model.config
        decoder = decoder_of(self.model)
        return (decoder is not None and cache_argument(decoder) in inspect.signature(decoder.forward).parameters
                and full_attention_only(config)
                and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))

    def _shared_prompt_states(self, prompt: Sequence[int], actions: Sequence[Sequence[int]], adapter: str | None
                              ) -> list[torch.Tensor] | None:
        """`action_states` of one group of pairs with the same prompt: the prompt's pass (batch 1) records each
        layer's keys and values, then one pass over the actions (all but their last token, whose output predicts
        nothing) reads them for every row. None when some layer did not use the cache (a model or library version
        that drops it, e.g. under checkpointing): its states would have ignored the prompt."""
        length = len(prompt)
        with self.use_adapter(self._adapter_or_default(adapter)) as module:
            decoder = decoder_of(module)
            cache_key = cache_argument(decoder)
            cache = prefix_cache(self.hf_model.config.num_hidden_layers)
            with cache_kept_under_checkpointing(decoder):
                ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=self.device)
                positions = torch.arange(length, device=self.device)[None]
                after_prompt = decoder(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                                       use_cache=False, **{cache_key: cache}).last_hidden_state[0, -1:]
                tails = [list(a)[:-1] for a in actions]
                width = max(len(t) for t in tails)
                if width == 0:
                    return [after_prompt for _ in actions]
                if not all(layer.is_initialized for layer in cache.layers):
                    return None  # the prompt's pass ran without the cache: nothing recorded to share
                cache = prefix_cache(cache, rows=len(actions))  # a second cache: reads the first, keeps nothing
                ids, mask = pad_sequences(tails, self.pad_id, "right", self.device)
                mask = torch.cat([mask.new_ones((len(actions), length)), mask], 1)
                positions = (length + torch.arange(width, device=self.device))[None].expand(len(actions), -1)
                hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                 **{cache_key: cache}).last_hidden_state
        if not all(layer.reads for layer in cache.layers):
            return None
        return [torch.cat([after_prompt, hidden[b, : len(tail)]]) for b, tail in enumerate(tails)]

    def sequence_logprobs(self, prompt_ids: Sequence[Sequence[int]], action_ids: Sequence[Sequence[int]],
                          adapter: str | None = "policy", padded: bool = False
                          ) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of each action under `adapter` (None = reference ρ), differentiable.

        Returns a list of [n_i] tensors, or with `padded=True` (logp [B, N] with zeros at padding, mask [B, N]).
        """
        hidden, targets, mask = self.action_hidden(prompt_ids, action_ids, adapter)
        flat = token_logprobs(hidden[mask], targets[mask], self.head(adapter), self.chunk_size)
        out = hidden.new_zeros(mask.shape, dtype=torch.float32)
        out = out.masked_scatter(mask, flat)
        if padded:
            return out, mask
        return [out[i, : int(mask[i].sum())] for i in range(len(action_ids))]

    def _adapter_or_default(self, adapter: str | None) -> str | None:
        if adapter == "policy" and "policy" not in self.adapter_names:
            return self.default_adapter if self.adapter_names else "policy"
        return adapter

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Adapters (one sub-directory each, by peft) or the full model, plus tokenizer and policy metadata."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        meta = {"base": self.name_or_path, "adapters": self.adapter_names, "reference": self.reference}
        (directory / "policy.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             base: str | None = None, **kw: Any) -> LMPolicy:
        """Reload what `save` wrote (adapters are re-attached to the recorded base model, all trainable unless
        frozen as the reference)."""
        directory = Path(directory)
        meta = json.loads((directory / "policy.json").read_text())
        if not meta["adapters"]:
            return cls.from_pretrained(directory, device=device, dtype=dtype, reference=meta["reference"], **kw)
        adapters = {}
        for name in meta["adapters"]:
            sub = directory if name == "default" else directory / name
            adapters[name] = str(sub if (sub / "adapter_config.json").exists() else directory)
        return cls.from_pretrained(base or meta["base"], adapters=adapters, reference=meta["reference"],
                                   device=device, dtype=dtype, **kw)
