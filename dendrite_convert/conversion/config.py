"""What to convert and how: one config object per verb, serialisable into `dendrite_config.json`."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from ..core.errors import UsageError
from ..core.layers import ACTIVATIONS


@dataclass
class DendriteConfig:
    """How dendrites are inserted (docs/design.md §2-3)."""

    dendrites: int = 0  # dendrites pre-inserted in every target
    activation: str = "sigmoid"  # sigmoid | tanh | identity
    init_std: float = 0.01  # std of a new dendrite's weights
    rank: int | None = None  # low-rank dendrites (in -> rank -> out) instead of full copies
    channel_fraction: float | None = None  # channel-selective: each dendrite serves this fraction of its target's channels
    include: list[str] = field(default_factory=list)  # globs on module names, or layer type names
    exclude: list[str] = field(default_factory=list)
    pair_norms: bool = True  # conv/linear -> BatchNorm is one neuron
    strict_graph: bool = False  # a tracing fallback is an error

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}.",
                             parameter="activation")
        if self.dendrites < 0:
            raise UsageError(f"dendrites must be 0 or more, not {self.dendrites}.", parameter="dendrites")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"rank must be 1 or more, not {self.rank}.", parameter="rank")
        if self.channel_fraction is not None and not 0 < self.channel_fraction <= 1:
            raise UsageError(f"channel_fraction must be a fraction in (0, 1], not {self.channel_fraction}.",
                             parameter="channel_fraction")
        if self.channel_fraction is not None and self.channel_fraction < 1 and self.dendrites:
            raise UsageError("dendrites cannot be combined with channel_fraction= below 1: a channel-selective "
                             "dendrite serves the channels with the largest error, known only in training; let "
                             "training add them.", parameter="dendrites")
        if self.init_std <= 0:
            raise UsageError(f"init_std must be positive, not {self.init_std}.", parameter="init_std")

    def selects(self, module: nn.Module, fqn: str) -> str | None:
        """None if the target is selected, else the reason it is not."""
        def matches(pattern: str) -> bool:
            return fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(type(module).__name__, pattern)

        if self.include and not any(matches(p) for p in self.include):
            return f"not matched by --include {' '.join(self.include)}"
        hit = next((p for p in self.exclude if matches(p)), None)
        return f"excluded by --exclude {hit}" if hit else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DendriteConfig:
        known = {f.name for f in fields(cls)}
        if "channels" in data and "channel_fraction" not in data:  # its name in 0.1.0 dev builds
            data = {**data, "channel_fraction": data["channels"]}
        return cls(**{k: v for k, v in data.items() if k in known})
