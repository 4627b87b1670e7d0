"""Closed-form dendrites (issue 18): a new dendrite whose weights are the best first-order fix of its
target's error, after TINY (Verbockhaven et al., TMLR 2024) and GradMax (Evci et al., ICLR 2022).

With the network frozen, training batches run forward and backward (correlation.each_error_signal) and,
per target, streaming sufficient statistics of its input x and error signal e = dloss/dy are summed in
float64: n, sum x, sum e, x x^T, x e^T. A conv's x is the patch its own kernel sees, one row per output
position (F.unfold), so a conv target is a Linear over patches. e is scaled by the batch size, so it is
the gradient of one sample's loss whatever the batches.

A new dendrite adds dy = s * a(z) to the output. Linearised around its operating point z0,
a(z) ~ a(z0) + a'(z0) (z - z0), and to first order the loss moves by sum_n e_n . dy_n. The map from
centred x that best predicts -e (ridge least squares, C = centred covariances, S = C_xx + lambda I) is

    M = -C_ex S^-1 = -(S^-1/2 G)^T   with   G = S^-1/2 C_xe

and a rank-R dendrite takes the reduced-rank solution -(S^-1/2 [G]_R)^T, [G]_R being G's top R singular
directions (the top-R SVD of M itself when x is white): the best rank-R fit, in the metric of the data.
Moving along dy = eta M (x - mean x) lowers the loss by eta ||G||^2 to first order, so ||G||^2 (or
||[G]_R||^2) is the gain a target can achieve, and gain / added parameters says where to grow.

The dendrite's pre-activation is M's rows rescaled to spread `spread` over the training inputs and centred
on z0 = 0 by its bias; its constant part s * a(z0) moves into the target's own bias, and eta comes from a
line search on the training loss (eta = 0 is a candidate), so insertion lowers the loss at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import batch_size
from .correlation import each_error_signal, frozen
from ..core.channels import flat
from ..core.cheap import is_hf_conv1d
from ..core.layers import ACTIVATIONS, DendriteLayer, dendrite_layers


@dataclass(frozen=True)
class ClosedFormConfig:
    max_samples: int = 4096  # training samples whose statistics are summed (and on which the loss is searched)
    ridge: float = 1e-3  # lambda, relative to the mean eigenvalue of C_xx
    spread: float = 1.0  # std of a new dendrite's pre-activation over the training inputs
    top_k: int | None = None  # where to grow: only the k targets with the best gain per parameter
    min_relative_score: float = 0.0  # ... and only those scoring at least this fraction of the best


@dataclass
class TargetStatistics:
    """Running sums of one target's rows (x, e); `samples` counts batch samples, `rows` x rows (positions)."""

    sum_x: torch.Tensor
    sum_e: torch.Tensor
    xx: torch.Tensor
    xe: torch.Tensor
    rows: int = 0
    samples: int = 0

    @classmethod
    def empty(cls, d: int, c: int) -> TargetStatistics:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(z(d), z(c), z(d, d), z(d, c))

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        x, e = x.double().cpu(), e.double().cpu()
        self.sum_x += x.sum(0)
        self.sum_e += e.sum(0)
        self.xx += x.T @ x
        self.xe += x.T @ e
        self.rows += x.shape[0]

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / self.rows

    def cov_xx(self) -> torch.Tensor:
        mean = self.mean_x
        return self.xx / self.rows - torch.outer(mean, mean)

    def cov_xe(self) -> torch.Tensor:
        return self.xe / self.rows - torch.outer(self.mean_x, self.sum_e / self.rows)


@dataclass
class DendriteFit:
    """The fitted map M = P @ Q ([C', d]) from centred x to -e, on `channels` (None: all)."""

    P: torch.Tensor  # [C', R] (R = d for a full fit, Q = I)
    Q: torch.Tensor  # [R, d]
    gain: float  # first-order loss decrease per sample at step 1: ||G||^2 (per row) * rows / samples
    channel_gain: torch.Tensor  # [C] the same per output channel, for the full fit
    channels: torch.Tensor | None

    @property
    def weight(self) -> torch.Tensor:
        return self.P @ self.Q


@dataclass
class TargetReport:
    grown: bool
    reason: str  # why not grown, or "" when grown
    gain: float = 0.0
    params: int = 0  # parameters the dendrite adds (weights, scale, cascade)
    score: float = 0.0  # gain per added parameter
    step: float = 0.0  # the line search's eta
    loss_before: float = float("nan")
    loss_after: float = float("nan")


