"""The paper's tables and figures from your own runs: a Table 3 row per run, Fig. 1, Fig. 4, Table 1.

    python -m hvd_megdet.report runs/megdet_bs16_bn16 runs/megdet_bs256_bn32 --out runs/report
    python -m hvd_megdet.report runs/demo                # writes runs/demo/report/

Reads each run directory as ``hvd_megdet.train`` leaves it (``log.jsonl``, ``config.yaml``,
``eval_epochNN/metrics.json``) and writes to ``--out`` (default: ``RUN_DIR/report`` for one run,
``./report`` for several):

* ``report.md``: the table in the form of MegDet Table 3 (arXiv 1711.07240) with the last
  evaluation, training hours, throughput and Table 1's positive/negative sample ratios;
* ``report.json``: the same rows with full precision, for scripts;
* ``fig1_mmap_vs_hours.png``: mmAP against training hours, every evaluation of every run (Fig. 1);
* ``fig4_mmap_per_epoch.png``: mmAP per epoch, the LR decays as dashed lines (Fig. 4);
* ``loss_lr.png``: training loss and learning rate against iteration;
* ``pos_neg_ratio.png``: RPN and RoI positive/negative ratio per epoch (Table 1).

How the numbers are made:

* **Training hours** add up the run's segments: a resumed run has one "start" record per launch,
  and a segment lasts from its start record to the last record before the next one. Time between
  a crash and the relaunch is not counted; time between a segment's last record and its end (up
  to ``log_every`` iterations, or a crash) is lost; checkpoints and evaluations inside a segment
  are counted. The training hours of an evaluation are those up to its record.
* **Epochs** are 1-based: "epoch 1" is the first pass over the data; an evaluation "after epoch
  8" sits at x = 8 in Fig. 4, where the normal policy's first LR decay also is.
* **Iterations logged twice** (a run resumed from a checkpoint older than its last records) count
  once: the later record wins.
* **img/s** is the median of the logged windows' throughput (training steps only).
* **pos/neg %** is positives / negatives x 100 of the samples the RPN and RoI heads drew, the mean of
  an epoch's logged windows (the paper's Table 1 lists it at epochs 1, 6 and 12).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from hvd_megdet import lr_schedule
from hvd_megdet.fileio import atomic_path, atomic_write_text
from hvd_megdet.metrics import LOG_FILE, read_log

log = logging.getLogger("hvd_megdet.report")

FIGURES = ("fig1_mmap_vs_hours.png", "fig4_mmap_per_epoch.png", "loss_lr.png", "pos_neg_ratio.png")
RATIO_KEYS = {"RPN": "rpn_pos_neg_ratio", "RoI": "roi_pos_neg_ratio"}
EVAL_KEYS = ("mmAP", "AP50", "AP75", "mmAR")


@dataclass(frozen=True)
class Run:
    """What the report needs from one training output directory."""

    name: str
    path: Path
    start: dict[str, Any]                 # the last "start" record (world size, batch, BN size, ...)
    policy: str                           # "normal" | "long" | "?" (no config.yaml)
    segments: list[tuple[float, float]]   # (first, last) record time of each launch, seconds
    train: list[dict[str, Any]]           # "train" records, one per iteration, by iteration
    evals: list[dict[str, Any]]           # {"epoch", "hours" (None if unknown), metrics}, by epoch
    ratios: dict[str, dict[int, float]]   # "RPN"/"RoI" -> 1-based epoch -> mean pos/neg
    finished: bool = False                # finished.json is there

    @property
    def hours(self) -> float:
        return sum(end - begin for begin, end in self.segments) / 3600.0

    @property
    def decay_epochs(self) -> tuple[int, ...]:
        return lr_schedule.POLICIES[self.policy].decay_epochs if self.policy in lr_schedule.POLICIES else ()

    @property
    def label(self) -> str:
        """The legend entry: name, batch, BN size and ranks, as the paper's rows are told apart."""
        s = self.start
        ranks = s.get("world_size", "?")
        return (f"{self.name} (batch {s.get('global_batch', '?')}, BN {s.get('bn_size', '?')}, "
                f"{ranks} rank{'' if ranks == 1 else 's'}{', long' if self.policy == 'long' else ''})")


