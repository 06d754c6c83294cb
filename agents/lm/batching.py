"""Token-id batching helpers: padding, position ids, devices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
