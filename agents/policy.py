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

import contextlib
import copy
import functools
import inspect
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 256  # positions per whole-vocabulary chunk: 256 × 150k vocab × 4 B ≈ 150 MB at most


# ----------------------------------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per action."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; <= 0 means greedy."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens (0 = all)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off)."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Stop strings; the action ends with the token "
                                                                 "that completes one (it is kept in the action)."})
    stop_at_eos: bool = field(default=True, metadata={"help": "End the action at the EOS token (kept in the action)."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed of the policy's sampling stream: the first call with a seed starts the stream, later calls "
                "continue it (so repeated prompts still get fresh samples). None: torch's global RNG."})


@dataclass
class RuntimeSettings:
    """How a model is loaded and run: one schema for every learner config (composed as `runtime`)."""

    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (CUDA when present)."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "Base weights' dtype. auto = bfloat16 on CUDA, float32 on CPU. Trainable parameters (adapters, "
                "heads) are always float32."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel passed to transformers (eager, sdpa, flash_attention_2; None = its default)."})
    quantization: Literal["none", "4bit"] = field(default="none", metadata={
        "help": "4bit: load the frozen base in NF4 with bitsandbytes (install the `quantization` extra; CUDA)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    merge_for_generation: bool = field(default=True, metadata={
        "help": "Fold the sampling adapter's LoRA weights into float32 base weights while generating (restored "
                "bit for bit afterwards): the adapter's per-layer work and call overhead leave each decode step, "
                "and the recorded log-probs equal the training forward's to float32 rounding. Costs one copy of "
                "the adapted base weights during generation; bfloat16/float16/4-bit bases never merge."})
    overlap_generation: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "Collect from two halves of the envs in turn, generating one half's actions while the other "
                "half's programs run. auto = on when the model runs on CUDA (generation on the GPU, programs on "
                "the CPU); off on CPU, where both compete for the same cores (measured slower there)."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.overlap_generation not in ("auto", "on", "off"):
            raise ValueError(f"overlap_generation must be auto, on or off, got {self.overlap_generation!r}")
        if self.quantization not in ("none", "4bit"):
            raise ValueError(f"quantization must be none or 4bit, got {self.quantization!r}")


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: `auto` is bfloat16 on CUDA (half the memory, the dtype models are trained in) and float32
    on CPU (where bfloat16 matmuls are slow and less exact)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def overlaps_generation(runtime: RuntimeSettings, device: torch.device) -> bool:
    """Whether collection overlaps generation with the sandbox runs (`RuntimeSettings.overlap_generation`)."""
    if runtime.overlap_generation == "auto":
        return torch.device(device).type == "cuda"
    return runtime.overlap_generation == "on"


def load_options(runtime: RuntimeSettings) -> dict[str, Any]:
    """Keyword arguments of `LMPolicy.from_pretrained` / `LMPolicy.load` for `runtime`."""
    device = resolve_device(runtime.device)
    options: dict[str, Any] = {"device": device, "dtype": resolve_dtype(runtime.dtype, device),
                               "gradient_checkpointing": runtime.gradient_checkpointing,
                               "merge_for_generation": runtime.merge_for_generation}
    if runtime.attn_implementation:
        options["attn_implementation"] = runtime.attn_implementation
    if runtime.quantization == "4bit":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ImportError("quantization=4bit needs bitsandbytes: pip install 'etpo-gym[quantization]'") from exc
        compute = options["dtype"] if options["dtype"] != torch.float32 else torch.bfloat16
        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=compute)
    return options


@dataclass
class Generation:
    """One sampled action. `logp[i]` = log π(action_ids[i] | prefix) under the policy's own distribution
    (temperature 1, no top-k/top-p filter) — the quantity `sequence_logprobs` recomputes for the same ids."""

    action_ids: list[int]
    text: str
    logp: np.ndarray  # float32[n]
    finish_reason: str = "length"  # "stop", "eos" or "length"


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


