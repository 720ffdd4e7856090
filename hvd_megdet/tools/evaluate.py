"""Evaluate a checkpoint on COCO with every rank: mmAP / mmAR exactly as pycocotools computes them.

    horovodrun -np 8 -H node1:8 python -m hvd_megdet.tools.evaluate --config configs/megdet_bs16_bn16.yaml \\
        --checkpoint runs/megdet_bs16_bn16/checkpoints/ckpt_00080000.pt
    python -m hvd_megdet.tools.evaluate --config configs/demo_cpu.yaml --checkpoint runs/demo/checkpoints/ckpt_00000132.pt

The ground truth is rebuilt from the shards (``--data``, default ``data.val_path``); ``--annotations``
scores against a COCO json instead. Writes detections.json and metrics.json to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from hvd_megdet import checkpoint, comm, engine, errors
from hvd_megdet.config import load_or_exit
from hvd_megdet.data import ShardedCocoDataset, build_transforms
from hvd_megdet.evaluation import evaluate
from hvd_megdet.metrics import setup_console_logging
from hvd_megdet.model import build_model


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="the training config (model and data sizes)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by hvd_megdet.train")
    parser.add_argument("--data", default=None, help="shard directory to evaluate (default: data.val_path)")
    parser.add_argument("--annotations", default=None, help="COCO json ground truth (default: from the shards)")
    parser.add_argument("--output", default=None, help="where detections.json and metrics.json go "
                                                       "(default: beside the checkpoint, eval_<name>/)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = load_or_exit(args.config, args.set)
    data = args.data or cfg.data.val_path
    if not data:
        print("error: no evaluation data: pass --data or set data.val_path", file=sys.stderr)
        return 2
    ctx = comm.init(cfg.model.bn_group_size)
    setup_console_logging(ctx.is_main)
    try:
        _evaluate_checkpoint(args, cfg, ctx, data)
    except Exception as err:
        errors.end_rank(err, ctx.rank, debug=args.debug)  # a bad shard or checkpoint: one line, exit 1
        raise
    comm.barrier(ctx)
    comm.shutdown(ctx)
    return 0


def _evaluate_checkpoint(args: argparse.Namespace, cfg, ctx: comm.DistContext, data: str) -> None:
    device = engine.pick_device(cfg.train.device, ctx)
    dataset = ShardedCocoDataset(data, transforms=build_transforms(False, cfg.data.min_size, cfg.data.max_size))
    model = build_model(cfg.model, ctx, dataset.num_classes, min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    state = checkpoint.load_checkpoint(args.checkpoint)  # every rank reads it: no broadcast needed
    model.load_state_dict(state["model"])
    model.to(device)
    ckpt = Path(args.checkpoint)
    out = Path(args.output) if args.output else ckpt.parent.parent / f"eval_{ckpt.stem}"
    metrics = evaluate(model, dataset, ctx, device=device, gt=args.annotations or dataset.coco_gt(),
                       output_dir=out, progress=cfg.train.progress)
    if ctx.is_main:
        print(json.dumps({"checkpoint": str(ckpt), "data": str(data), **metrics}, indent=2))
        print(f"wrote {out}/metrics.json and {out}/detections.json")


if __name__ == "__main__":
    sys.exit(main())
