"""A converted model's structure, changed in place: dendrite counts, growth by one, snapshots, checkpoints.

Loops that are not ours (Trainer, Lightning) cannot swap the model object (the loop, the optimizer and
the accelerator all hold references to it), so everything here works *in place*:

- `snapshot(model)` / `restore(model, snap)`: the best state (weights and dendrite counts), kept in
  CPU memory; restoring truncates or adds dendrites until the structure matches, then loads strictly;
- `add_dendrites(model)`: one fresh dendrite (zero scale, so the function is unchanged) per target;
- `dendrite_counts` / `set_dendrite_counts` / `restore_structure`: the structure a checkpoint needs
  before its weights can be loaded (from `dendrite_structure.json`, or inferred from the weight names).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LoadError
from .header import read_header
from .layers import dendrite_layers

STRUCTURE_FILE = "dendrite_structure.json"
STRUCTURE_VERSION = 1
_SCALE_KEY = re.compile(r"^(?P<layer>.+)\.dendrite_scales\.(?P<index>\d+)$")


def dendrite_counts(model: nn.Module) -> dict[str, int]:
    """Dendrites per target, by the target's module name."""
    return {name: layer.num_dendrites for name, layer in dendrite_layers(model).items()}


def set_dendrite_counts(model: nn.Module, counts: Mapping[str, int] | int) -> None:
    """Give every target exactly `counts[name]` dendrites (an int: the same for all).

    Extra dendrites are removed from the end; missing ones are added fresh (load weights afterwards).
    """
    layers = dendrite_layers(model)
    if isinstance(counts, Mapping):
        unknown = sorted(set(counts) - set(layers))
        if unknown:
            raise LoadError(f"the saved dendrite structure names targets this model does not have: "
                            f"{', '.join(unknown[:5])}; convert the model the same way as the saved one.")
    for name, layer in layers.items():
        want = counts if isinstance(counts, int) else counts.get(name, layer.num_dendrites)
        layer.truncate(want)
        while layer.num_dendrites < want:
            layer.add_dendrite()


def add_dendrites(model: nn.Module, channels: Mapping[str, torch.Tensor] | None = None) -> int:
    """Add one fresh dendrite to every target (serving `channels[name]` where channel-selective);
    returns the number of targets grown."""
    layers = dendrite_layers(model)
    for name, layer in layers.items():
        layer.add_dendrite(channels=(channels or {}).get(name))
    return len(layers)


def selective(model: nn.Module) -> bool:
    """Whether any target has channel-selective dendrites (their channels must be ranked before growing)."""
    return any(layer.dendrite_channels is not None for layer in dendrite_layers(model).values())


def max_dendrites(model: nn.Module) -> int:
    return max(dendrite_counts(model).values(), default=0)


@dataclass
class Snapshot:
    """A model state that can be put back in place: dendrite counts and a CPU copy of the weights."""

    counts: dict[str, int]
    state: dict[str, torch.Tensor]


def snapshot(model: nn.Module) -> Snapshot:
    """Copy the model's state to CPU memory; tied tensors stay tied (copied once)."""
    copies: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is None or key not in copies:
            copy = t.detach().to("cpu", copy=True)
            if key is not None:
                copies[key] = copy
        state[name] = copies[key] if key is not None else copy
    return Snapshot(dendrite_counts(model), state)


def restore(model: nn.Module, snap: Snapshot) -> None:
    """Put a snapshot back into `model` in place (structure first, then a strict load)."""
    set_dendrite_counts(model, snap.counts)
    model.load_state_dict(snap.state, strict=True)


# ---- the structure a checkpoint needs --------------------------------------------------------------

def save_structure(model: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `dendrite_structure.json` (dendrites per target) into a checkpoint folder."""
    path = Path(directory) / STRUCTURE_FILE
    data = {"version": STRUCTURE_VERSION, "dendrites": dendrite_counts(model), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def counts_from_keys(keys: Iterable[str], model: nn.Module) -> dict[str, int]:
    """Dendrites per target implied by state-dict keys (`<target>.dendrite_scales.<i>`)."""
    found: dict[str, int] = {}
    for key in keys:
        m = _SCALE_KEY.match(key)
        if m:
            found[m["layer"]] = max(found.get(m["layer"], 0), int(m["index"]) + 1)
    # Targets without any scale key have no dendrites; keys of shared targets under other names are ignored.
    return {name: found.get(name, 0) for name in dendrite_layers(model)}


def restore_structure(model: nn.Module, checkpoint: str | Path | Mapping) -> dict[str, int]:
    """Give `model` the dendrite structure of a checkpoint, so that its weights load into it.

    `checkpoint` is a Hugging Face Trainer checkpoint folder (`checkpoint-N/`, holding the
    `dendrite_structure.json` that `DendriteCallback` writes, or else `model.safetensors` whose weight
    names imply the structure), a Lightning `.ckpt` file, or a state dict. Call it on the freshly
    converted model before `trainer.train(resume_from_checkpoint=...)` or `load_state_dict`.
    Returns the dendrite counts it applied.
    """
    if isinstance(checkpoint, Mapping):
        state = checkpoint.get("state_dict", checkpoint)
        counts = counts_from_keys(state.keys(), model)
    else:
        path = Path(checkpoint)
        if path.is_dir() and (path / STRUCTURE_FILE).is_file():
            try:
                counts = json.loads((path / STRUCTURE_FILE).read_text())["dendrites"]
            except (OSError, ValueError, KeyError) as exc:
                raise LoadError(f"{path / STRUCTURE_FILE} is unreadable ({type(exc).__name__}: {exc}).") from exc
        elif path.is_dir() and (path / "model.safetensors").is_file():
            counts = counts_from_keys(read_header(path / "model.safetensors"), model)
        elif path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - an UnpicklingError for unsafe globals, or a damaged file
                raise LoadError(f"{path} cannot be read with weights_only=True ({type(exc).__name__}); if you trust it, "
                                "load it yourself and pass the dict: restore_structure(model, torch.load(path, "
                                "weights_only=False)).") from exc
            if not isinstance(blob, Mapping):
                raise LoadError(f"{path} holds a {type(blob).__name__}, not a checkpoint or state dict.")
            return restore_structure(model, blob)
        else:
            raise LoadError(f"{path}: not a checkpoint folder or file (expected {STRUCTURE_FILE} or model.safetensors).")
    set_dendrite_counts(model, counts)
    return counts