# ----------------------------------------------------------------------------------------------------------------
# Batching helpers
# ----------------------------------------------------------------------------------------------------------------
def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad int sequences to one [B, L] tensor; returns (ids, attention_mask)."""
    length = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        row = torch.as_tensor(np.asarray(s, dtype=np.int64))
        if side == "right":
            ids[i, :len(s)], mask[i, :len(s)] = row, 1
        else:
            ids[i, length - len(s):], mask[i, length - len(s):] = row, 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding safe)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------
REFERENCE = "<reference>"  # the role of ρ in LMPolicy._role (adapters disabled, a frozen adapter, or a copy)


def tempered(head: LogitsFn, temperature: float) -> LogitsFn:
    """hidden -> the logits of the distribution actions are sampled from, softmax(logits / T): what a learner that
    trains its sampled distribution scores tokens under (π and ρ at the same T)."""
    if temperature == 1.0:
        return head
    return lambda h: head(h).float() / temperature


class LMPolicy:
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
            model = _attach_adapters(model, adapters, frozen=_reference_adapter_name(reference))
        policy = cls(model, tokenizer, reference=reference, device=device, name_or_path=str(name_or_path),
                     chunk_size=chunk_size, merge_for_generation=merge_for_generation)
        if not trainable:
            model.requires_grad_(False)
        policy.upcast_trainable_to_fp32()
        policy.set_gradient_checkpointing(gradient_checkpointing)
        return policy

    def _validate_reference(self) -> None:
        ref_adapter = _reference_adapter_name(self.reference)
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

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        base = self.hf_model
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; accept both.
        if hasattr(base, "activation_checkpointing_enable"):
            enable = lambda: base.activation_checkpointing_enable({"use_reentrant": False})  # noqa: E731
            disable = base.activation_checkpointing_disable
        else:
            enable = lambda: base.gradient_checkpointing_enable({"use_reentrant": False})  # noqa: E731
            disable = base.gradient_checkpointing_disable
        if enabled:
            enable()
            base.config.use_cache = False
            for module in base.modules():  # replay each layer under the adapter it ran with (see below)
                if hasattr(module, "_gradient_checkpointing_func"):
                    module._gradient_checkpointing_func = self._checkpoint_layer
        elif self._checkpointing:
            disable()
        self._checkpointing = enabled

    def _checkpoint_layer(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Activation checkpointing of one layer that replays it under the adapter it first ran with.

        The adapters share one base model and peft switches them globally, so a plain checkpoint recomputes a layer
        in backward under whichever adapter is active *then*: with a policy and a critic (or value) adapter, one
        network's gradients came out of the other's activations. Written here because neither transformers nor
        peft offer an adapter-aware checkpoint.
        """
        role = self._role

        def replay(*a: Any, **k: Any) -> Any:
            with self._under(role):
                return function(*a, **k)

        return checkpoint(replay, *args, use_reentrant=False, **kwargs)

    def _under(self, role: str | None) -> contextlib.AbstractContextManager:
        """Context that makes `role` active; nothing when it already is (or when it is unknown)."""
        if role is None or role == self._role:
            return contextlib.nullcontext()
        return self._reference_context() if role == REFERENCE else self.use_adapter(role)

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
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

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

    def trainable_parameters(self, adapter: str | None = None) -> list[torch.nn.Parameter]:
        """Trainable parameters, optionally only those of one adapter (by peft's `.<adapter>.` naming)."""
        params = []
        for name, p in self.model.named_parameters():
            if not self._trainable.get(name, False):
                continue
            if adapter is None or f".{adapter}." in name:
                params.append(p)
        return params

    # -- adapters ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator[torch.nn.Module]:
        """Run the enclosed forward passes with adapter `name` active; `None` means the reference policy ρ.
        Yields the module to call."""
        if name is None:
            with self._reference_context() as module:
                yield module
            return
        if name not in self.adapter_names:
            if not self.adapter_names and name == "policy":  # full fine-tuning: the model itself is the policy
                yield self.model
                return
            raise ValueError(f"unknown adapter {name!r}; loaded: {self.adapter_names}")
        previous, previous_role = self.model.active_adapter, self._role
        self._switch(name)
        self._role = name
        try:
            yield self.model
        finally:
            self._role = previous_role
            self._switch(previous)

    @contextlib.contextmanager
    def _reference_context(self) -> Iterator[torch.nn.Module]:
        previous_role, self._role = self._role, REFERENCE
        try:
            with self._reference_modules() as module:
                yield module
        finally:
            self._role = previous_role

    @contextlib.contextmanager
    def _reference_modules(self) -> Iterator[torch.nn.Module]:
        if self.reference == "copy":
            yield self._reference_model
        elif self.reference == "base":
            if self.adapter_names:
                try:
                    with self.model.disable_adapter():
                        yield self.model
                finally:  # re-enabling the adapters (peft's set_adapter) froze every inactive one
                    self._restore_requires_grad()
            else:
                yield self.model  # no adapters and no copy: ρ is the current model (documented)
        else:
            with self.use_adapter(_reference_adapter_name(self.reference)) as module:
                yield module

    def _switch(self, name: str) -> None:
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self._restore_requires_grad()

    def _restore_requires_grad(self) -> None:
        """Undo peft's requires_grad toggling: a graph built under one adapter must still reach its parameters
        after a forward under another (or under ρ) ran before its backward."""
        for p, want in self._grad_flags:
            if p.requires_grad != want:
                p.requires_grad_(want)

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
            decoder = _decoder_of(module)
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
                             f"result in a way agents.policy.logits_transform does not know; add it there")
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
        values, kept by `_prefix_cache`, serve every action of the group, and its outputs give each action's first
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
        decoder = _decoder_of(self.model)
        return (decoder is not None and _cache_argument(decoder) in inspect.signature(decoder.forward).parameters
                and _full_attention_only(config)
                and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))

    def _shared_prompt_states(self, prompt: Sequence[int], actions: Sequence[Sequence[int]], adapter: str | None
                              ) -> list[torch.Tensor] | None:
        """`action_states` of one group of pairs with the same prompt: the prompt's pass (batch 1) records each
        layer's keys and values, then one pass over the actions (all but their last token, whose output predicts
        nothing) reads them for every row. None when some layer did not use the cache (a model or library version
        that drops it, e.g. under checkpointing): its states would have ignored the prompt."""
        length = len(prompt)
        with self.use_adapter(self._adapter_or_default(adapter)) as module:
            decoder = _decoder_of(module)
            cache_key = _cache_argument(decoder)
            cache = _prefix_cache(self.hf_model.config.num_hidden_layers)
            with _cache_kept_under_checkpointing(decoder):
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
                cache = _prefix_cache(cache, rows=len(actions))  # a second cache: reads the first, keeps nothing
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
                cache_key = _cache_argument(self.hf_model)
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
        """A KV cache allocated once for `length` positions: `_growing_cache` where every layer attends to the
        whole sequence, transformers' `StaticCache` for models with other layer kinds that can take one, else None
        (the model's default cache)."""
        from transformers import StaticCache

        if _full_attention_only(self.hf_model.config):
            return _growing_cache(self.hf_model.config.num_hidden_layers, length)
        if not getattr(self.hf_model, "_can_compile_fullgraph", False):
            return None
        return StaticCache(config=self.hf_model.config, max_cache_len=length)

    @contextlib.contextmanager
    def _merged(self, adapter: str | None) -> Iterator[bool]:
        """Adapter `adapter`'s LoRA deltas folded into the base weights (peft's `merge`) for the enclosed
        forward passes, then taken out again with the saved weights copied back, so the base — and with it ρ —
        is bit-identical afterwards (peft's `unmerge` alone subtracts the delta and leaves rounding residue).
        While merged, each LoRA wrapper is swapped out of the module tree for its base layer (a merged wrapper
        only forwards to it), so a decode step runs the plain model. Nothing happens unless
        `merge_for_generation` is on and every adapted base weight is float32: merging into bfloat16 would round
        the adapter away from the weights the training forward uses. Yields whether it merged."""
        layers = self._lora_layers(adapter) if self.merge_for_generation else []
        if not layers or any(layer.get_base_layer().weight.dtype != torch.float32 for layer in layers):
            yield False
            return
        saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        slots = _module_slots(self.model, layers)
        try:
            for layer in layers:
                layer.merge(adapter_names=[adapter])
            for (parent, name), layer in zip(slots, layers):  # a merged wrapper only forwards: take it out
                setattr(parent, name, layer.get_base_layer())
            yield True
        finally:
            for (parent, name), layer, weight in zip(slots, layers, saved):
                setattr(parent, name, layer)
                if layer.merged:
                    layer.unmerge()
                layer.get_base_layer().weight.data.copy_(weight)

    def _lora_layers(self, adapter: str | None) -> list[torch.nn.Module]:
        """The LoRA layers (on linear base layers, none already merged) that hold adapter `adapter`."""
        if adapter is None or adapter not in self.adapter_names:
            return []
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        if any(m.merged or not isinstance(m.get_base_layer(), torch.nn.Linear) for m in layers):
            return []
        return layers

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


