"""One rank of benchmarks/rehearse_scale.py (started by mpirun; not meant to be run by hand).

    python benchmarks/_rehearse_rank.py checks --shards DIR --out DIR [--steps 3] [--model tiny]
    python benchmarks/_rehearse_rank.py train --config configs/smoke_cpu.yaml --set ...

``checks`` times start-up and training steps and takes the measurements the driver judges: BN group
membership, the CGBN statistics against float64 BN over the host's images, the gradients after
Horovod's averaging, and the images each rank's batches hold. Each rank writes ``rank<r>.json``.

``train`` is the real trainer (``hvd_megdet.train.main``) with :func:`tiny_detector` in place of
``build_model``. Memory decides the model: importing torch and torchvision costs ~370 MB of private
pages per process (measured), 12 GB for 32 ranks; a ResNet-18 Faster R-CNN (28 M parameters: weights,
gradients, momentum, Horovod's fusion buffer and activations, ~0.6 GB per rank, estimated) would take
32 ranks past 24 GiB. The tiny detector has 0.2 M.

Everything in this file is torch-side; the driver (rehearse_scale.py) never imports torch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from collections import OrderedDict
from pathlib import Path

T0 = float(os.environ.get("REHEARSE_T0", time.time()))  # the driver's clock just before mpirun starts
T_START = time.time()  # this interpreter is up (python itself + this file, before torch)

import torch  # noqa: E402  (the import's cost is one of the measurements)
import torchvision  # noqa: E402,F401

torch.set_num_threads(1)  # 32 ranks share 2 cores: one intra-op thread each
T_IMPORTED = time.time()

from torch import nn  # noqa: E402

from hvd_megdet import cgbn, comm, engine  # noqa: E402
from hvd_megdet.fileio import atomic_write_text  # noqa: E402

WATCHED_BN = ("backbone.body.stem.1", "backbone.body.layer2.4", "backbone.body.layer4.4")  # tiny detector
WATCHED_BN_RESNET = ("backbone.body.bn1", "backbone.body.layer2.0.bn1", "backbone.body.layer4.1.bn2")


# ------------------------------------------------------------------------------------------- model
def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def tiny_detector(ctx: comm.DistContext, num_classes: int, min_size: int, max_size: int,
                  norm: str = "cgbn") -> nn.Module:
    """torchvision Faster R-CNN with FPN on a 10-BN-layer trunk of strides 4..32 (~0.2 M parameters).

    The norm layers are this package's (``cgbn.convert_norm``, as ``model.build_backbone`` converts
    ResNet stages), over ``ctx.bn_process_set`` for ``norm="cgbn"``; everything else is torchvision's:
    anchors, RPN, RoIAlign, box head, losses. Only the widths are small.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    widths = (8, 16, 24, 32, 48)
    trunk = nn.Sequential(OrderedDict(
        [("stem", _stage(3, widths[0], 2))] +
        [(f"layer{i}", _stage(widths[i - 1], widths[i], 2)) for i in range(1, 5)]))
    process_set = ctx.bn_process_set if norm == "cgbn" else None
    cgbn.convert_norm(trunk, "frozen" if norm == "frozen" else "cgbn", process_set)
    backbone = BackboneWithFPN(trunk, return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
                               in_channels_list=list(widths[1:]), out_channels=32, extra_blocks=LastLevelMaxPool())
    model = FasterRCNN(backbone, num_classes=None, min_size=min_size, max_size=max_size,
                       box_head=TwoMLPHead(32 * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, num_classes),
                       rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, box_batch_size_per_image=128)
    for name, module in model.named_modules():  # collective names from the module path, as build_model
        if isinstance(module, cgbn.CrossGPUBatchNorm2d):
            module.collective_name = f"cgbn.{name}"
    return model


