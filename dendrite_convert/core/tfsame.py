"""TensorFlow's 'SAME' padding as plain convs: what a conv that pads by its input size (timm's Conv2dSame, the
layers of TF-ported EfficientNets and MobileNets) folds into.

'SAME' pads each spatial axis of size n by max((ceil(n/s) - 1)·s + (k - 1)·d + 1 - n, 0) zeros, the odd one at the
end (ONNX's SAME_UPPER). For stride 1 that is torch's padding='same'; for a larger stride it depends on n mod s,
so these convs compute it from the input in forward (constants once the input size is fixed, as in an export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tf_same_pads(sizes, kernel_size, stride, dilation) -> list:
    """The `F.pad` argument (last axis first) that pads spatial `sizes` as TensorFlow's 'SAME' does."""
    pads: list = []
    for n, k, s, d in reversed(list(zip(sizes, kernel_size, stride, dilation))):
        total = torch.sym_max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class TFSameConv:
    """A ConvNd without padding of its own that pads its input as TensorFlow's 'SAME' does."""

    tf_same = True  # layer_spec records padding "tf_same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = tf_same_pads(x.shape[-len(self.kernel_size):], self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


class TFSameConv1d(TFSameConv, nn.Conv1d):
    pass


class TFSameConv2d(TFSameConv, nn.Conv2d):
    pass


class TFSameConv3d(TFSameConv, nn.Conv3d):
    pass
