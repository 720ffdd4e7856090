"""MegDet's evidence in miniature (issue 23): Tables 2 and 3 and Figs. 1 and 4 on the 2-core machine.

    python benchmarks/recipe_sweep.py --dry-run      # the plan and its estimated time; trains nothing
    python benchmarks/recipe_sweep.py                # the sweep (about an hour on 2 cores), then the report
    python benchmarks/recipe_sweep.py --seeds 2      # every run with seeds 1 and 2 (about twice as long)
    python benchmarks/recipe_sweep.py --quick        # 6 runs of 1-2 steps: the pipeline, not a result
    python benchmarks/recipe_sweep.py --report-only  # the report from the runs done so far

Every run trains the same number of epochs (11, the normal policy; 18 for the long one) of the hard
synthetic set (python -m data_prep synthetic --hard) with a ResNet-18 FPN at 96x64 px, the LR scaled by
the linear rule from the paper's LR per image (0.02 for 16: 0.0025 for 2), and linear warm-up over one
epoch. A global batch is ranks x images per rank x backward passes (solver.backward_passes_per_step),
ranks on this machine under mpirun. The comparisons (MegDet arXiv 1711.07240, Sec. 4):

* batch size: 2, 8 and 32 images with CGBN (Table 3, Fig. 1): does mmAP hold at equal epochs?
* warm-up: at batch 32, with and without (Sec. 3.2). Without is a control: the paper says it fails.
* BN: at batch 8 (2 images per rank) frozen (no BN), local (BN size 2) and CGBN (BN size 8), Table 3's
  "16 | 2" against "16 | 16"; and frozen at batch 32, a control (Table 2: without BN, batch 64 at the
  scaled LR failed even with warm-up).
* policy: long against normal at batch 8 (Table 3's "(long)" rows, Fig. 4).

Each run and seed trains into OUT/<name>_seed<k>/, the name saying batch, ranks x images x passes, BN,
warm-up and policy; sweep_run.json there holds the same as fields, with each launch's exit status and
wall time, and console.log the ranks' output. A rerun skips runs that finished or diverged and resumes
the others. The report (hvd_megdet.tools.report_sweep, OUT/report/) pools the seeds and judges
divergence. The time is estimated from measured figures (CostModel), not from running the sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: hvd_megdet and data_prep from this checkout

from hvd_megdet import lr_schedule  # noqa: E402  (pure, torch-free: a dry run imports no torch)
from hvd_megdet.fileio import atomic_write_text  # noqa: E402
from hvd_megdet.ranks import local_mpirun_command  # noqa: E402
from hvd_megdet.tools import report_sweep  # noqa: E402

BASE_CONFIG = "configs/smoke_cpu.yaml"  # every key the sweep depends on is set again below
# The paper's LR per image, 0.02 for 16 (Sec. 4). The demo's 4x higher rate (0.01 for 2) made every
# run of the first attempt diverge, the batch-2 baseline too (iteration 47 of 352, 2026-12-02).
BASE_LR, BASE_BATCH = 0.0025, 2
EVAL_EPOCHS = (4, 8, 12, 16)  # mmAP per epoch for Fig. 4 (those below a run's last epoch), then at the end


@dataclass(frozen=True)
class CostModel:
    """Seconds on the slower 2-core machine (docs/testing.md), measured there before the sweep, side by side.

    A step is a fixed cost (the ~30M-parameter allreduce, the optimizer, Python) plus a cost per image
    each core computes: 1.24, 3.03 and 10.84 s per step at batch 2 (2 x 1 x 1), 8 (4 x 2 x 1) and 32
    (4 x 2 x 4), i.e. 1, 4 and 16 images per core (2026-12-02, medians over steps 4-30, 4-16 and 4-6 of
    runs one after another, nothing else running). An image-only model (this class before) was 5x low at batch 2.
    """

    step_fixed_s: float = 0.6            # fitted to the three steps above (0.6 + 0.64 x 1, 4, 16)
    train_s_per_image_core: float = 0.64
    cores: int = 2
    startup_s_per_rank: float = 4.5      # launch to the first step: 9.3 s for 2 ranks, 17.9 s for 4
    eval_s_per_image: float = 0.375      # 24 s for 64 validation images on the 2 cores (batch-2 run, epoch 2)
    eval_fixed_s: float = 2.0            # COCOeval on the gathered detections (assumed)
    checkpoint_s: float = 1.0            # 0.7-1.1 s measured at each epoch end
    report_s: float = 5.0                # the trainer's own report at its end, 4 PNGs (assumed)
    data_s_per_image: float = 0.02       # writing and packing the synthetic set (assumed)


@dataclass(frozen=True)
class Sizes:
    """The sweep's scale. Shapes: global batch -> (ranks, images per rank, backward passes)."""

    name: str
    train_images: int
    val_images: int
    shapes: dict[int, tuple[int, int, int]]
    bn_batch: int        # where frozen / local / CGBN are compared, at 2 images per rank
    policy_batch: int    # where long / normal are compared
    max_iters: int = 0   # 0: the whole policy


