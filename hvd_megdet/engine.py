"""The training loop: a plain loop over iterations, no hooks (torchvision/detectron2 plain_train_net).

One iteration = one optimizer step = ``backward_passes_per_step`` batches on every rank. The number
of iterations per epoch is the same on every rank (the batch sampler guarantees equal batch counts),
which every collective in the step relies on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hvd_megdet import comm
from hvd_megdet.comm import DistContext
from hvd_megdet.metrics import MetricLogger


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (stops the run unless solver.on_nonfinite=skip)."""


class Preempted(RuntimeError):
    """A rank was asked to stop (SIGTERM); every rank saved a checkpoint and stopped at one iteration."""


def any_rank(flag: bool, ctx: DistContext, name: str) -> bool:
    """True on every rank if ``flag`` is True on any rank (one float allreduce)."""
    # dist(world): all ranks take the same branch afterwards, so none waits alone in a collective.
    return comm.allreduce_mean(torch.tensor([1.0 if flag else 0.0]), ctx, name=name).item() > 0


@dataclass
class Progress:
    """Where training stands; saved in checkpoints."""

    iteration: int = 0        # optimizer steps done
    epoch: int = 0            # current epoch (0-based)
    batches_done: int = 0     # batches of the current epoch consumed by the loop
    skipped_steps: int = 0    # steps skipped for a non-finite loss


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
    counters = {"rpn": SampleRatioCounter(model.rpn.fg_bg_sampler),
                "roi": SampleRatioCounter(model.roi_heads.fg_bg_sampler)}
    model.rpn.fg_bg_sampler = counters["rpn"]
    model.roi_heads.fg_bg_sampler = counters["roi"]
    return counters


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


@dataclass(frozen=True)
class StepSettings:
    backward_passes: int
    amp_dtype: torch.dtype | None
    clip_grad_norm: float
    on_nonfinite: str
    device: torch.device


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
            optimizer.zero_grad()
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


def _timed_next(loader_iter) -> tuple[Any, float]:
    start = time.perf_counter()
    batch = next(loader_iter)
    return batch, time.perf_counter() - start


def train_loop(model, optimizer, scaler, *, make_loader: Callable[[int, int], Any], iters_per_epoch: int,
               total_iters: int, lr_at: Callable[[int], float], settings: StepSettings, ctx: DistContext,
               progress: Progress, logger: MetricLogger, log_every: int, images_per_step: int,
               save: Callable[[Progress], None], checkpoint_every: int,
               end_of_epoch: Callable[[Progress], None],
               stop_requested: Callable[[], bool] = lambda: False) -> Progress:
    """Run from ``progress`` to ``total_iters`` (an iteration budget, possibly mid-epoch).

    Args:
        make_loader: (epoch, batches already done in it) -> a DataLoader over the rest of the epoch.
        lr_at: the LR of an iteration (pure; see lr_schedule.lr_at).
        images_per_step: images this rank processes per iteration (for img/s).
        save: writes a checkpoint of ``progress`` (every rank calls it; rank 0 writes).
        end_of_epoch: called after the last iteration of each epoch, with ``progress.epoch`` already
            counting it (1 after the first epoch): checkpoint, evaluation.
        stop_requested: this rank's wish to stop (e.g. SIGTERM seen); checked on every rank after
            each iteration, so all ranks save and raise :class:`Preempted` at the same iteration.
    """
    counters = attach_ratio_counters(model)
    epoch_batches = iters_per_epoch * settings.backward_passes  # batches each rank takes per epoch
    bar = logger.progress_bar(total=total_iters, initial=progress.iteration)
    model.train()
    while progress.iteration < total_iters:
        loader_iter = iter(make_loader(progress.epoch, progress.batches_done))
        window_losses: dict[str, float] = {}
        window_steps, window_data, window_step, window_start = 0, 0.0, 0.0, time.perf_counter()
        while progress.iteration < total_iters and progress.batches_done < epoch_batches:
            batches, data_time = [], 0.0
            for _ in range(settings.backward_passes):
                batch, dt = _timed_next(loader_iter)
                batches.append(batch)
                data_time += dt
            lr = lr_at(progress.iteration)
            set_lr(optimizer, lr)
            start = time.perf_counter()
            losses = train_step(model, optimizer, scaler, batches, settings, ctx, progress)
            window_step += time.perf_counter() - start
            window_data += data_time
            progress.iteration += 1
            progress.batches_done += settings.backward_passes
            if losses is not None:
                window_steps += 1
                for k, v in losses.items():
                    window_losses[k] = window_losses.get(k, 0.0) + v
            bar.update(1)
            if progress.iteration % log_every == 0 or progress.iteration == total_iters:
                elapsed = time.perf_counter() - window_start
                steps = max(window_steps, 1)
                record = log_record(progress, {k: v / steps for k, v in window_losses.items()}, counters, ctx, {
                    "lr": lr,
                    "img_per_s": images_per_step * ctx.size * window_steps / max(elapsed, 1e-9),
                    "data_time": window_data / steps,
                    "step_time": window_step / steps,
                    "global_batch": images_per_step * ctx.size,
                    "skipped_steps": progress.skipped_steps,
                    "peak_mem_mb": peak_memory_mb(settings.device),
                })
                logger.log("train", record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.4g}")
                window_losses, window_steps, window_data, window_step = {}, 0, 0.0, 0.0
                window_start = time.perf_counter()
            epoch_over = progress.batches_done >= epoch_batches
            if any_rank(stop_requested(), ctx, "stop"):
                if epoch_over:  # resume at the next epoch's start, as the end-of-epoch save would
                    progress.epoch, progress.batches_done = progress.epoch + 1, 0
                save(progress)
                bar.close()
                raise Preempted(f"stopped on request after iteration {progress.iteration}; "
                                f"rerun with the same train.output_dir to resume")
            if progress.iteration % checkpoint_every == 0 and not epoch_over:
                save(progress)
        if progress.batches_done >= epoch_batches:
            # Advance first, so the end-of-epoch checkpoint resumes at the next epoch's start.
            progress.epoch += 1
            progress.batches_done = 0
            end_of_epoch(progress)
            model.train()
    bar.close()
    return progress
