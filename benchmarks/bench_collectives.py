"""What one CGBN collective costs: Horovod allreduce against the transport (mpi4py) on the BN group.

    python benchmarks/bench_collectives.py [--reps 100] [--iters 4] [--size 160] [--configs a,b,...]
    python benchmarks/bench_collectives.py --hosts node01:1,node02:1 --iters 0   # across two hosts

``--hosts``: one rank on each of two hosts (mpirun -H, TCP between them), the collective over both;
run it on the first host (on the test cluster: ``nsenter -t $(cat DIR/run/node01.pid) -n -u -m``, with
OMPI_MCA_oob_tcp_if_include/btl_tcp_if_include set to the hosts' network, as tests/cluster.py's
``mpi_env`` gives them). The same-host figure is the run without it.

CGBN makes one float64 allreduce per BN layer per direction: 2C+1 elements forward, 2C backward, for
the C = 64..2048 channels of ResNet-50's 53 BN layers. For each configuration below (each one
mpirun -np 2 job, since Horovod and Open MPI read their settings at start-up) this prints:
  - per-operation latency (median of --reps back-to-back synchronous calls, slowest rank), for every
    CGBN packet size, of Horovod's allreduce on the BN process set (``comm.allreduce_sum_``, what CGBN
    calls) and of mpi4py ``Allreduce`` on a communicator of the same ranks (the transport itself);
  - the cost model: sum over the 53 layers of the forward and backward Horovod latency, per step;
  - beside it, the measured step time of a ResNet-50 trunk (fwd+bwd) with CGBN minus with the
    `local` layer (the same layer without a process set), the two in rotation.
Every knob is set explicitly per row (the user's environment is ignored for them); "shipped" sets
none and takes what ``comm.init`` applies (``comm.HOROVOD_DEFAULTS``).
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

# The knobs that decide a small synchronous allreduce's latency (Horovod 0.28.1 common/operations.cc,
# controller.cc):
#   HOROVOD_CYCLE_TIME (ms, default 1): the background thread sleeps until a cycle's start is this far
#     behind it, then negotiates and runs whatever every rank has queued; 0 spins.
#   HOROVOD_CACHE_CAPACITY (default 1024; 0 off): with the response cache a repeated tensor is agreed by
#     a bit-vector allreduce instead of the gather/broadcast of requests at the coordinator.
#   HOROVOD_ENABLE_ASYNC_COMPLETION: GPU ops complete without the background thread waiting on the
#     CUDA event; no effect on CPU tensors (measured to show it).
#   HOROVOD_FUSION_THRESHOLD (bytes, default 128 MiB): a lone synchronous op has nothing to fuse with.
#   OMPI_MCA_mpi_yield_when_idle: Open MPI's progress loop yields the core while waiting, or spins.
KNOBS = ("HOROVOD_CYCLE_TIME", "HOROVOD_CACHE_CAPACITY", "HOROVOD_ENABLE_ASYNC_COMPLETION",
         "HOROVOD_FUSION_THRESHOLD", "OMPI_MCA_mpi_yield_when_idle")
STOCK = {"HOROVOD_CYCLE_TIME": "1", "HOROVOD_CACHE_CAPACITY": "1024", "HOROVOD_ENABLE_ASYNC_COMPLETION": "0",
         "HOROVOD_FUSION_THRESHOLD": str(128 * 2**20), "OMPI_MCA_mpi_yield_when_idle": "0"}
CONFIGS: dict[str, dict[str, str] | None] = {
    "stock": STOCK,  # Horovod 0.28.1's and Open MPI's own defaults, spelled out
    "cycle=0 (spin)": {**STOCK, "HOROVOD_CYCLE_TIME": "0"},
    "cycle=0.05": {**STOCK, "HOROVOD_CYCLE_TIME": "0.05"},
    "cycle=0.1": {**STOCK, "HOROVOD_CYCLE_TIME": "0.1"},
    "cycle=0.2": {**STOCK, "HOROVOD_CYCLE_TIME": "0.2"},
    "cycle=0.5": {**STOCK, "HOROVOD_CYCLE_TIME": "0.5"},
    "cycle=5": {**STOCK, "HOROVOD_CYCLE_TIME": "5"},
    "cycle=10 yield": {**STOCK, "HOROVOD_CYCLE_TIME": "10", "OMPI_MCA_mpi_yield_when_idle": "1"},
    "cycle=0.1 yield": {**STOCK, "HOROVOD_CYCLE_TIME": "0.1", "OMPI_MCA_mpi_yield_when_idle": "1"},
    "cycle=0.1 no cache": {**STOCK, "HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_CACHE_CAPACITY": "0"},
    "cycle=0.1 async": {**STOCK, "HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_ENABLE_ASYNC_COMPLETION": "1"},
    "cycle=0.1 fusion=0": {**STOCK, "HOROVOD_CYCLE_TIME": "0.1", "HOROVOD_FUSION_THRESHOLD": "0"},
    "shipped": None,  # nothing set: comm.init applies comm.HOROVOD_DEFAULTS
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=100, help="timed calls per packet size and path")
    parser.add_argument("--iters", type=int, default=4, help="timed trunk steps per norm (0: no step timing)")
    parser.add_argument("--size", type=int, default=160, help="image side for the trunk steps")
    parser.add_argument("--images", type=int, default=2, help="images per rank for the trunk steps")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--hosts", default="", help="mpirun -H spec of 2 ranks on 2 hosts (default: this machine)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # the config, under mpirun
    return parser


def _resnet50_bn_channels() -> list[int]:
    import torchvision
    from torch import nn

    model = torchvision.models.resnet50(weights=None)
    return [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _latency(call, reps: int) -> float:
    """Median seconds of one synchronous call, after warm-up (the first calls register the name)."""
    for _ in range(5):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _group(ctx) -> tuple[list[int], object]:
    """The ranks measured and their Horovod set: the BN group, or every rank when the ranks sit on
    different hosts (no BN group spans hosts; the collective is the same, over TCP)."""
    from hvd_megdet import comm

    if ctx.num_hosts > 1:
        return list(range(ctx.size)), comm.world_process_set(ctx)
    return list(ctx.bn_ranks), ctx.bn_process_set


def _latencies(ctx, sizes: list[int], reps: int) -> dict[str, dict[int, float]]:
    import torch
    from mpi4py import MPI

    from hvd_megdet import comm

    world = MPI.COMM_WORLD
    # dist(bn set, mpi4py): a communicator of the BN group's ranks, created by them alone; the
    # transport reference only, CGBN itself goes through Horovod.
    ranks, pset = _group(ctx)
    group_comm = world.Create_group(world.group.Incl(ranks))
    out: dict[str, dict[int, float]] = {"horovod": {}, "mpi4py": {}}
    for n in sizes:
        buf = torch.ones(n, dtype=torch.float64)
        array = buf.numpy()
        comm.barrier(ctx)
        # dist(bn set): Horovod, one name per size as each CGBN layer has its own.
        out["horovod"][n] = _latency(lambda: comm.allreduce_sum_(buf, pset, name=f"lat.{n}"), reps)
        comm.barrier(ctx)
        out["mpi4py"][n] = _latency(lambda: group_comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM), reps)
    group_comm.Free()
    return out


STEP_MODES = ("local", "cgbn")


def _step_times(ctx, args) -> dict[str, float]:
    """Median fwd+bwd seconds of a ResNet-50 trunk per norm mode, the modes in rotation."""
    import torch
    import torchvision

    from hvd_megdet import comm
    from hvd_megdet.cgbn import convert_norm

    def trunk(mode):
        torch.manual_seed(0)
        resnet = torchvision.models.resnet50(weights=None)
        return convert_norm(torch.nn.Sequential(*list(resnet.children())[:-2]), mode, _group(ctx)[1])

    models = {mode: trunk(mode) for mode in STEP_MODES}
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(ctx.rank))
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for step in range(args.iters + 1):  # step 0 warms up
        for mode, model in models.items():
            model.zero_grad(set_to_none=True)
            comm.barrier(ctx)
            start = time.perf_counter()
            model(x).square().mean().backward()
            if step:
                times[mode].append(time.perf_counter() - start)
    return times


def run_job(args) -> dict:
    from hvd_megdet import comm

    ctx = comm.init()
    channels = _resnet50_bn_channels()
    sizes = sorted({2 * c + 1 for c in channels} | {2 * c for c in channels})
    lat = _latencies(ctx, sizes, args.reps)
    steps = _step_times(ctx, args) if args.iters else {}
    # A collective ends on the slowest rank: report that rank's figures.
    every = comm.allgather_object({"lat": lat, "steps": steps}, ctx)
    slowest = {path: {n: max(r["lat"][path][n] for r in every) for n in sizes} for path in lat}
    # Per rotation, the slowest rank's time; then medians, and the median of the per-rotation ratio
    # (cgbn and local timed back to back, so load that drifts between rotations cancels out).
    per_step = {mode: [max(r["steps"][mode][i] for r in every) for i in range(args.iters)] for mode in steps}
    steps = {mode: statistics.median(t) for mode, t in per_step.items()}
    if per_step:
        steps["ratio"] = statistics.median(c / l for c, l in zip(per_step["cgbn"], per_step["local"]))
    model = {path: sum(slowest[path][2 * c + 1] + slowest[path][2 * c] for c in channels) for path in slowest}
    settings = {k: os.environ.get(k, "(unset)") for k in KNOBS}
    return {"channels": channels, "lat": slowest, "model": model, "steps": steps, "settings": settings}


def _run_config(name: str, argv: list[str], hosts: str = "") -> dict:
    sys.path.insert(0, str(ROOT))
    from hvd_megdet.ranks import local_mpirun_command

    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(CONFIGS[name] or {}, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = local_mpirun_command(2)
    if hosts:  # the other host's rank gets only what -x names
        cmd += ["-H", hosts, "--wdir", str(ROOT), *[a for k in ("PYTHONPATH", "OMP_NUM_THREADS", *(CONFIGS[name] or {}))
                                                    for a in ("-x", k)]]
    cmd += [sys.executable, __file__, "--job", name, *argv]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [l.split("RESULT ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"config {name!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[0])


def _print_config(name: str, res: dict) -> None:
    lat = {path: {int(n): t for n, t in v.items()} for path, v in res["lat"].items()}
    print(f"\n== {name}: " + " ".join(f"{k}={v}" for k, v in res["settings"].items()))
    print(f"  {'C':>5s} {'elements':>9s} {'horovod ms':>11s} {'mpi4py ms':>10s} {'hvd/mpi':>8s}")
    for c in sorted(set(res["channels"])):
        for n in (2 * c + 1, 2 * c):
            h, m = lat["horovod"][n], lat["mpi4py"][n]
            print(f"  {c:5d} {n:9d} {h * 1e3:11.3f} {m * 1e3:10.4f} {h / m:7.1f}x")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if args.job:
        result = run_job(args)
        if int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    job_argv = ["--reps", str(args.reps), "--iters", str(args.iters), "--size", str(args.size),
                "--images", str(args.images)]
    results = {}
    for name in names:
        results[name] = _run_config(name, job_argv, args.hosts)
        _print_config(name, results[name])
    layers = len(next(iter(results.values()))["channels"])
    where = f"on hosts {args.hosts} (TCP between them)" if args.hosts else "on this machine"
    print(f"\n2 ranks {where}, one group; latency: median over the CGBN packet sizes of the median of {args.reps} "
          f"back-to-back calls, slowest rank. Steps: ResNet-50 trunk fwd+bwd, {args.images} images of "
          f"{args.size}x{args.size} per rank, median of {args.iters}, slowest rank, local and cgbn in rotation; "
          f"cgbn/local: median of the per-rotation ratios.")
    print(f"model = sum over the {layers} BN layers of Horovod latency(2C+1) + latency(2C), per step. "
          f"'best': the lowest per-size median (the latency when no other load got in the way).")
    print(f"{'config':20s} {'hvd ms':>7s} {'best':>6s} {'mpi ms':>7s} {'best':>6s} {'hvd/mpi':>7s} {'best':>6s} | "
          f"{'model s':>7s} {'cgbn-local s':>12s} | {'local s':>7s} {'cgbn/local':>10s}")
    for name, res in results.items():
        h = statistics.median(res["lat"]["horovod"].values())
        m = statistics.median(res["lat"]["mpi4py"].values())
        hb, mb = min(res["lat"]["horovod"].values()), min(res["lat"]["mpi4py"].values())
        st = res["steps"]
        line = (f"{name:20s} {h * 1e3:7.3f} {hb * 1e3:6.3f} {m * 1e3:7.4f} {mb * 1e3:6.4f} {h / m:6.1f}x "
                f"{hb / mb:5.0f}x | {res['model']['horovod']:7.3f} ")
        if st:
            line += f"{st['cgbn'] - st['local']:12.3f} | {st['local']:7.3f} {st['ratio']:9.3f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
