"""Plain DDP under torchrun (docs/design.md §4): the few calls the trainer needs, and nothing when not distributed.

`torchrun --standalone --nproc_per_node=N --no-python dendrite-train ...` sets WORLD_SIZE/RANK; we
then use gloo on CPU and nccl on GPU, shard every loader with a DistributedSampler (same batch size,
`set_epoch` each epoch), average scores across ranks so every rank takes the same switch decision,
and let rank 0 alone write files and show progress. DDP is rebuilt whenever the set of trainable
parameters changes (a dendrite added, parameters frozen), because DDP buckets them at construction.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler


def requested() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """The rank torchrun gave this process (before the process group exists): 0 when not distributed."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init() -> torch.device | None:
    """Join the process group torchrun describes; returns this rank's device (None when not distributed)."""
    if not requested():
        return None
    if not active():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """`model` for training: a fresh DDP over its trainable parameters when distributed, else itself."""
    if not active():
        return model
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _Strided(torch.utils.data.Sampler):
    """Every world_size-th sample from this rank's offset: an exact partition for evaluation (no padding)."""

    def __init__(self, size: int):
        self.indices = range(rank(), size, world_size())

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard(loader, seed: int, training: bool):
    """This rank's part of a DataLoader: a DistributedSampler for training (shuffled as the original was,
    `set_epoch` each epoch), an exact strided split for evaluation so summed scores equal the full one."""
    if not active() or not isinstance(loader, DataLoader):
        return loader
    if training:
        shuffle = not isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed)
    else:
        sampler = _Strided(len(loader.dataset))
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last and training)


def set_epoch(loaders, epoch: int) -> None:
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def all_sum(*values: float) -> list[float]:
    """Element-wise sums over ranks (scores are summed with their sample counts, then divided)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (after a dendrite phase that ran on every rank)."""
    if not active():
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def check_replicas(model: nn.Module) -> None:
    """Every rank must end with the same model; a cheap checksum comparison says so or fails loudly."""
    if not active():
        return
    with torch.no_grad():
        local = sum(float(t.double().sum()) + float(t.double().square().sum()) for t in model.state_dict().values())
    low, high = _min_max(local)
    if low != high:
        raise RuntimeError(f"the replicas of the model differ across ranks (checksums {low!r} vs {high!r})")


def _min_max(value: float) -> tuple[float, float]:
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    low = torch.tensor([value], dtype=torch.float64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return float(low), float(high)


def shutdown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()