def build(kind: str, ctx: comm.DistContext, num_classes: int, size: tuple[int, int]) -> nn.Module:
    if kind == "tiny":
        return tiny_detector(ctx, num_classes, *size)
    from hvd_megdet.config import ModelConfig
    from hvd_megdet.model import build_model

    return build_model(ModelConfig(backbone=kind, norm="cgbn"), ctx, num_classes, min_size=size[0], max_size=size[1])


# ------------------------------------------------------------------------------------------ memory
def memory_mb() -> dict[str, float]:
    """Peak resident set (VmHWM, shared library pages included) and this process's private and
    proportional shares now (what one more rank really costs)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")[0], line.split()[1]
        if key in ("Pss", "Private_Dirty", "Private_Clean", "Rss"):
            out[key] = int(value) / 1024
    out["private"] = out.pop("Private_Dirty") + out.pop("Private_Clean")
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ------------------------------------------------------------------------------------------ checks
def membership(ctx: comm.DistContext, model: nn.Module) -> dict:
    """Where this rank thinks it is, the ranks its BN set really reduces over, and its layers' sets."""
    onehot = torch.zeros(ctx.size, dtype=torch.float64)
    onehot[ctx.rank] = 1.0
    # dist(bn set): the sum is nonzero exactly at the ranks that take part in this rank's set.
    summed = comm.allreduce_sum_(onehot, ctx.bn_process_set, name="rehearse.membership")
    layers = [m for m in model.modules() if isinstance(m, cgbn.CrossGPUBatchNorm2d)]
    return {"host_index": ctx.host_index, "num_hosts": ctx.num_hosts, "host_rank": ctx.host_rank,
            "host_size": ctx.host_size, "bn_ranks": list(ctx.bn_ranks),
            "set_ranks": list(getattr(ctx.bn_process_set, "ranks", None) or []),
            "reduced_over": [r for r, v in enumerate(summed.tolist()) if v != 0],
            "cgbn_layers": len(layers),
            "layers_on_set": sum(m.process_set is ctx.bn_process_set and m.process_set is not None for m in layers)}


def _channel_moments(xs: list, dims=(0, 2, 3)):
    """float64 (count, mean, biased var) per channel over a list of N x C x H x W arrays."""
    import numpy as np

    flat = np.concatenate([x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1) for x in xs], axis=1)
    return flat.shape[1], flat.mean(axis=1), flat.var(axis=1)


def bn_statistics(layer: cgbn.CrossGPUBatchNorm2d, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, running_before: torch.Tensor, host_comm, world_comm, updates: int = 1) -> dict:
    """This rank's CGBN output against float64 BN whose statistics come from every image of the host,
    gathered with mpi4py (not Horovod); the same against the world's and the rank's own images, to
    show the tolerance tells the groups apart. Also the running mean's update."""
    import numpy as np

    x64 = x.detach().double().numpy()
    mine = _channel_moments([x64])
    host = _channel_moments(host_comm.allgather(x64))  # mpi4py: the inputs of this host's ranks
    world_parts = world_comm.allgather((mine[0], mine[1] * mine[0], (mine[2] + mine[1] ** 2) * mine[0]))
    n = sum(p[0] for p in world_parts)
    world_mean = sum(p[1] for p in world_parts) / n
    world = (n, world_mean, sum(p[2] for p in world_parts) / n - world_mean ** 2)
    w, b = weight.double().numpy(), bias.double().numpy()
    y64 = y.detach().double().numpy()

    def error(stats) -> float:
        _, mean, var = stats
        ref = (x64 - mean[None, :, None, None]) / np.sqrt(var + layer.eps)[None, :, None, None]
        return float(np.abs(y64 - (ref * w[None, :, None, None] + b[None, :, None, None])).max())

    count, mean, var = host
    expected_running = running_before.double().numpy()
    for _ in range(updates):
        expected_running = (1 - layer.momentum) * expected_running + layer.momentum * mean
    return {"count": count, "err_host": error(host), "err_world": error(world), "err_local": error(mine),
            "running_mean_err": float(np.abs(layer.running_mean.double().numpy() - expected_running).max()),
            "y_max": float(np.abs(y64).max())}