def supported(layer: DendriteLayer) -> str | None:
    """None when a closed-form dendrite can be fitted for this target, else why not."""
    base = layer.base_layer
    if not isinstance(base._parameters.get("weight"), nn.Parameter):
        return "its weight is computed (weight or spectral norm)"
    if isinstance(base, nn.Linear) or is_hf_conv1d(base):
        return None
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and type(base) in (nn.Conv1d, nn.Conv2d) and base.groups == 1:
        return None
    return f"{type(base).__name__} targets are not supported yet (Linear, Conv1D, Conv1d and Conv2d are)"


def input_rows(layer: DendriteLayer, x: torch.Tensor) -> torch.Tensor:
    """x as the target's weight sees it: [n, d] rows (a conv: one patch per output position, unfold order)."""
    base = layer.base_layer
    if not isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return x.reshape(-1, x.shape[-1])
    dims = base.weight.ndim - 2
    if x.ndim == dims + 1:  # unbatched
        x = x.unsqueeze(0)
    mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
    x = F.pad(x, base._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = base.kernel_size, base.dilation, base.stride
    if dims == 1:
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, Cin * prod(kernel), positions]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def record_statistics(model: nn.Module, batches: Iterable, forward_loss: Callable[[object], torch.Tensor],
                      targets: dict[str, DendriteLayer], max_samples: int = 4096) -> dict[str, TargetStatistics]:
    """Per target that reaches the loss, the sums of (x rows, per-sample e) over up to `max_samples` samples."""
    stats: dict[str, TargetStatistics] = {}
    current = {"n": 1, "batch": 0}
    counted: dict[str, int] = {}

    def counting(batch):
        current["n"] = batch_size(batch)
        current["batch"] += 1
        return forward_loss(batch)

    def visit(name: str, x: torch.Tensor, e: torch.Tensor) -> None:
        layer = targets[name]
        rows, errors = input_rows(layer, x), flat(e, layer) * current["n"]
        if name not in stats:
            stats[name] = TargetStatistics.empty(rows.shape[1], errors.shape[1])
        stats[name].add(rows, errors)
        if counted.get(name) != current["batch"]:  # a shared target is called more than once per batch
            counted[name] = current["batch"]
            stats[name].samples += current["n"]

    with frozen(model):
        each_error_signal(model, targets, batches, counting, max_samples, visit)
    return stats


def _sym_power(s: torch.Tensor, power: float) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(torch.finfo(w.dtype).tiny) ** power) @ v.T


def fit_dendrite(stats: TargetStatistics, rank: int | None = None, ridge: float = 1e-3,
                 width: int | None = None) -> DendriteFit:
    """The ridge least-squares map from centred x to -e, reduced to `rank` and to the `width` channels
    with the largest gain (both None: full)."""
    cov = stats.cov_xx()
    d = cov.shape[0]
    lam = ridge * max(float(cov.diagonal().mean()), 1e-12)
    s = cov + lam * torch.eye(d, dtype=cov.dtype)
    inv_sqrt = _sym_power(s, -0.5)
    g = inv_sqrt @ stats.cov_xe()  # [d, C]
    per_row_to_sample = stats.rows / max(stats.samples, 1)
    channel_gain = g.square().sum(0) * per_row_to_sample
    channels = None
    if width is not None and width < g.shape[1]:
        channels = channel_gain.topk(width).indices.sort().values
        g = g[:, channels]
    if rank is None or rank >= min(g.shape):
        return DendriteFit(-(inv_sqrt @ g).T, torch.eye(d, dtype=g.dtype), float(g.square().sum()) * per_row_to_sample,
                           channel_gain, channels)
    u, sigma, vh = torch.linalg.svd(g, full_matrices=False)
    u, sigma, vh = u[:, :rank], sigma[:rank], vh[:rank]
    return DendriteFit(-(vh.T * sigma), u.T @ inv_sqrt, float(sigma.square().sum()) * per_row_to_sample,
                       channel_gain, channels)


