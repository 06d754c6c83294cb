"""Adapter roles on one shared base: which adapter (or the reference ρ) a forward pass runs under, activation
checkpointing that replays a layer under the role it ran with, and folding an adapter into the base weights for
generation. A mixin of `LMPolicy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from agents.lm.loading import reference_adapter_name

REFERENCE = "<reference>"  # the role of ρ in LMPolicy._role (adapters disabled, a frozen adapter, or a copy)


class AdapterRoles:
    """Adapter switching, reference contexts, adapter-aware checkpointing and merging of an `LMPolicy`."""

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

    @property
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

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
            with self.use_adapter(reference_adapter_name(self.reference)) as module:
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
        slots = module_slots(self.model, layers)
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


def module_slots(root: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute name) under which each of `modules` sits in `root`."""
    wanted = {id(m): i for i, m in enumerate(modules)}
    slots: list[tuple[torch.nn.Module, str] | None] = [None] * len(modules)
    for parent in root.modules():
        for name, child in parent.named_children():
            if id(child) in wanted:
                slots[wanted[id(child)]] = (parent, name)
    assert all(slot is not None for slot in slots), "every module must be a child of root"
    return slots  # type: ignore[return-value]

