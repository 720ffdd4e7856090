"""How many nodes, how many hours: seconds per iteration, time to train and scaling efficiency.

    python -m hvd_megdet.plan --config configs/megdet_bs256_bn16.yaml --nodes 1,2,4,8,16 \\
        --step-time 0.07 --images-per-gpu 2                   # a measured per-GPU step time
    python -m hvd_megdet.plan --config ... --from-log runs/megdet/log.jsonl    # a run's train records
    python -m hvd_megdet.plan --config ... --from-bench benchmarks/results/bench_gpu.json
    python -m hvd_megdet.plan --table3                        # checked against the paper's Table 3

One iteration on W = N x G GPUs, every rank B images per backward pass and k passes per step:

    compute   = c + k B t f_norm f_sub     t: seconds per image on one GPU (trainable BN); f_norm: frozen
                                           BN / trainable; f_sub: with sub-linear memory / without
    cgbn      = k sum over CGBN layers of 2 collectives (1 forward, 1 backward; cgbn.py), each
                alpha_bn + 2(g-1)/g bytes / bw_intra, within a group of g GPUs of one node
    allreduce = 2(W-1)/W S / bw + 2(W-1) alpha m   the ring over all GPUs: S gradient bytes (4 per
                trainable parameter, 2 with fp16 compression) in m messages: ceil(S / fusion) with
                Horovod's tensor fusion, one per gradient tensor without (fusion 0); bw and alpha are
                the node's links when W <= G, else the slower inter-node link
    data      = k B t_decode / cores           decoding on the rank's loader cores, overlapped
    iteration = max(compute + cgbn + allreduce, data)

Nothing is assumed to overlap with the backward pass, so the allreduce term is an upper bound.
hours = iteration x iterations / 3600, with the trainer's iteration count (lr_schedule); scaling
efficiency = iteration on one GPU with the same per-GPU work (no communication) / iteration on W.

``--table3`` fits c, t, f_norm, f_sub and alpha_bn on Table 3's eight 8-GPU rows (least relative error,
non-negative), with the paper cluster's links assumed (PAPER_LINKS: 8 GPUs in a node cannot tell links
from compute), predicts every other row, and then the rows on 8-GPU H100 nodes (H100_LINKS).

A step time read from a run's log.jsonl is that run's, communication included: from a multi-GPU run
it overstates t by the run's own allreduce and CGBN time (a 1-GPU run, or a bench_gpu result, does not).

The JSON a GPU benchmark leaves (``--from-bench``): {"step_time_s": seconds per optimizer step on one
GPU, "images_per_gpu": B, optional "norm": "frozen" | "local" | "cgbn" (default "cgbn"), optional
"sublinear_memory": bool (default false), optional "device": a name to print}; benchmarks/bench_gpu.py
writes these at its top level. If its rows hold "hvd_cgbn1/fp32" and "hvd_local/fp32", their step
time difference over 2 collectives per BN layer replaces the assumed CGBN collective cost. A dry run
("dry_run": true) is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvd_megdet import lr_schedule
from hvd_megdet.config import Config, ConfigError, ModelConfig, load_config

COCO_TRAIN_IMAGES = 118_287  # train2017


@dataclass(frozen=True)
class Platform:
    """Constants of a cluster and its software. Seconds, and bytes per second."""

    image_s: float                   # t: compute per image per GPU, trainable BN, no sub-linear memory
    iteration_s: float = 0.0         # c: fixed cost per iteration (optimizer step, launches, Python)
    frozen_factor: float = 1.0       # compute per image with frozen BN / with trainable BN
    sublinear_factor: float = 1.1    # compute per image with sub-linear memory / without
    bn_latency_s: float = 2e-4       # alpha_bn: one CGBN collective within a node
    intra_bw: float = 300e9          # allreduce bus bandwidth within a node
    intra_latency_s: float = 5e-6    # per ring step within a node
    inter_bw: float = 50e9           # between nodes, per node (400 Gb/s)
    inter_latency_s: float = 5e-6    # per ring step between nodes
    gpus_per_node: int = 8
    decode_s: float = 0.02           # decode + resize + flip of one COCO image on one core
    fusion_bytes: float = 128 * 2**20  # Horovod's default HOROVOD_FUSION_THRESHOLD; 0: one message a tensor


@dataclass(frozen=True)
class Job:
    """What one rank does per iteration (from a config) and how much there is to train."""

    images_per_gpu: int
    grad_params: int                 # trainable parameters: what the gradient allreduce carries
    bn_channels: tuple[int, ...]     # channels of each CGBN layer (empty: none communicates)
    grad_tensors: int = 1            # trainable parameter tensors: the messages without tensor fusion
    norm: str = "cgbn"               # frozen | local | cgbn
    bn_group: int | None = None      # GPUs per CGBN group; None: all GPUs of a node
    sublinear: bool = False
    backward_passes: int = 1
    grad_bytes_per_param: int = 4    # 2 with fp16 compression
    loader_cores: int = 4
    epochs_policy: str = "normal"
    dataset_images: int = COCO_TRAIN_IMAGES


@dataclass(frozen=True)
class Iteration:
    compute: float
    cgbn: float
    allreduce: float
    data: float

    @property
    def total(self) -> float:
        return max(self.compute + self.cgbn + self.allreduce, self.data)


@dataclass(frozen=True)
class Prediction:
    nodes: int
    gpus: int
    global_batch: int
    iteration: Iteration
    iterations: int
    hours: float
    efficiency: float


# --------------------------------------------------------------------------------- the model (pure)
def ring_allreduce_s(nbytes: float, ranks: int, bandwidth: float, latency_s: float) -> float:
    """One ring allreduce: 2(N-1) steps, each moving nbytes/N and paying one latency."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency_s


