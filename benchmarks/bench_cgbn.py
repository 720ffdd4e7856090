"""CGBN vs local BN vs frozen BN: forward + backward of a ResNet-50 trunk on 2 ranks, side by side.

    python benchmarks/bench_cgbn.py [--iters 6] [--images 2] [--size 256]

Relaunches itself under ``mpirun -np 2`` (one CGBN group of both ranks). Each rank runs the three
norm modes in rotation (so machine load drifts hit all of them alike) and reports the median step
time per mode, the ratios to local BN, and the Horovod collectives per BN layer per step.
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
    from tests.mpirun import mpirun_command

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    cmd = mpirun_command(args.np) + [sys.executable, __file__, *sys.argv[1:]]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def _trunk():
    import torch
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    return torch.nn.Sequential(*list(resnet.children())[:-2])  # everything up to C5


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
        calls["n"] += process_set is not None
        return real_allreduce(tensor, process_set, name)

    comm.allreduce_sum_ = counting_allreduce

    models = {mode: convert_norm(_trunk(), mode, ctx.bn_process_set) for mode in ("frozen", "local", "cgbn")}
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
    median = {mode: statistics.median(t) for mode, t in times.items()}
    medians = comm.allgather_object(median, ctx)
    if ctx.is_main:
        worst = {mode: max(m[mode] for m in medians) for mode in median}  # a step ends on the slowest rank
        print(f"ResNet-50 trunk, {ctx.size} ranks x {args.images} images of {args.size}x{args.size}, "
              f"fwd+bwd, median of {args.iters} steps (slowest rank), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
        print(f"{'norm':8s} {'s/step':>8s} {'vs local':>9s} {'collectives/BN layer/step':>27s}")
        for mode in ("frozen", "local", "cgbn"):
            print(f"{mode:8s} {worst[mode]:8.3f} {worst[mode] / worst['local']:8.2f}x "
                  f"{collectives[mode] / num_bn:27.1f}")
        print(f"BN layers: {num_bn}; CGBN/local = {worst['cgbn'] / worst['local']:.3f} (target <= 1.15)")
    comm.barrier(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
