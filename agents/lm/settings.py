"""How a policy generates and where it runs: `GenerationSettings`, `RuntimeSettings`, and a sampled `Generation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from agents.lm.batching import resolve_device


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