def link(platform: Platform, ranks: int) -> tuple[float, float]:
    """(bandwidth, latency) of the slowest hop of a ring over ``ranks`` GPUs, nodes filled in order."""
    if ranks <= platform.gpus_per_node:
        return platform.intra_bw, platform.intra_latency_s
    return min(platform.intra_bw, platform.inter_bw), max(platform.intra_latency_s, platform.inter_latency_s)


def gradient_messages(job: Job, platform: Platform) -> int:
    """Ring allreduces per step: fusion-buffer-sized ones, or one per gradient tensor (fusion 0)."""
    if platform.fusion_bytes <= 0:
        return max(1, job.grad_tensors)
    return max(1, math.ceil(job.grad_params * job.grad_bytes_per_param / platform.fusion_bytes))


def gradient_allreduce_s(job: Job, platform: Platform, ranks: int) -> float:
    """The gradients' ring allreduce: the bytes once, a ring's latencies once per message."""
    nbytes = job.grad_params * job.grad_bytes_per_param
    messages = gradient_messages(job, platform)
    bandwidth, latency = link(platform, ranks)
    return ring_allreduce_s(nbytes, ranks, bandwidth, 0.0) + ring_allreduce_s(0.0, ranks, bandwidth, latency) * messages


def bn_group_size(job: Job, platform: Platform, ranks: int) -> int:
    """GPUs whose images share BN statistics (1: no CGBN collective)."""
    if job.norm != "cgbn" or not job.bn_channels:
        return 1
    group = min(job.bn_group or platform.gpus_per_node, platform.gpus_per_node, ranks)
    if ranks % group or platform.gpus_per_node % group and ranks > group:
        raise ValueError(f"a CGBN group of {group} GPUs does not divide {ranks} GPUs in nodes of {platform.gpus_per_node}")
    return group


def cgbn_s(job: Job, platform: Platform, ranks: int) -> float:
    """Per backward pass: per layer one forward ((2C+1) float64) and one backward (2C) allreduce."""
    group = bn_group_size(job, platform, ranks)
    if group == 1:
        return 0.0
    scale = 2 * (group - 1) / group / platform.intra_bw
    return sum(2 * platform.bn_latency_s + scale * 8 * ((2 * c + 1) + 2 * c) for c in job.bn_channels)


def compute_factor(platform: Platform, norm: str, sublinear: bool) -> float:
    """Compute per image relative to trainable BN without sub-linear memory."""
    return (platform.frozen_factor if norm == "frozen" else 1.0) * (platform.sublinear_factor if sublinear else 1.0)


def compute_s(job: Job, platform: Platform) -> float:
    factor = compute_factor(platform, job.norm, job.sublinear)
    return platform.iteration_s + job.backward_passes * job.images_per_gpu * platform.image_s * factor


def iteration(job: Job, platform: Platform, ranks: int) -> Iteration:
    return Iteration(
        compute=compute_s(job, platform),
        cgbn=job.backward_passes * cgbn_s(job, platform, ranks),
        allreduce=gradient_allreduce_s(job, platform, ranks),
        data=job.backward_passes * job.images_per_gpu * platform.decode_s / max(job.loader_cores, 1))


