"""Closed-form growth (issue 18): turn a fit of closed_form_fit.py into a dendrite, find its step on the training
loss, and grow the targets where that pays most per parameter.

A fitted row c becomes the dendrite's pre-activation z_c = z0 + spread * r_c . (x - mean x), r_c of unit
spread over the training inputs, centred by the dendrite's bias (or its norm). Then, per channel,

- first order (z0 = 0, the fit predicts -e): s_c a(z) ~ s_c a(0) + s_c a'(0) (z - z0); the constant moves
  into the target's bias and s_c = eta * unit_c makes the rest eta * M_c (x - mean);
- second order (z0 where a'' is largest, the fit gives each channel's direction of largest curvature):
  the constant and the linear part s_c a'(z0) (z - z0) are taken out of the target's own weight and bias,
  leaving s_c a''(z0) (z - z0)^2 / 2, s_c proportional to minus the channel's curvature.

The step eta is line-searched on the last quarter of the recorded training batches, which the fits never
saw: a fit that only matches the other batches' noise finds no loss decrease there. eta = 0 is always a
candidate, so the loss on those batches never goes up; a dendrite no step helps is removed again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.families import DendriteHFConv1D
from ...core.layers import ACTIVATIONS, DendriteLayer, dendrite_layers
from ..adapter import batch_size
from ..error_signal import frozen
from .closed_form_fit import (DendriteFit, TargetStatistics, fit_curvature, fit_dendrite, joined, record_statistics,
                              supported, target_groups)

MAX_CURVATURE_ENTRIES = 20_000_000  # C * d * d floats a second-order fit may sum per target
# the sums one pass over the batches holds: a model whose targets need more is recorded in several passes
# (a 7B-parameter LLM's Linear layers need over 100 GB of them)
MAX_STATISTICS_BYTES = 2 * 2 ** 30


@dataclass(frozen=True)
class ClosedFormConfig:
    order: int = 2  # 1: fit -e linearly (a natural-gradient step's worth); 2: fit the curvature (works at a plateau)
    max_samples: int = 4096  # training samples whose statistics are summed (and on which the loss is searched)
    ridge: float = 1e-3  # lambda, relative to the mean eigenvalue of C_xx
    spread: float = 0.5  # std of a new dendrite's pre-activation around its operating point
    top_k: int | None = None  # where to grow: only the k targets with the best gain per parameter
    min_relative_score: float = 0.0  # ... and only those scoring at least this fraction of the best
    held_out: float = 0.25  # fraction of the recorded batches kept out of the fits, for the line search alone


@dataclass
class TargetReport:
    grown: bool
    reason: str  # why not grown, or "" when grown
    order: int = 0
    gain: float = 0.0  # first-order loss decrease per sample at step 1
    params: int = 0  # parameters the dendrite adds (weights, scale, cascade)
    score: float = 0.0  # gain per added parameter
    step: float = 0.0  # the line search's eta
    loss_before: float = float("nan")
    loss_after: float = float("nan")


def _derivatives(activation: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a(z), a'(z), a''(z) elementwise."""
    z = z.detach().double().clone().requires_grad_(True)
    with torch.enable_grad():
        value = ACTIVATIONS[activation](z)
        (first,) = torch.autograd.grad(value.sum(), z, create_graph=True)
        second = torch.autograd.grad(first.sum(), z, allow_unused=True)[0] if first.requires_grad else None
    return value.detach(), first.detach(), torch.zeros_like(z) if second is None else second.detach()


def most_curved_point(activation: str) -> float:
    """The operating point where a'' is largest (sigmoid: -1.317; tanh: -0.658); 0 when a is linear."""
    grid = torch.linspace(-4, 4, 8001, dtype=torch.float64)
    _, _, second = _derivatives(activation, grid)
    return float(grid[second.argmax()]) if float(second.max()) > 1e-9 else 0.0


