"""Loading a causal LM and putting named LoRA adapters on its one base model (peft)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

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


def decoder_of(module: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack inside a causal LM (inside any peft wrapper, whose LoRA layers it holds), or None."""
    model = module.get_base_model() if hasattr(module, "get_base_model") else module
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def reference_adapter_name(reference: str) -> str | None:
    return reference.split(":", 1)[1] if reference.startswith("adapter:") else None


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft calls that wrap a model: peft reads transformers' deprecated `is_gradient_checkpointing` then,
    a FutureWarning about peft's code, not ours, printed once per wrap."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_adapters(model: torch.nn.Module, adapters: dict[str, Any], frozen: str | None) -> torch.nn.Module:
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
