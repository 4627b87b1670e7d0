"""nn.Embedding as a layer family: a dendrite is another embedding table, and the fold precomputes every row.

The input is an index, so the dendritic layer is a function of one of `num_embeddings` values: evaluating it on
all of them gives one table of the original size that reproduces it exactly, whatever the activation, cascade,
rank or channel set. A low-rank dendrite is a table with R columns times an R -> C projection (no bias).

Opt-in (`by_default = False`): a full dendrite copies the whole vocabulary table (tens of millions of parameters
for a language model), so embeddings get dendrites only when an include pattern names them (`Embedding`, the
module's name, or `*`).
"""

from __future__ import annotations

import torch
from torch import nn

from .dendrite import DendriteLayer


class DendriteEmbedding(DendriteLayer):
    """nn.Embedding: weight [num_embeddings, C], channels on the last axis of the output."""

    layer_type = nn.Embedding
    by_default = False
    weight_out_axis = 1
    channels_attribute = "embedding_dim"

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm rescales its rows in place at every lookup, so a dendrite copy would drift from it"
        return super().refusal(module)

    @classmethod
    def channels_of(cls, layer: nn.Module) -> int:
        return layer.embedding_dim

    @classmethod
    def low_rank_factors(cls, base, rank, width, bias, **factory):
        rows = base.num_embeddings
        if rank * (rows + width) >= rows * width:
            return None
        return (nn.Embedding(rows, rank, padding_idx=base.padding_idx, **factory),
                nn.Linear(rank, width, bias=False, **factory))

    @classmethod
    def layer_spec(cls, layer: nn.Module, out_channels: int | None = None) -> dict:
        return {"type": "Embedding", "num_embeddings": layer.num_embeddings,
                "out_channels": out_channels or layer.embedding_dim, "padding_idx": layer.padding_idx,
                "spatial_dims": 0, "bias": False}

    @classmethod
    def layer_from_spec(cls, spec: dict, out_channels: int | None = None) -> nn.Module:
        return nn.Embedding(spec["num_embeddings"], out_channels or spec["out_channels"], padding_idx=spec["padding_idx"])

    def precomputed(self) -> nn.Module:
        """One table holding this layer's output for every index (evaluated as it is, eval mode in the fold)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            rows = self(torch.arange(self.base_layer.num_embeddings, device=weight.device))
        table = self.layer_from_spec(self.layer_spec(self.base_layer)).to(device=weight.device, dtype=rows.dtype)
        with torch.no_grad():
            table.weight.copy_(rows)
        return table