# 64 training images, so that 2 seeds of the 8 runs fit in under 1.5 h on the slower 2-core machine (76 min):
# every run sees 11 x 64 images; 32-image steps give 2 steps an epoch, 8-image steps 8.
FULL = Sizes("full", train_images=64, val_images=32, shapes={2: (2, 1, 1), 8: (4, 2, 1), 32: (4, 2, 4)},
             bn_batch=8, policy_batch=8)
# 4 images: one 4-image step an epoch and two 2-image steps, so 2 steps end an epoch and evaluate.
QUICK = Sizes("quick", train_images=4, val_images=4, shapes={2: (2, 1, 1), 4: (2, 2, 1)},
              bn_batch=4, policy_batch=4, max_iters=2)
IMAGE_SIZE = "96x64"  # data.min_size 64, max_size 96: the smoke config's scale, no resize


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan (trained once per seed)."""

    order: int
    comparisons: tuple[str, ...]  # what it is compared in
    control: str                  # "": none; else why the paper says this setting fails
    ranks: int
    images_per_rank: int
    passes: int                   # solver.backward_passes_per_step
    norm: str                     # frozen | local | cgbn
    warmup: bool
    policy: str                   # normal | long

    @property
    def global_batch(self) -> int:
        return lr_schedule.global_batch_size(self.images_per_rank, self.ranks, self.passes)

    @property
    def bn_size(self) -> int:  # as hvd_megdet.train.bn_size: CGBN over every rank of the job
        return {"frozen": 0, "local": self.images_per_rank, "cgbn": self.images_per_rank * self.ranks}[self.norm]

    @property
    def scaled_lr(self) -> float:
        return lr_schedule.scaled_lr(self.global_batch, BASE_LR, BASE_BATCH)

    @property
    def name(self) -> str:
        bn = "frozen" if self.norm == "frozen" else f"{self.norm}{self.bn_size}"
        return (f"bs{self.global_batch}_{self.ranks}x{self.images_per_rank}x{self.passes}_{bn}_"
                f"{'warmup' if self.warmup else 'nowarmup'}_{self.policy}")


def build_plan(sizes: Sizes) -> list[RunSpec]:
    """The comparisons of the module docstring, each run once (a run may serve several)."""
    largest = max(sizes.shapes)
    specs: dict[tuple, RunSpec] = {}

    def add(batch: int, comparison: str, norm: str = "cgbn", warmup: bool = True, policy: str = "normal",
            control: str = "") -> None:
        ranks, images, passes = sizes.shapes[batch]
        key = (batch, norm, warmup, policy)
        old = specs.get(key)
        comparisons = tuple(dict.fromkeys((old.comparisons if old else ()) + (comparison,)))
        specs[key] = RunSpec(old.order if old else len(specs), comparisons, control or (old.control if old else ""),
                             ranks, images, passes, norm, warmup, policy)

    for batch in sorted(sizes.shapes):
        add(batch, "batch size")
    add(largest, f"warm-up @{largest}")
    add(largest, f"warm-up @{largest}", warmup=False,
        control="no warm-up at the largest batch's scaled LR (MegDet Sec. 3.2, 4.1)")
    for norm in ("frozen", "local", "cgbn"):
        add(sizes.bn_batch, f"BN @{sizes.bn_batch}", norm=norm)
    add(largest, f"BN @{largest}", norm="frozen",
        control="no BN at a large batch and its scaled LR, even with warm-up (MegDet Table 2)")
    add(sizes.policy_batch, f"policy @{sizes.policy_batch}")
    add(sizes.policy_batch, f"policy @{sizes.policy_batch}", policy="long")
    return sorted(specs.values(), key=lambda s: s.order)


def iters_per_epoch(spec: RunSpec, sizes: Sizes) -> int:
    return lr_schedule.iters_per_epoch(sizes.train_images, spec.images_per_rank, spec.ranks, spec.passes)


def warmup_iters(spec: RunSpec, sizes: Sizes) -> int:
    """One epoch, as 500 steps is about one epoch at the paper's batch 256; 0 without warm-up."""
    return iters_per_epoch(spec, sizes) if spec.warmup else 0


