"""Train MegDet: FPN Faster R-CNN with the linear scaling rule, linear warm-up and Cross-GPU BN.

    horovodrun -np 16 -H node1:8,node2:8 python -m hvd_megdet.train --config configs/megdet_bs16_bn16.yaml
    mpirun -np 2 python -m hvd_megdet.train --config configs/demo_cpu.yaml --set train.max_iters=20
    python -m hvd_megdet.train --config configs/demo_cpu.yaml          # one process, no launcher

Outputs in ``train.output_dir``: config.yaml (resolved), log.jsonl, checkpoints/, loss.svg,
eval_epochNN/metrics.json. A rerun with the same output_dir resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch

from hvd_megdet import checkpoint, comm, engine, lr_schedule
from hvd_megdet.config import Config, load_or_exit, save_config, to_dict
from hvd_megdet.data import DistributedShardSampler, GroupedBatchSampler, ShardedCocoDataset, build_transforms, collate_fn
from hvd_megdet.metrics import MetricLogger, setup_console_logging, write_loss_plot
from hvd_megdet.model import build_model, count_norm_layers

log = logging.getLogger("hvd_megdet.train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (configs/...); defaults apply without one")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides such as solver.base_lr=0.04 (applied in order, after the file)")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (default: the latest in output_dir)")
    return parser


class SeededDataset(torch.utils.data.Dataset):
    """Makes each sample's random augmentation a function of (seed, epoch, index).

    The augmentation then does not depend on which worker loads the sample or on how far the global
    RNG has advanced, so a resumed run sees exactly the images an uninterrupted one would.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**63)
            return self.dataset[index]


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", comm.real_local_rank())  # one GPU per rank on its machine
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on norm parameters and biases (detectron2's default)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.solver.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=cfg.solver.momentum)


def run(cfg: Config, ctx: comm.DistContext, resume: str | None = None) -> dict:
    """Train with ``cfg`` on the ranks of ``ctx``; returns a summary (paths, iterations, final loss)."""
    out = Path(cfg.train.output_dir)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (then broadcast from rank 0)
    s = cfg.solver

    dataset = SeededDataset(ShardedCocoDataset(cfg.data.train_path, transforms=build_transforms(
        True, cfg.data.min_size, cfg.data.max_size, cfg.data.flip_prob)), cfg.train.seed)
    sampler = DistributedShardSampler(dataset.dataset, ctx.rank, ctx.size, seed=cfg.train.seed,
                                      shard_shuffle=cfg.data.shard_shuffle)
    ratios = dataset.dataset.aspect_ratios() if cfg.data.aspect_ratio_grouping else [1.0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler, ratios, cfg.data.images_per_rank)
    iters_per_epoch = len(batch_sampler) // s.backward_passes_per_step
    if iters_per_epoch == 0:
        raise ValueError(f"{cfg.data.train_path}: {len(dataset)} images give no full step of "
                         f"{cfg.data.images_per_rank} images x {s.backward_passes_per_step} passes on {ctx.size} ranks")
    global_batch = lr_schedule.global_batch_size(cfg.data.images_per_rank, ctx.size, s.backward_passes_per_step)
    total = lr_schedule.total_iters(iters_per_epoch, s.policy)
    if cfg.train.max_iters:
        total = min(total, cfg.train.max_iters)

    def lr_at(iteration: int) -> float:
        return lr_schedule.lr_at(iteration, global_batch=global_batch, iters_per_epoch=iters_per_epoch,
                                 policy=s.policy, warmup_iters=s.warmup_iters, base_lr=s.base_lr,
                                 base_batch=s.base_batch)

    model = build_model(cfg.model, ctx, dataset.dataset.num_classes,
                        min_size=cfg.data.min_size, max_size=cfg.data.max_size).to(device)
    optimizer = build_optimizer(model, cfg, lr_at(0))
    optimizer = comm.distributed_optimizer(optimizer, model, ctx, fp16_compression=s.fp16_allreduce,
                                           backward_passes_per_step=s.backward_passes_per_step)
    scaler = torch.amp.GradScaler(device.type) if s.amp == "fp16" else None
    progress = engine.Progress()

    # Rank 0 decides where to resume from; every rank then reads the same file itself.
    path = resume or (checkpoint.latest_checkpoint(out) if ctx.is_main else None)
    path = comm.broadcast_object(str(path) if path else None, ctx)
    if path:
        state = checkpoint.load_checkpoint(path)
        checkpoint.check_world(state, ctx.size, global_batch, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress = engine.Progress(**state["progress"])
        checkpoint.set_rng_state(state["rng"][ctx.rank])
        log.info("resumed from %s at iteration %d (epoch %d)", path, progress.iteration, progress.epoch)
    comm.broadcast_state(model, optimizer, ctx)  # identical start on every rank (see comm)
    if not path:
        torch.manual_seed(cfg.train.seed + ctx.rank)  # distinct RPN/RoI sampling streams per rank

    logger = MetricLogger(out, ctx.is_main, progress=cfg.train.progress, tensorboard=cfg.train.tensorboard)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    logger.log("start", {
        "world_size": ctx.size, "hosts": ctx.num_hosts, "global_batch": global_batch,
        "bn_size": cfg.data.images_per_rank * len(ctx.bn_ranks) if cfg.model.norm == "cgbn" else
                   (cfg.data.images_per_rank if cfg.model.norm == "local" else 0),
        "base_lr": s.base_lr, "scaled_lr": lr_schedule.scaled_lr(global_batch, s.base_lr, s.base_batch),
        "warmup_iters": s.warmup_iters, "iters_per_epoch": iters_per_epoch, "total_iters": total,
        "start_iter": progress.iteration, "images": len(dataset), "device": str(device),
        "norm_layers": count_norm_layers(model)})

    def make_loader(epoch: int, batches_done: int):
        dataset.epoch = epoch
        batch_sampler.set_epoch(epoch)
        batch_sampler.load_state_dict({"epoch": epoch, "batches_consumed": batches_done,
                                       "batch_size": cfg.data.images_per_rank, "num_batches": len(batch_sampler)})
        # Its own generator: creating the iterator must not draw from the global RNG.
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=cfg.data.num_workers, collate_fn=collate_fn,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.train.seed + epoch))

    # The iteration of the newest checkpoint in `out`. Every rank calls save(), so every rank knows it.
    resumed_here = path and Path(path).resolve().parent == (out / checkpoint.CHECKPOINT_DIR).resolve()
    last_saved = {"iteration": progress.iteration if resumed_here else None}

    def save(p: engine.Progress) -> None:
        last_saved["iteration"] = p.iteration
        rng = comm.allgather_object(checkpoint.rng_state(), ctx)  # dist(world): every rank's RNG
        if ctx.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "progress": vars(p).copy(), "rng": rng, "world_size": ctx.size,
                     "global_batch": global_batch, "config": to_dict(cfg)}
            written = checkpoint.save_checkpoint(state, out, p.iteration, cfg.train.keep_checkpoints)
            logger.log("checkpoint", {"iter": p.iteration, "path": str(written)})

    val = {}  # the evaluation split and its ground truth, built at the first evaluation only

    def end_of_epoch(p: engine.Progress) -> None:
        save(p)
        last = p.iteration >= lr_schedule.total_iters(iters_per_epoch, s.policy)
        if cfg.data.val_path and (p.epoch in cfg.train.eval_epochs or (last and cfg.train.eval_at_end)):
            if not val:
                val["dataset"] = ShardedCocoDataset(cfg.data.val_path, transforms=build_transforms(
                    False, cfg.data.min_size, cfg.data.max_size))
                val["gt"] = cfg.data.val_annotations or val["dataset"].coco_gt()
            evaluate_epoch(model, val["dataset"], val["gt"], cfg, ctx, device, logger, p.epoch)

    # SIGTERM (scheduler preemption, a requeue, mpirun forwarding ^C) stops at the next iteration
    # boundary with a checkpoint, instead of losing everything since the last one.
    stop = {"requested": False}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(requested=True))
    settings = engine.StepSettings(
        backward_passes=s.backward_passes_per_step,
        amp_dtype={"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s.amp],
        clip_grad_norm=s.clip_grad_norm, on_nonfinite=s.on_nonfinite, device=device)
    engine.train_loop(model, optimizer, scaler, make_loader=make_loader, iters_per_epoch=iters_per_epoch,
                      total_iters=total, lr_at=lr_at, settings=settings, ctx=ctx, progress=progress,
                      logger=logger, log_every=cfg.train.log_every,
                      images_per_step=cfg.data.images_per_rank * s.backward_passes_per_step, save=save,
                      checkpoint_every=cfg.train.checkpoint_every, end_of_epoch=end_of_epoch,
                      stop_requested=lambda: stop["requested"])
    signal.signal(signal.SIGTERM, previous)
    if last_saved["iteration"] != progress.iteration:
        save(progress)  # stopped mid-epoch (max_iters): keep the final state too
    summary = {"output_dir": str(out), "iterations": progress.iteration, "epoch": progress.epoch,
               "skipped_steps": progress.skipped_steps}
    if ctx.is_main and (out / "log.jsonl").exists():
        summary["plot"] = str(write_loss_plot(out / "log.jsonl", out / "loss.svg"))
    logger.close()
    comm.barrier(ctx)  # leave together: one rank's exit shuts Horovod down for all
    return summary


def evaluate_epoch(model, dataset, gt, cfg: Config, ctx: comm.DistContext, device, logger: MetricLogger,
                   epoch: int) -> dict | None:
    """COCO evaluation of the current weights on every rank; metrics logged by rank 0."""
    from hvd_megdet.evaluation import evaluate

    out = Path(cfg.train.output_dir) / f"eval_epoch{epoch:02d}"
    metrics = evaluate(model, dataset, ctx, device=device, gt=gt, output_dir=out, progress=cfg.train.progress)
    if metrics is not None:
        logger.log("eval", {"epoch": epoch, **metrics})
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = load_or_exit(args.config, args.set)
    ctx = comm.init(cfg.model.bn_group_size)
    setup_console_logging(ctx.is_main)
    try:
        summary = run(cfg, ctx, args.resume)
    except engine.NonFiniteLossError as err:
        log.error("%s", err)
        return 3
    except engine.Preempted as err:
        log.warning("rank %d: %s", ctx.rank, err)
        comm.barrier(ctx)  # leave together
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    if ctx.is_main:
        print(f"done: {summary['iterations']} iterations; log {summary['output_dir']}/log.jsonl, "
              f"checkpoints {summary['output_dir']}/checkpoints/, plot {summary.get('plot', '-')}")
    comm.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
