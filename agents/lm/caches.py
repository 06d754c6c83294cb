"""KV caches the policy writes itself: a decode cache that grows in place, and a shared-prompt cache safe
under activation checkpointing. Written here because transformers' caches copy or append on every call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which a model takes and returns its KV cache: `cache` in recent transformers (which
    deprecated `past_key_values`), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def full_attention_only(config: Any) -> bool:
    """Whether every layer of a model with this config attends to the whole sequence (no sliding windows, no
    recurrent or linear-attention layers, whose caches work differently)."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"} and not getattr(config, "sliding_window", None)


def growing_cache(num_layers: int, capacity: int) -> Any:
    """A transformers `Cache` for decoding whose layers allocate their keys and values once, for `capacity`
    positions, write each step's in place and hand attention only the filled positions. Written here because
    transformers' default cache copies all of its keys and values at every step and its `StaticCache` hands
    attention every allocated position (the unfilled ones masked), which at a batch of 16 rows makes attention
    the largest cost of a decode step on CPU."""
    from transformers.cache_utils import Cache

    layer_class = growing_layer_class()
    return Cache(layers=[layer_class(capacity) for _ in range(num_layers)])


@functools.cache
def growing_layer_class() -> type:
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


def prefix_cache(source: int | Any, rows: int = 0) -> Any:
    """A transformers `Cache` that holds one prompt's keys and values for `LMPolicy._shared_prompt_states`.

    `prefix_cache(num_layers)` records: each layer's `update` keeps what the layer computed (replacing, never
    appending, so a checkpointed layer replayed in backward stores the same again) and returns it.
    `prefix_cache(recording, rows)` reads: `update` returns the recorded keys and values for `rows` rows followed
    by the new ones and keeps nothing, so a replayed layer sees exactly what its first run saw. Written here because
    transformers' caches append on every call, which a checkpoint replay would repeat.
    """
    from transformers.cache_utils import Cache

    layer_class = prefix_layer_class()
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
def prefix_layer_class() -> type:
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
def cache_kept_under_checkpointing(decoder: torch.nn.Module) -> Iterator[None]:
    """Let checkpointed decoder layers keep the cache argument inside the block (transformers drops it under
    checkpointing unless a layer says it only reads it; `prefix_cache`'s layers are safe to replay)."""
    layers = [m for m in decoder.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class's own setting again