def iterations_to_train(job: Job, ranks: int) -> int:
    """The trainer's count: epochs x (ceil(images / W) // B // k)."""
    per_epoch = lr_schedule.iters_per_epoch(job.dataset_images, job.images_per_gpu, ranks, job.backward_passes)
    return lr_schedule.total_iters(per_epoch, job.epochs_policy)


def predict(job: Job, platform: Platform, nodes: int, gpus_per_node: int | None = None) -> Prediction:
    """Seconds per iteration, hours and weak-scaling efficiency on ``nodes`` x ``gpus_per_node`` GPUs."""
    per_node = gpus_per_node or platform.gpus_per_node
    platform = dataclasses.replace(platform, gpus_per_node=per_node)
    ranks = nodes * per_node
    it = iteration(job, platform, ranks)
    alone = iteration(dataclasses.replace(job, bn_channels=()), platform, 1).total
    count = iterations_to_train(job, ranks)
    return Prediction(nodes=nodes, gpus=ranks, global_batch=ranks * job.images_per_gpu * job.backward_passes,
                      iteration=it, iterations=count, hours=it.total * count / 3600, efficiency=alone / it.total)


def image_time_from_step(step_time_s: float, images_per_gpu: int, platform: Platform, norm: str = "cgbn",
                         sublinear: bool = False) -> float:
    """t from one GPU's measured step time on a job of ``images_per_gpu`` (c is taken as 0)."""
    return step_time_s / (images_per_gpu * compute_factor(platform, norm, sublinear))


