"""Cross-GPU Batch Normalization (CGBN, MegDet arXiv 1711.07240, Sec. 3.3 and Algorithm 1).

Training-mode BN whose statistics are taken over every pixel of every image held by the ranks of one
Horovod process set (the GPUs of one machine in the paper), on CPU or CUDA, with any controller.

Collectives: one allreduce per layer per direction. The paper reduces twice in the forward (the sum,
then the variance about the reduced mean). Here each rank reduces its own (count, mean, M2) locally
and the group merges them in a single fused float64 allreduce of (n, n*mean, M2 + n*mean^2): the
merge is exact in float64 while the per-rank moments are centred, so inputs with a large mean keep
their variance (a plain fp32 E[x^2] - E[x]^2 loses it to cancellation). The backward reduces
(sum dy, sum dy*(x - mean)) in one more allreduce. Both are Horovod allreduces on the process set
(``comm.allreduce_sum_``); each costs about one Horovod cycle (``comm.HOROVOD_DEFAULTS``).

Gradient convention: the input gradient is that of BN applied to the concatenation of the group's
inputs with the loss summed over the group. Weight and bias gradients are each rank's own
contribution; DistributedOptimizer's average over ranks then gives the gradient of the mean loss.

Precision: counts, means and sums of squares are fp32 (float64 for float64 input) whatever autocast
is active, forward and backward; the output and the input gradient have the input's dtype. Autocast
would otherwise run ``linalg.vecdot`` in fp16, whose sum of squares passes 65504 on any stride-4 map
of a COCO-sized image (about 67k pixels per channel).

Host reads: none. The group count stays a tensor on the input's device, so a CUDA forward queues
its kernels without waiting for them; only the collective itself synchronises.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet import comm

NORM_MODES = ("frozen", "local", "cgbn")
_unnamed = itertools.count()


@dataclass
class _StatsTape:
    """Statistics of every CGBN call in one checkpointed region, in call order."""

    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # mean, var, count
    position: int = 0


# ("record" | "replay", tape) while a checkpointed region runs; None otherwise.
_TAPE: contextvars.ContextVar[tuple[str, _StatsTape] | None] = contextvars.ContextVar("cgbn_tape", default=None)


@contextlib.contextmanager
def _use_tape(mode: str, tape: _StatsTape):
    if mode == "replay":
        tape.position = 0
    token = _TAPE.set((mode, tape))
    try:
        yield
    finally:
        _TAPE.reset(token)


def checkpoint(function: Callable, *args, **kwargs):
    """``torch.utils.checkpoint`` for regions holding CGBN layers.

    On recomputation each CGBN layer reuses the statistics of its first forward: the result equals
    the first forward, running statistics are updated once, and no collective runs again, so ranks
    may recompute in any order without deadlocking.
    """
    tape = _StatsTape()
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False,
        context_fn=lambda: (_use_tape("record", tape), _use_tape("replay", tape)), **kwargs)


def _compute(t: torch.Tensor) -> torch.Tensor:
    """fp32 for fp32 and the 16-bit autocast types; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def _full_precision(t: torch.Tensor):
    """Autocast off for ``t``'s device: autocast lowers ``linalg.vecdot`` to fp16/bf16 on CPU and CUDA."""
    return torch.autocast(t.device.type, enabled=False)


