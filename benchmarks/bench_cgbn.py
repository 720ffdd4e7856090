"""CGBN vs the `local` layer vs nn.BatchNorm2d vs frozen BN: fwd + bwd of a ResNet-50 trunk on 2 ranks.

    python benchmarks/bench_cgbn.py [--iters 6] [--images 2] [--size 256]

Relaunches itself under ``mpirun -np 2`` (one CGBN group of both ranks). Each rank runs the norm
modes in rotation (so machine load drifts hit all of them alike) and reports the median step time
per mode (slowest rank), the ratios to `local`, and the collectives per BN layer per step. Modes:
  frozen        torchvision FrozenBatchNorm2d (fixed statistics, no batch statistics at all)
  BatchNorm2d   torch's nn.BatchNorm2d on each rank's own images
  local         what training uses for model.norm=local: CrossGPUBatchNorm2d without a process set
  cgbn          CrossGPUBatchNorm2d over both ranks: its statistics through Horovod's allreduce on
                the BN process set
Horovod and MPI run at the settings ``comm.init`` ships (``comm.HOROVOD_DEFAULTS``) unless the
environment sets them: ``HOROVOD_CYCLE_TIME=1 python benchmarks/bench_cgbn.py`` gives Horovod's own.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--images", type=int, default=2, help="images per rank")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--np", type=int, default=2, help="ranks (one CGBN group)")
    return parser


def _relaunch(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from hvd_megdet.ranks import local_mpirun_command

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    cmd = local_mpirun_command(args.np) + [sys.executable, __file__, *sys.argv[1:]]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def _trunk():
    import torch
    import torchvision

    torch.manual_seed(0)
    # torchvision's resnet50 is built with nn.BatchNorm2d; convert_norm replaces it for the other modes.
    resnet = torchvision.models.resnet50(weights=None)
    return torch.nn.Sequential(*list(resnet.children())[:-2])  # everything up to C5


MODES = ("frozen", "BatchNorm2d", "local", "cgbn")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return _relaunch(args)

    import torch

    from hvd_megdet import comm
    from hvd_megdet.cgbn import convert_norm

    ctx = comm.init()
    calls = {"n": 0}
    real_allreduce = comm.allreduce_sum_

    def counting_allreduce(tensor, process_set, name=None):
        calls["n"] += process_set is not None  # only what communicates
        return real_allreduce(tensor, process_set, name)

    comm.allreduce_sum_ = counting_allreduce  # what the CGBN layers call
    models = {"frozen": convert_norm(_trunk(), "frozen"), "BatchNorm2d": _trunk(),
              "local": convert_norm(_trunk(), "local"), "cgbn": convert_norm(_trunk(), "cgbn", ctx.bn_process_set)}
    num_bn = sum(1 for m in models["cgbn"].modules() if type(m).__name__ == "CrossGPUBatchNorm2d")
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(ctx.rank))
    times: dict[str, list[float]] = {mode: [] for mode in models}
    collectives: dict[str, int] = {}
    for step in range(args.iters + 1):  # step 0 warms up
        for mode, model in models.items():
            model.zero_grad(set_to_none=True)
            comm.barrier(ctx)  # start together, so waiting on a slow peer is part of the time
            calls["n"] = 0
            start = time.perf_counter()
            model(x).float().square().mean().backward()
            elapsed = time.perf_counter() - start
            collectives[mode] = calls["n"]
            if step:
                times[mode].append(elapsed)
    comm.allreduce_sum_ = real_allreduce
    median = {mode: statistics.median(t) for mode, t in times.items()}
    medians = comm.allgather_object(median, ctx)
    every_time = comm.allgather_object(times, ctx)
    if ctx.is_main:
        worst = {mode: max(m[mode] for m in medians) for mode in median}  # a step ends on the slowest rank
        # The same ratio per rotation (cgbn and local timed back to back), then its median: machine load
        # that drifts between rotations cancels out.
        slowest = {mode: [max(r[mode][i] for r in every_time) for i in range(args.iters)] for mode in MODES}
        paired = statistics.median(c / l for c, l in zip(slowest["cgbn"], slowest["local"]))
        settings = " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in
                            ("HOROVOD_CYCLE_TIME", "HOROVOD_CACHE_CAPACITY", "OMPI_MCA_mpi_yield_when_idle"))
        print(f"ResNet-50 trunk, {ctx.size} ranks x {args.images} images of {args.size}x{args.size}, "
              f"fwd+bwd, median of {args.iters} steps (slowest rank), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
              f"{settings}")
        print(f"{'norm':13s} {'s/step':>8s} {'vs local':>9s} {'collectives/BN layer/step':>27s}")
        for mode in MODES:
            print(f"{mode:13s} {worst[mode]:8.3f} {worst[mode] / worst['local']:8.3f}x "
                  f"{collectives[mode] / num_bn:27.1f}")
        print(f"BN layers: {num_bn}; CGBN/local = {worst['cgbn'] / worst['local']:.3f} (target <= 1.05), "
              f"median of the per-rotation ratios {paired:.3f}; local/BatchNorm2d = "
              f"{worst['local'] / worst['BatchNorm2d']:.3f}")
    comm.barrier(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
