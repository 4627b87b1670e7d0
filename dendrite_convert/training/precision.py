"""`--precision`: fp32, or mixed precision with torch.autocast (bf16, or fp16 with a gradient scaler).

Parameters and optimizer state stay fp32; autocast runs the forward (and so the backward) of the ops that
gain from it in bf16 or fp16 on the run's device. fp16's narrow range needs the loss scaled before backward
and the gradients unscaled before the step (torch.amp.GradScaler); the scaler's state is part of the
checkpoint, so a resumed run continues with the scale it had. bf16 has fp32's range and needs no scaler.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {name!r}.", parameter="precision")


class Precision:
    """The autocast context and the backward/step of one run's precision on its device."""

    def __init__(self, name: str, device: torch.device):
        check_precision(name)
        self.name = name
        self.dtype = PRECISIONS[name]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        """The forward's context: torch.autocast in bf16/fp16, nothing at all in fp32."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """loss.backward() and optimizer.step(), through the scaler in fp16 (a step whose gradients overflowed
        is skipped and the scale lowered)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """The scaler state a checkpoint recorded (ignored when either side has no scaler: a run resumed in
        another precision starts that precision afresh)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