def gradient_checks(model, optimizer, batch, ctx, world_comm, seed: int) -> dict:
    """The gradients Horovod leaves after a step's backward, against the float64 mean over the world
    of each rank's own gradients (mpi4py Allreduce); and fingerprints of gradients and weights."""
    import numpy as np
    from mpi4py import MPI

    images, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    # Pass A: this rank's own gradients. autograd.grad accumulates nothing, so Horovod's
    # accumulate-grad hooks stay silent; CGBN's own backward collective runs as in training.
    torch.manual_seed(seed)
    loss_a = sum(model(images, targets).values())
    local = torch.autograd.grad(loss_a, params, allow_unused=True)
    local = np.concatenate([(g if g is not None else torch.zeros_like(p)).double().flatten().numpy()
                            for g, p in zip(local, params)])
    reference = np.empty_like(local)
    world_comm.Allreduce(local, reference, op=MPI.SUM)
    reference /= ctx.size
    # Pass B: the training path. Same RNG, so the same proposals and samples as pass A.
    torch.manual_seed(seed)
    optimizer.zero_grad()
    loss_b = sum(model(images, targets).values())
    loss_b.backward()
    comm.synchronize_gradients(optimizer)  # dist(world): Horovod's averaged gradients, now
    averaged = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    with comm.optimizer_skip_synchronize(optimizer):
        optimizer.step()
    weights = torch.cat([p.detach().flatten() for p in params])
    scale = float(np.abs(reference).max())
    return {"loss_a": loss_a.item(), "loss_b": loss_b.item(), "params": int(averaged.numel()),
            "grad_err": float(np.abs(averaged.double().numpy() - reference).max()) / scale,
            "grad_scale": scale, "local_vs_mean": float(np.abs(local - reference).max()) / scale,
            "grad_sha": hashlib.sha256(averaged.numpy().tobytes()).hexdigest(),
            "weight_sha": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}


def consumed_image_ids(loader, epochs: int) -> tuple[dict[int, list[int]], list]:
    """The image ids this rank's loader yields in each epoch (the trainer's sampler chain), and the
    first batch of epoch 0 (the one the timed steps train on)."""
    seen, first = {}, None
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch, start=0)
        seen[epoch] = []
        for images, targets in loader:
            first = first or (images, targets)
            seen[epoch] += [int(t["image_id"]) for t in targets]
    return seen, first


def grouped_image_ids(batch_sampler, image_ids: list[int], epochs: int) -> dict[int, list[int]]:
    """The image ids of this rank's aspect-grouped batches in each epoch (indices only: no decoding)."""
    seen = {}
    for epoch in range(epochs):
        batch_sampler.set_epoch(epoch, start=0)
        seen[epoch] = [image_ids[i] for batch in batch_sampler.batches() for i in batch]
    return seen