def steps_and_evals(spec: RunSpec, sizes: Sizes) -> tuple[int, tuple[int, ...], int]:
    """(optimizer steps, train.eval_epochs, evaluations) of one run, as hvd_megdet.train does them."""
    ipe = iters_per_epoch(spec, sizes)
    steps = lr_schedule.total_iters(ipe, spec.policy)
    steps = min(steps, sizes.max_iters) if sizes.max_iters else steps
    epochs = steps // ipe
    eval_epochs = () if sizes.max_iters else tuple(e for e in EVAL_EPOCHS if e < epochs)
    return steps, eval_epochs, len(eval_epochs) + (steps % ipe == 0)  # and at the end, if at an epoch's end


def estimate_s(spec: RunSpec, sizes: Sizes, cost: CostModel = CostModel()) -> float:
    """Wall seconds of one run (see CostModel)."""
    steps, _, evals = steps_and_evals(spec, sizes)
    images_per_core = spec.global_batch / min(spec.ranks, cost.cores)
    train = steps * (cost.step_fixed_s + images_per_core * cost.train_s_per_image_core)
    evaluate = evals * (sizes.val_images * cost.eval_s_per_image + cost.eval_fixed_s)
    saves = steps // iters_per_epoch(spec, sizes) + evals + 1
    return (cost.startup_s_per_rank * spec.ranks + train + evaluate + saves * cost.checkpoint_s
            + cost.report_s)


def overrides(spec: RunSpec, sizes: Sizes, seed: int, data: Path, out: Path) -> list[str]:
    """Every config key the run depends on, set explicitly on top of BASE_CONFIG."""
    _, eval_epochs, _ = steps_and_evals(spec, sizes)
    return [
        f"data.train_path={data / 'shards/train'}", f"data.val_path={data / 'shards/val'}",
        f"data.images_per_rank={spec.images_per_rank}", "data.min_size=64", "data.max_size=96",
        "data.num_workers=0",
        "model.backbone=resnet18", f"model.norm={spec.norm}",
        f"model.bn_group_size={spec.ranks if spec.norm == 'cgbn' else 'null'}",
        "model.box_batch_size_per_image=64", "model.box_fc_dim=1024", "model.backbone_weights=",
        f"solver.base_lr={BASE_LR}", f"solver.base_batch={BASE_BATCH}", f"solver.policy={spec.policy}",
        f"solver.warmup_iters={warmup_iters(spec, sizes)}",
        f"solver.backward_passes_per_step={spec.passes}", "solver.on_nonfinite=stop",
        f"train.output_dir={out}", f"train.seed={seed}", "train.log_every=1",  # log_every=1: judge's first loss
        "train.checkpoint_every=1000000", "train.keep_checkpoints=1",
        f"train.eval_epochs=[{', '.join(map(str, eval_epochs))}]", "train.eval_at_end=true",
        f"train.max_iters={sizes.max_iters}", "train.device=cpu", "train.progress=false",
    ]


