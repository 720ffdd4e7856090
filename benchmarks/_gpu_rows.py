"""bench_gpu's rows: one optimizer step of bare torchvision or of hvd_megdet, timed in rotation.

Each row is a model, an optimizer and a ``step(batch)`` closure, built from scratch under the same
seed; :func:`run_rotation` steps every row once per round so that drift (clocks, heat, other jobs)
hits every row alike, and :func:`summarise` turns a row's step times into its JSON entry.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet import comm, engine
from hvd_megdet.config import ModelConfig
from hvd_megdet.model import build_model

NUM_CLASSES = 81
BOXES_PER_IMAGE = 7  # COCO train2017 averages 7.3 annotations per image
AMPS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ROWS = ("tv_frozen", "tv_bn", "hvd_frozen", "hvd_local", "hvd_cgbn1")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Image and model sizes: the paper's, or --tiny's for a CPU dry run."""

    sizes: tuple[tuple[int, int], ...]  # (H, W) of the raw images, cycled
    min_size: int
    max_size: int
    backbone: str


PAPER = Scale(sizes=((480, 640), (640, 480)), min_size=800, max_size=1333, backbone="resnet50")
TINY = Scale(sizes=((96, 128), (128, 96)), min_size=96, max_size=160, backbone="resnet18")


# --------------------------------------------------------------------------------------- data
def make_batches(scale: Scale, images: int, count: int = 4, seed: int = 0) -> list:
    """``count`` batches of ``images`` CPU images with targets; a batch's images share an orientation
    (as the aspect-ratio grouping sampler gives)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(count):
        h, w = scale.sizes[b % len(scale.sizes)]
        imgs, targets = [], []
        for _ in range(images):
            imgs.append(torch.rand(3, h, w, generator=gen))
            xy = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
            wh = 8 + torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3])
            targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                            "labels": torch.randint(1, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=gen)})
        batches.append((imgs, targets))
    return batches


# --------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    name: str                 # e.g. hvd_cgbn1/bf16
    kind: str                 # one of ROWS
    amp: str
    step: object              # callable(batch) -> None: one optimizer step
    params: int
    times: list = dataclasses.field(default_factory=list)
    peaks: list = dataclasses.field(default_factory=list)


def _torchvision_model(kind: str, scale: Scale) -> nn.Module:
    if kind == "tv_bn" and scale.backbone == "resnet50":
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                       min_size=scale.min_size, max_size=scale.max_size)
    # fasterrcnn_resnet50_fpn's own construction, with the norm layer and backbone chosen.
    norm = FrozenBatchNorm2d if kind == "tv_frozen" else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name=scale.backbone, weights=None, norm_layer=norm, trainable_layers=5)
    return FasterRCNN(backbone, num_classes=NUM_CLASSES, min_size=scale.min_size, max_size=scale.max_size)


def _torchvision_step(model, optimizer, scaler, amp_dtype, device):
    """torchvision's references/detection train_one_epoch step, without its logging."""
    def step(batch):
        images = [i.to(device, non_blocking=True) for i in batch[0]]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss).item():  # the reference stops on a non-finite loss (one host read)
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    return step


def _hvd_step(model, optimizer, scaler, amp_dtype, device, ctx):
    settings = engine.StepSettings(backward_passes=1, amp_dtype=amp_dtype, clip_grad_norm=0.0,
                                   on_nonfinite="stop", device=device)
    progress = engine.Progress()

    def step(batch):
        engine.train_step(model, optimizer, scaler, [batch], settings, ctx, progress)
    return step


def one_rank_cgbn_context(ctx: comm.DistContext) -> comm.DistContext:
    """``ctx`` with CGBN reducing over Horovod's world set of this 1-rank job.

    comm.init registers no set for a group of one (there is nothing to reduce); the benchmark wants
    the collectives to run, to measure what they cost without any network.
    """
    if not ctx.horovod:
        raise RuntimeError("hvd_cgbn1 needs Horovod: source .gpu_env/env.sh (scripts/gpu_env.sh) or drop the row")
    return dataclasses.replace(ctx, bn_process_set=comm.hvd.global_process_set)


def build_row(kind: str, amp: str, scale: Scale, device: torch.device, ctx, sublinear: bool = False) -> Row:
    torch.manual_seed(0)
    amp_dtype = AMPS[amp]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    if kind.startswith("tv_"):
        model = _torchvision_model(kind, scale).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0025, momentum=0.9, weight_decay=1e-4)
        step = _torchvision_step(model, optimizer, scaler, amp_dtype, device)
    else:
        norm = {"hvd_frozen": "frozen", "hvd_local": "local", "hvd_cgbn1": "cgbn"}[kind]
        row_ctx = one_rank_cgbn_context(ctx) if kind == "hvd_cgbn1" else ctx
        cfg = ModelConfig(backbone=scale.backbone, norm=norm, sublinear_memory=sublinear)
        model = build_model(cfg, row_ctx, NUM_CLASSES, min_size=scale.min_size, max_size=scale.max_size).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0025, momentum=0.9, weight_decay=1e-4)
        optimizer = comm.distributed_optimizer(optimizer, model, row_ctx)
        comm.broadcast_state(model, optimizer, row_ctx)
        step = _hvd_step(model, optimizer, scaler, amp_dtype, device, row_ctx)
    return Row(name=f"{kind}/{amp}", kind=kind, amp=amp, step=step, params=sum(p.numel() for p in params))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(row: Row, batch, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one step, device work included, and the memory it allocated above what it started
    with (MB; None on the CPU, which has no such counter)."""
    sync(device)
    base = 0
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    row.step(batch)
    sync(device)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return elapsed, peak


def run_rotation(rows: list[Row], batches: list, warmup: int, steps: int, device: torch.device) -> None:
    """One step of each row in turn, ``warmup + steps`` rounds; the rows see the same batch in a round."""
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = batches[i % len(batches)]
        for row in rows if i % 2 == 0 else rows[::-1]:  # alternate who goes first
            elapsed, peak = timed_step(row, batch, device)
            if i >= warmup:
                row.times.append(elapsed)
                row.peaks.append(peak)
        print(f"  round {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}: {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)


def summarise(row: Row, images: int) -> dict:
    median = statistics.median(row.times)
    q = statistics.quantiles(row.times, n=4) if len(row.times) > 1 else [median, median, median]
    return {"name": row.name, "kind": row.kind, "amp": row.amp, "images_per_gpu": images,
            "step_time_s": median, "step_time_p25_s": q[0], "step_time_p75_s": q[2],
            "img_per_s": images / median, "step_peak_extra_mb": None if None in row.peaks else max(row.peaks),
            "trainable_params": row.params,
            "steps": len(row.times)}



def profile_rows(rows: list[Row], names: list[str], batches: list, device: torch.device, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        for row in rows:
            if row.name not in names:
                continue
            with profile(activities=activities) as prof:
                for i in range(3):
                    row.step(batches[i % len(batches)])
                sync(device)
            f.write(f"=== {row.name}: 3 steps, sorted by {sort}\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=25) + "\n\n")