def _dendrite_rank(dendrite: nn.Module) -> int | None:
    core = dendrite[0] if _has_norm(dendrite) else dendrite
    if isinstance(core, nn.Sequential):  # DendriteLayer.low_rank_dendrite: (in -> R, R -> out)
        first = core[0]
        return first.out_features if isinstance(first, nn.Linear) else first.out_channels
    return None


def _has_norm(dendrite: nn.Module) -> bool:
    return isinstance(dendrite, nn.Sequential) and isinstance(dendrite[-1], nn.modules.batchnorm._BatchNorm)


def _set_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        w = weight.T if DendriteHFConv1D.matches(module) else weight
        module.weight.copy_(w.reshape(module.weight.shape))
        if module.bias is not None:
            module.bias.copy_(bias if bias is not None else torch.zeros_like(module.bias))


def build_dendrite(layer: DendriteLayer, fit: DendriteFit, spread: float, z0: float,
                   dendrite: nn.Module | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dendrite` (default: the layer's next one) with pre-activation z_c = z0_c + r_c . (x - mean), r_c of
    spread `spread` in the fit's metric C_xx + lambda I.

    Returns (dendrite, std_c of fit row c over the inputs, z0_c, k_c: r_c = k_c M_c). z0_c = z0 where the
    dendrite can centre itself (a bias or a norm), else where the uncentred inputs put it."""
    dendrite = layer.new_dendrite() if dendrite is None else dendrite
    norm = dendrite[-1] if _has_norm(dendrite) else None
    core = dendrite[0] if norm is not None else dendrite
    std = fit.row_var.clamp_min(0).sqrt()
    live = std > 1e-12 * max(float(std.max()), 1e-300)
    # unit spread in the fit's own metric S = C_xx + lambda I: weights stay bounded by the inputs' size
    bounded = (std.square() + fit.row_ridge).sqrt()
    unit_rows = torch.where(live, 1.0 / bounded.clamp_min(1e-300), torch.zeros_like(std))
    gain = spread if norm is None or not norm.affine else 1.0  # a norm's affine weight applies the spread
    P = fit.P * (unit_rows * gain)[:, None]
    raw_mean = unit_rows * gain * fit.row_mean
    bias = z0 * (1.0 if norm is None else 0.0) - raw_mean
    dtype = layer.base_layer.weight.dtype
    last = core[1] if isinstance(core, nn.Sequential) else core
    if isinstance(core, nn.Sequential):
        _set_weight(core[0], fit.Q.to(dtype), None)
        _set_weight(core[1], P.to(dtype), bias.to(dtype))
    else:
        _set_weight(core, (P if fit.Q is None else P @ fit.Q).to(dtype), bias.to(dtype))
    centred = last.bias is not None
    out_mean = torch.full_like(std, z0) if centred else raw_mean
    if norm is not None:  # in eval and train mode alike the norm maps the core's output to spread * rows + z0
        with torch.no_grad():
            norm.running_mean.copy_((0.0 * raw_mean if centred else raw_mean).to(dtype))
            norm.running_var.fill_(1.0 - norm.eps)
            if norm.affine:
                norm.weight.fill_(spread)
                norm.bias.fill_(z0)
        out_mean = torch.full_like(std, z0 if norm.affine else 0.0)
        spread = spread if norm.affine else 1.0
    return dendrite, std, out_mean, unit_rows * spread


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
    its neighbours (x 1/2, x 2) are tried next; if nothing helps, ever smaller steps are tried. Deliberately
    no further: `gain` comes from the fitted batches and the losses from held-out ones, so the guess can be
    short of the held-out minimum, but searching on for it (doubling while the longest step was best, then a
    parabola's vertex) cost 2.5 to 5 test points on reviews in the growth benchmark and moved the other tasks
    by at most 1.3, within their seeds' spread: the longer steps fit the few held-out batches, not the task."""
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


def insert_closed_form(layer: DendriteLayer, fit: DendriteFit, dendrite: nn.Module, batches: list,
                       forward_loss: Callable[[object], torch.Tensor],
                       spread: float = 0.5) -> tuple[float, float, float]:
    """Add `dendrite` set to `fit` (first order, or second when `fit.curvature` is set) with the
    line-searched step; (eta, loss before, loss after) on `batches`. When no step lowers the loss the
    dendrite is removed, the target restored, and eta is 0."""
    second = fit.curvature is not None
    z0 = most_curved_point(layer.activation) if second else 0.0
    dendrite, std, z0s, row_scale = build_dendrite(layer, fit, spread, z0, dendrite)
    directions = fit.weight * row_scale[:, None]  # r_c
    value, slope, bend = _derivatives(layer.activation, z0s)
    reach = row_scale.square() * fit.row_var  # spread^2 of r_c . x
    if second:  # s_c a''(z0) (r.x)^2 / 2 = -eta curvature_c t_c^2 / 2, t_c = unit-spread fit row . (x - mean)
        usable = (std > 0) & (bend.abs() > 1e-9) & (reach > 0)
        unit = -fit.curvature * std.square() / (bend.clamp_min(1e-9) * reach.clamp_min(1e-300))
    else:  # s_c a'(z0) r . (x - mean) = eta M_c (x - mean)
        usable = (std > 0) & (slope.abs() > 1e-12) & (reach > 0)
        unit = std / (reach.clamp_min(1e-300).sqrt() * slope.clamp_min(1e-12))
    unit = torch.where(usable, unit, torch.zeros_like(unit))
    base = layer.base_layer
    k = layer.num_dendrites
    bias = _offset_bias(layer)
    bias0 = None if bias is None else bias.detach().clone()
    compensate = second and layer.norm is None  # take the linear part out of the target's own weight
    weight0 = base.weight.detach().clone()
    served = fit.channels if fit.channels is not None else slice(None)
    direction_mean = row_scale * fit.row_mean  # r_c . mean x
    layer.add_dendrite(dendrite=dendrite, channels=fit.channels)

    def set_step(eta: float) -> None:
        s = eta * unit
        constant = s * value
        with torch.no_grad():
            layer.dendrite_scales[k].copy_(s.to(weight0))
            if compensate:
                linear = (s * slope)[:, None] * directions  # [C', d]: s_c a'(z0) r_c
                constant = constant - s * slope * direction_mean
                rows = weight0.T.clone() if DendriteHFConv1D.matches(base) else weight0.reshape(weight0.shape[0], -1).clone()
                rows[served] -= linear.to(rows)
                base.weight.copy_(rows.T if DendriteHFConv1D.matches(base) else rows.reshape(weight0.shape))
            if bias is not None:
                shifted = bias0.clone()
                shifted[served] -= constant.to(shifted)
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
    the recorded batches held out of the fits (`config.held_out`). Returns a report per target."""
    config = config or ClosedFormConfig()
    targets = dendrite_layers(model) if targets is None else targets
    fit_batches, search_batches = split_held_out(take_samples(batches, config.max_samples), config.held_out)
    reports: dict[str, TargetReport] = {}
    plans = []
    with torch.inference_mode(False), frozen(model):
        unsupported = {name: why for name, layer in targets.items() if (why := supported(layer))}
        fitted = {name: layer for name, layer in targets.items() if name not in unsupported}
        second = {name: config.order == 2 and most_curved_point(layer.activation) != 0.0
                  and layer.out_channels * _fan_in(layer) ** 2 <= MAX_CURVATURE_ENTRIES
                  for name, layer in fitted.items()}
        curved = {name for name, curve in second.items() if curve}
        fits: dict[str, tuple[DendriteFit, nn.Module]] = {}
        for chunk in _chunks(fitted, curved):  # one pass over the batches per chunk; its sums go once fitted
            stats = record_statistics(model, fit_batches, forward_loss, chunk, config.max_samples,
                                      curved & chunk.keys())
            for name, target_stats in stats.items():
                layer, dendrite = chunk[name], chunk[name].new_dendrite()
                width = layer.width if layer.dendrite_channels is not None else None
                fits[name] = _fit(target_stats, second[name], _dendrite_rank(dendrite), config.ridge, width), dendrite
            stats = target_stats = None  # freed before the next chunk's pass
        for name, layer in targets.items():
            why = unsupported.get(name) or (None if name in fits else "no error signal reaches it")
            if why:
                reports[name] = TargetReport(False, why)
                continue
            fit, dendrite = fits[name]
            params = sum(t.numel() for t in [*dendrite.parameters(), *dendrite.buffers()] if t.is_floating_point())
            params += layer.width * (1 + layer.num_dendrites)  # its scale and cascade
            reports[name] = TargetReport(False, "", 2 if second[name] else 1, fit.gain, params, fit.gain / params)
            plans.append((name, layer, fit, dendrite))
        plans.sort(key=lambda plan: -reports[plan[0]].score)
        best = reports[plans[0][0]].score if plans else 0.0
        for place, (name, layer, fit, dendrite) in enumerate(plans):
            report = reports[name]
            if (config.top_k is not None and place >= config.top_k) or report.score < config.min_relative_score * best:
                report.reason = "other targets gain more per parameter"
            elif report.gain <= 0.0:
                report.reason = "its input does not predict its error"
            else:
                report.step, report.loss_before, report.loss_after = insert_closed_form(
                    layer, fit, dendrite, search_batches, forward_loss, config.spread)
                report.grown = report.step > 0
                report.reason = "" if report.grown else "no step lowered the training loss"
    return reports


def _chunks(layers: dict[str, DendriteLayer], curved: set[str]) -> list[dict[str, DendriteLayer]]:
    """`layers` in order, split where their float64 sums would pass MAX_STATISTICS_BYTES (a layer alone may)."""
    chunks: list[dict[str, DendriteLayer]] = [{}]
    held = 0
    for name, layer in layers.items():
        groups = target_groups(layer)
        size = TargetStatistics.nbytes(_fan_in(layer), layer.out_channels // (groups or 1), name in curved, groups)
        if chunks[-1] and held + size > MAX_STATISTICS_BYTES:
            chunks.append({})
            held = 0
        chunks[-1][name] = layer
        held += size
    return chunks


def _fit(stats: TargetStatistics, second: bool, rank: int | None, ridge: float, width: int | None) -> DendriteFit:
    """The target's fit (first or `second` order); a grouped conv's groups are fitted one by one and joined."""
    fit = fit_curvature if second else fit_dendrite
    if stats.groups is None:
        return fit(stats, rank, ridge, width)
    return joined([fit(stats.group(g), None, ridge) for g in range(stats.groups)])


def take_samples(batches: Iterable, max_samples: int) -> list:
    """The first batches of `batches` holding `max_samples` samples (the last one may pass it)."""
    kept, seen = [], 0
    for batch in batches:
        if seen >= max_samples:
            break
        kept.append(batch)
        seen += batch_size(batch)
    return kept


def split_held_out(batches: list, fraction: float) -> tuple[list, list]:
    """(batches to fit on, batches to line-search on): the last `fraction` of them held out of the fits, so a
    step that only fits the fitted batches' noise finds no loss decrease; with fewer than two batches (or
    fraction 0) both are all of them."""
    held = min(round(len(batches) * fraction), len(batches) - 1) if fraction > 0 else 0
    if held < 1:
        return batches, batches
    return batches[:-held], batches[-held:]


def _fan_in(layer: DendriteLayer) -> int:
    weight = layer.base_layer.weight
    return weight.shape[0] if DendriteHFConv1D.matches(layer.base_layer) else weight[0].numel()
