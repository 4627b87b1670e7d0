"""What a conversion did, as data (`--json`) and as a table for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .tracing import Fallback
from ..core.words import plural


@dataclass
class TargetRecord:
    """One dendrite layer: where it lives, what it wraps and how conversion reached it."""

    name: str
    type: str
    weight_shape: list[int]
    out_channels: int
    reached: str  # "fx graph", "fx functional", "module swap"
    via: str = ""  # the paired norm, the functional call, or the untraceable module
    shared: list[str] = field(default_factory=list)  # other names/call sites of the same layer
    dendrites: int = 0
    params_before: int = 0
    params_after: int = 0


@dataclass
class SkippedRecord:
    name: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    targets: list[TargetRecord] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConversionReport:
        return cls(
            targets=[TargetRecord(**t) for t in data.get("targets", [])],
            skipped=[SkippedRecord(**s) for s in data.get("skipped", [])],
            fallbacks=[Fallback(**f) for f in data.get("fallbacks", [])],
            notes=list(data.get("notes", [])),
            params_before=data.get("params_before", 0),
            params_after=data.get("params_after", 0),
        )

    def render(self, console) -> None:
        """Print the report as rich tables on `console` (stderr in the CLI)."""
        console.print(_table(
            f"{plural(len(self.targets), 'dendrite target')}",
            ("target", "type", "shape", "dendrites", "params before → after", "reached", "shared"),
            [(t.name, t.type, "×".join(map(str, t.weight_shape)), str(t.dendrites),
              f"{t.params_before:,} → {t.params_after:,}", t.reached + (f" ({t.via})" if t.via else ""),
              ", ".join(t.shared) or "-") for t in self.targets],
        ))
        if self.fallbacks:
            console.print(_table(
                "tracing fallbacks (targets inside were converted by module swapping)",
                ("module", "reason", "source line"),
                [(f.module or "<model>", f.reason, f.source) for f in self.fallbacks],
            ))
        if self.skipped:
            console.print(_table("skipped layers", ("layer", "type", "reason"),
                                 [(s.name, s.type, s.reason) for s in self.skipped]))
        for note in self.notes:
            console.print(f"note: {note}")
        console.print(f"parameters: {self.params_before:,} → {self.params_after:,}")


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table