# ---------------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------------
def segments_of(records: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) times of the launches in a log: each "start" record opens a segment that the
    last record before the next "start" closes (see the module docstring)."""
    segments: list[list[float]] = []
    for record in records:
        t = record.get("time")
        if not isinstance(t, (int, float)):
            continue
        if record.get("type") == "start" or not segments:
            segments.append([t, t])
        else:
            segments[-1][1] = max(segments[-1][1], t)
    return [(begin, end) for begin, end in segments]


def hours_at(segments: Sequence[tuple[float, float]], t: float) -> float:
    """Training hours spent up to wall-clock time ``t``."""
    return sum(max(0.0, min(end, t) - begin) for begin, end in segments if begin <= t) / 3600.0


def epoch_means(train: Sequence[dict[str, Any]], key: str, iters_per_epoch: int | None) -> dict[int, float]:
    """Mean of ``key`` over the finite values of each 1-based epoch's records."""
    groups: dict[int, list[float]] = {}
    for record in train:
        value = record.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if "epoch" in record:
            epoch = int(record["epoch"]) + 1  # records carry the 0-based epoch they were logged in
        elif iters_per_epoch:
            epoch = (int(record["iter"]) - 1) // iters_per_epoch + 1
        else:
            continue
        groups.setdefault(epoch, []).append(float(value))
    return {epoch: sum(v) / len(v) for epoch, v in sorted(groups.items())}


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        log.warning("%s: no config.yaml; the LR policy (and its decay epochs) is unknown", run_dir)
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    return raw if isinstance(raw, dict) else {}


