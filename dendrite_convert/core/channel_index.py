"""Index arithmetic for channel-selective dendrites: where one dendrite's channels sit among another's, and adding
a term to a subset of channels. Shared by the dendrite layer and its fold."""

from __future__ import annotations

import torch


def channel_positions(have: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each channel of `want` sits in the sorted set `have`, and whether it is there at all."""
    position = torch.searchsorted(have, want).clamp(max=have.numel() - 1)
    return position, have[position] == want


def add_to_channels(y: torch.Tensor, term: torch.Tensor, channels: torch.Tensor, axis: int) -> torch.Tensor:
    """y with `term` (m channels along `axis`) added to the channels listed in `channels` (a scatter-add:
    onnxruntime runs it as one ScatterElements, with no transposes)."""
    shape = [1] * term.ndim
    shape[axis] = channels.numel()
    return y.scatter_add(axis, channels.view(shape).expand_as(term), term)