# ------------------------------------------------------------------------------------ fitting (pure)
def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |a x - b| with x >= 0, exactly, by trying every set of free unknowns (a handful here)."""
    best, best_cost = np.zeros(a.shape[1]), float(np.sum(b * b))
    for k in range(1, a.shape[1] + 1):
        for free in itertools.combinations(range(a.shape[1]), k):
            x = np.zeros(a.shape[1])
            x[list(free)] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            cost = float(np.sum((a @ x - b) ** 2))
            if x.min() >= 0 and cost < best_cost - 1e-15 * max(best_cost, 1.0):
                best, best_cost = x, cost
    return best


def fit_platform(jobs: list[Job], seconds_per_iteration: list[float], base: Platform, ranks: list[int]) -> Platform:
    """c, t (frozen, trainable, sub-linear) and alpha_bn by least relative error; links stay ``base``'s.

    The model is linear in (c, t_frozen, t, t_sublinear, alpha_bn) once the communication that does
    not depend on them (ring allreduce, CGBN bytes) is subtracted, so the fit is a non-negative
    linear least squares on rows weighted by 1 / measured time.
    """
    rows, rhs = [], []
    for job, seconds, w in zip(jobs, seconds_per_iteration, ranks):
        images = job.backward_passes * job.images_per_gpu
        frozen, sub = job.norm == "frozen", job.sublinear and job.norm != "frozen"
        layers = len(job.bn_channels) if bn_group_size(job, base, w) > 1 else 0
        known = (gradient_allreduce_s(job, base, w)
                 + job.backward_passes * cgbn_s(job, dataclasses.replace(base, bn_latency_s=0), w))
        rows.append([1.0, images * frozen, images * (not frozen and not sub), images * sub,
                     2 * layers * job.backward_passes])
        rhs.append(seconds - known)
    weights = 1 / np.asarray(seconds_per_iteration)
    c, t_frozen, t, t_sub, alpha = nnls(np.asarray(rows) * weights[:, None], np.asarray(rhs) * weights)
    return dataclasses.replace(base, iteration_s=float(c), image_s=float(t), bn_latency_s=float(alpha),
                               frozen_factor=float(t_frozen / t) if t else 1.0,
                               sublinear_factor=float(t_sub / t) if t else 1.0)


# ------------------------------------------------------------------------------------ MegDet Table 3
@dataclass(frozen=True)
class PaperRow:
    label: str
    batch: int
    bn_size: int      # images per BN statistic; 0 = frozen BN
    gpus: int
    hours: float
    policy: str = "normal"

    @property
    def images_per_gpu(self) -> int:
        return self.batch // self.gpus


# arXiv 1711.07240, Table 3 (Batch size, BN size, # of GPUs, Time (h)); mmAP left out.
TABLE3 = (
    PaperRow("16-base", 16, 0, 8, 33.2), PaperRow("2", 2, 2, 2, 131.2), PaperRow("4", 4, 4, 4, 91.4),
    PaperRow("8", 8, 8, 8, 71.5), PaperRow("16", 16, 2, 8, 45.6), PaperRow("16", 16, 16, 8, 39.5),
    PaperRow("32", 32, 32, 8, 45.5), PaperRow("64", 64, 64, 8, 40.9), PaperRow("64", 64, 32, 16, 19.6),
    PaperRow("64", 64, 16, 32, 11.2), PaperRow("128", 128, 32, 32, 11.3), PaperRow("128", 128, 16, 64, 6.5),
    PaperRow("256", 256, 32, 64, 7.2), PaperRow("256", 256, 16, 128, 4.1),
    PaperRow("16 (long)", 16, 16, 8, 65.2, "long"), PaperRow("32 (long)", 32, 32, 8, 60.3, "long"),
    PaperRow("64 (long)", 64, 32, 16, 30.1, "long"), PaperRow("128 (long)", 128, 32, 32, 15.8, "long"),
    PaperRow("256 (long)", 256, 32, 64, 9.4, "long"), PaperRow("256 (long)", 256, 16, 128, 5.4, "long"),
)
# The paper's 2017 cluster is not described beyond 8 GPUs per machine, so its links are ASSUMED, not
# fitted (8-GPU rows cannot tell them apart from compute): 8 GPUs on PCIe 3.0 (8 GB/s ring bus bandwidth,
# 5 us a step), 56 Gb/s FDR InfiniBand between nodes (7 GB/s, 10 us a ring step with GPU buffers), and
# one ring allreduce per gradient tensor, as frameworks of 2017 ran them (Goyal et al. 2017, the
# paper's [10], allreduce each gradient as backward produces it; Horovod's tensor fusion came later).
PAPER_LINKS = Platform(image_s=0.0, intra_bw=8e9, intra_latency_s=5e-6, inter_bw=7e9, inter_latency_s=10e-6,
                       fusion_bytes=0)
PAPER_LATENCY_SWEEP_US = (5, 10, 20, 40)  # inter-node ring step: how much the held-out errors hinge on it
# H100 nodes: 8 GPUs on NVLink (300 GB/s allreduce bus bandwidth, below NCCL's ~360-480 GB/s), one
# 400 Gb/s InfiniBand port per node (50 GB/s), 5 us a ring step, Horovod's default 128 MB tensor
# fusion; a CGBN collective costs about one Horovod cycle: 0.33 ms per synchronous call measured on
# CPU at the HOROVOD_CYCLE_TIME=0.1 that comm.init ships (1.08 ms at Horovod's stock 1 ms; README:
# Benchmarks), the GPU's wait for the layer's kernels not included; trainable BN 1.1x the compute of frozen BN
# (BN layers are memory-bound, ~10% of a ResNet step). All assumed, not measured on an H100.
H100_LINKS = Platform(image_s=0.0, intra_bw=300e9, intra_latency_s=5e-6, inter_bw=50e9, inter_latency_s=5e-6,
                      bn_latency_s=3.3e-4, decode_s=0.02, frozen_factor=1 / 1.1)
# Without a measured step time: detectron2's R50-FPN 1x (frozen BN) trains at 0.210 s/iter with 2
# images on each of 8 V100s (MODEL_ZOO.md); an H100 taken as 3x a V100 (assumed, not measured).
D2_V100_STEP_S, D2_IMAGES, H100_OVER_V100 = 0.210, 2, 3.0


@dataclass(frozen=True)
class ModelSize:
    params: int                      # trainable parameters
    tensors: int                     # trainable parameter tensors
    bn_channels: tuple[int, ...]     # channels of each CGBN layer


def paper_job(row: PaperRow, sizes: dict[str, ModelSize], **changes) -> Job:
    """The Table 3 row as a job: the BN size says the norm and the group, >= 32 means sub-linear memory."""
    b = row.images_per_gpu
    norm = "frozen" if row.bn_size == 0 else ("local" if row.bn_size == b else "cgbn")
    size = sizes["frozen" if norm == "frozen" else "cgbn"]
    fields = dict(images_per_gpu=b, grad_params=size.params, grad_tensors=size.tensors,
                  bn_channels=size.bn_channels if norm == "cgbn" else (), norm=norm, bn_group=max(row.bn_size // b, 1),
                  sublinear=row.bn_size >= 32, epochs_policy=row.policy)
    return Job(**{**fields, **changes})


def paper_seconds_per_iteration(row: PaperRow, job: Job) -> float:
    return row.hours * 3600 / iterations_to_train(job, row.gpus)


def nodes_of(row: PaperRow, per_node: int = 8) -> tuple[int, int]:
    """(nodes, GPUs per node): rows of fewer GPUs than a node use part of one."""
    return (1, row.gpus) if row.gpus <= per_node else (row.gpus // per_node, per_node)


def model_size(model: ModelConfig, num_classes: int = 81) -> ModelSize:
    """The detector's trainable parameters, their tensors and its CGBN layers, built on the meta device."""
    import torch

    from hvd_megdet import cgbn
    from hvd_megdet.comm import DistContext
    from hvd_megdet.model import build_model

    with torch.device("meta"):
        net = build_model(dataclasses.replace(model, backbone_weights=""), DistContext(), num_classes)
    trainable = [p for p in net.parameters() if p.requires_grad]
    return ModelSize(params=sum(p.numel() for p in trainable), tensors=len(trainable),
                     bn_channels=tuple(m.num_features for m in net.modules() if isinstance(m, cgbn.CrossGPUBatchNorm2d)))