def _eval_files(run_dir: Path) -> dict[int, dict[str, float]]:
    """Metrics of eval_epochNN/metrics.json, by epoch (for evaluations the log lacks)."""
    found = {}
    for path in sorted(run_dir.glob("eval_epoch*/metrics.json")):
        digits = path.parent.name[len("eval_epoch"):]
        if not digits.isdigit():
            continue
        try:
            found[int(digits)] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
    return found


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read one training output directory (see the module docstring for what is computed)."""
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_FILE
    if not log_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {LOG_FILE} (not a hvd_megdet.train output directory?)")
    records = read_log(log_path)
    starts = [r for r in records if r.get("type") == "start"]
    if not starts:
        raise ValueError(f"{log_path}: no 'start' record (not written by hvd_megdet.train?)")
    start = starts[-1]
    segments = segments_of(records)
    train = sorted({int(r["iter"]): r for r in records if r.get("type") == "train" and "iter" in r}.values(),
                   key=lambda r: r["iter"])
    evals: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("type") == "eval" and "epoch" in r:
            hours = hours_at(segments, r["time"]) if isinstance(r.get("time"), (int, float)) else None
            evals[int(r["epoch"])] = {"epoch": int(r["epoch"]), "hours": hours,
                                      **{k: r[k] for k in EVAL_KEYS if k in r}}
    for epoch, metrics in _eval_files(run_dir).items():
        evals.setdefault(epoch, {"epoch": epoch, "hours": None, **{k: metrics[k] for k in EVAL_KEYS if k in metrics}})
    policy = _read_config(run_dir).get("solver", {}).get("policy", "?")
    ratios = {head: epoch_means(train, key, start.get("iters_per_epoch")) for head, key in RATIO_KEYS.items()}
    return Run(name=name or run_dir.name, path=run_dir, start=start, policy=policy, segments=segments,
               train=train, evals=[evals[e] for e in sorted(evals)], ratios=ratios,
               finished=(run_dir / "finished.json").exists())


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
def _first_middle_last(values: dict[int, float]) -> list[tuple[int, float]]:
    epochs = sorted(values)
    if not epochs:
        return []
    picked = [epochs[0], epochs[len(epochs) // 2], epochs[-1]]
    return [(e, values[e]) for e in dict.fromkeys(picked)]  # one entry per distinct epoch


def summarize(run: Run) -> dict[str, Any]:
    """One row of the table, full precision (report.json); mmAP etc. as pycocotools' fractions."""
    s = run.start
    last = run.evals[-1] if run.evals else {}
    speeds = [r["img_per_s"] for r in run.train
              if isinstance(r.get("img_per_s"), (int, float)) and math.isfinite(r["img_per_s"])]
    ipe = s.get("iters_per_epoch")
    total_epochs = lr_schedule.POLICIES[run.policy].total_epochs if run.policy in lr_schedule.POLICIES else None
    return {
        "run": run.name, "path": str(run.path), "global_batch": s.get("global_batch"), "bn_size": s.get("bn_size"),
        "ranks": s.get("world_size"), "policy": run.policy,
        **{k: last.get(k) for k in EVAL_KEYS}, "eval_epoch": last.get("epoch"),
        "hours": run.hours, "img_per_s": statistics.median(speeds) if speeds else None,
        "epochs_trained": run.train[-1]["iter"] / ipe if run.train and ipe else 0.0,
        "policy_epochs": total_epochs, "finished": run.finished,
        **{f"{head}_pos_neg_ratio": _first_middle_last(run.ratios[head]) for head in RATIO_KEYS},
    }


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return format(value * scale, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows in the form of MegDet Table 3, plus what Table 1 tracks."""
    header = ["run", "batch", "BN size", "ranks", "policy", "epochs", "mmAP", "AP50", "AP75", "mmAR",
              "hours", "img/s", "RPN pos/neg %", "RoI pos/neg %", "at epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 5 + ["--:"] * 9 + ["---"]) + "|"]
    for r in rows:
        rpn, roi = r["RPN_pos_neg_ratio"], r["RoI_pos_neg_ratio"]
        epochs = f"{_num(r['epochs_trained'], '.3g')}/{r['policy_epochs'] or '?'}"
        cells = [r["run"], str(r["global_batch"]), str(r["bn_size"]), str(r["ranks"]), r["policy"], epochs,
                 *[_num(r[k], ".1f", 100.0) for k in EVAL_KEYS], _num(r["hours"], ".3g"),
                 _num(r["img_per_s"], ".1f"),
                 " / ".join(_num(v, ".2f", 100.0) for _, v in rpn) or "–",
                 " / ".join(_num(v, ".2f", 100.0) for _, v in roi) or "–",
                 " / ".join(str(e) for e, _ in (rpn or roi)) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_NOTES = """\
mmAP, AP50, AP75, mmAR: COCO bbox metrics x 100 after the last evaluated epoch ("–": never evaluated).
epochs: epochs trained / epochs of the policy. hours: wall-clock training time, resumed segments summed.
img/s: median training throughput of all ranks together. pos/neg %: positive / negative samples x 100
drawn by the RPN and RoI heads, mean over the epoch, at the first, middle and last trained epoch
(MegDet Table 1)."""


# ---------------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------------
def _figure(rows: int = 1, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(8.0, height), dpi=120, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _colors(runs: Sequence[Run]) -> dict[str, str]:
    return {run.name: f"C{i % 10}" for i, run in enumerate(runs)}


def _plot_mmap(ax, runs: Sequence[Run], x_key: str) -> bool:
    """One mmAP (%) curve per run against ``x_key`` of its evaluations; False when none has a point."""
    colors = _colors(runs)
    drawn = False
    for run in runs:
        points = [(e[x_key], e["mmAP"] * 100) for e in run.evals if e.get(x_key) is not None and "mmAP" in e]
        if points:
            ax.plot(*zip(*points), "o-", color=colors[run.name], label=run.label)
            drawn = True
    return drawn


def plot_mmap_vs_hours(runs: Sequence[Run], path: Path) -> Path:
    fig, (ax,) = _figure()
    drawn = _plot_mmap(ax, runs, "hours")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)  # from zero: a zoomed axis makes small differences look large
    ax.set_xlabel("training time (hours, resumed segments summed)")
    ax.set_ylabel("COCO mmAP (AP@[.5:.95], %)")
    ax.set_title("mmAP vs training time (MegDet Fig. 1)")
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "no evaluations in these runs (set data.val_path and train.eval_epochs)")
    return _save(fig, path)


def plot_mmap_per_epoch(runs: Sequence[Run], path: Path) -> Path:
    fig, (ax,) = _figure()
    drawn = _plot_mmap(ax, runs, "epoch")
    styles = {"normal": "--", "long": ":"}
    for policy in sorted({run.policy for run in runs if run.decay_epochs}):
        for i, epoch in enumerate(lr_schedule.POLICIES[policy].decay_epochs):
            ax.axvline(epoch, color="0.35", linestyle=styles.get(policy, "-."), linewidth=1,
                       label=f"LR decay ({policy} policy)" if i == 0 else None)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("COCO mmAP (AP@[.5:.95], %)")
    ax.set_title("mmAP per epoch, LR decays dashed (MegDet Fig. 4)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "no evaluations in these runs (set data.val_path and train.eval_epochs)")
    return _save(fig, path)


def plot_loss_lr(runs: Sequence[Run], path: Path) -> Path:
    fig, (loss_ax, lr_ax) = _figure(rows=2, height=6.0)
    colors = _colors(runs)
    for run in runs:
        finite = [r for r in run.train if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if finite:
            loss_ax.plot([r["iter"] for r in finite], [r["loss"] for r in finite], color=colors[run.name],
                         label=run.label)
        lrs = [r for r in run.train if isinstance(r.get("lr"), (int, float)) and r["lr"] > 0]
        if lrs:
            lr_ax.plot([r["iter"] for r in lrs], [r["lr"] for r in lrs], color=colors[run.name], label=run.label)
    loss_ax.set_ylabel("training loss (sum of the 4 terms)")
    loss_ax.set_title("training loss (mean of each logged window) and learning rate (its last step)")
    lr_ax.set_ylabel("learning rate (log scale)")
    lr_ax.set_yscale("log")
    lr_ax.set_xlabel("iteration (optimizer steps)")
    if loss_ax.lines:
        loss_ax.legend(fontsize="small")  # one legend: the LR panel's lines have the same colours
    for ax in (loss_ax, lr_ax):
        if not ax.lines:
            _no_data(ax, "no training records")
    return _save(fig, path)


def plot_pos_neg_ratio(runs: Sequence[Run], path: Path) -> Path:
    fig, axes = _figure(rows=2, height=6.0)
    colors = _colors(runs)
    for ax, head in zip(axes, RATIO_KEYS):
        for run in runs:
            values = run.ratios[head]
            if values:
                ax.plot(list(values), [v * 100 for v in values.values()], "o-", color=colors[run.name],
                        label=run.label)
        ax.set_ylabel(f"{head} positive / negative (%)")
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            _no_data(ax, f"no {RATIO_KEYS[head]} in the training records")
    axes[0].set_title("sampled positives / negatives per epoch, mean of the logged windows (MegDet Table 1)")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportPaths:
    """What :func:`write_report` wrote, and the Markdown table it holds."""

    markdown: Path
    data: Path
    figures: tuple[Path, ...]
    table: str


def _names(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, or parent/name where two runs share a name."""
    names = [p.name or str(p) for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> ReportPaths:
    """Read ``run_dirs`` and write report.md, report.json and the four PNGs to ``out_dir``.

    Raises:
        FileNotFoundError, ValueError: a run directory without a readable log (the message names it).
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ValueError("write_report: no run directories given")
    runs = [load_run(p, name) for p, name in zip(run_dirs, _names(run_dirs))]
    out = Path(out_dir)
    rows = [summarize(run) for run in runs]
    table = markdown_table(rows)
    figures = (plot_mmap_vs_hours(runs, out / FIGURES[0]), plot_mmap_per_epoch(runs, out / FIGURES[1]),
               plot_loss_lr(runs, out / FIGURES[2]), plot_pos_neg_ratio(runs, out / FIGURES[3]))
    captions = ["mmAP vs training hours (Fig. 1)", "mmAP per epoch, LR decays marked (Fig. 4)",
                "training loss and learning rate", "positive / negative sample ratio per epoch (Table 1)"]
    body = ["# Training report", "", "Runs: " + ", ".join(f"`{p}`" for p in run_dirs), "", table, "",
            TABLE_NOTES, ""]
    body += [f"![{c}]({f.name})\n" for c, f in zip(captions, figures)]
    markdown = atomic_write_text(out / "report.md", "\n".join(body))
    data = atomic_write_text(out / "report.json", json.dumps(rows, indent=1, allow_nan=True) + "\n")
    return ReportPaths(markdown=markdown, data=data, figures=figures, table=table)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output directories")
    parser.add_argument("--out", default=None,
                        help="where the report goes (default: RUN_DIR/report for one run, ./report for several)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.out) if args.out else (Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1
                                           else Path("report"))
    try:
        paths = write_report(args.run_dirs, out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths.table)
    print()
    print(TABLE_NOTES)
    print()
    print(f"report:  {paths.markdown}")
    for figure in paths.figures:
        print(f"figure:  {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