def run_checks(args) -> tuple[comm.DistContext, dict]:
    from mpi4py import MPI

    from hvd_megdet.data import (DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset,
                                 ShardedCocoDataset, build_transforms, collate_fn)

    ctx = comm.init()
    t_init = time.time()
    world = MPI.COMM_WORLD
    host_comm = world.Split(color=ctx.host_index, key=ctx.rank)  # mpi4py's own view of the host group

    # Data as train.run builds it (num_workers=0: a worker per rank would double 32 imports), once
    # with data.aspect_ratio_grouping=false (every image one group, as train.run passes it) and once
    # with the aspect groups of the configs' default.
    dataset = ShardedCocoDataset(args.shards, transforms=build_transforms(True, args.min_size, args.max_size, 0.5))

    def batch_sampler_for(ratios):
        sampler = DistributedShardSampler(dataset, ctx.rank, ctx.size, seed=args.seed)
        return GroupedBatchSampler(sampler, ratios, args.images_per_rank)

    loader = torch.utils.data.DataLoader(SeededDataset(dataset, args.seed), num_workers=0, collate_fn=collate_fn,
                                         batch_sampler=EpochTagged(batch_sampler_for([1.0] * len(dataset))))
    seen, batch = consumed_image_ids(loader, args.epochs)
    grouped = grouped_image_ids(batch_sampler_for(dataset.aspect_ratios()), dataset.image_ids, args.epochs)

    torch.manual_seed(args.seed)
    model = build(args.model, ctx, dataset.num_classes, (args.min_size, args.max_size))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    optimizer = comm.distributed_optimizer(optimizer, model, ctx)
    comm.broadcast_state(model, optimizer, ctx)
    model.train()
    t_built = time.time()

    settings = engine.StepSettings(1, None, 0.0, "stop", torch.device("cpu"))
    progress = engine.Progress()
    step_times = []
    for _ in range(args.steps + 1):
        start = time.time()
        engine.train_step(model, optimizer, None, [batch], settings, ctx, progress)
        step_times.append(time.time() - start)
        if len(step_times) == 1:
            t_first_step = time.time()
    # The measurements the driver judges (after the timed steps, so they do not delay the first).
    names = WATCHED_BN if args.model == "tiny" else WATCHED_BN_RESNET
    layers = dict(model.named_modules())
    captured, before = {}, {n: layers[n].running_mean.clone() for n in names}

    def keep_first(name):
        def hook(module, inputs, output):  # copies: the ReLU after each BN works in place on its output,
            captured.setdefault(name, (inputs[0].detach().clone(), output.detach().clone(),  # and the step
                                       module.weight.detach().clone(), module.bias.detach().clone()))  # on w, b
        return hook

    hooks = [layers[n].register_forward_hook(keep_first(n)) for n in names]
    grads = gradient_checks(model, optimizer, batch, ctx, world, seed=1000 + ctx.rank)
    for h in hooks:
        h.remove()
    # Passes A and B see the same images, so each moves the running mean once towards the same
    # group mean: bn_statistics expects two updates.
    bn = {n: bn_statistics(layers[n], *captured[n], before[n], host_comm, world, updates=2) for n in names}
    return ctx, {
        "rank": ctx.rank, "size": ctx.size, "hostname_groups": ctx.num_hosts,
        "times": {"python_up": T_START - T0, "imported": T_IMPORTED - T0, "initialised": t_init - T0,
                  "built": t_built - T0, "first_step": t_first_step - T0, "done": time.time() - T0},
        "step_times": step_times[1:], "membership": membership(ctx, model), "bn": bn, "grads": grads,
        "seen": seen, "grouped": grouped, "memory": memory_mb(),
    }


# ------------------------------------------------------------------------------------------- train
def run_trainer(argv: list[str]) -> int:
    """``python -m hvd_megdet.train ARGV`` with the tiny detector (see the module docstring)."""
    from hvd_megdet import train

    if not hasattr(train, "build_model"):
        raise RuntimeError("hvd_megdet.train no longer calls build_model by that name: update _rehearse_rank.py")

    def build_model(model_cfg, ctx, num_classes, *, min_size, max_size):  # model.build_model's signature
        return tiny_detector(ctx, num_classes, min_size, max_size, norm=model_cfg.norm)

    train.build_model = build_model
    return train.main(argv)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("checks", "train"))
    parser.add_argument("--shards", help="training shards (checks)")
    parser.add_argument("--out", help="directory for rank<r>.json (checks)")
    parser.add_argument("--model", default="tiny", help="tiny, or a ResNet name for build_model (memory permitting)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of sampler output to record")
    parser.add_argument("--images-per-rank", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=48)
    parser.add_argument("--max-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    return parser


def main() -> int:
    if sys.argv[1:2] == ["train"]:
        return run_trainer(sys.argv[2:])
    args = get_args_parser().parse_args()
    ctx, result = run_checks(args)
    atomic_write_text(Path(args.out) / f"rank{ctx.rank}.json", json.dumps(result) + "\n")
    comm.barrier(ctx)  # leave together: one rank's exit shuts Horovod down for all
    comm.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
