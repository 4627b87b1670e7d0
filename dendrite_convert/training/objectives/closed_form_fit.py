"""Closed-form dendrites, the fits (issue 18): the weights of a new dendrite that best fixes its target's
error, after TINY (Verbockhaven et al., TMLR 2024) and GradMax (Evci et al., ICLR 2022).

With the network frozen, training batches run forward and backward (error_signal.each_error_signal) and,
per target, streaming sufficient statistics of its input x and error signal e = dloss/dy are summed in
float64: n, sum x, sum e, x x^T, x e^T (and, for the second order, e_c x x^T). A conv's x is the patch
its own kernel sees, one row per output position (F.unfold), so a conv target is a Linear over patches.
e is scaled by the batch size: the gradient of one sample's loss, whatever the batches.

A new dendrite adds dy = s * a(z) to the output, and to first order the loss moves by sum_n e_n . dy_n.

First order (a linearised: a(z) ~ a(z0) + a'(z0)(z - z0)): the map from centred x that best predicts -e
(ridge least squares, C = centred covariances, S = C_xx + lambda I, lambda relative to x's mean square) is

    M = -C_ex S^-1 = -(K^T G)^T   with   G = K C_xe

for any whitening K (K S K^T = I: S^-1/2, or the inverse of S's Cholesky factor, which is cheaper), and a
rank-R dendrite takes the reduced-rank solution -(K^T [G]_R)^T, [G]_R being G's top R singular directions
(the top-R SVD of M itself when x is white): the best rank-R fit in the data's metric, whichever K.
Moving along dy = eta M (x - mean) lowers the loss by eta ||G||^2 to first order. This is what the
target's own weight could learn, so at a plateau (where W's gradient C_ex is zero) G vanishes.

Second order (z0 where a'' is largest, the linear part taken out of W): dy_c = s_c a''(z0)(w_c . x)^2 / 2,
and per channel the best unit-spread direction w_c is the eigenvector of largest |eigenvalue| of the
whitened K H_c K^T, H_c = mean e_c (x - mean)(x - mean)^T, its eigenvalue setting s_c; this gain stays
when the first-order one is gone.

Either gain divided by the dendrite's parameter count says where to grow (closed_form_growth.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.channels import flat
from ...core.families import DendriteHFConv1D
from ...core.layers import DendriteLayer
from ..adapter import batch_size
from ..error_signal import each_error_signal, frozen

# multiply-adds the [C, d, d] curvature sums may spend on one batch of a target: a conv's rows are its output
# positions, so at image sizes they would cost far more than the pass itself; past this, they read an even
# stride of the rows (the first-order sums always read all of them)
CURVATURE_WORK_PER_BATCH = 2_000_000_000


@dataclass
class TargetStatistics:
    """Running sums of one target's rows (x, e); `samples` counts batch samples, `rows` x rows (positions).

    A grouped conv's sums carry a leading group axis: group g's output channels see only the g-th slice of each
    patch, so each group is a target of its own (`group(g)`), and its sums run for all groups at once."""

    sum_x: torch.Tensor
    sum_e: torch.Tensor
    xx: torch.Tensor
    xe: torch.Tensor
    exx: torch.Tensor | None = None  # [C, d, d] sum of e_c x x^T, for the second-order fit
    rows: int = 0
    samples: int = 0

    @classmethod
    def empty(cls, d: int, c: int, curvature: bool = False, groups: int | None = None) -> TargetStatistics:
        """Zero sums for rows of d inputs and c outputs (with `groups`: of each group)."""
        lead = () if groups is None else (groups,)
        z = lambda *shape: torch.zeros(*lead, *shape, dtype=torch.float64)  # noqa: E731
        return cls(z(d), z(c), z(d, d), z(d, c), z(c, d, d) if curvature else None)

    @staticmethod
    def nbytes(d: int, c: int, curvature: bool = False, groups: int | None = None) -> int:
        """The bytes `empty(d, c, curvature, groups)` holds."""
        return 8 * (groups or 1) * (d + c + d * d + d * c + (c * d * d if curvature else 0))

    @property
    def groups(self) -> int | None:
        return self.sum_x.shape[0] if self.sum_x.ndim == 2 else None

    def group(self, g: int) -> TargetStatistics:
        """Group g's sums (views), as an ungrouped target's."""
        return TargetStatistics(self.sum_x[g], self.sum_e[g], self.xx[g], self.xe[g],
                                None if self.exx is None else self.exx[g], self.rows, self.samples)

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        """Add rows [n, d] and [n, c] (grouped: [n, groups * d], [n, groups * c]); the sums over them run
        where the rows are (a GPU's), only the [d, d]-sized results move."""
        x, e = x.double(), e.double()
        if self.groups is not None:  # [groups, n, d] and [groups, n, c]
            x, e = (t.reshape(t.shape[0], self.groups, -1).transpose(0, 1) for t in (x, e))
        self.sum_x += x.sum(-2).cpu()
        self.sum_e += e.sum(-2).cpu()
        self.xx += (x.mT @ x).cpu()
        self.xe += (x.mT @ e).cpu()
        if self.exx is not None:
            self.exx += _curvature_sum(x, e)
        self.rows += x.shape[-2]

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / self.rows

    def cov_xx(self) -> torch.Tensor:
        mean = self.mean_x
        return self.xx / self.rows - torch.outer(mean, mean)

    def cov_xe(self) -> torch.Tensor:
        return self.xe / self.rows - torch.outer(self.mean_x, self.sum_e / self.rows)

    def curvature(self) -> torch.Tensor:
        """[C, d, d]: H_c = mean of e_c (x - mean)(x - mean)^T, how the loss moves with a square of centred x."""
        mean, n = self.mean_x, self.rows
        m = self.xe.T / n  # [C, d]: mean of e_c x
        outer = torch.einsum("cd,e->cde", m, mean)
        return (self.exx / n - outer - outer.transpose(1, 2)
                + (self.sum_e / n)[:, None, None] * torch.outer(mean, mean))

    @property
    def per_sample(self) -> float:
        """Rows per sample: the means over rows become sums over a sample's positions."""
        return self.rows / max(self.samples, 1)


def _curvature_sum(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """sum over rows of e_c x x^T, [..., C, d, d], from every stride-th row (scaled up to all of them) where all
    rows would cost more than CURVATURE_WORK_PER_BATCH."""
    n, c, d = x.shape[-2], e.shape[-1], x.shape[-1]
    stride = -(-x.numel() * c * d // CURVATURE_WORK_PER_BATCH)  # x.numel() * c * d: every group's n * c * d * d
    if stride <= 1:
        return torch.einsum("...nc,...nd,...ne->...cde", e, x, x).cpu()
    x, e = x[..., ::stride, :], e[..., ::stride, :]
    return torch.einsum("...nc,...nd,...ne->...cde", e, x, x).cpu() * (n / x.shape[-2])


@dataclass
class DendriteFit:
    """The fitted map M = P @ Q ([C', d]) on centred x, for the output `channels` (None: all).

    First order: M predicts -e. Second order: row c is the direction w_c (unit spread) along which the
    loss bends most, `curvature[c]` = mean of e_c (w_c . (x - mean))^2."""

    P: torch.Tensor  # [C', R]
    Q: torch.Tensor | None  # [R, d]; None: P is the whole map (a full first-order fit, R = d)
    gain: float  # loss decrease per sample, to first order, at step 1
    channel_gain: torch.Tensor  # [C] the same per output channel, for the full-rank fit
    channels: torch.Tensor | None
    # what inserting the fit needs of the inputs, so that their [d, d] statistics can go once it is made:
    row_var: torch.Tensor  # [C'] the variance of M_c . x over the inputs
    row_mean: torch.Tensor  # [C'] the mean of M_c . x
    row_ridge: torch.Tensor  # [C'] lambda |M_c|^2: the fit's metric C_xx + lambda I adds it to the variance
    curvature: torch.Tensor | None = None  # second order only

    @property
    def weight(self) -> torch.Tensor:
        return self.P if self.Q is None else self.P @ self.Q


def _fitted(P: torch.Tensor, Q: torch.Tensor | None, gain: float, channel_gain: torch.Tensor,
            channels: torch.Tensor | None, stats: TargetStatistics, ridge: float,
            curvature: torch.Tensor | None = None) -> DendriteFit:
    weight = P if Q is None else P @ Q
    row_var = torch.einsum("cd,de,ce->c", weight, stats.cov_xx(), weight)
    mean = stats.mean_x if Q is None else Q @ stats.mean_x
    return DendriteFit(P, Q, gain, channel_gain, channels, row_var, P @ mean,
                       ridge_of(stats, ridge) * weight.square().sum(1), curvature)


def joined(fits: list[DendriteFit]) -> DendriteFit:
    """The full fits of a grouped target's groups as one fit: their rows one after another, as the grouped
    weight [C, in/groups, *kernel] holds them."""
    cat = lambda name: torch.cat([getattr(f, name) for f in fits])  # noqa: E731
    return DendriteFit(torch.cat([f.weight for f in fits]), None, sum(f.gain for f in fits),
                       cat("channel_gain"), None, cat("row_var"), cat("row_mean"), cat("row_ridge"),
                       None if fits[0].curvature is None else cat("curvature"))


def supported(layer: DendriteLayer) -> str | None:
    """None when a closed-form dendrite can be fitted for this target, else why not."""
    base = layer.base_layer
    if not isinstance(base._parameters.get("weight"), nn.Parameter):
        return "its weight is computed (weight or spectral norm)"
    if layer.plain_form(base) is not base:  # timm's Linear, ScaledStdConv2d, ...: the fit adjusts the raw weight
        return f"{type(base).__name__} computes its output in its own forward"
    if isinstance(base, nn.Linear) or DendriteHFConv1D.matches(base):
        return None
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and type(base) in (nn.Conv1d, nn.Conv2d):
        if base.groups > 1 and layer.dendrite_channels is not None:  # (a grouped conv's dendrites are never low-rank)
            return f"channel-selective dendrites of grouped {type(base).__name__} targets are not supported yet"
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


def target_groups(layer: DendriteLayer) -> int | None:
    """A grouped conv target's group count (None: not grouped), which its statistics and fits keep apart."""
    groups = getattr(layer.base_layer, "groups", 1)
    return groups if groups > 1 else None


def record_statistics(model: nn.Module, batches: Iterable, forward_loss: Callable[[object], torch.Tensor],
                      targets: dict[str, DendriteLayer], max_samples: int = 4096,
                      curvature: Collection[str] = ()) -> dict[str, TargetStatistics]:
    """Per target that reaches the loss, the sums of (x rows, per-sample e) over up to `max_samples` samples;
    for the targets named in `curvature`, also the [C, d, d] sums the second-order fit needs (only those: on a
    wide target they would not fit in memory)."""
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
            groups = target_groups(layer)
            stats[name] = TargetStatistics.empty(rows.shape[1] // (groups or 1), errors.shape[1] // (groups or 1),
                                                 name in curvature, groups)
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


def ridge_of(stats: TargetStatistics, ridge: float) -> float:
    """lambda = ridge * the inputs' mean square (uncentred): a direction along which the inputs barely vary,
    compared with their size, gains little from a fit and cannot make its weights large."""
    return ridge * max(float(stats.xx.diagonal().mean()) / max(stats.rows, 1), 1e-12)


def _regularised_cov(stats: TargetStatistics, ridge: float) -> torch.Tensor:
    """S = C_xx + lambda I (ridge_of)."""
    cov = stats.cov_xx()
    return cov + ridge_of(stats, ridge) * torch.eye(cov.shape[0], dtype=cov.dtype)


class _Whitening:
    """K with K S K^T = I, applied to matrices: the inverse of S's Cholesky factor L, by triangular solves, or
    S^-1/2 where S is not positive definite (ridge 0 on inputs that do not span their space). Every first-order
    fit only needs S's metric, which any such K gives (K S^1/2 is orthogonal), and one Cholesky factorisation
    costs a small part of the eigendecomposition S^-1/2 takes, which was most of a growth step on wide convs."""

    def __init__(self, s: torch.Tensor):
        self.lower, info = torch.linalg.cholesky_ex(s)
        self.symmetric = _sym_power(s, -0.5) if int(info) != 0 else None

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        """K @ m."""
        if self.symmetric is not None:
            return self.symmetric @ m
        return torch.linalg.solve_triangular(self.lower, m, upper=False)

    def transposed(self, m: torch.Tensor) -> torch.Tensor:
        """K^T @ m."""
        if self.symmetric is not None:
            return self.symmetric @ m
        return torch.linalg.solve_triangular(self.lower.mT, m, upper=True)


def fit_dendrite(stats: TargetStatistics, rank: int | None = None, ridge: float = 1e-3,
                 width: int | None = None) -> DendriteFit:
    """First order: the ridge least-squares map from centred x to -e, reduced to `rank` and to the `width`
    channels with the largest gain (both None: full)."""
    white = _Whitening(_regularised_cov(stats, ridge))
    g = white(stats.cov_xe())  # [d, C]
    channel_gain = g.square().sum(0) * stats.per_sample
    channels = None
    if width is not None and width < g.shape[1]:
        channels = channel_gain.topk(width).indices.sort().values
        g = g[:, channels]
    if rank is None or rank >= min(g.shape):
        return _fitted(-white.transposed(g).T, None, float(g.square().sum()) * stats.per_sample, channel_gain,
                       channels, stats, ridge)
    u, sigma, vh = torch.linalg.svd(g, full_matrices=False)
    u, sigma, vh = u[:, :rank], sigma[:rank], vh[:rank]
    return _fitted(-(vh.T * sigma), white.transposed(u).T, float(sigma.square().sum()) * stats.per_sample,
                   channel_gain, channels, stats, ridge)


def _strongest(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per symmetric matrix in a batch [C, k, k]: the eigenvalue of largest magnitude and its unit vector."""
    w, v = torch.linalg.eigh(h)
    pick = w.abs().argmax(-1)
    index = torch.arange(h.shape[0])
    return w[index, pick], v[index, :, pick]


def fit_curvature(stats: TargetStatistics, rank: int | None = None, ridge: float = 1e-3,
                  width: int | None = None) -> DendriteFit:
    """Second order: per channel, the direction w (unit spread, w^T S w = 1) of largest |mean e_c (w.x)^2|.

    At a plateau the error is uncorrelated with x (W's gradient is zero), so no linear fit helps; a
    dendrite's curved part s a''(z0) (w.x)^2 / 2 still does. Rank R: the R whitened directions that carry
    most of sum_c H_c^2, then each channel's best direction inside them. With dy_c = -eta curvature_c t_c^2 / 2
(t_c = w_c . (x - mean)), the Gauss-Newton choice, the first-order gain is sum_c curvature_c^2 / 2."""
    # S^-1/2, not the cheaper Cholesky whitening: the C eigendecompositions below cost more than it anyway, and
    # its basis sets the signs of the directions found, so fits (and recorded results) stay as they were
    white = _sym_power(_regularised_cov(stats, ridge), -0.5)
    d = white.shape[0]
    h = white @ stats.curvature() @ white  # [C, d, d], whitened
    lam, _ = _strongest(h)
    channel_gain = lam.square() / 2 * stats.per_sample
    channels = None
    if width is not None and width < h.shape[0]:
        channels = channel_gain.topk(width).indices.sort().values
        h = h[channels]
    if rank is None or rank >= d:
        basis = torch.eye(d, dtype=h.dtype)
    else:
        _, vectors = torch.linalg.eigh((h @ h).sum(0))
        basis = vectors[:, -rank:]  # [d, R]
    lam, v = _strongest(basis.T @ h @ basis)  # [C'], [C', R]
    return _fitted(v, basis.T @ white, float(lam.square().sum() / 2) * stats.per_sample, channel_gain,
                   channels, stats, ridge, lam)
