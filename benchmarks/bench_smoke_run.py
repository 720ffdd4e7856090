"""What one smoke run costs, the unit the multi-rank and multi-host tests repeat: 4 ranks of
configs/smoke_cpu.yaml under mpirun from start to exit (imports, model, broadcast, steps, checkpoints,
report), with the box head at the paper's width (1024, 28.3M parameters) and at the smoke config's
(128, 16.0M), alternated so that both see the same machine.

    python benchmarks/bench_smoke_run.py [--rounds 3] [--np 4] [--iters 4]

Prints, per width, the median CPU-seconds (user + system of every rank, from the children's rusage)
and wall seconds, and their ratios.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: hvd_megdet and data_prep from this checkout

from data_prep import synthetic  # noqa: E402
from hvd_megdet.ranks import local_mpirun_command  # noqa: E402

WIDTHS = (1024, 128)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs per width, alternated")
    parser.add_argument("--np", type=int, default=4, help="ranks per run")
    parser.add_argument("--iters", type=int, default=4, help="training steps per run (a checkpoint after each)")
    return parser


def one_run(args, shards: Path, out: Path, width: int) -> tuple[float, float]:
    """(CPU-seconds of every rank, wall seconds) of one run."""
    cmd = local_mpirun_command(args.np) + ["-x", "OMP_NUM_THREADS=1", sys.executable, "-m", "hvd_megdet.train",
                                           "--config", "configs/smoke_cpu.yaml", "--set",
                                           f"data.train_path={shards}", f"train.output_dir={out}",
                                           f"train.max_iters={args.iters}", f"model.box_fc_dim={width}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main(args) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_smoke_") as tmp:
        shards = synthetic.make_shards(Path(tmp), 16, "96x64", seed=1)  # 8 images per shard
        runs: dict[int, list[tuple[float, float]]] = {w: [] for w in WIDTHS}
        for r in range(args.rounds):
            for width in WIDTHS:
                cpu, wall = one_run(args, shards, Path(tmp) / f"run_{width}_{r}", width)
                runs[width].append((cpu, wall))
                print(f"round {r + 1}: box_fc_dim={width}: {cpu:.1f} CPU-s, {wall:.1f} s wall", flush=True)
    med = {w: (statistics.median(c for c, _ in v), statistics.median(s for _, s in v)) for w, v in runs.items()}
    print(f"\n{args.np} ranks x {args.iters} smoke steps, median of {args.rounds}:")
    for width, (cpu, wall) in med.items():
        print(f"  box_fc_dim={width:<5} {cpu:6.1f} CPU-s  {wall:6.1f} s wall")
    (c_big, w_big), (c_small, w_small) = med[WIDTHS[0]], med[WIDTHS[1]]
    print(f"  ratio 128/1024: CPU {c_small / c_big:.2f}, wall {w_small / w_big:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
