"""The time model behind ``plan``: seconds per iteration, hours to train and scaling efficiency.

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

Every term is a pure function of a :class:`Job` (what one rank does, from a config) and a
:class:`Platform` (the cluster's constants); plan_table3 fits the constants, plan reads them from
the command line.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hvd_megdet import lr_schedule
from hvd_megdet.config import ModelConfig

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



# H100 nodes: 8 GPUs on NVLink (300 GB/s allreduce bus bandwidth, below NCCL's ~360-480 GB/s), one
# 400 Gb/s InfiniBand port per node (50 GB/s), 5 us a ring step, Horovod's default 128 MB tensor
# fusion; a CGBN collective costs about one Horovod cycle: 0.33 ms per synchronous call measured on
# CPU at the HOROVOD_CYCLE_TIME=0.1 that comm.init ships (1.08 ms at Horovod's stock 1 ms;
# docs/benchmarks.md), the GPU's wait for the layer's kernels not included; trainable BN 1.1x the
# compute of frozen BN (BN layers are memory-bound, ~10% of a ResNet step). All assumed, not measured
# on an H100. The command line's default platform, and plan_table3's for today's nodes.
H100_LINKS = Platform(image_s=0.0, intra_bw=300e9, intra_latency_s=5e-6, inter_bw=50e9, inter_latency_s=5e-6,
                      bn_latency_s=3.3e-4, decode_s=0.02, frozen_factor=1 / 1.1)


@dataclass(frozen=True)
class ModelSize:
    params: int                      # trainable parameters
    tensors: int                     # trainable parameter tensors
    bn_channels: tuple[int, ...]     # channels of each CGBN layer


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

