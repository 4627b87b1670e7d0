"""Where a run trains: the device `--device` names, batches moved onto it, and the peak memory it used.

`auto` takes CUDA, then Apple's MPS, then the CPU. A device that is named but absent is a usage error
(exit 2) rather than a silent fall back to the CPU: a user who asked for a GPU must know they did not get one.
"""

from __future__ import annotations

import re
import sys

import torch

from ..core.errors import UsageError
from ..core.words import plural

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """A usage error unless `name` is one of the device spellings accepted (availability is checked later)."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise UsageError(f"device must be {DEVICE_CHOICES}, not {name!r}.", parameter="device")


def resolve_device(name: str) -> torch.device:
    """The torch device for `name`; auto: CUDA, then MPS, then CPU. Absent hardware is a usage error."""
    check_device_name(name)
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
            torch.device("mps") if has_mps else torch.device("cpu"))
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'no GPU visible' if torch.version.cuda else 'built without CUDA'}); "
                             "use the cpu or auto device.", parameter="device")
        index = int(name.partition(":")[2] or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise UsageError(f"device {name}: there are only {plural(torch.cuda.device_count(), 'CUDA device')}, "
                             f"numbered from 0; pick one of them.", parameter="device")
        return torch.device("cuda", index)
    if name == "mps" and not has_mps:
        raise UsageError("device mps: Apple's MPS backend is not available here; use the cpu or auto device.",
                         parameter="device")
    return torch.device(name)


def describe(device: torch.device) -> str:
    """The device as a person reads it: `cuda:0 (NVIDIA H200)`, `cpu (8 threads)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' * (threads != 1)})"
    return str(device)


def to_device(batch, device: torch.device):
    """`batch` with every tensor on `device` (dicts, lists and tuples kept, named tuples left as they are).

    non_blocking: from pinned memory (a DataLoader with pin_memory=True) the copy overlaps the work already
    queued on the GPU; from ordinary memory it is a plain copy."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (CUDA); the process's peak RSS cannot be reset, so on the CPU it covers the whole process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory in MB: tensors allocated on a CUDA device since the last reset, else the process's peak RSS
    (None where the platform does not report it)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if device.type == "mps" and hasattr(torch, "mps"):
        return round(torch.mps.driver_allocated_memory() / 2**20, 1)
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