def _dendrite_rank(dendrite: nn.Module) -> int | None:
    core = dendrite[0] if isinstance(dendrite, nn.Sequential) and isinstance(dendrite[-1], nn.modules.batchnorm._BatchNorm) else dendrite
    if isinstance(core, nn.Sequential):  # cheap.low_rank_dendrite: (in -> R, R -> out)
        first = core[0]
        return first.out_features if isinstance(first, nn.Linear) else first.out_channels
    return None


def _set_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        w = weight.T if is_hf_conv1d(module) else weight
        module.weight.copy_(w.reshape(module.weight.shape))
        if module.bias is not None:
            module.bias.copy_(bias if bias is not None else torch.zeros_like(module.bias))


def build_dendrite(layer: DendriteLayer, fit: DendriteFit, stats: TargetStatistics, spread: float,
                   dendrite: nn.Module | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """`dendrite` (default: the layer's next one) set to realise `fit`, and per served channel (unit, a(z0)):
    its scale s = eta * unit gives dy ~ eta * M (x - mean) + s * a(z0), linearised at its operating point z0."""
    dendrite = layer.new_dendrite() if dendrite is None else dendrite
    has_norm = layer.norm is not None
    core = dendrite[0] if has_norm else dendrite
    cov, mean = stats.cov_xx(), stats.mean_x
    std = torch.einsum("cd,de,ce->c", fit.weight, cov, fit.weight).clamp_min(0).sqrt()
    live = std > 1e-12 * max(float(std.max()), 1e-300)
    norm_rows = torch.where(live, 1.0 / std.clamp_min(1e-300), torch.zeros_like(std))  # rows of unit spread
    P = fit.P * norm_rows[:, None] * (1.0 if has_norm else spread)
    out_bias = -(P @ (fit.Q @ mean))  # centres z on 0 where the dendrite has a bias
    dtype = layer.base_layer.weight.dtype
    if isinstance(core, nn.Sequential):
        _set_weight(core[0], fit.Q.to(dtype), None)
        _set_weight(core[1], P.to(dtype), out_bias.to(dtype))
        has_bias = core[1].bias is not None
    else:
        _set_weight(core, (P @ fit.Q).to(dtype), out_bias.to(dtype))
        has_bias = core.bias is not None
    raw_mean = torch.zeros_like(std) if has_bias else P @ (fit.Q @ mean)  # the core's mean output
    if has_norm:  # its norm, in eval and train mode alike, maps the core's output to spread * rows (x - mean)
        bn = dendrite[-1]
        with torch.no_grad():
            bn.running_mean.copy_(raw_mean.to(dtype))
            bn.running_var.fill_(1.0 - bn.eps)
            if bn.affine:
                bn.weight.fill_(spread)
                bn.bias.zero_()
            else:  # no affine: the norm's output keeps unit spread
                spread = 1.0
        raw_mean = torch.zeros_like(std)
    z0 = raw_mean.clone().requires_grad_(True)
    with torch.enable_grad():
        value = ACTIVATIONS[layer.activation](z0)
        (slope,) = torch.autograd.grad(value.sum(), z0)
    usable = live & (slope.abs() > 1e-12)
    unit = torch.where(usable, std / (spread * slope.clamp_min(1e-12)), torch.zeros_like(std))
    return dendrite, unit, value.detach()


def _offset_bias(layer: DendriteLayer) -> torch.Tensor | None:
    """Where a constant per channel can be added to the target's output: its norm's or its own bias."""
    if layer.norm is not None:
        return layer.norm.bias if getattr(layer.norm, "affine", False) else None
    return layer.base_layer.bias


@torch.no_grad()
def mean_loss(batches: list, forward_loss: Callable[[object], torch.Tensor]) -> float:
    """The loss per sample over `batches` (each batch's loss weighted by its size)."""
    total, count = 0.0, 0
    for batch in batches:
        n = batch_size(batch)
        total += float(forward_loss(batch)) * n
        count += n
    return total / max(count, 1)


def line_search(loss_at: Callable[[float], float], loss0: float, gain: float) -> tuple[float, float]:
    """The best step eta among a few candidates and its loss; 0 when none lowers the loss.

    The first-order decrease is eta * gain; one trial at eta = 1 gives the curvature, whose minimiser and
    its neighbours (x 1/2, x 2) are tried next; if nothing helps, ever smaller steps are tried."""
    tried = {0.0: loss0}
    tried[1.0] = loss_at(1.0)
    curvature = 2.0 * (tried[1.0] - loss0 + gain)
    guess = min(max(gain / curvature, 1e-3), 1e3) if curvature > 0 else 4.0
    for eta in (guess, guess / 2, guess * 2):
        if eta not in tried:
            tried[eta] = loss_at(eta)
    eta = min(e for e in tried if e > 0)
    for _ in range(8):
        if min(tried, key=tried.get) != 0.0:
            break
        eta /= 4
        tried[eta] = loss_at(eta)
    best = min(tried, key=tried.get)
    return best, tried[best]


def insert_closed_form(layer: DendriteLayer, fit: DendriteFit, stats: TargetStatistics, dendrite: nn.Module,
                       batches: list, forward_loss: Callable[[object], torch.Tensor], spread: float = 1.0
                       ) -> tuple[float, float, float]:
    """Add `dendrite` set to `fit` with the line-searched scale; (eta, loss before, loss after) on `batches`.
    When no step lowers the loss the dendrite is removed again and eta is 0."""
    dendrite, unit, offset = build_dendrite(layer, fit, stats, spread, dendrite)
    k = layer.num_dendrites
    bias = _offset_bias(layer)
    bias0 = None if bias is None else bias.detach().clone()
    served = fit.channels if fit.channels is not None else slice(None)
    weight = layer.base_layer.weight
    unit, offset = unit.to(weight), offset.to(weight)
    layer.add_dendrite(dendrite=dendrite, channels=fit.channels)

    def set_step(eta: float) -> None:
        with torch.no_grad():
            layer.dendrite_scales[k].copy_(eta * unit)
            if bias is not None:
                shifted = bias0.clone()
                shifted[served] -= eta * unit * offset
                bias.copy_(shifted)

    def loss_at(eta: float) -> float:
        set_step(eta)
        return mean_loss(batches, forward_loss)

    loss0 = mean_loss(batches, forward_loss)
    eta, loss = line_search(loss_at, loss0, fit.gain)
    set_step(eta)
    if eta == 0.0:
        layer.truncate(k)
    return eta, loss0, loss


def add_closed_form_dendrites(model: nn.Module, batches: Iterable, forward_loss: Callable[[object], torch.Tensor],
                              config: ClosedFormConfig | None = None,
                              targets: dict[str, DendriteLayer] | None = None) -> dict[str, TargetReport]:
    """One closed-form growth step: record statistics, fit every target, grow those with the best gain per
    parameter (`config.top_k`, `config.min_relative_score`), best first, each with its own line search on
    the training batches seen while recording. Returns a report per target."""
    config = config or ClosedFormConfig()
    targets = dendrite_layers(model) if targets is None else targets
    kept: list = []

    def keeping():
        for batch in batches:
            kept.append(batch)
            yield batch

    reports: dict[str, TargetReport] = {}
    plans = []
    with torch.inference_mode(False), frozen(model):
        stats = record_statistics(model, keeping(), forward_loss, targets, config.max_samples)
        for name, layer in targets.items():
            why = supported(layer) or (None if name in stats else "no error signal reaches it")
            if why:
                reports[name] = TargetReport(False, why)
                continue
            dendrite = layer.new_dendrite()
            width = layer.width if layer.dendrite_channels is not None else None
            fit = fit_dendrite(stats[name], _dendrite_rank(dendrite), config.ridge, width)
            params = sum(t.numel() for t in [*dendrite.parameters(), *dendrite.buffers()] if t.is_floating_point())
            params += layer.width * (1 + layer.num_dendrites)  # its scale and cascade
            reports[name] = TargetReport(False, "", fit.gain, params, fit.gain / params)
            plans.append((name, layer, fit, dendrite))
        plans.sort(key=lambda plan: -reports[plan[0]].score)
        best = reports[plans[0][0]].score if plans else 0.0
        for rank_, (name, layer, fit, dendrite) in enumerate(plans):
            report = reports[name]
            if (config.top_k is not None and rank_ >= config.top_k) or report.score < config.min_relative_score * best:
                report.reason = "other targets gain more per parameter"
                continue
            if report.gain <= 0.0:
                report.reason = "its input does not predict its error"
                continue
            report.step, report.loss_before, report.loss_after = insert_closed_form(
                layer, fit, stats[name], dendrite, kept, forward_loss, config.spread)
            report.grown = report.step > 0
            report.reason = "" if report.grown else "no step lowered the training loss"
    return reports