def paper_sizes() -> dict[str, ModelSize]:
    """R50-FPN as the paper trains it: frozen BN with stem and stage 1 frozen (16-base), or every layer."""
    return {"frozen": model_size(ModelConfig(norm="frozen", trainable_layers=3)),
            "cgbn": model_size(ModelConfig(norm="cgbn", trainable_layers=5))}


@dataclass(frozen=True)
class Table3Result:
    fitted: Platform
    rows: tuple[tuple[PaperRow, str, float, Prediction], ...]  # (row, role, paper s/iter, prediction)

    def held_out(self) -> list[tuple[PaperRow, float]]:
        """(row, relative error of the predicted hours) of the rows on 16-128 GPUs."""
        return [(row, p.hours / row.hours - 1) for row, role, _, p in self.rows if role == "held out"]


def check_table3(sizes: dict[str, ModelSize], links: Platform = PAPER_LINKS) -> Table3Result:
    """Fit the compute constants on Table 3's 8-GPU rows only (links given), predict every row."""
    jobs = [paper_job(r, sizes) for r in TABLE3]
    seconds = [paper_seconds_per_iteration(r, j) for r, j in zip(TABLE3, jobs)]
    fit = [i for i, r in enumerate(TABLE3) if r.gpus == 8]
    fitted = fit_platform([jobs[i] for i in fit], [seconds[i] for i in fit], links, [8] * len(fit))
    rows = []
    for i, (row, job) in enumerate(zip(TABLE3, jobs)):
        role = "fit" if i in fit else ("held out" if row.gpus > 8 else "held out, < 8 GPUs")
        rows.append((row, role, seconds[i], predict(job, fitted, *nodes_of(row))))
    return Table3Result(fitted, tuple(rows))


def table3(measured: dict | None) -> int:
    sizes = paper_sizes()
    result = check_table3(sizes)
    f, links = result.fitted, PAPER_LINKS
    print(f"Fitted on the 8 rows on 8 GPUs: t = {f.image_s:.3f} s per image (trainable BN), frozen BN "
          f"x{f.frozen_factor:.2f}, sub-linear memory x{f.sublinear_factor:.2f}, c = {f.iteration_s:.3f} s per "
          f"iteration, CGBN collective {f.bn_latency_s * 1e3:.2f} ms.")
    print(f"Links ASSUMED (PAPER_LINKS): {links.intra_bw / 1e9:g} GB/s and {links.intra_latency_s * 1e6:g} us a ring "
          f"step in a node, {links.inter_bw / 1e9:g} GB/s and {links.inter_latency_s * 1e6:g} us between nodes, one "
          f"allreduce per gradient tensor ({sizes['cgbn'].tensors} tensors, {sizes['cgbn'].params / 1e6:.1f} M "
          f"parameters).")
    print(f"\n{'batch':>11} {'BN':>3} {'GPUs':>4} {'img/GPU':>7} {'paper s/it':>10} {'model s/it':>10} "
          f"{'paper h':>8} {'model h':>8} {'error':>7}  role")
    for row, role, sec, p in result.rows:
        print(f"{row.label:>11} {row.bn_size:>3} {row.gpus:>4} {row.images_per_gpu:>7} {sec:>10.3f} "
              f"{p.iteration.total:>10.3f} {row.hours:>8.1f} {p.hours:>8.1f} {p.hours / row.hours - 1:>+7.1%}  {role}")
    held = result.held_out()
    over = [f"{r.label}/BN{r.bn_size}/{r.gpus} GPUs ({e:+.1%})" for r, e in held if abs(e) > 0.2]
    print(f"\nHeld-out rows (16-128 GPUs): {len(held) - len(over)} of {len(held)} within 20%, worst "
          f"{max(abs(e) for _, e in held):.1%}" + (f"; beyond 20%: {', '.join(over)}" if over else ""))
    sweep = []
    for us in PAPER_LATENCY_SWEEP_US:
        errors = [e for _, e in check_table3(sizes, dataclasses.replace(links, inter_latency_s=us * 1e-6)).held_out()]
        sweep.append(f"{us} us: {sum(abs(e) <= 0.2 for e in errors)}/{len(errors)} within 20%, worst "
                     f"{max(abs(e) for e in errors):.1%}")
    print(f"  The same with another (assumed) latency of an inter-node ring step: {'; '.join(sweep)}.")
    by_setup: dict[tuple[int, int, int], list[float]] = {}
    for row, _, sec, _ in result.rows:
        by_setup.setdefault((row.batch, row.bn_size, row.gpus), []).append(sec)
    spread = max(max(v) / min(v) - 1 for v in by_setup.values() if len(v) > 1)
    print(f"  For scale: rows of the same batch, BN size and GPUs under the normal and the long policy differ "
          f"by up to {spread:.0%} in the paper's own seconds per iteration.")
    one = [(row.gpus, sec) for row, _, sec, _ in result.rows if row.images_per_gpu == 1]
    slope = np.polyfit([g for g, _ in one], [sec for _, sec in one], 1)[0]
    print(f"  Rows on 2 and 4 GPUs (outside the goal): at 1 image per GPU the paper's iteration takes "
          f"{', '.join(f'{sec:.2f}' for _, sec in one)} s on {', '.join(str(g) for g, _ in one)} GPUs, "
          f"{slope:+.2f} s per GPU added inside one machine; a ring's cost is flat in the GPU count, so the model, "
          f"fitted at 8, over-predicts them.")
    h100_table(measured, sizes)
    return 0


