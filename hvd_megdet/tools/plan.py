"""How many nodes, how many hours: seconds per iteration, time to train and scaling efficiency.

    python -m hvd_megdet.tools.plan --config configs/megdet_bs256_bn16.yaml --nodes 1,2,4,8,16 \\
        --step-time 0.07 --images-per-gpu 2                   # a measured per-GPU step time
    python -m hvd_megdet.tools.plan --config ... --from-log runs/megdet/log.jsonl    # a run's train records
    python -m hvd_megdet.tools.plan --config ... --from-bench benchmarks/results/bench_gpu.json
    python -m hvd_megdet.tools.plan --table3                        # checked against the paper's Table 3

The time model and its terms are in plan_time_model (one iteration = max(compute + CGBN + gradient
allreduce, data loading)); the fit to the paper's Table 3 is in plan_table3.

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
import json
import statistics
import sys
from pathlib import Path

from hvd_megdet.config import Config, ConfigError, load_config
from hvd_megdet.tools.plan_table3 import table3
from hvd_megdet.tools.plan_time_model import (COCO_TRAIN_IMAGES, H100_LINKS, Job, Platform, image_time_from_step,
                                              model_size, predict)


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
            found = sorted(Path(__file__).resolve().parents[2].glob("benchmarks/results/bench_gpu*.json"))
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