def describe(spec: RunSpec, sizes: Sizes, seed: int) -> dict:
    """The spec as sweep_run.json holds it (what hvd_megdet.tools.report_sweep reads)."""
    steps, eval_epochs, _ = steps_and_evals(spec, sizes)
    return {**asdict(spec), "name": spec.name, "global_batch": spec.global_batch, "bn_size": spec.bn_size,
            "base_lr": BASE_LR, "base_batch": BASE_BATCH, "scaled_lr": spec.scaled_lr,
            "warmup_iters": warmup_iters(spec, sizes),
            "iters_per_epoch": iters_per_epoch(spec, sizes), "steps": steps, "eval_epochs": list(eval_epochs),
            "sizes": sizes.name, "train_images": sizes.train_images, "val_images": sizes.val_images,
            "image_size": IMAGE_SIZE, "dataset": "synthetic --hard", "seed": seed}


def print_plan(plan: list[RunSpec], sizes: Sizes, seeds: list[int], cost: CostModel) -> float:
    print(f"plan ({sizes.name}): {len(plan)} runs x {len(seeds)} seed(s) {seeds}; hard synthetic set, "
          f"{sizes.train_images} train / {sizes.val_images} val images of {IMAGE_SIZE}; LR {BASE_LR} per "
          f"{BASE_BATCH} images, scaled linearly")
    print(f"{'run':40} {'batch':>5} {'LR':>6} {'warm-up':>7} {'steps':>6} {'est. min':>8}  compares / control")
    total = (sizes.train_images + sizes.val_images) * cost.data_s_per_image
    for spec in plan:
        est = estimate_s(spec, sizes, cost)
        total += est * len(seeds)
        steps, _, _ = steps_and_evals(spec, sizes)
        print(f"{spec.name:40} {spec.global_batch:5d} {spec.scaled_lr:6.3g} {warmup_iters(spec, sizes):7d} "
              f"{steps:6d} {est / 60:8.1f}  {', '.join(spec.comparisons)}"
              f"{'  CONTROL: ' + spec.control if spec.control else ''}")
    print(f"estimated total: {total / 60:.0f} min ({total / 3600:.2f} h) on the slower 2-core machine: per run "
          f"start-up {cost.startup_s_per_rank:g} s/rank + steps x ({cost.step_fixed_s:g} s + "
          f"{cost.train_s_per_image_core:g} s per image per core) + evaluations + a checkpoint per epoch "
          f"(benchmarks/recipe_sweep.py CostModel)")
    return total


def prepare_data(data: Path, sizes: Sizes) -> None:
    """The hard synthetic set, packed into shards, unless it is there (the demo's two commands)."""
    for split, images, seed in (("train", sizes.train_images, 1), ("val", sizes.val_images, 2)):
        shards = data / "shards" / split
        manifest = shards / "manifest.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())["num_images"]
            if found != images:  # a set of another sweep's size: its runs would not be this plan's
                raise SystemExit(f"error: {manifest}: {found} {split} images, the plan needs {images}: "
                                 f"give another --data")
            continue
        raw = data / f"raw_{split}"
        subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--hard", "--out", str(raw), "--images",
                        str(images), "--size", IMAGE_SIZE, "--seed", str(seed), "--split", split], check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "data_prep.coco_to_hdf5", "--images", str(raw / "images"),
                        "--annotations", str(raw / "annotations" / f"instances_{split}.json"), "--out", str(shards),
                        "--images-per-shard", "64"], check=True, cwd=ROOT)


