"""One training step and one epoch of them (torchvision's references/detection/engine.py, distributed).

One iteration = one optimizer step = ``backward_passes_per_step`` batches on every rank. The number
of iterations per epoch is the same on every rank (the batch sampler guarantees equal batch counts),
which every collective in the step relies on. :func:`train_one_epoch` yields after every step so that
the caller's loop (``hvd_megdet.train.run``) decides, in plain sight, when to checkpoint or stop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from hvd_megdet import comm
from hvd_megdet.comm import DistContext
from hvd_megdet.metrics import MetricLogger


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (stops the run unless solver.on_nonfinite=skip)."""


class Preempted(RuntimeError):
    """A rank was asked to stop; every rank saved a checkpoint and stopped at one iteration.
    ``signalled``: some rank got SIGTERM (not only the stop file), the same on every rank."""

    def __init__(self, message: str, signalled: bool = True):
        super().__init__(message)
        self.signalled = signalled


def any_rank(flag: bool, ctx: DistContext, name: str) -> bool:
    """True on every rank if ``flag`` is True on any rank (one float allreduce)."""
    # dist(world): all ranks take the same branch afterwards, so none waits alone in a collective.
    return comm.allreduce_mean(torch.tensor([1.0 if flag else 0.0]), ctx, name=name).item() > 0


@dataclass
class Progress:
    """Where training stands; saved in checkpoints.

    An epoch whose batches are all done but whose end (evaluation, then ``next_epoch``) has not
    happened yet keeps ``batches_done`` at the epoch's total: a run resumed there finishes the epoch
    end before anything else (a preemption on an epoch's last step loses nothing).
    """

    iteration: int = 0        # optimizer steps done
    epoch: int = 0            # current epoch (0-based)
    batches_done: int = 0     # batches of the current epoch consumed by the loop
    skipped_steps: int = 0    # steps skipped for a non-finite loss

    def next_epoch(self) -> None:
        self.epoch, self.batches_done = self.epoch + 1, 0


class SampleRatioCounter:
    """Wraps a torchvision BalancedPositiveNegativeSampler to count the positives and negatives it picks.

    MegDet Table 1 tracks this ratio: larger mini-batches balance it.
    """

    def __init__(self, sampler: Callable):
        self.sampler = sampler
        self.positives = 0
        self.negatives = 0

    def __call__(self, matched_idxs):
        pos, neg = self.sampler(matched_idxs)
        self.positives += int(sum(int(p.sum()) for p in pos))
        self.negatives += int(sum(int(n.sum()) for n in neg))
        return pos, neg

    def take(self) -> tuple[int, int]:
        counts = (self.positives, self.negatives)
        self.positives = self.negatives = 0
        return counts