def assumed_h100_step() -> dict:
    return {"step_time_s": D2_V100_STEP_S / H100_OVER_V100, "images_per_gpu": D2_IMAGES, "norm": "frozen",
            "sublinear_memory": False,
            "device": f"ASSUMED: detectron2's {D2_V100_STEP_S} s/iter on a V100 / {H100_OVER_V100:g} for an H100"}


def h100_table(measured: dict | None, sizes: dict[str, ModelSize]) -> None:
    """Table 3's rows on H100 nodes. The paper platform's fitted factors are not carried over: its
    frozen-BN row alone sets the frozen factor, and sub-linear memory is not needed on 80 GB."""
    measured = measured or assumed_h100_step()
    t = image_time_from_step(measured["step_time_s"], measured["images_per_gpu"], H100_LINKS,
                             measured["norm"], measured["sublinear_memory"])
    platform = dataclasses.replace(H100_LINKS, image_s=t)
    if "cgbn_extra_s" in measured:  # measured: the 1-rank CGBN row's extra time over 2 collectives a layer
        layers = len(sizes["cgbn"].bn_channels)
        platform = dataclasses.replace(platform, bn_latency_s=max(measured["cgbn_extra_s"], 0.0) / (2 * layers))
    print(f"\n8-GPU H100 nodes, 400 Gb/s InfiniBand (H100_LINKS, assumed). Per-GPU step: {measured['step_time_s']:.3f} s "
          f"at {measured['images_per_gpu']} images, {measured['norm']} BN ({measured['device'] or 'device not named'})"
          f" -> {t * 1e3:.1f} ms per image with trainable BN. CGBN collective {platform.bn_latency_s * 1e3:.3g} ms "
          + ("(measured: 1-rank CGBN row - local BN row, / 2 per layer)" if "cgbn_extra_s" in measured else
             "(assumed: one Horovod cycle)") + ". No sub-linear memory: 80 GB hold 8 images of 800x1333.")
    print(f"{'batch':>11} {'BN':>3} {'GPUs':>4} {'nodes':>5} {'s/iter':>7} {'cgbn':>6} {'allreduce':>9} "
          f"{'hours':>6} {'paper h':>7} {'efficiency':>10}")
    for row in TABLE3:
        nodes, per_node = nodes_of(row)
        p = predict(paper_job(row, sizes, sublinear=False), platform, nodes, per_node)
        print(f"{row.label:>11} {row.bn_size:>3} {row.gpus:>4} {nodes:>5} {p.iteration.total:>7.3f} "
              f"{p.iteration.cgbn:>6.3f} {p.iteration.allreduce:>9.4f} {p.hours:>6.2f} {row.hours:>7.1f} "
              f"{p.efficiency:>10.0%}")


