"""Training throughput on the CPU: 1 vs 2 ranks, frozen vs local vs CGBN, sub-linear memory on/off.

    python benchmarks/bench_train.py [--steps 4] [--size 160] [--backbone resnet18]

Runs the real model, DistributedOptimizer and train_step on in-memory images (no data loading, so
the figures are the training step's). In one invocation, each job under mpirun:
  1 rank and 2 ranks (CGBN over both), each rank 2 images per step, one thread per rank; 2 ranks
  again with Horovod tuned for saturated CPUs; and two independent 1-rank jobs at once, the
  machine's ceiling for two processes;
  2 ranks with frozen, local and CGBN norm in rotation;
  1 rank, ResNet-50 at 256x256 with and without sub-linear memory: activation memory is the bytes
  autograd keeps for backward at the end of the forward (deduplicated by storage), plus step time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after 1 warm-up)")
    parser.add_argument("--size", type=int, default=160, help="image side for the scaling runs")
    parser.add_argument("--backbone", default="resnet18", help="backbone for the scaling runs")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # set when relaunched under mpirun
    return parser


def _batch(rank: int, size: int, images: int = 2):
    import torch

    gen = torch.Generator().manual_seed(rank)
    imgs = [torch.rand(3, size, size, generator=gen) for _ in range(images)]
    targets = [{"boxes": torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.5, 0.4, 0.9, 0.95]]) * size,
                "labels": torch.tensor([1, 2])} for _ in range(images)]
    return imgs, targets


def _setup(norm: str, args, ctx, backbone=None, sublinear=False, size=None):
    import torch

    from hvd_megdet import comm, engine
    from hvd_megdet.config import ModelConfig
    from hvd_megdet.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone or args.backbone, norm=norm, sublinear_memory=sublinear)
    side = size or args.size
    model = build_model(cfg, ctx, num_classes=4, min_size=side, max_size=side)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    opt = comm.distributed_optimizer(opt, model, ctx)
    comm.broadcast_state(model, opt, ctx)
    settings = engine.StepSettings(1, None, 0.0, "stop", torch.device("cpu"))
    return model, opt, settings


def _timed_steps(model, opt, settings, ctx, batch, steps):
    from hvd_megdet import comm, engine

    times = []
    for i in range(steps + 1):
        comm.barrier(ctx)
        start = time.perf_counter()
        engine.train_step(model, opt, None, [batch], settings, ctx, engine.Progress())
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def job_scaling(args) -> dict:
    """img/s of CGBN training on this job's ranks (1 or 2)."""
    from hvd_megdet import comm

    ctx = comm.init()
    model, opt, settings = _setup("cgbn", args, ctx)
    step = _timed_steps(model, opt, settings, ctx, _batch(ctx.rank, args.size), args.steps)
    step = max(comm.allgather_object(step, ctx))  # a step ends on the slowest rank
    return {"ranks": ctx.size, "step_s": step, "img_per_s": 2 * ctx.size / step}


def job_norms(args) -> dict:
    """2 ranks: frozen vs local vs CGBN, in rotation."""
    from hvd_megdet import comm

    ctx = comm.init()
    runs = {norm: _setup(norm, args, ctx) for norm in ("frozen", "local", "cgbn")}
    batch = _batch(ctx.rank, args.size)
    times = {norm: [] for norm in runs}
    for _ in range(args.steps):
        for norm, (model, opt, settings) in runs.items():
            times[norm].append(_timed_steps(model, opt, settings, ctx, batch, 1))
    med = {norm: max(comm.allgather_object(statistics.median(t), ctx)) for norm, t in times.items()}
    return {norm: {"step_s": s, "img_per_s": 2 * ctx.size / s} for norm, s in med.items()}