def attach_ratio_counters(model: torch.nn.Module) -> dict[str, SampleRatioCounter]:
    """Count what the RPN and RoI samplers pick (idempotent: an attached counter is reused)."""
    for head in (model.rpn, model.roi_heads):
        if not isinstance(head.fg_bg_sampler, SampleRatioCounter):
            head.fg_bg_sampler = SampleRatioCounter(head.fg_bg_sampler)
    return {"rpn": model.rpn.fg_bg_sampler, "roi": model.roi_heads.fg_bg_sampler}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def pick_device(choice: str, ctx: DistContext) -> torch.device:
    """``cuda`` (or ``auto`` where CUDA is present): the GPU of this rank on its machine; else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", ctx.device_index)  # one GPU per rank on its machine
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


@dataclass(frozen=True)
class StepSettings:
    """How one optimizer step runs (solver section of the config, resolved)."""

    backward_passes: int
    amp_dtype: torch.dtype | None
    clip_grad_norm: float
    on_nonfinite: str         # stop | skip
    device: torch.device


@dataclass(frozen=True)
class EpochSettings:
    """What :func:`train_one_epoch` needs besides the model and data: the schedule and logging."""

    step: StepSettings
    iters_per_epoch: int
    total_iters: int          # the run's iteration budget; an epoch may end early at it
    lr_at: Callable[[int], float]  # pure: lr_schedule.lr_at with the run's constants bound
    log_every: int
    bn_size: int              # images per BN group (0: frozen BN), in every log record


def train_step(model, optimizer, scaler, batches: list, settings: StepSettings, ctx: DistContext,
               progress: Progress) -> dict[str, float] | None:
    """One optimizer step over ``batches`` (one per backward pass). Returns the loss terms, or None
    when the step was skipped for a non-finite loss (on every rank alike)."""
    loss_sums: dict[str, float] = {}
    for images, targets in batches:
        images, targets = _to_device(images, targets, settings.device)
        with torch.autocast(settings.device.type, dtype=settings.amp_dtype or torch.float32,
                            enabled=settings.amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        # dist(world): every rank learns whether any rank's loss is non-finite, so all stop or skip
        # together instead of some ranks waiting forever in the gradient allreduce.
        finite = math.isfinite(loss.item())
        if any_rank(not finite, ctx, "nonfinite"):
            bad_ranks = [r for r, ok in enumerate(comm.allgather_object(finite, ctx)) if not ok]
            if settings.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {progress.iteration} on rank(s) {bad_ranks}: "
                    f"{ {k: v.item() for k, v in loss_dict.items()} } (rank {ctx.rank}); "
                    f"set solver.on_nonfinite=skip to skip such steps, or lower the LR / warm up longer")
            # Every rank skips together, before this pass's backward: no allreduce is in flight.
            comm.discard_gradients(optimizer)
            progress.skipped_steps += 1
            return None
        scaled = loss / settings.backward_passes  # DistributedOptimizer sums the k local passes
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for k, v in loss_dict.items():
            loss_sums[k] = loss_sums.get(k, 0.0) + v.item() / settings.backward_passes
    if settings.clip_grad_norm > 0 or scaler is not None:
        comm.synchronize_gradients(optimizer)  # averaged gradients, before clipping or unscaling
        if scaler is not None:
            scaler.unscale_(optimizer)
        if settings.clip_grad_norm > 0:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm)
        with comm.optimizer_skip_synchronize(optimizer):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
    else:
        optimizer.step()
    optimizer.zero_grad()
    return loss_sums


def log_record(progress: Progress, losses: dict[str, float], counters: dict[str, SampleRatioCounter],
               ctx: DistContext, extra: dict[str, Any]) -> dict[str, Any]:
    """The averaged metrics of one logging window (a collective: call on every rank)."""
    values = dict(losses)
    values["loss"] = sum(losses.values())
    for name, counter in counters.items():
        pos, neg = counter.take()
        values[f"{name}_pos"], values[f"{name}_neg"] = pos, neg
    mean = comm.reduce_dict(values, ctx)  # dist(world): one fused allreduce for the log line
    for name in counters:
        pos, neg = mean.pop(f"{name}_pos"), mean.pop(f"{name}_neg")
        mean[f"{name}_pos_neg_ratio"] = pos / neg if neg else float("nan")
    return {"iter": progress.iteration, "epoch": progress.epoch, **mean, **extra}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_one_epoch(model, optimizer, scaler, loader, progress: Progress, settings: EpochSettings,
                    ctx: DistContext, logger: MetricLogger) -> Iterator[Progress]:
    """Train the rest of ``progress.epoch``, yielding after every optimizer step.

    Stops at the epoch's end or at ``settings.total_iters``, whichever comes first; ``progress`` is
    advanced in place (iteration, batches done). The caller checkpoints, stops or evaluates between
    steps. ``loader`` iterates an :class:`~hvd_megdet.data.EpochTagged` batch sampler.
    """
    passes = settings.step.backward_passes
    epoch_batches = settings.iters_per_epoch * passes
    if progress.iteration >= settings.total_iters or progress.batches_done >= epoch_batches:
        return
    counters = attach_ratio_counters(model)
    loader.batch_sampler.set_epoch(progress.epoch, start=progress.batches_done)
    global_batch = ctx.size * passes * loader.batch_sampler.batch_size
    model.train()
    batches = iter(loader)
    window = _Window()
    with logger.progress_bar(total=settings.total_iters, initial=progress.iteration) as bar:
        while progress.iteration < settings.total_iters and progress.batches_done < epoch_batches:
            start = time.perf_counter()
            step_batches = [next(batches) for _ in range(passes)]
            data_time = time.perf_counter() - start
            lr = settings.lr_at(progress.iteration)
            set_lr(optimizer, lr)
            losses = train_step(model, optimizer, scaler, step_batches, settings.step, ctx, progress)
            progress.iteration += 1
            progress.batches_done += passes
            window.add(losses, data_time, time.perf_counter() - start - data_time)
            bar.update(1)
            if progress.iteration % settings.log_every == 0 or progress.iteration == settings.total_iters:
                record = log_record(progress, window.mean_losses(), counters, ctx, {
                    "lr": lr, "img_per_s": global_batch * window.steps / max(window.elapsed(), 1e-9),
                    "data_time": window.data_time / max(window.steps, 1),
                    "step_time": window.step_time / max(window.steps, 1),
                    "global_batch": global_batch, "bn_size": settings.bn_size,
                    "skipped_steps": progress.skipped_steps,
                    "peak_mem_mb": peak_memory_mb(settings.step.device)})
                logger.log("train", record)
                bar.set_postfix(epoch=progress.epoch + 1, loss=record["loss"], lr=lr, img_per_s=record["img_per_s"])
                window = _Window()
            yield progress


class _Window:
    """Sums over the steps of one logging window."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps, self.data_time, self.step_time = 0, 0.0, 0.0
        self.losses: dict[str, float] = {}

    def add(self, losses: dict[str, float] | None, data_time: float, step_time: float) -> None:
        self.data_time += data_time
        self.step_time += step_time
        if losses is not None:  # a skipped step has no losses
            self.steps += 1
            for k, v in losses.items():
                self.losses[k] = self.losses.get(k, 0.0) + v

    def mean_losses(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.losses.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
