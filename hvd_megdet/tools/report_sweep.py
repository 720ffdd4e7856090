"""The recipe sweep's report (issue 23): MegDet's Tables 2 and 3 and Figs. 1 and 4, in miniature.

    python -m hvd_megdet.tools.report_sweep runs/recipe_sweep          # writes runs/recipe_sweep/report/

``benchmarks/recipe_sweep.py`` trains one directory per run and seed. Besides what hvd_megdet.train
writes there (log.jsonl, config.yaml, eval_epochNN/, finished.json), each holds ``sweep_run.json``
(what the run is: batch, ranks x images x passes, BN, policy, warm-up, LR, which comparison it serves,
whether the paper says it fails; and each launch's exit status and wall time) and ``console.log``
(the ranks' output). This module reads them and writes to ``--out``:

* ``report.md``: a row per run, its seeds pooled: the median mmAP with the spread (min-max), steps,
  wall time, how many seeds diverged, and for the controls whether they failed as the paper says;
  runs without BN first (Table 2), then those with BN (Table 3);
* ``report.json``: the rows, and every seed's result;
* ``fig1_mmap_vs_batch.png``: final mmAP against the global batch (Fig. 1), diverged runs marked;
* ``fig4_per_epoch.png``: mmAP and mean training loss per epoch, the LR decays dashed (Fig. 4).

**Diverged** is decided by :func:`judge`, here and nowhere else; the rule was fixed before any sweep
result existed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hvd_megdet import lr_schedule
from hvd_megdet.fileio import atomic_path, atomic_write_text
from hvd_megdet.tools.report_runs import Run, epoch_means, load_run

SPEC_FILE = "sweep_run.json"   # written by benchmarks/recipe_sweep.py into each run directory
CONSOLE_FILE = "console.log"   # the ranks' stdout and stderr, every launch appended
# hvd_megdet.train stops on a non-finite loss (solver.on_nonfinite=stop) by raising
# engine.NonFiniteLossError: every rank prints its message and exits 3. log.jsonl gets no record of it
# (its records just end, and finished.json is never written), so the console and exit status tell.
NONFINITE_MESSAGE = "non-finite loss at iteration"
NONFINITE_EXIT = 3
LOSS_GROWTH_LIMIT = 10.0  # diverged: the last epoch's mean loss exceeds this many times the first logged loss
MMAP_ZERO = 0.001         # "mmAP ~0": below 0.1 points
FIGURES = ("fig1_mmap_vs_batch.png", "fig4_per_epoch.png")


@dataclass(frozen=True)
class Verdict:
    diverged: bool | None  # None: unknown (the run neither finished nor diverged)
    reason: str


def judge(launches: Sequence[dict], console: str, train: Sequence[dict], finished: bool,
          final_mmap: float | None) -> Verdict:
    """Whether a run diverged, and why. In this order, a run diverged when:

    1. it stopped on a non-finite loss: a launch exited NONFINITE_EXIT, or the console holds
       NONFINITE_MESSAGE (both are hvd_megdet.train's, see above);
    2. a logged loss (the mean of a logging window) is NaN or infinite;
    3. the loss grew: the mean logged loss of its last epoch is over LOSS_GROWTH_LIMIT times the first
       logged loss (at log_every=1, as the sweep trains, that is the untrained model's loss);
    4. it skipped steps for a non-finite loss (solver.on_nonfinite=skip) and its final mmAP is ~0.

    Otherwise a finished run did not diverge, and any other run is unknown (None): it failed for
    another reason, was interrupted, or has not run.
    """
    if any(launch.get("returncode") == NONFINITE_EXIT for launch in launches) or NONFINITE_MESSAGE in console:
        return Verdict(True, "stopped on a non-finite loss")
    losses = [r["loss"] for r in train if isinstance(r.get("loss"), (int, float))]
    if any(not math.isfinite(v) for v in losses):
        return Verdict(True, "non-finite loss in the log")
    if losses and losses[0] > 0:
        per_epoch = epoch_means(train, "loss", None)
        last = per_epoch[max(per_epoch)] if per_epoch else losses[-1]
        if last > LOSS_GROWTH_LIMIT * losses[0]:
            return Verdict(True, f"loss grew {last / losses[0]:.0f}x ({losses[0]:.3g} -> {last:.3g})")
    skipped = max((r.get("skipped_steps", 0) for r in train), default=0)
    if skipped and final_mmap is not None and final_mmap < MMAP_ZERO:
        return Verdict(True, f"{skipped} non-finite steps skipped, mmAP ~0")
    return Verdict(False, "") if finished else Verdict(None, "")


@dataclass(frozen=True)
class Result:
    """One run directory (one run, one seed), as the tables need it."""

    path: Path
    spec: dict[str, Any]        # sweep_run.json "spec": see benchmarks/recipe_sweep.py RunSpec
    seed: int
    status: str                 # finished | diverged | failed (exit N) | interrupted | not run
    verdict: Verdict
    mmap: float | None          # after the last epoch of a finished run (None otherwise)
    steps: int                  # optimizer steps logged
    wall_s: float               # every launch, start-up and evaluation included
    mmap_per_epoch: dict[int, float] = field(default_factory=dict)
    loss_per_epoch: dict[int, float] = field(default_factory=dict)


def _status(launches: Sequence[dict], verdict: Verdict, finished: bool, has_log: bool) -> str:
    if verdict.diverged:
        return "diverged"
    if finished:
        return "finished"
    code = launches[-1].get("returncode") if launches else None
    if code not in (None, 0):
        return f"failed (exit {code})"
    return "interrupted" if launches or has_log else "not run"


def load_result(run_dir: str | Path) -> Result:
    """Read one sweep run directory (it must hold SPEC_FILE)."""
    run_dir = Path(run_dir)
    record = json.loads((run_dir / SPEC_FILE).read_text())
    launches = record.get("launches", [])
    console = (run_dir / CONSOLE_FILE).read_text(errors="replace") if (run_dir / CONSOLE_FILE).exists() else ""
    run: Run | None = None
    try:
        run = load_run(run_dir)
    except (FileNotFoundError, ValueError):  # it never got as far as its first log record
        pass
    train = run.train if run else []
    finished = (run_dir / "finished.json").exists()
    ipe = run.start.get("iters_per_epoch") if run else None
    steps = int(train[-1]["iter"]) if train else 0
    evals = run.evals if run else []
    # The final mmAP is the evaluation after the last epoch of a finished run: an earlier one of a
    # run that went on to diverge says nothing about where it ended.
    final = evals[-1] if finished and evals and ipe and evals[-1]["epoch"] * ipe == steps else None
    mmap = final.get("mmAP") if final else None
    verdict = judge(launches, console, train, finished, mmap)
    return Result(path=run_dir, spec=record["spec"], seed=int(record.get("seed", 0)),
                  status=_status(launches, verdict, finished, run is not None), verdict=verdict, mmap=mmap,
                  steps=steps, wall_s=sum(float(x.get("wall_s", 0.0)) for x in launches),
                  mmap_per_epoch={e["epoch"]: e["mmAP"] for e in evals if "mmAP" in e},
                  loss_per_epoch=epoch_means(train, "loss", ipe))


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run directories under ``sweep_dir``: those holding SPEC_FILE."""
    return sorted(p.parent for p in Path(sweep_dir).glob(f"*/{SPEC_FILE}"))


# ---------------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------------
def judged(group: Sequence[Result]) -> list[Result]:
    """The seeds that have a verdict: those that finished or diverged, not those still training (a
    report written mid-sweep) or crashed otherwise."""
    return [r for r in group if r.verdict.diverged is not None]


def failed(group: Sequence[Result]) -> bool:
    """A run failed (the table's "failed", the per-epoch figure's "(diverged)") when every judged seed
    diverged."""
    ended = judged(group)
    return bool(ended) and all(r.verdict.diverged for r in ended)


def pool(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per run (spec name), its seeds pooled; in the plan's order."""
    by_name: dict[str, list[Result]] = {}
    for r in sorted(results, key=lambda r: (r.spec.get("order", 0), r.seed)):
        by_name.setdefault(r.spec["name"], []).append(r)
    rows = []
    for name, group in by_name.items():
        s = group[0].spec
        verdicts = judged(group)
        diverged = [r for r in verdicts if r.verdict.diverged]
        mmaps = [r.mmap for r in group if r.mmap is not None and not r.verdict.diverged]
        # Steps and wall time of the judged seeds (those that ended): a seed still training (a report
        # written mid-sweep) would pull the median down to wherever it is now.
        ended = verdicts or group
        rows.append({
            "run": name, "compares": ", ".join(s.get("comparisons", ())), "control": s.get("control", ""),
            "global_batch": s["global_batch"], "ranks": s["ranks"], "images_per_rank": s["images_per_rank"],
            "passes": s["passes"], "norm": s["norm"], "bn_size": s["bn_size"], "policy": s["policy"],
            "warmup": s["warmup_iters"] > 0, "lr": s["scaled_lr"], "seeds": len(group), "judged": len(verdicts),
            "diverged": len(diverged), "failed": failed(group), "reasons": sorted({r.verdict.reason for r in diverged}),
            "mmAP": statistics.median(mmaps) if mmaps else None,
            "mmAP_min": min(mmaps) if mmaps else None, "mmAP_max": max(mmaps) if mmaps else None,
            "steps": statistics.median(r.steps for r in ended),
            "wall_s": statistics.median(r.wall_s for r in ended),
            "statuses": [r.status for r in group]})
    return rows


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _mmap_cell(row: dict) -> str:
    if row["failed"]:
        return "failed"  # as the paper's Table 2 writes it
    if row["mmAP"] is None:
        return "–"
    if row["mmAP_min"] == row["mmAP_max"]:
        return _pct(row["mmAP"])
    return f"{_pct(row['mmAP'])} ({_pct(row['mmAP_min'])}-{_pct(row['mmAP_max'])})"


def _count_cell(k: int, n: int) -> str:
    """How many of n judged seeds diverged: yes / no for one seed, k/n for several, ? for none."""
    if n == 0:
        return "?"
    return ("yes" if k else "no") if n == 1 else f"{k}/{n}"


def markdown_table(rows: Sequence[dict]) -> str:
    header = ["run", "compares", "batch", "ranks x img x passes", "BN size", "policy", "warm-up", "LR", "mmAP",
              "steps", "wall (min)", "diverged", "paper: fails?", "control failed?"]
    align = ["---"] * 2 + ["--:"] * 2 + ["---"] * 3 + ["--:"] * 4 + ["---"] * 3
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        control = bool(r["control"])
        control_failed = "–"
        if control:
            control_failed = "not run yet" if not r["judged"] else (
                "yes" if r["failed"] else "no" if not r["diverged"] else "partly"
            ) + f" ({r['diverged']}/{r['judged']} seeds diverged)"
        cells = [r["run"], r["compares"], str(r["global_batch"]),
                 f"{r['ranks']} x {r['images_per_rank']} x {r['passes']}",
                 f"{r['bn_size']} ({r['norm']})", r["policy"], "yes" if r["warmup"] else "no", f"{r['lr']:.3g}",
                 _mmap_cell(r), f"{r['steps']:.0f}", f"{r['wall_s'] / 60:.1f}",
                 _count_cell(r["diverged"], r["judged"]), "fails" if control else "–", control_failed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = f"""\
mmAP: COCO AP@[.5:.95] x 100 after the last epoch, the median over the seeds that did not diverge
(min-max when they differ); "failed" when every seed diverged. steps: optimizer steps logged (median).
wall: minutes from launch to exit, start-up and evaluations included (median). diverged: yes, no, or
k/n seeds; a run diverged when it stopped on a non-finite loss, logged one, its last epoch's mean loss
exceeded {LOSS_GROWTH_LIMIT:g}x its first logged loss, or it skipped non-finite steps and ended at
mmAP ~0 (hvd_megdet.tools.report_sweep.judge). paper: fails?: the controls, settings that MegDet
reports as failing; control failed?: whether they diverged here."""


# ---------------------------------------------------------------------------------------------------
# The figures (matplotlib's object API, as report_figures: no pyplot, no display)
# ---------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _family(row: dict) -> str:
    """What a line of Fig. 1 joins: runs alike but for the batch."""
    norm = {"frozen": "no BN (frozen)", "local": f"local BN {row['bn_size']}", "cgbn": "CGBN"}[row["norm"]]
    return f"{norm}{'' if row['warmup'] else ', no warm-up'}{', long' if row['policy'] == 'long' else ''}"


def plot_mmap_vs_batch(rows: Sequence[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(_family(r), []).append(r)
    for i, (family, group) in enumerate(families.items()):
        ok = sorted((r for r in group if r["mmAP"] is not None), key=lambda r: r["global_batch"])
        if ok:
            y = [100 * r["mmAP"] for r in ok]
            err = [[v - 100 * r["mmAP_min"] for v, r in zip(y, ok)], [100 * r["mmAP_max"] - v for v, r in zip(y, ok)]]
            ax.errorbar([r["global_batch"] for r in ok], y, yerr=err, fmt="o-", color=f"C{i % 10}", capsize=3,
                        label=family)
        for r in group:
            if r["diverged"]:
                ax.plot(r["global_batch"], 0, "x", color="red", markersize=10, markeredgewidth=2)
                ax.annotate(f"diverged {r['diverged']}/{r['judged']}: {family}", (r["global_batch"], 0),
                            textcoords="offset points", xytext=(6, 6 + 10 * i), fontsize="small", color="red")
    ax.set_xscale("log", base=2)
    batches = sorted({r["global_batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=-1)
    ax.set_xlabel("global batch (images per SGD step)")
    ax.set_ylabel("final mmAP (%)")
    ax.set_title("mmAP vs mini-batch size, same epochs (MegDet Fig. 1 in miniature)")
    if ax.get_legend_handles_labels()[0]:  # none while every run so far diverged (only unlabelled x marks)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_per_epoch(results: Sequence[Result], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 7.5), dpi=120, layout="constrained")
    mmap_ax, loss_ax = fig.subplots(2, 1, sharex=True)
    names = list(dict.fromkeys(r.spec["name"] for r in sorted(results, key=lambda r: r.spec.get("order", 0))))
    # A diverged loss reaches 1e30 and would flatten every other curve: the loss axis stops at 10x the
    # highest first-epoch loss, and a diverged run's curve ends there in an x.
    firsts = [r.loss_per_epoch[min(r.loss_per_epoch)] for r in results if r.loss_per_epoch]
    loss_top = 10 * max(firsts) if firsts else None
    handles = []
    for i, name in enumerate(names):
        group = [r for r in results if r.spec["name"] == name]
        diverged = failed(group)
        label = f"{name} (diverged)" if diverged else name
        for ax, key, scale in ((mmap_ax, "mmap_per_epoch", 100.0), (loss_ax, "loss_per_epoch", 1.0)):
            epochs = sorted({e for r in group for e in getattr(r, key)})
            points = [(e, scale * statistics.median(getattr(r, key)[e] for r in group if e in getattr(r, key)))
                      for e in epochs]
            if key == "loss_per_epoch" and loss_top:
                points = [(e, min(v, loss_top)) for e, v in points]
            if points:
                line, = ax.plot(*zip(*points), "o-" if key == "mmap_per_epoch" else "-", color=f"C{i % 10}",
                                label=label, markersize=4)
                if key == "loss_per_epoch":
                    handles.append(line)
                    if diverged:
                        ax.plot(*points[-1], "x", color=f"C{i % 10}", markersize=9, markeredgewidth=2, zorder=5)
    for policy, style in (("normal", "--"), ("long", ":")):
        if any(r.spec["policy"] == policy for r in results):
            for ax in (mmap_ax, loss_ax):
                for epoch in lr_schedule.POLICIES[policy].decay_epochs:
                    ax.axvline(epoch, color="0.35", linestyle=style, linewidth=1)
    mmap_ax.set_ylabel("mmAP (%)")
    fig.suptitle("mmAP and training loss per epoch, median over seeds (MegDet Fig. 4 in miniature)\n"
                 "LR decays: dashed (normal policy), dotted (long)", fontsize="medium")
    loss_ax.set_ylabel("mean training loss")
    loss_ax.set_yscale("log")
    if loss_top:
        loss_ax.set_ylim(top=loss_top * 1.5)
    loss_ax.set_xlabel("epoch")
    for ax in (mmap_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    loss_ax.xaxis.get_major_locator().set_params(integer=True)
    if handles:  # one legend for both panels (same colours), every run in it, diverged ones too
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="x-small")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepReport:
    markdown: Path
    data: Path
    figures: tuple[Path, ...]
    rows: list[dict]
    table: str


def write_sweep_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> SweepReport:
    """Read the sweep's run directories, write report.md, report.json and the two PNGs to ``out_dir``."""
    if not run_dirs:
        raise ValueError("no sweep run directories (none holds sweep_run.json)")
    results = [load_result(p) for p in run_dirs]
    rows = pool(results)
    out = Path(out_dir)
    without_bn = [r for r in rows if r["norm"] == "frozen"]
    with_bn = [r for r in rows if r["norm"] != "frozen"]
    table = "\n\n".join(f"**{title}**\n\n{markdown_table(part)}" for title, part in (
        ("Without BN (frozen): MegDet Table 2 in miniature", without_bn),
        ("With BN (local, CGBN): MegDet Table 3 in miniature", with_bn)) if part)
    figures = (plot_mmap_vs_batch(rows, out / FIGURES[0]), plot_per_epoch(results, out / FIGURES[1]))
    body = ["# The recipe in miniature", "", f"{len(results)} run directories, {len(rows)} runs.", "", table, "",
            NOTES, "", f"![mmAP vs batch (Fig. 1)]({FIGURES[0]})", "",
            f"![mmAP and loss per epoch (Fig. 4)]({FIGURES[1]})", ""]
    markdown = atomic_write_text(out / "report.md", "\n".join(body))
    seeds = [{**{k: v for k, v in asdict(r).items() if k not in ("path", "verdict")}, "path": str(r.path),
              "diverged": r.verdict.diverged, "reason": r.verdict.reason} for r in results]
    data = atomic_write_text(out / "report.json", json.dumps({"rows": rows, "seeds": seeds}, indent=1) + "\n")
    return SweepReport(markdown=markdown, data=data, figures=figures, rows=rows, table=table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="the sweep's output directory (benchmarks/recipe_sweep.py --out)")
    parser.add_argument("--out", default=None, help="where the report goes (default: SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    try:
        report = write_sweep_report(find_run_dirs(args.sweep_dir), args.out or Path(args.sweep_dir) / "report")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table)
    print(f"\nreport: {report.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
