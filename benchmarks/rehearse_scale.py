"""Rehearse a many-node job on one machine: 8, 16 and 32 ranks as simulated hosts of 8 ranks.

    python benchmarks/rehearse_scale.py [--scales 8,16,32] [--trainer-ranks 32] [--keep DIR]
    make rehearse

Every run is ``mpirun -np N --oversubscribe`` with HVD_MEGDET_RANKS_PER_HOST=8 (N/8 simulated hosts,
one CGBN process set each), one thread per rank, a tiny Faster R-CNN (see benchmarks/_rehearse_rank.py)
on 64x48 synthetic images, 2 images per rank. At each scale it checks:

  membership   every rank's BN group is the 8 ranks of its host, and the set reduces over exactly them
  bn-stats     CGBN outputs and running means equal float64 BN over the host's images (gathered with
               mpi4py), and differ from BN over the world's or the rank's own images by far more
  gradients    after a step's backward, every rank holds the same gradient bytes and weights, equal to
               the float64 mean of the ranks' own gradients (mpi4py)
  sampler      the ranks' loaders (DistributedShardSampler + GroupedBatchSampler + EpochTagged +
               SeededDataset, as train.py with data.aspect_ratio_grouping=false) together yield every
               training image exactly once per epoch, for 2 epochs
  grouped      the same with aspect groups (the configs' default): every image exactly once per epoch
               too (group_batches puts each group's leftovers into mixed batches at the epoch's end)

and prints start-up time (launch to the first step done, slowest rank), step time and memory per rank.
Then, at --trainer-ranks, the real trainer (hvd_megdet.train.main, tiny detector) runs 8 iterations
(6 per epoch at 32 ranks) with a checkpoint every 2; a fresh output directory holding only its
checkpoint of iteration 4 is resumed on as many ranks; the final weights, momentum, progress and the
losses after the resume must be bitwise equal. Exit status 1 if any check fails. The driver itself
imports torch only for that final comparison.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = ROOT / "benchmarks" / "_rehearse_rank.py"
sys.path.insert(0, str(ROOT))

from data_prep import synthetic  # noqa: E402
from hvd_megdet.data import h5_schema as S  # noqa: E402  (torch-free)
from hvd_megdet.ranks import local_mpirun_command  # noqa: E402

BN_TOL = 1e-5       # |CGBN - float64 BN| on outputs of order 1 (fp32 rounding: ~1e-6 measured)
RUNNING_TOL = 1e-6  # running mean, fp32
GRAD_TOL = 1e-5     # relative to the largest gradient: fp32 sums over 32 ranks vs float64
SEPARATION = 100    # a wrong group's statistics must miss by at least this many tolerances
# Oversubscribed 16 to a core, a rank waiting in MPI must give the core up rather than spin, and
# Horovod's background thread wake every 10 ms rather than every 1 (what `make demo` sets).
RANK_ENV = {"OMP_NUM_THREADS": "1", "OMPI_MCA_mpi_yield_when_idle": "1", "HOROVOD_CYCLE_TIME": "10"}


def status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="8,16,32", help="comma-separated rank counts (multiples of 8)")
    parser.add_argument("--ranks-per-host", type=int, default=8)
    parser.add_argument("--images", type=int, default=384, help="synthetic training images (divisible by 2 x ranks)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--model", default="tiny", help="tiny, or resnet18 (build_model; ~0.8 GB per rank)")
    parser.add_argument("--trainer-ranks", type=int, default=32, help="ranks of the kill-and-resume runs (0: skip)")
    parser.add_argument("--trainer-iters", type=int, default=8, help="iterations of the trainer runs")
    parser.add_argument("--resume-from", type=int, default=4,
                        help="the checkpoint (iteration) the resumed run starts from; even, < --trainer-iters")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before one mpirun job is killed")
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    return parser


# ------------------------------------------------------------------------------------------- jobs
class MemoryWatch(threading.Thread):
    """Samples the summed proportional set size (Pss: shared pages split among their users) of a job's
    rank processes, and the machine's available memory, every ``interval`` seconds."""

    def __init__(self, interval: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.peak_total_mb, self.peak_ranks, self.min_available_mb = 0.0, 0, float("inf")

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            total, ranks = 0.0, 0
            for proc in Path("/proc").iterdir():
                try:
                    if not proc.name.isdigit() or RANK_SCRIPT.name.encode() not in (proc / "cmdline").read_bytes():
                        continue
                    total += _field_kb(proc / "smaps_rollup", "Pss") / 1024
                    ranks += 1
                except OSError:  # exited meanwhile
                    continue
            self.peak_total_mb = max(self.peak_total_mb, total)
            self.peak_ranks = max(self.peak_ranks, ranks)
            self.min_available_mb = min(self.min_available_mb, _field_kb(Path("/proc/meminfo"), "MemAvailable") / 1024)


def _field_kb(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def start_job(np: int, args: list[str], ranks_per_host: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HVD_MEGDET_RANKS_PER_HOST=str(ranks_per_host), **RANK_ENV)
    env["REHEARSE_T0"] = repr(time.time())
    cmd = local_mpirun_command(np) + [sys.executable, str(RANK_SCRIPT), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: a kill reaches every rank


def wait_job(proc: subprocess.Popen, timeout: float, log: Path, what: str) -> float:
    start = time.time()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"{what}: killed after {timeout:.0f} s; log {log}") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{what}: mpirun exit code {proc.returncode}; log {log}:\n{tail}")
    return time.time() - start


def run_checks_job(np: int, opts, shards: Path, work: Path) -> dict:
    out = work / f"checks_np{np}"
    out.mkdir(parents=True, exist_ok=True)
    watch = MemoryWatch()
    watch.start()
    launched = time.time()
    proc = start_job(np, ["checks", "--shards", str(shards), "--out", str(out), "--steps", str(opts.steps),
                          "--model", opts.model], opts.ranks_per_host, out / "mpirun.log")
    wait_job(proc, opts.timeout, out / "mpirun.log", f"checks on {np} ranks")
    wall = time.time() - launched
    watch.stop.set()
    watch.join()
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]
    return {"np": np, "ranks": results, "wall": wall, "peak_pss_total_mb": watch.peak_total_mb,
            "min_available_mb": watch.min_available_mb}


# ------------------------------------------------------------------------------------------ checks
def judge(job: dict, k: int, image_ids: list[int]) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for one scale's rank results."""
    ranks, np = job["ranks"], job["np"]
    hosts = np // k
    bad = [r["rank"] for r in ranks if not _member_ok(r, k, hosts)]
    checks = [("membership", not bad, f"{hosts} host(s) x {k}: every rank's BN set = its host's ranks, "
                                       f"{ranks[0]['membership']['cgbn_layers']} CGBN layers on it"
               + (f"; wrong on ranks {bad}" if bad else ""))]

    bn = [layer for r in ranks for layer in r["bn"].values()]
    err_host = max(b["err_host"] for b in bn)
    err_run = max(b["running_mean_err"] for b in bn)
    err_world, err_local = min(b["err_world"] for b in bn), min(b["err_local"] for b in bn)
    separated = err_local > SEPARATION * BN_TOL and (hosts == 1 or err_world > SEPARATION * BN_TOL)
    checks.append(("bn-stats", err_host <= BN_TOL and err_run <= RUNNING_TOL and separated,
                   f"max |y - BN64(host)| {err_host:.1e} (tol {BN_TOL:.0e}), running mean {err_run:.1e}; "
                   f"BN over the world would miss by >= {err_world:.2f}" + (" (1 host: same group)" if hosts == 1 else "")
                   + f", over the rank's own images by >= {err_local:.2f}"))

    g = [r["grads"] for r in ranks]
    same = len({x["grad_sha"] for x in g}) == 1 and len({x["weight_sha"] for x in g}) == 1
    err = max(x["grad_err"] for x in g)
    deterministic = all(x["loss_a"] == x["loss_b"] for x in g)
    spread = statistics.median(x["local_vs_mean"] for x in g)
    checks.append(("gradients", same and err <= GRAD_TOL and deterministic,
                   f"{len({x['grad_sha'] for x in g})} distinct gradient hash(es) and "
                   f"{len({x['weight_sha'] for x in g})} weight hash(es) over {np} ranks; "
                   f"max |g - mean64(own g)| / max|g| {err:.1e} (tol {GRAD_TOL:.0e}); a rank's own gradient "
                   f"differs from the mean by {spread:.2f} (median)"))

    for epoch in sorted(ranks[0]["seen"], key=int):
        missing, extra, detail = _coverage([r["seen"][epoch] for r in ranks], image_ids)
        checks.append((f"sampler e{epoch}", not missing and not extra, f"loaders, aspect grouping off: {detail}"))
        # With aspect groups (the configs' default) too: group_batches yields each group's leftovers
        # in mixed batches at the epoch's end, so nothing is repeated or left out.
        missing, extra, detail = _coverage([r["grouped"][epoch] for r in ranks], image_ids)
        checks.append((f"grouped e{epoch}", not missing and not extra, f"batches, aspect grouping on: {detail}"))
    return checks


def _coverage(per_rank: list[list[int]], image_ids: list[int]) -> tuple[list[int], int, str]:
    """(images never seen, extra sightings, a summary) of one epoch over every rank."""
    counts = collections.Counter(i for ids in per_rank for i in ids)
    missing = [i for i in image_ids if i not in counts]
    extra = sum(c - 1 for c in counts.values()) + sum(c for i, c in counts.items() if i not in set(image_ids))
    detail = (f"{len(counts)} of {len(image_ids)} images seen, {len(missing)} never, {extra} extra times"
              + (f" (e.g. never {missing[:3]}, twice {[i for i, c in counts.items() if c > 1][:3]})" if missing or extra
                 else ""))
    return missing, extra, detail


def _member_ok(r: dict, k: int, hosts: int) -> bool:
    m, rank = r["membership"], r["rank"]
    group = list(range(k * (rank // k), k * (rank // k) + k))
    set_ok = m["set_ranks"] == group or (hosts == 1 and m["set_ranks"] in ([], group))  # 1 host: the global set
    return (m["host_index"] == rank // k and m["num_hosts"] == hosts and m["host_rank"] == rank % k
            and m["bn_ranks"] == group and set_ok and m["reduced_over"] == group
            and m["cgbn_layers"] > 0 and m["layers_on_set"] == m["cgbn_layers"])


def timing(job: dict) -> dict:
    ranks, np = job["ranks"], job["np"]
    steps = [max(r["step_times"][i] for r in ranks) for i in range(len(ranks[0]["step_times"]))]
    t = {key: max(r["times"][key] for r in ranks) for key in ranks[0]["times"]}
    return {"np": np, "startup": t["first_step"], "imported": t["imported"], "initialised": t["initialised"],
            "built": t["built"], "step": statistics.median(steps), "exit": job["wall"] - t["done"],
            "wall": job["wall"], "peak_rss": max(r["memory"]["peak_rss"] for r in ranks),
            "private": statistics.median(r["memory"]["private"] for r in ranks),
            "pss_per_rank": job["peak_pss_total_mb"] / np, "pss_total": job["peak_pss_total_mb"],
            "min_available": job["min_available_mb"]}


# ----------------------------------------------------------------------------------------- trainer
def trainer_args(shards: Path, out: Path, iters: int) -> list[str]:
    """configs/smoke_cpu.yaml on the tiny detector: 2 images of 64x48 per rank, CGBN, a checkpoint every 2."""
    return ["train", "--config", "configs/smoke_cpu.yaml", "--set", f"data.train_path={shards}",
            f"train.output_dir={out}", f"train.max_iters={iters}", "data.images_per_rank=2", "data.min_size=48",
            "data.max_size=64", "data.num_workers=0", "model.norm=cgbn", "solver.warmup_iters=2",
            "model.box_fc_dim=1024",  # the head its figures (README) were measured with, not the smoke config's
            "solver.base_batch=64",  # lr 0.01 at 32 ranks x 2 images (the linear rule from 2 would give 0.32)
            "train.checkpoint_every=2", "train.keep_checkpoints=20", "train.log_every=1", "train.progress=false"]


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in (out / "checkpoints").glob("ckpt_*.pt")
                  if (m := re.fullmatch(r"ckpt_(\d+)\.pt", p.name)))


def trainer_resume(np: int, opts, shards: Path, work: Path) -> tuple[list[tuple[str, bool, str]], dict]:
    """The real trainer on ``np`` ranks for ``trainer_iters`` iterations, checkpointing every 2; then a
    fresh output directory holding only its checkpoint of iteration ``resume_from`` (mid-epoch) is
    resumed on ``np`` ranks to the end. The final checkpoints must be bitwise equal."""
    straight, resumed = work / f"train_np{np}_straight", work / f"train_np{np}_resumed"
    for d in (straight, resumed):
        shutil.rmtree(d, ignore_errors=True)
    k, n, at = opts.ranks_per_host, opts.trainer_iters, opts.resume_from
    watch = MemoryWatch()
    watch.start()
    t = time.time()
    wait_job(start_job(np, trainer_args(shards, straight, n), k, work / "straight.log"), opts.timeout,
             work / "straight.log", f"uninterrupted trainer on {np} ranks")
    times = {"uninterrupted": time.time() - t}
    watch.stop.set()
    watch.join()
    if at not in _checkpoints(straight):
        return [(f"resume at {np}", False, f"no checkpoint of iteration {at} in {straight} (have "
                 f"{_checkpoints(straight)})")], {}
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy2(straight / "checkpoints" / f"ckpt_{at:08d}.pt", resumed / "checkpoints")
    t = time.time()
    wait_job(start_job(np, trainer_args(shards, resumed, n), k, work / "resumed.log"), opts.timeout,
             work / "resumed.log", f"resumed trainer on {np} ranks")
    times["resumed"] = time.time() - t
    found = re.search(r"resumed from \S+ at iteration (\d+)", (work / "resumed.log").read_text(errors="replace"))

    import torch  # only now: the comparison reads the checkpoints

    from hvd_megdet import checkpoint
    from hvd_megdet.metrics import read_log

    (_, a), (_, b) = checkpoint.find_resumable(straight), checkpoint.find_resumable(resumed)
    differ = [key for key, value in a["model"].items() if not torch.equal(value, b["model"][key])]
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    momentum_same = len(momentum_a) == len(momentum_b) and all(map(torch.equal, momentum_a, momentum_b))
    losses_a = {r["iter"]: r["loss"] for r in read_log(straight / "log.jsonl", "train")}
    losses_b = {r["iter"]: r["loss"] for r in read_log(resumed / "log.jsonl", "train")}
    start = int(found.group(1)) if found else -1
    after = list(range(start + 1, n + 1))
    losses_same = bool(after) and all(losses_a.get(i) == losses_b.get(i) for i in after)
    ok = (start == at and a["progress"] == b["progress"] and a["progress"]["iteration"] == n
          and not differ and momentum_same and losses_same and a["world_size"] == b["world_size"] == np)
    detail = (f"resumed at iteration {start} from the uninterrupted run's checkpoint, ran to {n} (epoch "
              f"{b['progress']['epoch']}, {b['progress']['batches_done']} batches into it); {len(a['model'])} tensors, "
              f"{len(differ)} differ" + (f" ({differ[:3]})" if differ else "") + f"; momentum "
              f"{'equal' if momentum_same else 'DIFFERS'}; losses of iterations {after[0]}..{after[-1]} "
              f"{'equal' if losses_same else 'DIFFER'}; wall: uninterrupted {times['uninterrupted']:.0f} s, resumed "
              f"{times['resumed']:.0f} s" if after else "no iteration after the resume")
    memory = {"np": np, "pss_total_mb": watch.peak_total_mb, "min_available_mb": watch.min_available_mb}
    return [(f"resume at {np}", ok, detail)], memory


# ------------------------------------------------------------------------------------------- main
def print_scaling(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\nStart-up, steps and memory per rank ({os.cpu_count()} cores; every rank 1 thread, 2 images of 64x48):")
    print(f"{'ranks':>5} {'imported':>9} {'hvd.init':>9} {'1st step':>9} {'step s':>7} {'core-s/img':>10} "
          f"{'peak RSS':>9} {'private':>8} {'Pss':>6} {'job Pss':>8} {'min avail':>9} {'exit':>6} {'wall':>6}")
    for r in rows:
        core_s = r["step"] * min(os.cpu_count() or 1, r["np"]) / (2 * r["np"])
        print(f"{r['np']:>5} {r['imported']:>8.0f}s {r['initialised']:>8.0f}s {r['startup']:>8.0f}s {r['step']:>7.2f} "
              f"{core_s:>10.3f} {r['peak_rss']:>7.0f}MB {r['private']:>6.0f}MB {r['pss_per_rank']:>4.0f}MB "
              f"{r['pss_total'] / 1024:>6.1f}GB {r['min_available'] / 1024:>7.1f}GB {r['exit']:>5.0f}s {r['wall']:>5.0f}s")
    for r in rows[1:]:
        x = r["np"] / base["np"]
        print(f"  {base['np']} -> {r['np']} ranks ({x:.0f}x): start-up {r['startup'] / base['startup']:.2f}x, "
              f"step {r['step'] / base['step']:.2f}x, Pss per rank {r['pss_per_rank'] / base['pss_per_rank']:.2f}x")
    print("  imported / hvd.init / 1st step: seconds from the launch to the slowest rank reaching that point; "
          "step: median over steps of the slowest rank;\n  core-s/img: step x cores / images (flat = no overhead "
          "beyond sharing the cores); peak RSS: VmHWM (shared library pages counted in every rank);\n  private: "
          "pages no other rank shares; Pss: peak of the job's summed proportional set size / ranks; min avail: the "
          "machine's\n  MemAvailable at its lowest during the job (other users included); exit: last rank done -> "
          "mpirun returned.")


def main(argv: list[str] | None = None) -> int:
    opts = get_args_parser().parse_args(argv)
    began = time.time()
    scales = [int(s) for s in opts.scales.split(",") if s]
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="rehearse_"))
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards" / "train"
    if not (shards / "manifest.json").exists():  # --keep: made once
        synthetic.make_shards(work, opts.images, "64x48", seed=5, images_per_shard=64)
    image_ids = [i for s in S.load_manifest(shards)[S.M_SHARDS] for i in s[S.S_IMAGE_IDS]]
    print(f"work directory {work}; {len(image_ids)} synthetic images; model {opts.model}")
    rows, results = [], []
    for np in scales:
        try:
            job = run_checks_job(np, opts, shards, work)
        except RuntimeError as err:  # a crashed or hung job: say so, and go on to the next scale
            print(f"[{np:>2} ranks] FAIL checks job: {err}", flush=True)
            results.append((f"checks job @{np}", False, str(err)))
            continue
        rows.append(timing(job))
        checks = judge(job, opts.ranks_per_host, image_ids)
        results += [(f"{name} @{np}", ok, detail) for name, ok, detail in checks]
        for name, ok, detail in checks:
            print(f"[{np:>2} ranks] {status(ok)} {name}: {detail}", flush=True)
    if rows:
        print_scaling(rows)
    if opts.trainer_ranks:
        try:
            checks, memory = trainer_resume(opts.trainer_ranks, opts, shards, work)
        except RuntimeError as err:
            checks, memory = [(f"resume at {opts.trainer_ranks}", False, str(err))], {}
        for name, ok, detail in checks:
            results.append((name, ok, detail))
            print(f"\n[{opts.trainer_ranks} ranks] {status(ok)} {name} (real trainer): {detail}")
        if memory:
            print(f"  the trainer's peak job Pss on {memory['np']} ranks: {memory['pss_total_mb'] / 1024:.1f} GB "
                  f"({memory['pss_total_mb'] / memory['np']:.0f} MB per rank); the machine's available memory "
                  f"never fell below {memory['min_available_mb'] / 1024:.1f} GB")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + f"; rehearsal took {time.time() - began:.0f} s")
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