# ---------------------------------------------------------------------------------- measured inputs
def read_bench(path: Path) -> dict:
    """A bench_gpu result (keys: see the module docstring)."""
    try:
        raw = json.loads(Path(path).read_text())
        out = {"step_time_s": float(raw["step_time_s"]), "images_per_gpu": int(raw["images_per_gpu"]),
               "norm": raw.get("norm", "cgbn"), "sublinear_memory": bool(raw.get("sublinear_memory", False)),
               "device": raw.get("device", "")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a bench_gpu result ({type(err).__name__}: {err}); expected "
                         f"{{\"step_time_s\": s, \"images_per_gpu\": n, ...}}") from None
    if out["step_time_s"] <= 0 or out["images_per_gpu"] < 1 or out["norm"] not in ("frozen", "local", "cgbn"):
        raise ValueError(f"{path}: step_time_s must be > 0, images_per_gpu >= 1, norm frozen|local|cgbn")
    if raw.get("dry_run"):
        raise ValueError(f"{path}: a dry run (CPU or toy sizes), not a GPU's figures")
    # bench_gpu's CGBN on a 1-rank process set minus local BN, same images and precision: what the
    # per-layer Horovod collectives cost on that GPU, no network involved.
    rows = {r.get("name"): r for r in raw.get("rows", []) if isinstance(r, dict)}
    cgbn, local = rows.get("hvd_cgbn1/fp32"), rows.get("hvd_local/fp32")
    if cgbn and local and cgbn.get("images_per_gpu") == local.get("images_per_gpu"):
        out["cgbn_extra_s"] = float(cgbn["step_time_s"]) - float(local["step_time_s"])
    return out


def read_run_log(path: Path) -> dict:
    """Median step time of a run's ``train`` records (the first left out: warm-up) and its images per GPU."""
    from hvd_megdet.metrics import read_log

    train, start = read_log(path, "train"), read_log(path, "start")
    if not train or not start:
        raise ValueError(f"{path}: no 'start' and 'train' records to read a step time from")
    times = [r["step_time"] for r in (train[1:] or train)]
    run = start[-1]
    measured = {"step_time_s": statistics.median(times), "images_per_gpu": run["global_batch"] // run["world_size"],
                "norm": "cgbn", "sublinear_memory": False, "device": f"{run.get('device', '?')} x{run['world_size']}"}
    config = Path(path).parent / "config.yaml"
    if config.exists():
        cfg = load_config(config)
        measured.update(norm=cfg.model.norm, sublinear_memory=cfg.model.sublinear_memory)
    return measured


def job_from_config(cfg: Config, dataset_images: int) -> Job:
    size = model_size(cfg.model)
    return Job(images_per_gpu=cfg.data.images_per_rank, grad_params=size.params, grad_tensors=size.tensors,
               bn_channels=size.bn_channels,
               norm=cfg.model.norm, bn_group=cfg.model.bn_group_size, sublinear=cfg.model.sublinear_memory,
               backward_passes=cfg.solver.backward_passes_per_step,
               grad_bytes_per_param=2 if cfg.solver.fp16_allreduce else 4, loader_cores=max(cfg.data.num_workers, 1),
               epochs_policy=cfg.solver.policy, dataset_images=dataset_images)


# -------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table3", action="store_true", help="fit on Table 3's 8-GPU rows, predict the rest, then H100")
    parser.add_argument("--config", default="configs/megdet_bs16_bn16.yaml")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nodes", default="1,2,4,8,16", help="comma-separated node counts")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES, help="training images")
    source = parser.add_argument_group("per-GPU step time (one of; --table3 defaults to the newest "
                                       "benchmarks/results/bench_gpu*.json, else an assumed one)")
    source.add_argument("--step-time", type=float, help="seconds per step on one GPU, with --images-per-gpu")
    source.add_argument("--images-per-gpu", type=int, default=2)
    source.add_argument("--measured-norm", default="cgbn", choices=("frozen", "local", "cgbn"))
    source.add_argument("--measured-sublinear", action="store_true")
    source.add_argument("--from-log", type=Path, help="a run's log.jsonl")
    source.add_argument("--from-bench", type=Path, help="a bench_gpu JSON result")
    links = parser.add_argument_group("platform (defaults: 8-GPU H100 nodes, 400 Gb/s InfiniBand)")
    links.add_argument("--intra-gbps", type=float, default=H100_LINKS.intra_bw * 8e-9)
    links.add_argument("--intra-latency-us", type=float, default=H100_LINKS.intra_latency_s * 1e6)
    links.add_argument("--inter-gbps", type=float, default=H100_LINKS.inter_bw * 8e-9, help="per node")
    links.add_argument("--inter-latency-us", type=float, default=H100_LINKS.inter_latency_s * 1e6)
    links.add_argument("--bn-latency-us", type=float, default=H100_LINKS.bn_latency_s * 1e6,
                       help="one CGBN collective (through Horovod: about one HOROVOD_CYCLE_TIME; 0.33 ms measured on CPU at the shipped 0.1)")
    links.add_argument("--sublinear-factor", type=float, default=H100_LINKS.sublinear_factor)
    links.add_argument("--frozen-factor", type=float, default=H100_LINKS.frozen_factor)
    links.add_argument("--decode-ms", type=float, default=H100_LINKS.decode_s * 1e3, help="per image per loader core")
    links.add_argument("--fusion-mb", type=float, default=H100_LINKS.fusion_bytes / 2**20,
                       help="HOROVOD_FUSION_THRESHOLD; 0: one allreduce per gradient tensor")
    return parser