FINISH_REASONS = ("length", "eos", "stop")
COMPACT_FRACTION = 0.25  # finished rows leave the decode batch once they are this share of it (it copies the cache)


QUIET_LOAD_BYTES = 64 * 2**20  # local checkpoints below this load in well under a second: no progress bar


def load_causal_lm(name_or_path: str | Path, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained`, with transformers' "Loading weights" bar shown only where loading takes
    long: a small local checkpoint (the tiny model, loaded once per benchmark cell) would print a bar per load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    local = Path(name_or_path)
    small = local.is_dir() and sum(f.stat().st_size for f in local.glob("*.safetensors")) < QUIET_LOAD_BYTES
    if not (small and hf_logging.is_progress_bar_enabled()):
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    finally:
        hf_logging.enable_progress_bar()


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which a model takes and returns its KV cache: `cache` in recent transformers (which
    deprecated `past_key_values`), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _full_attention_only(config: Any) -> bool:
    """Whether every layer of a model with this config attends to the whole sequence (no sliding windows, no
    recurrent or linear-attention layers, whose caches work differently)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"} and not getattr(config, "sliding_window", None)


def _growing_cache(num_layers: int, capacity: int) -> Any:
    """A transformers `Cache` for decoding whose layers allocate their keys and values once, for `capacity`
    positions, write each step's in place and hand attention only the filled positions. Written here because
    transformers' default cache copies all of its keys and values at every step and its `StaticCache` hands
    attention every allocated position (the unfilled ones masked), which at a batch of 16 rows makes attention
    the largest cost of a decode step on CPU."""
    from transformers.cache_utils import Cache

    layer_class = _growing_layer_class()
    return Cache(layers=[layer_class(capacity) for _ in range(num_layers)])


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.filled = capacity, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            rows, heads = key_states.shape[:2]
            self.key_store = key_states.new_zeros((rows, heads, self.capacity, key_states.shape[-1]))
            self.value_store = value_states.new_zeros((rows, heads, self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.filled + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"the decode cache holds {self.capacity} positions; {end} were written")
            self.key_store[:, :, self.filled: end] = key_states
            self.value_store[:, :, self.filled: end] = value_states
            self.filled = end
            self._expose()
            return self.keys, self.values

        def _expose(self) -> None:
            self.keys = self.key_store[:, :, : self.filled]
            self.values = self.value_store[:, :, : self.filled]

        def get_seq_length(self) -> int:
            return self.filled

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            """Rows `beam_idx` of the cache, in that order (duplicates for shared prompts, a subset when finished
            rows leave)."""
            if self.is_initialized:
                self.key_store = self.key_store.index_select(0, beam_idx.to(self.device))
                self.value_store = self.value_store.index_select(0, beam_idx.to(self.device))
                self._expose()

        batch_select_indices = reorder_cache

    return GrowingLayer


def _prefix_cache(source: int | Any, rows: int = 0) -> Any:
    """A transformers `Cache` that holds one prompt's keys and values for `LMPolicy._shared_prompt_states`.

    `_prefix_cache(num_layers)` records: each layer's `update` keeps what the layer computed (replacing, never
    appending, so a checkpointed layer replayed in backward stores the same again) and returns it.
    `_prefix_cache(recording, rows)` reads: `update` returns the recorded keys and values for `rows` rows followed
    by the new ones and keeps nothing, so a replayed layer sees exactly what its first run saw. Written here because
    transformers' caches append on every call, which a checkpoint replay would repeat.
    """
    from transformers.cache_utils import Cache

    layer_class = _prefix_layer_class()
    if isinstance(source, int):
        return Cache(layers=[layer_class() for _ in range(source)])
    layers = []
    for recorded in source.layers:
        layer = layer_class()
        layer.keys, layer.values, layer.is_initialized, layer.rows = recorded.keys, recorded.values, True, rows
        layer.device = recorded.device
        layers.append(layer)
    return Cache(layers=layers)


@functools.cache
def _prefix_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        rows = 0  # 0: recording; else the rows each read expands the recorded prompt to
        reads = 0  # reads served (a layer that never read its prompt ran without it)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.rows:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states
                return key_states, value_states
            self.reads += 1
            keys = self.keys.expand(self.rows, -1, -1, -1)
            values = self.values.expand(self.rows, -1, -1, -1)
            return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    return PrefixLayer


@contextlib.contextmanager
def _cache_kept_under_checkpointing(decoder: torch.nn.Module) -> Iterator[None]:
    """Let checkpointed decoder layers keep the cache argument inside the block (transformers drops it under
    checkpointing unless a layer says it only reads it; `_prefix_cache`'s layers are safe to replay)."""
    layers = [m for m in decoder.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class's own setting again


def _decoder_of(module: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack inside a causal LM (inside any peft wrapper, whose LoRA layers it holds), or None."""
    model = module.get_base_model() if hasattr(module, "get_base_model") else module
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def _module_slots(root: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute name) under which each of `modules` sits in `root`."""
    wanted = {id(m): i for i, m in enumerate(modules)}
    slots: list[tuple[torch.nn.Module, str] | None] = [None] * len(modules)
    for parent in root.modules():
        for name, child in parent.named_children():
            if id(child) in wanted:
                slots[wanted[id(child)]] = (parent, name)
    assert all(slot is not None for slot in slots), "every module must be a child of root"
    return slots  # type: ignore[return-value]


def _reference_adapter_name(reference: str) -> str | None:
    return reference.split(":", 1)[1] if reference.startswith("adapter:") else None


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft calls that wrap a model: peft reads transformers' deprecated `is_gradient_checkpointing` then,
    a FutureWarning about peft's code, not ours, printed once per wrap."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _attach_adapters(model: torch.nn.Module, adapters: dict[str, Any], frozen: str | None) -> torch.nn.Module:
    """Put every adapter on the one base model: LoraConfig -> fresh adapter, path -> saved adapter."""
    from peft import PeftModel, get_peft_model

    peft_model = None
    for name, spec in adapters.items():
        trainable = name != frozen
        with peft_wrapping():
            if isinstance(spec, (str, Path)):
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(spec), adapter_name=name,
                                                           is_trainable=trainable)
                else:
                    peft_model.load_adapter(str(spec), adapter_name=name, is_trainable=trainable)
            elif peft_model is None:
                peft_model = get_peft_model(model, spec, adapter_name=name)
            else:
                peft_model.add_adapter(name, spec)
        for pname, p in peft_model.named_parameters():
            if f".{name}." in pname:
                p.requires_grad_(trainable)
    assert peft_model is not None
    first_trainable = "policy" if "policy" in adapters else next(n for n in adapters if n != frozen)
    peft_model.set_adapter(first_trainable)
    for pname, p in peft_model.named_parameters():  # set_adapter froze the others; decide here instead
        p.requires_grad_(any(f".{n}." in pname for n in adapters if n != frozen))
    return peft_model


def default_lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: Any = "all-linear"):
    """A LoRA config for causal LMs (every linear layer but the output head, as PEFT's "all-linear")."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM")


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