def train_one(spec: RunSpec, sizes: Sizes, seed: int, data: Path, out: Path, estimate: float) -> str:
    """Train (or resume) one run and seed into ``out``; returns its status line."""
    record_path = out / report_sweep.SPEC_FILE
    if record_path.exists():
        done = report_sweep.load_result(out)
        if done.status in ("finished", "diverged"):  # final: a rerun would only repeat it
            return f"{done.status} before: skipped"
        record = json.loads(record_path.read_text())
        if record["spec"] != describe(spec, sizes, seed):  # resuming it would mix two plans in one run
            raise SystemExit(f"error: {record_path}: a run of another plan (its spec differs): give another --out")
    else:
        record = {"launches": []}
    cmd = local_mpirun_command(spec.ranks) + [sys.executable, "-m", "hvd_megdet.train", "--config", BASE_CONFIG,
                                              "--set", *overrides(spec, sizes, seed, data, out)]
    record.update(spec=describe(spec, sizes, seed), seed=seed, estimate_s=round(estimate, 1), command=cmd)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")  # self-describing before it starts
    # One thread per rank (up to 4 ranks share the 2 cores), and the demo's Horovod settings for CPU
    # ranks (jobs/local/demo.sh); the caller's environment wins.
    env = {"HOROVOD_CYCLE_TIME": "10", "OMPI_MCA_mpi_yield_when_idle": "1", **os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    with open(out / report_sweep.CONSOLE_FILE, "a") as console:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: a hung run is stopped with its ranks
        try:
            # A cap for a run hung past its own stall watchdog, not a budget: the estimate can be 5x low
            # (2 images per step: 1.25 s per step measured on a slow 2-core machine, 0.24 s estimated).
            code = proc.wait(timeout=max(3600.0, 20 * estimate))
        except subprocess.TimeoutExpired:
            code = _stop_run(proc)
        except KeyboardInterrupt:  # Ctrl-C or TERM to the sweep: the run, in a group of its own, saves too
            _stop_run(proc)
            raise
    record["launches"].append({"started": round(start, 3), "returncode": code, "wall_s": round(time.time() - start, 1)})
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    result = report_sweep.load_result(out)
    mmap = f", mmAP {100 * result.mmap:.1f}" if result.mmap is not None else ""
    return f"{result.status}{': ' + result.verdict.reason if result.verdict.reason else ''}{mmap}"


def _stop_run(proc: subprocess.Popen) -> int:
    """TERM to the run's ranks: the trainer saves and exits, and a rerun of the sweep resumes it."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=300)
    except subprocess.TimeoutExpired:  # too stuck to save: the rerun resumes from the last epoch
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="runs and report (default runs/recipe_sweep[_quick])")
    parser.add_argument("--data", default=None, help="the hard synthetic set (default data/recipe_sweep[_quick])")
    parser.add_argument("--seeds", type=int, default=1, help="train every run with seeds 1..N (rows: median, min-max)")
    parser.add_argument("--quick", action="store_true", help="6 runs of 1-2 steps on 4 images: checks the pipeline")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimated time, train nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    return parser


def main(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    out = Path(args.out or ROOT / f"runs/recipe_sweep{suffix}").resolve()
    data = Path(args.data or ROOT / f"data/recipe_sweep{suffix}").resolve()
    if args.seeds < 1:
        print("error: --seeds must be at least 1", file=sys.stderr)
        return 2
    seeds = list(range(1, args.seeds + 1))
    plan = build_plan(sizes)
    cost = CostModel()
    total = print_plan(plan, sizes, seeds, cost)
    if args.dry_run:
        return 0
    if not args.report_only:
        prepare_data(data, sizes)
        started, left = time.time(), total
        for seed in seeds:
            for spec in plan:
                estimate = estimate_s(spec, sizes, cost)
                status = train_one(spec, sizes, seed, data, out / f"{spec.name}_seed{seed}", estimate)
                left -= estimate
                print(f"[{(time.time() - started) / 60:5.1f} min, ~{left / 60:.0f} min left] {spec.name} seed {seed}: "
                      f"{status}", flush=True)
    run_dirs = report_sweep.find_run_dirs(out)
    if not run_dirs:
        print(f"error: no runs in {out} to report on", file=sys.stderr)
        return 2
    report = report_sweep.write_sweep_report(run_dirs, out / "report")
    print(report.table)
    print(f"\nreport: {report.markdown}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the sweep as Ctrl-C does
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except KeyboardInterrupt:
        print("stopped (a run in progress saves a checkpoint first): run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