def _platform(args) -> Platform:
    return Platform(image_s=0.0, intra_bw=args.intra_gbps / 8e-9, intra_latency_s=args.intra_latency_us * 1e-6,
                    inter_bw=args.inter_gbps / 8e-9, inter_latency_s=args.inter_latency_us * 1e-6,
                    bn_latency_s=args.bn_latency_us * 1e-6, sublinear_factor=args.sublinear_factor,
                    frozen_factor=args.frozen_factor, decode_s=args.decode_ms * 1e-3,
                    fusion_bytes=args.fusion_mb * 2**20, gpus_per_node=args.gpus_per_node)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = sum(x is not None for x in (args.step_time, args.from_log, args.from_bench))
    if given > 1 or (given == 0 and not args.table3):
        parser.error("give the per-GPU step time: one of --step-time, --from-log, --from-bench (or --table3)")
    try:
        if args.step_time is not None:
            measured = {"step_time_s": args.step_time, "images_per_gpu": args.images_per_gpu,
                        "norm": args.measured_norm, "sublinear_memory": args.measured_sublinear, "device": "given"}
        elif args.from_log or args.from_bench:
            measured = read_run_log(args.from_log) if args.from_log else read_bench(args.from_bench)
        else:  # --table3 alone: a GPU benchmark's result if one was saved, else the assumed H100 step
            found = sorted(Path(__file__).resolve().parent.parent.glob("benchmarks/results/bench_gpu*.json"))
            measured = None
            if found:
                try:
                    measured = read_bench(found[-1])
                except ValueError as err:  # a result in another layout: say so, and plan on the assumed step
                    print(f"warning: {err}; using the assumed H100 step time", file=sys.stderr)
        if args.table3:
            return table3(measured)
        cfg = load_config(args.config, args.set)
        nodes = [int(n) for n in args.nodes.split(",") if n]
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    platform = _platform(args)
    platform = dataclasses.replace(platform, image_s=image_time_from_step(
        measured["step_time_s"], measured["images_per_gpu"], platform, measured["norm"], measured["sublinear_memory"]))
    job = job_from_config(cfg, args.images)
    print(f"{args.config}: {job.images_per_gpu} images/GPU x {job.backward_passes} pass(es), norm {job.norm}, "
          f"sub-linear memory {'on' if job.sublinear else 'off'}, {job.grad_params / 1e6:.1f} M trainable parameters "
          f"({job.grad_bytes_per_param} bytes each on the wire), {len(job.bn_channels)} CGBN layers, "
          f"policy {job.epochs_policy}")
    print(f"t = {platform.image_s * 1e3:.1f} ms per image from {measured['step_time_s']} s per step at "
          f"{measured['images_per_gpu']} images/GPU {measured['device']}".rstrip())
    print(f"{'nodes':>5} {'GPUs':>5} {'batch':>6} {'compute':>8} {'cgbn':>7} {'allreduce':>9} {'data':>6} {'s/iter':>7} "
          f"{'iters':>7} {'hours':>7} {'efficiency':>10}")
    for n in nodes:
        try:
            p = predict(job, platform, n, args.gpus_per_node)
        except ValueError as err:
            print(f"{n:>5}  {err}")
            continue
        it = p.iteration
        print(f"{n:>5} {p.gpus:>5} {p.global_batch:>6} {it.compute:>8.3f} {it.cgbn:>7.3f} {it.allreduce:>9.4f} "
              f"{it.data:>6.3f} {it.total:>7.3f} {p.iterations:>7} {p.hours:>7.2f} {p.efficiency:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
