"""The paper's tables and figures from your own runs: a Table 3 row per run, Fig. 1, Fig. 4, Table 1.

    python -m hvd_megdet.tools.report runs/megdet_bs16_bn16 runs/megdet_bs256_bn32 --out runs/report
    python -m hvd_megdet.tools.report runs/demo                # writes runs/demo/report/

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

How the numbers are made: see report_runs (training hours, epochs, iterations logged twice,
pos/neg %). **img/s** is the median of the logged windows' throughput (training steps only).
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

from hvd_megdet import lr_schedule
from hvd_megdet.fileio import atomic_write_text
from hvd_megdet.tools.report_figures import (FIGURES, plot_loss_lr, plot_mmap_per_epoch, plot_mmap_vs_hours,
                                             plot_pos_neg_ratio)
from hvd_megdet.tools.report_runs import EVAL_KEYS, RATIO_KEYS, Run, load_run


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
