"""ResNet-50 FPN Faster R-CNN on one GPU: bare torchvision vs hvd_megdet's train_step, per norm and precision.

    python benchmarks/bench_gpu.py                       # on a GPU node, after `source .gpu_env/env.sh`
    python benchmarks/bench_gpu.py --device cpu --tiny --out /tmp/bench_gpu_dry.json   # dry run, NOT GPU figures

The paper's scale: COCO-shaped synthetic images (640x480 and 480x640, 7 boxes each, 81 classes)
resized by the detector to 800/1333, 2 images per GPU. One process, Horovod on 1 rank. Rows, each
in fp32 (TF32 on for matmul and cuDNN, as stated in the output), bf16 autocast and fp16 autocast
with GradScaler, all measured in rotation (one step of each row in turn) so that drift hits every
row alike; median step time (device synchronised) and img/s per row:
  tv_frozen   torchvision alone: resnet_fpn_backbone(resnet50, FrozenBatchNorm2d, 5 trainable stages)
              + FasterRCNN, a plain SGD step (what fasterrcnn_resnet50_fpn builds around a pretrained
              backbone): the like-for-like reference of hvd_frozen
  tv_bn       torchvision alone: fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None), which
              trains nn.BatchNorm2d in every stage: the reference of hvd_local
  hvd_frozen, hvd_local   hvd_megdet: build_model, DistributedOptimizer, engine.train_step
  hvd_cgbn1   CGBN whose statistics go through Horovod on a process set of this one rank: the
              per-layer host synchronisation and Horovod latency, without any network
Then sub-linear memory off/on at 2, 4 and 8 images (hvd_local): peak torch.cuda.max_memory_allocated
and step time; and the input pipeline: decode + resize to 800/1333 from HDF5 shards, img/s on one
core, and the cores one GPU needs at the fastest measured row.

The JSON (--out) holds every row, the goals of issue 11, the environment and the command. Its top
level is what ``python -m hvd_megdet.tools.plan --from-bench`` reads: step_time_s and images_per_gpu of
the hvd_local fp32 row (compute with trainable BN and no communication), norm, sublinear_memory, device.
A CPU or --tiny run is marked "dry_run": true and may not be written under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # hvd_megdet without installing it; the _gpu_* modules beside this file

from _gpu_memory import memory_section  # noqa: E402
from _gpu_pipeline import pipeline_section  # noqa: E402
from _gpu_rows import (AMPS, NUM_CLASSES, PAPER, ROWS, TINY, build_row, make_batches, profile_rows,  # noqa: E402
                       run_rotation, summarise)
from hvd_megdet import comm, engine  # noqa: E402
from hvd_megdet.fileio import atomic_write_text  # noqa: E402

HEADLINE = "hvd_local/fp32"  # what plan.py reads: trainable BN, no communication


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true",
                        help="dry run: resnet18, 128x96 images resized to 96/160, 1 warm-up + 3 steps, fp32 unless --amp")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    parser.add_argument("--images", type=int, default=2, help="images per GPU")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--amp", default="fp32,bf16,fp16", help="comma-separated subset of fp32,bf16,fp16")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 rows in full fp32 (TF32 is on by default)")
    parser.add_argument("--memory-images", default="2,4,8", help="images per GPU for sub-linear memory ('' skips)")
    parser.add_argument("--memory-amp", default="fp32", choices=tuple(AMPS))
    parser.add_argument("--pipeline-images", type=int, default=64, help="JPEGs for the pipeline rate (0 skips)")
    parser.add_argument("--profile", default="", help="comma-separated rows (e.g. hvd_cgbn1/bf16) to profile "
                        "for 3 steps; top ops go to <out>.profile.txt")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (default: benchmarks/results/bench_gpu_<gpu>.json; dry runs: the temp dir)")
    return parser



# --------------------------------------------------------------------------------------- report
def environment(device: torch.device, ctx) -> dict:
    env = {"hostname": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
           "horovod": None, "horovod_nccl": None, "horovod_size": ctx.size,
           "HOROVOD_CYCLE_TIME": os.environ.get("HOROVOD_CYCLE_TIME")}
    if comm.hvd is not None:
        env["horovod"] = importlib.metadata.version("horovod")
        env["horovod_nccl"] = bool(comm.hvd.nccl_built())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, sm_count=props.multi_processor_count, memory_mb=props.total_memory // 2**20,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def goals(rows: dict[str, dict], memory: list[dict]) -> list[dict]:
    """Issue 11's goals, each as measured (None where its rows were not run)."""
    def ratio(a, b, key):
        return rows[a][key] / rows[b][key] if a in rows and b in rows else None

    out = [
        ("hvd_frozen img/s vs tv_frozen (fp32)", ratio("hvd_frozen/fp32", "tv_frozen/fp32", "img_per_s"), ">=", 0.97),
        ("hvd_frozen img/s vs tv_frozen (bf16)", ratio("hvd_frozen/bf16", "tv_frozen/bf16", "img_per_s"), ">=", 0.97),
        ("hvd_cgbn1 step vs hvd_local (fp32)", ratio("hvd_cgbn1/fp32", "hvd_local/fp32", "step_time_s"), "<=", 1.10),
        ("hvd_cgbn1 step vs hvd_local (bf16)", ratio("hvd_cgbn1/bf16", "hvd_local/bf16", "step_time_s"), "<=", 1.10),
        ("hvd_cgbn1 bf16 img/s vs fp32", ratio("hvd_cgbn1/bf16", "hvd_cgbn1/fp32", "img_per_s"), ">=", 1.5),
        ("hvd_local bf16 img/s vs fp32", ratio("hvd_local/bf16", "hvd_local/fp32", "img_per_s"), ">=", 1.5),
        ("moonshot: hvd_cgbn1 bf16 img/s", rows.get("hvd_cgbn1/bf16", {}).get("img_per_s"), ">=", 60.0),
    ]
    for r in memory:
        if r["sublinear_memory"]:
            out.append((f"sub-linear memory peak vs off ({r['images_per_gpu']} images)", r["peak_vs_off"], "<=", 0.6))
            out.append((f"sub-linear memory step vs off ({r['images_per_gpu']} images)", r["step_vs_off"], "<=", 1.35))
    result = []
    for name, value, op, target in out:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        result.append({"goal": f"{name} {op} {target}", "value": value, "met": met})
    return result


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def print_report(result: dict) -> None:
    dry = result["dry_run"]
    print(("DRY RUN (not GPU figures): " if dry else "") + f"{result['env']['device']}, torch {result['env']['torch']}, "
          f"CUDA {result['env']['cuda']}, {result['settings']['description']}")
    print(f"{'row':18s} {'s/step':>8s} {'img/s':>8s} {'step peak MB':>13s} {'vs tv_frozen':>13s}")
    rows = {r["name"]: r for r in result["rows"]}
    for r in result["rows"]:
        ref = rows.get(f"tv_frozen/{r['amp']}")
        vs = f"{r['img_per_s'] / ref['img_per_s']:12.3f}x" if ref else f"{'':13s}"
        print(f"{r['name']:18s} {r['step_time_s']:8.4f} {r['img_per_s']:8.2f} {_fmt(r['step_peak_extra_mb'], 13, 0)} {vs}")
    for r in result["memory"]:
        print(f"memory: {r['images_per_gpu']} img, sub-linear {'on ' if r['sublinear_memory'] else 'off'}: "
              f"peak {_fmt(r['peak_mem_mb'], 0, 0)} MB ({_fmt(r['peak_vs_off'], 0, 2)}x), "
              f"step {r['step_time_s']:.4f} s ({r['step_vs_off']:.2f}x)")
    if result["pipeline"]:
        p = result["pipeline"]
        print(f"pipeline: {p['decode_resize_img_per_s_per_core']:.1f} img/s per core (decode + resize {p['resize']} "
              f"of {p['raw_size']} JPEGs from HDF5); {p['cores_per_gpu']:.2f} cores per GPU at {p['at_row']}")
    for g in result["goals"]:
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        verdict = "not judged (dry run)" if dry else "met" if g["met"] else "MISSED" if g["met"] is False else "n/a"
        print(f"goal {g['goal']}: {value} -> {verdict}")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; for a dry run: --device cpu --tiny", file=sys.stderr)
        return 2
    dry = args.device != "cuda" or args.tiny
    scale = TINY if args.tiny else PAPER
    if args.tiny:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 3)
        # bf16 and fp16 convolutions are emulated on most CPUs (~10x slower than fp32): ask for them with --amp.
        args.amp = "fp32" if args.amp == get_args_parser().get_default("amp") else args.amp
        args.memory_images = "2" if args.memory_images == get_args_parser().get_default("memory_images") else args.memory_images
        args.pipeline_images = min(args.pipeline_images, 8)
    results_dir = (ROOT / "benchmarks" / "results").resolve()
    if dry and args.out is not None and results_dir in args.out.resolve().parents:
        print(f"error: a dry run's figures are not GPU figures: write them outside {results_dir}", file=sys.stderr)
        return 2

    ctx = comm.init()  # Horovod on 1 rank (MPI singleton); the DistContext every hvd row uses
    device = engine.pick_device(args.device, ctx)
    tf32 = device.type == "cuda" and not args.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    env = environment(device, ctx)
    out = args.out or (Path(tempfile.gettempdir()) / "bench_gpu_dryrun.json" if dry else
                       results_dir / f"bench_gpu_{env['device'].replace(' ', '_')}.json")

    kinds = [k for k in args.rows.split(",") if k]
    amps = [a for a in args.amp.split(",") if a]
    for bad in [k for k in kinds if k not in ROWS] + [a for a in amps if a not in AMPS]:
        print(f"error: unknown row or precision {bad!r}", file=sys.stderr)
        return 2
    print(f"building {len(kinds) * len(amps)} rows on {env['device']}", file=sys.stderr, flush=True)
    rows = [build_row(kind, amp, scale, device, ctx) for amp in amps for kind in kinds]
    batches = make_batches(scale, args.images)
    run_rotation(rows, batches, args.warmup, args.steps, device)
    if args.profile:
        profile_rows(rows, args.profile.split(","), batches, device, out.with_suffix(".profile.txt"))
    summaries = [summarise(r, args.images) for r in rows]
    del rows
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory = memory_section(args, scale, device, ctx) if args.memory_images else []
    pipeline = pipeline_section(args, scale) if args.pipeline_images else {}
    by_name = {r["name"]: r for r in summaries}
    if pipeline:
        fastest = max(summaries, key=lambda r: r["img_per_s"])
        pipeline.update(at_row=fastest["name"],
                        cores_per_gpu=fastest["img_per_s"] / pipeline["decode_resize_img_per_s_per_core"])
    head = by_name.get(HEADLINE) or summaries[0]
    result = {
        "benchmark": "bench_gpu", "dry_run": dry,
        **({"note": "DRY RUN: CPU and/or toy sizes, to prove the script works; these are NOT GPU figures"} if dry else {}),
        # read by hvd_megdet.tools.plan --from-bench:
        "step_time_s": head["step_time_s"], "images_per_gpu": head["images_per_gpu"],
        "norm": {"hvd_frozen": "frozen", "hvd_cgbn1": "cgbn"}.get(head["kind"], "local"),
        "sublinear_memory": False, "device": env["device"], "amp": head["amp"], "headline_row": head["name"],
        "env": env, "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": {"description": f"{args.images} images/GPU of {'/'.join(f'{w}x{h}' for h, w in scale.sizes)} "
                                    f"resized to {scale.min_size}/{scale.max_size}, {scale.backbone} FPN, "
                                    f"{NUM_CLASSES} classes, TF32 {'on' if tf32 else 'off'} for fp32, median of "
                                    f"{args.steps} steps after {args.warmup} warm-up, rows in rotation",
                     "tf32": tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark, "steps": args.steps,
                     "warmup": args.warmup, "backbone": scale.backbone, "min_size": scale.min_size,
                     "max_size": scale.max_size, "raw_sizes": scale.sizes},
        "rows": summaries, "memory": memory, "pipeline": pipeline,
        # a dry run's ratios are listed but never judged against the GPU goals
        "goals": [dict(g, met=None) if dry else g for g in goals(by_name, memory)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1, allow_nan=False) + "\n")
    print_report(result)
    print(f"wrote {out}")
    comm.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