def _saved_activation_bytes(model, batch) -> tuple[int, float]:
    """Activation bytes autograd holds for backward after one training forward (parameters, which it
    saves by reference, excluded), and the fwd+bwd time."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(*batch)
    held = sum(storages.values())
    sum(losses.values()).backward()
    return held, time.perf_counter() - start


def job_memory(args) -> dict:
    """1 rank, ResNet-50 at 256x256: sub-linear memory off vs on."""
    import torch

    from hvd_megdet import comm

    ctx = comm.init()
    batch = _batch(0, 256)
    out = {}
    for sublinear in (False, True):
        model, _, _ = _setup("cgbn", args, ctx, backbone="resnet50", sublinear=sublinear, size=256)
        results = []
        for _ in range(args.steps):
            torch.manual_seed(0)
            model.zero_grad()
            results.append(_saved_activation_bytes(model, batch))
        out["on" if sublinear else "off"] = {"saved_mb": results[-1][0] / 2**20,
                                             "step_s": statistics.median(r[1] for r in results)}
    return out


JOBS = {"scaling": job_scaling, "norms": job_norms, "memory": job_memory}


# The 2-rank job runs three ways: as comm.init leaves Horovod on CPU ranks (its stock settings), with
# the short cycle comm.init ships for GPU machines (comm.HOROVOD_DEFAULTS), and tuned for CPU ranks
# that fill every core (Horovod's thread negotiates less often and MPI yields while it waits, so
# both take less CPU from training; what jobs/local/demo.sh sets).
GPU_DEFAULTS_ENV = {"HOROVOD_CYCLE_TIME": "0.1"}
TUNED_ENV = {"HOROVOD_CYCLE_TIME": "10", "OMPI_MCA_mpi_yield_when_idle": "1"}


def _start_job(name: str, np: int, argv: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    sys.path.insert(0, str(ROOT))
    from hvd_megdet.ranks import local_mpirun_command as mpirun_command

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(extra_env or {}))
    cmd = mpirun_command(np) + [sys.executable, __file__, "--job", name, *argv]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, what: str) -> dict:
    out, err = proc.communicate()
    lines = [l.split("RESULT ", 1)[1] for l in out.splitlines() if "RESULT " in l]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{out[-2000:]}\n{err[-4000:]}")
    return json.loads(lines[0])


def _run_job(name: str, np: int, argv: list[str], extra_env: dict | None = None) -> dict:
    return _result(_start_job(name, np, argv, extra_env), f"job {name} on {np} ranks")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if args.job:
        result = JOBS[args.job](args)
        if int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    one = _run_job("scaling", 1, argv)
    two = _run_job("scaling", 2, argv)
    two_gpu_defaults = _run_job("scaling", 2, argv, GPU_DEFAULTS_ENV)
    two_tuned = _run_job("scaling", 2, argv, TUNED_ENV)
    # The machine's own ceiling: two independent 1-rank jobs at once, nothing communicated.
    pair = [_start_job("scaling", 1, argv) for _ in range(2)]
    ceiling = sum(_result(p, "independent 1-rank job")["img_per_s"] for p in pair)
    norms = _run_job("norms", 2, argv)
    memory = _run_job("memory", 1, argv)
    print(f"Faster R-CNN FPN {args.backbone}, 2 images of {args.size}x{args.size} per rank, 1 thread per rank, "
          f"median of {args.steps} steps")
    print(f"  1 rank : {one['img_per_s']:.2f} img/s ({one['step_s']:.2f} s/step)")
    print(f"  2 ranks, Horovod's own settings (comm.init on CPU): {two['img_per_s']:.2f} img/s "
          f"({two['step_s']:.2f} s/step)  speed-up {two['img_per_s'] / one['img_per_s']:.2f}x (goal >= 1.7x)")
    print(f"  2 ranks, HOROVOD_CYCLE_TIME=0.1 (comm.init's GPU default): {two_gpu_defaults['img_per_s']:.2f} img/s  "
          f"speed-up {two_gpu_defaults['img_per_s'] / one['img_per_s']:.2f}x; vs Horovod's own "
          f"{two_gpu_defaults['img_per_s'] / two['img_per_s']:.2f}x")
    print(f"  2 ranks, HOROVOD_CYCLE_TIME=10 OMPI_MCA_mpi_yield_when_idle=1: {two_tuned['img_per_s']:.2f} img/s  "
          f"speed-up {two_tuned['img_per_s'] / one['img_per_s']:.2f}x")
    print(f"  ceiling: 2 independent 1-rank jobs at once (no communication): {ceiling:.2f} img/s  "
          f"{ceiling / one['img_per_s']:.2f}x")
    local = norms["local"]["step_s"]
    for norm in ("frozen", "local", "cgbn"):
        print(f"  2 ranks, {norm:6s}: {norms[norm]['img_per_s']:.2f} img/s, step {norms[norm]['step_s'] / local:.2f}x local")
    off, on = memory["off"], memory["on"]
    print("ResNet-50 FPN, 2 images of 256x256, sub-linear memory off -> on:")
    print(f"  activation memory held for backward: {off['saved_mb']:.0f} MB -> {on['saved_mb']:.0f} MB "
          f"({on['saved_mb'] / off['saved_mb']:.2f}x, goal <= 0.6x)")
    print(f"  step time: {off['step_s']:.2f} s -> {on['step_s']:.2f} s ({on['step_s'] / off['step_s']:.2f}x, goal <= 1.35x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
