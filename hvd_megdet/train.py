"""Train MegDet: FPN Faster R-CNN with the linear scaling rule, linear warm-up and Cross-GPU BN.

    horovodrun -np 16 -H node1:8,node2:8 python -m hvd_megdet.train --config configs/megdet_bs16_bn16.yaml
    mpirun -np 2 python -m hvd_megdet.train --config configs/demo_cpu.yaml --set train.max_iters=20
    python -m hvd_megdet.train --config configs/demo_cpu.yaml          # one process, no launcher

Outputs in ``train.output_dir``: config.yaml (resolved), log.jsonl, checkpoints/, eval_epochNN/,
report/ (table and figures) and, once training is complete, finished.json. A rerun with the same
output_dir resumes from its newest loadable checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import torch

from hvd_megdet import checkpoint, comm, engine, errors, lr_schedule, watchdog
from hvd_megdet.tools import report
from hvd_megdet.config import Config, SolverConfig, load_or_exit, save_config, to_dict
from hvd_megdet.data import (DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset,
                             ShardedCocoDataset, build_transforms, collate_fn)
from hvd_megdet.evaluation import evaluate
from hvd_megdet.fileio import atomic_write_text
from hvd_megdet.metrics import MetricLogger, setup_console_logging
from hvd_megdet.model import build_model, count_norm_layers
from hvd_megdet.stop import StopRequest

log = logging.getLogger("hvd_megdet.train")
FINISHED = "finished.json"  # written by rank 0 once the whole budget is trained (and evaluated)
EVAL_STALL_FACTOR = 6  # evaluation may take this many train.stall_timeout_s before the watchdog fires


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (configs/...); defaults apply without one")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides such as solver.base_lr=0.04 (applied in order, after the file)")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (default: the newest in output_dir)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    return parser


def build_optimizer(model: torch.nn.Module, solver: SolverConfig, lr: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every trainable parameter (the paper's uniform 1e-4);
    ``solver.no_decay_bias_norm`` exempts biases and norm weights (1-D parameters) instead."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not solver.no_decay_bias_norm:
        return torch.optim.SGD(params, lr=lr, momentum=solver.momentum, weight_decay=solver.weight_decay)
    return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": solver.weight_decay},
                            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=lr, momentum=solver.momentum)


def bn_size(cfg: Config, ctx: comm.DistContext) -> int:
    """Images whose statistics one BN layer normalises with (the paper's "BN size"; 0: frozen BN)."""
    return {"frozen": 0, "local": cfg.data.images_per_rank,
            "cgbn": cfg.data.images_per_rank * len(ctx.bn_ranks)}[cfg.model.norm]


def bn_groups(cfg: Config, ctx: comm.DistContext) -> list[dict]:
    """Each CGBN group's host, ranks and BN size, for the log. Hosts with unequal rank counts train
    with unequal BN sizes (each host's images are normalised together, as in the paper); rank 0 warns."""
    if cfg.model.norm != "cgbn":
        return []
    return [{"host": ctx.hostnames[g[0]], "ranks": len(g), "bn_size": cfg.data.images_per_rank * len(g)}
            for g in ctx.bn_groups]


def _ignore_sigterm(worker_id: int) -> None:
    # A launcher may signal the whole process group: only the trainer decides when to stop, and a
    # worker that died of the signal would turn a clean preemption into a crash. Workers end with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def _workers_shut_down(loader: torch.utils.data.DataLoader):
    """Stop the loader's persistent workers when the block ends, however it ends. They ignore SIGTERM
    (see _ignore_sigterm), so multiprocessing's exit handler, which terminates them with SIGTERM and
    then joins them, would wait forever if a reference cycle kept the loader alive until exit."""
    try:
        yield
    finally:
        iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None


def run(cfg: Config, ctx: comm.DistContext, resume: str | None = None, debug: bool = False) -> dict:
    """Train with ``cfg`` on the ranks of ``ctx``; returns a summary (paths, iterations, epoch).
    ``debug``: a stalled rank prints every thread's stack before it ends the job."""
    out = Path(cfg.train.output_dir)
    device = engine.pick_device(cfg.train.device, ctx)
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (then broadcast from rank 0)
    s = cfg.solver

    # Data: each rank's share of every epoch in aspect-grouped batches, loaded by workers that live
    # for the whole run (their open shards too); augmentation seeded by (seed, epoch, image).
    dataset = ShardedCocoDataset(cfg.data.train_path, transforms=build_transforms(
        True, cfg.data.min_size, cfg.data.max_size, cfg.data.flip_prob))
    sampler = DistributedShardSampler(dataset, ctx.rank, ctx.size, seed=cfg.train.seed,
                                      shard_shuffle=cfg.data.shard_shuffle)
    ratios = dataset.aspect_ratios() if cfg.data.aspect_ratio_grouping else [1.0] * len(dataset)
    batch_sampler = GroupedBatchSampler(sampler, ratios, cfg.data.images_per_rank)
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset, cfg.train.seed), batch_sampler=EpochTagged(batch_sampler),
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=_ignore_sigterm, collate_fn=collate_fn, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.train.seed))  # not the global RNG: see resume
    val_dataset = val_gt = None
    if cfg.data.val_path:
        val_dataset = ShardedCocoDataset(cfg.data.val_path, transforms=build_transforms(
            False, cfg.data.min_size, cfg.data.max_size))
        val_gt = (cfg.data.val_annotations or val_dataset.coco_gt()) if ctx.is_main else None  # rank 0 scores

    # Schedule: linear scaling rule and linear warm-up (paper Sec. 3.2), in optimizer steps.
    global_batch = lr_schedule.global_batch_size(cfg.data.images_per_rank, ctx.size, s.backward_passes_per_step)
    iters_per_epoch = lr_schedule.iters_per_epoch(len(dataset), cfg.data.images_per_rank, ctx.size,
                                                  s.backward_passes_per_step)
    policy_iters = lr_schedule.total_iters(iters_per_epoch, s.policy)
    total = min(policy_iters, cfg.train.max_iters) if cfg.train.max_iters else policy_iters

    def lr_at(iteration: int) -> float:
        return lr_schedule.lr_at(iteration, global_batch=global_batch, iters_per_epoch=iters_per_epoch,
                                 policy=s.policy, warmup_iters=s.warmup_iters, base_lr=s.base_lr,
                                 base_batch=s.base_batch)

    model = build_model(cfg.model, ctx, dataset.num_classes,
                        min_size=cfg.data.min_size, max_size=cfg.data.max_size).to(device)
    optimizer = build_optimizer(model, s, lr_at(0))
    # dist(world): gradients averaged over every rank by allreduce during backward (see comm).
    optimizer = comm.distributed_optimizer(optimizer, model, ctx, fp16_compression=s.fp16_allreduce,
                                           backward_passes_per_step=s.backward_passes_per_step)
    scaler = torch.amp.GradScaler(device.type) if s.amp == "fp16" else None

    # Resume: rank 0 picks the newest checkpoint that loads (a damaged newer one is skipped, named),
    # every rank reads that file itself.
    progress = engine.Progress()
    found = None
    if ctx.is_main:
        found = (resume, checkpoint.load_checkpoint(resume)) if resume else checkpoint.find_resumable(out)
    path = comm.broadcast_object(str(found[0]) if found else None, ctx)  # dist(world)
    if path:
        state = found[1] if found else checkpoint.load_checkpoint(path)
        checkpoint.check_world(state, ctx.size, global_batch, path)
        checkpoint.check_model(state, model.state_dict(), to_dict(cfg)["model"], path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress = engine.Progress(**state["progress"])
        checkpoint.set_rng_state(state["rng"][ctx.rank])
        log.info("resumed from %s at iteration %d (epoch %d)", path, progress.iteration, progress.epoch)
    comm.broadcast_state(model, optimizer, ctx)  # dist(world): identical start on every rank
    if not path:
        torch.manual_seed(cfg.train.seed + ctx.rank)  # distinct RPN/RoI sampling streams per rank
    if progress.iteration >= total and (out / FINISHED).exists():
        log.warning("%s holds a finished run (%s, iteration %d of %d): nothing to do; raise train.max_iters "
                    "or use a new train.output_dir", out, FINISHED, progress.iteration, total)
        return {"output_dir": str(out), "iterations": progress.iteration, "epoch": progress.epoch,
                "skipped_steps": progress.skipped_steps, "already_finished": True}

    logger = MetricLogger(out, ctx.is_main, progress=cfg.train.progress, tensorboard=cfg.train.tensorboard)
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
    groups = bn_groups(cfg, ctx)
    if ctx.is_main and len({g["bn_size"] for g in groups}) > 1:
        log.warning("BN size differs between hosts: %s. CGBN normalises each host's images together; for one "
                    "BN size give every host the same number of ranks, or set model.bn_group_size to a divisor "
                    "of every host's ranks", ", ".join(f"{g['host']} {g['ranks']} rank{'s' * (g['ranks'] > 1)} "
                                                      f"(BN size {g['bn_size']})" for g in groups))
    logger.log("start", {
        "world_size": ctx.size, "hosts": ctx.num_hosts, "global_batch": global_batch,
        "bn_size": bn_size(cfg, ctx), "bn_groups": groups, "base_lr": s.base_lr,
        "scaled_lr": lr_schedule.scaled_lr(global_batch, s.base_lr, s.base_batch),
        "warmup_iters": s.warmup_iters, "iters_per_epoch": iters_per_epoch, "total_iters": total,
        "start_iter": progress.iteration, "images": len(dataset), "device": str(device),
        "norm_layers": count_norm_layers(model)})
    settings = engine.EpochSettings(
        step=engine.StepSettings(
            backward_passes=s.backward_passes_per_step,
            amp_dtype={"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s.amp],
            clip_grad_norm=s.clip_grad_norm, on_nonfinite=s.on_nonfinite, device=device),
        iters_per_epoch=iters_per_epoch, total_iters=total, lr_at=lr_at, log_every=cfg.train.log_every,
        bn_size=bn_size(cfg, ctx))
    epoch_batches = iters_per_epoch * s.backward_passes_per_step

    def save() -> int:
        # dist(world): every rank's RNG states go into the checkpoint; rank 0 writes it.
        rng = comm.allgather_object(checkpoint.rng_state(), ctx)
        if ctx.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "progress": vars(progress).copy(), "rng": rng, "world_size": ctx.size,
                     "global_batch": global_batch, "config": to_dict(cfg)}
            written = checkpoint.save_checkpoint(state, out, progress.iteration, cfg.train.keep_checkpoints)
            logger.log("checkpoint", {"iter": progress.iteration, "epoch": progress.epoch, "path": str(written)})
        return progress.iteration

    def evaluate_now(name: str) -> None:
        # Its own RNG streams: evaluation must not change what training samples afterwards.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = evaluate(model, val_dataset, ctx, device=device, gt=val_gt, output_dir=out / name,
                               progress=cfg.train.progress)
        if metrics is not None:
            logger.log("eval", {"epoch": progress.epoch + 1, "iter": progress.iteration, **metrics})

    saved_at = progress.iteration if path else None
    # A rank that stops progressing (a hung read, a stopped process) ends the job with one line naming
    # it: Horovod's own stall check cannot see it (see watchdog).
    stall = watchdog.Watchdog(ctx.rank, cfg.train.stall_timeout_s, status_dir=out / "status",
                              world_size=ctx.size, dump_stacks=debug)
    def stop_here(stop: StopRequest, saved: bool = False) -> engine.Preempted:
        # dist(world): who was asked and how, gathered so that rank 0 records every rank's stop in the
        # log (a launcher aborting the job may lose the ranks' own output lines, never this record).
        ranks = comm.allgather_object(stop.how(), ctx, name="stop.how")
        if not saved:
            save()
        # Consumed before the record is written: whoever reads the record finds no request left over.
        stop.honoured()
        logger.log("stop", {"iter": progress.iteration, "epoch": progress.epoch, "ranks": ranks})
        return engine.Preempted(f"stopped on request after iteration {progress.iteration}; "
                                f"rerun with the same train.output_dir to resume",
                                signalled=any(r["signalled"] for r in ranks))

    # Rank 0 looks for the STOP file (written by the batch shell; see hvd_megdet.stop).
    with StopRequest(out, watch_file=ctx.is_main) as stop, stall, _workers_shut_down(loader):
        batches = watchdog.watched(loader, stall)  # beats before and after every batch
        for epoch in range(progress.epoch, math.ceil(total / iters_per_epoch)):
            for _ in engine.train_one_epoch(model, optimizer, scaler, batches, progress, settings, ctx, logger):
                # dist(world): every rank learns whether any rank was asked to stop, so all stop together.
                if engine.any_rank(stop.requested(), ctx, "stop"):
                    raise stop_here(stop)
                if progress.iteration % cfg.train.checkpoint_every == 0 and progress.batches_done < epoch_batches:
                    saved_at = save()
            if progress.batches_done < epoch_batches:
                break  # train.max_iters ended training inside this epoch
            # End of epoch, one checkpoint. An evaluated epoch saves before evaluating (evaluation may take
            # long, fail or be stopped), with the epoch's end still to do: a run resumed from it evaluates
            # only if eval_epochNN/metrics.json is missing. Any other epoch saves once it has ended.
            last = progress.iteration >= total
            if val_dataset is not None and (epoch + 1 in cfg.train.eval_epochs or (last and cfg.train.eval_at_end)):
                if saved_at != progress.iteration:
                    saved_at = save()
                name = f"eval_epoch{epoch + 1:02d}"
                # dist(world): rank 0's look at the output directory decides for every rank.
                if not engine.any_rank(ctx.is_main and (out / name / "metrics.json").exists(), ctx, "evaluated"):
                    # Evaluation has no per-batch beat here: it gets a longer limit of its own.
                    stall.beat(f"evaluation after epoch {epoch + 1}",
                               timeout_s=EVAL_STALL_FACTOR * cfg.train.stall_timeout_s)
                    evaluate_now(name)
            progress.next_epoch()
            if saved_at != progress.iteration:
                saved_at = save()
            if engine.any_rank(stop.requested(), ctx, "stop"):  # asked during evaluation
                raise stop_here(stop, saved=True)
    if saved_at != progress.iteration:
        saved_at = save()  # stopped inside an epoch (train.max_iters): keep the final state
    summary = {"output_dir": str(out), "iterations": progress.iteration, "epoch": progress.epoch,
               "skipped_steps": progress.skipped_steps}
    if ctx.is_main:
        atomic_write_text(out / FINISHED, json.dumps(summary, indent=1) + "\n")
        try:  # the figures are a convenience: a failure here must not fail a finished run
            paths = report.write_report([out], out / "report")
            log.info("report: %s", paths.markdown)
        except Exception as err:  # noqa: BLE001 (matplotlib, a full disk, a log without records...)
            log.warning("could not write the report (%s: %s); run python -m hvd_megdet.tools.report %s later",
                        type(err).__name__, err, out)
    logger.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = load_or_exit(args.config, args.set)
    ctx = comm.init(cfg.model.bn_group_size)
    setup_console_logging(ctx.is_main)
    try:
        summary = run(cfg, ctx, args.resume, debug=args.debug)
    except engine.NonFiniteLossError as err:
        log.error("%s", err)
        return 3
    except engine.Preempted as err:
        log.warning("rank %d: %s", ctx.rank, err)
        comm.barrier(ctx)  # leave together
        # 128 + SIGTERM, as if the signal had ended the process. A stop asked through the STOP file
        # alone ends with 0 on every rank: mpirun answers any non-zero exit by aborting the job, which
        # sits out odls_base_sigkill_timeout twice (minutes with the job scripts' STOP_GRACE) before it
        # lets the job script requeue. The job script, which wrote the file, reports 143 itself.
        return 143 if err.signalled else 0
    except Exception as err:
        errors.end_rank(err, ctx.rank, debug=args.debug)  # a bad shard, checkpoint or disk: one line, exit 1
        raise  # anything else is a bug: the full traceback
    if ctx.is_main:
        print(f"done: {summary['iterations']} iterations; log {summary['output_dir']}/log.jsonl, "
              f"checkpoints {summary['output_dir']}/checkpoints/")
    comm.barrier(ctx)  # leave together: one rank's exit shuts Horovod down for all
    comm.shutdown(ctx)
    return 0


if __name__ == "__main__":
    code = main()
    if code == 143:
        # A scheduler's TERM (requeue, scancel, qdel) reached the launcher too: mpirun and its daemons sit
        # in Open MPI's kill delay, their event loop stopped, and MPI_Finalize's fence, which goes through
        # them, would hold every rank until they wake and kill it. The checkpoint is on disk and every
        # rank has passed the barrier after it: leave without finalizing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