def _affine(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per channel, in one pass of the native kernel.

    Eval-mode ``F.batch_norm`` is exactly this affine map and runs as one fused loop, several times
    faster on CPU than the same expression written with broadcasting ops.
    """
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over N, H, W of a * b per channel, without materialising a * b."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2), dim=2).sum(0)


def _local_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) per channel of an N x C x H x W tensor, in fp32 (float64 for float64
    input), centred (two passes). Call with autocast off (``_full_precision``).

    The two-pass form (mean first, then squares about it) is the paper's Algorithm 1 applied locally;
    it keeps the variance of inputs whose mean is large compared with their spread.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0  # from the shape: no host read
    if count == 0:  # a rank without images still joins the collective, with zero weight
        zeros = _compute(x.new_zeros(channels))
        return 0, zeros, zeros
    xf = _compute(x)
    mean = xf.mean(dim=(0, 2, 3))
    centred = _affine(xf, mean, torch.full_like(mean, 1.0), None, None, 0.0)
    return count, mean, _rowwise_dot(centred, centred)


@torch.no_grad()  # the statistics' gradient is part of _CrossGPUBatchNormFn.backward
def _group_moments(x: torch.Tensor, process_set: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group mean and biased variance (in the compute dtype) and total count (a float64 0-dim
    tensor on x's device), in one float64 allreduce.

    A group without any pixel gives mean 0, variance 0 and count 0 (the denominators are clamped
    rather than tested on the host); its inputs are empty, so the output is the (empty) input.
    """
    with _full_precision(x):
        count, mean, m2 = _local_moments(x)
        c = x.shape[1]
        packed = torch.empty(2 * c + 1, dtype=torch.float64, device=x.device)
        mean64 = mean.double()
        packed[0] = count
        packed[1:c + 1] = mean64 * count
        packed[c + 1:] = m2.double() + count * mean64 * mean64
        # dist(bn set): the forward's single collective.
        comm.allreduce_sum_(packed, process_set, name=f"{name}.fwd")
        total = packed[0]
        group_mean = packed[1:c + 1] / total.clamp(min=1.0)
        group_var = (packed[c + 1:] / total.clamp(min=1.0) - group_mean * group_mean).clamp_(min=0.0)
        return group_mean.to(mean.dtype), group_var.to(mean.dtype), total


class _CrossGPUBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, total, eps, process_set, name):
        with _full_precision(x):
            xf = _compute(x)
            w = None if weight is None else weight.to(xf.dtype)
            b = None if bias is None else bias.to(xf.dtype)
            y = _affine(xf, mean, var, w, b, eps)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps, ctx.process_set, ctx.name = eps, process_set, name
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var, total = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with _full_precision(x):
            dy = _compute(grad_out)
            xf = _compute(x)
            invstd = torch.rsqrt(var + ctx.eps)
            xhat = _affine(xf, mean, var, None, None, ctx.eps)
            sum_dy = dy.sum(dim=(0, 2, 3))
            sum_dy_xhat = _rowwise_dot(dy, xhat)
            del xhat
            grad_x = grad_w = grad_b = None
            if need_w:
                grad_w = sum_dy_xhat.to(weight.dtype)  # local contribution
            if need_b:
                grad_b = sum_dy.to(weight.dtype if weight is not None else dy.dtype)
            if need_x:
                c = x.shape[1]
                packed = torch.cat([sum_dy, sum_dy_xhat]).double()
                # dist(bn set): the backward's single collective (same on every rank of the set).
                comm.allreduce_sum_(packed, ctx.process_set, name=f"{ctx.name}.bwd")
                packed /= total.clamp(min=1.0)
                mean_dy, mean_dy_xhat = packed[:c].to(dy.dtype), packed[c:].to(dy.dtype)
                scale = invstd if weight is None else weight.to(dy.dtype) * invstd
                # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), the last two terms as one affine of x.
                correction = _affine(xf, mean, var, -scale * mean_dy_xhat, -scale * mean_dy, ctx.eps)
                grad_x = torch.addcmul(correction, dy, scale.view(1, -1, 1, 1)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class CrossGPUBatchNorm2d(nn.BatchNorm2d):
    """Drop-in for ``nn.BatchNorm2d`` with statistics over the ranks of ``process_set``.

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm2d``. ``process_set=None`` means
    no communication: plain local BN (with the same checkpoint-safe behaviour).

    Args:
        num_features, eps, momentum, affine: as for ``nn.BatchNorm2d``.
        process_set: a Horovod ProcessSet registered at ``hvd.init`` (see ``comm.init``), or None.
            The ranks of a set must call their CGBN layers in the same order (the same model).
        name: collective name prefix, identical on every rank; ``convert_norm`` uses the module path.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, process_set: Any = None, name: str | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        self.process_set = process_set
        self.collective_name = name or f"cgbn.{next(_unnamed)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{self.collective_name}: expected a 4-D N x C x H x W input, got {tuple(x.shape)}")
        if not self.training:
            # Eval: running statistics, no communication, so one rank can run it alone.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        tape = _TAPE.get()
        if tape is not None and tape[0] == "replay":
            mean, var, total = tape[1].saved[tape[1].position]
            tape[1].position += 1
        else:
            mean, var, total = _group_moments(x, self.process_set, self.collective_name)
            self._update_running_stats(mean, var, total)
            if tape is not None:
                tape[1].saved.append((mean, var, total))
        return _CrossGPUBatchNormFn.apply(x, self.weight, self.bias, mean, var, total, self.eps,
                                          self.process_set, self.collective_name)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        """As ``nn.BatchNorm2d``, with tensor arithmetic only; a group without pixels changes nothing."""
        seen = total > 0
        self.num_batches_tracked.add_(seen.to(self.num_batches_tracked.dtype))
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / self.num_batches_tracked.clamp(min=1).to(self.running_mean.dtype)
        else:
            momentum = torch.full_like(total, self.momentum, dtype=self.running_mean.dtype)
        momentum = torch.where(seen, momentum, 0.0)  # lerp by 0 leaves the buffers exactly as they were
        unbiased = var * (total / (total - 1.0).clamp(min=1.0))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)

    def extra_repr(self) -> str:
        grouped = "local" if self.process_set is None else f"process_set={self.process_set!r}"
        return f"{super().extra_repr()}, {grouped}"


_BN_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


def convert_norm(module: nn.Module, mode: str, process_set: Any = None, _prefix: str = "") -> nn.Module:
    """Replace every BatchNorm2d / FrozenBatchNorm2d in ``module`` by the layer of ``mode``.

    Weight, bias and running statistics are carried over, so a Table 3 row is one argument:
    "frozen" (torchvision FrozenBatchNorm2d: fixed ImageNet statistics, the 16-base row),
    "local" (CrossGPUBatchNorm2d without a process set: each rank's own images), "cgbn"
    (CrossGPUBatchNorm2d over ``process_set``). "local" is the CGBN layer rather than
    nn.BatchNorm2d so that both modes share the fp32 statistics under autocast and the
    checkpoint-safe running statistics (nn.BatchNorm2d would update them again on recomputation).

    Returns:
        The converted module (``module`` itself, changed in place, unless it is a norm layer).
    """
    if mode not in NORM_MODES:
        raise ValueError(f"norm mode must be one of {NORM_MODES}, got {mode!r}")
    if isinstance(module, _BN_TYPES):
        return _convert_layer(module, mode, process_set, _prefix or "bn")
    for child_name, child in module.named_children():
        path = f"{_prefix}.{child_name}" if _prefix else child_name
        converted = convert_norm(child, mode, process_set, path)
        if converted is not child:
            setattr(module, child_name, converted)
    return module


def _convert_layer(old: nn.Module, mode: str, process_set: Any, path: str) -> nn.Module:
    c = old.running_mean.numel()
    eps = float(old.eps)
    if mode == "frozen":
        new = FrozenBatchNorm2d(c, eps=eps)
    else:
        new = CrossGPUBatchNorm2d(c, eps=eps, momentum=getattr(old, "momentum", 0.1),
                                  process_set=process_set if mode == "cgbn" else None, name=f"cgbn.{path}")
    with torch.no_grad():
        new.running_mean.copy_(old.running_mean)
        new.running_var.copy_(old.running_var)
        weight = old.weight if old.weight is not None else torch.ones(c)
        bias = old.bias if old.bias is not None else torch.zeros(c)
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    device = old.running_mean.device
    new.to(device)
    if not old.training:
        new.eval()
    return new
