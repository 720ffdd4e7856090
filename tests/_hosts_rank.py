"""One rank of tests/jobs/test_hosts.py: ``python -m tests._hosts_rank OUTDIR`` under horovodrun, horovodrun
--gloo or mpirun on the test cluster's hosts. Writes OUTDIR/rankN.pkl with what this rank saw:

- its host and CGBN group (comm.init groups ranks by their real hostname);
- test_cgbn's CGBN cases, computed on the group's process set (the test compares them with float64 BN
  over each host's concatenated inputs);
- one real training step of the smoke model under DistributedOptimizer: every gradient and parameter
  after it, which must be identical on every rank.
"""
import os
import pickle
import socket
import sys
from pathlib import Path

import torch

from hvd_megdet import comm
from hvd_megdet.config import load_config
from hvd_megdet.model import build_model
from hvd_megdet.train import build_optimizer
from tests.test_cgbn import SHAPES, _cgbn_worker

REPO = Path(__file__).resolve().parents[1]


def _batch(rank: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Two 48x64 images with two boxes each, different on every rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    images = [torch.rand(3, 48, 64, generator=gen) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 30.0]]) + rank,
                "labels": torch.tensor([1, 2])} for _ in images]
    return images, targets


def _train_step(ctx: comm.DistContext) -> dict:
    cfg = load_config(REPO / "configs" / "smoke_cpu.yaml")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, ctx, num_classes=3, min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    optimizer = comm.distributed_optimizer(build_optimizer(model, cfg.solver, 0.01), model, ctx)
    comm.broadcast_state(model, optimizer, ctx)
    torch.manual_seed(cfg.train.seed + ctx.rank)  # distinct RoI sampling per rank, as in training
    images, targets = _batch(ctx.rank)
    losses = model(images, targets)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "loss": float(sum(losses.values()))}


def main() -> int:
    out = Path(sys.argv[1])
    ctx = comm.init()
    result = {"rank": ctx.rank, "size": ctx.size, "host": socket.gethostname(), "pid": os.getpid(),
              "bn_ranks": ctx.bn_ranks, "num_hosts": ctx.num_hosts, "hostnames": ctx.hostnames}
    result["cgbn"] = _cgbn_worker(list(SHAPES), ctx)
    result["step"] = _train_step(ctx)
    tmp = out / f"rank{ctx.rank}.pkl.tmp"
    tmp.write_bytes(pickle.dumps(result))
    tmp.rename(out / f"rank{ctx.rank}.pkl")
    comm.barrier(ctx)  # leave together: one rank's exit shuts Horovod down for all
    comm.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
