"""The report's four figures, drawn from :class:`~hvd_megdet.tools.report_runs.Run` objects.

* ``fig1_mmap_vs_hours.png``: mmAP against training hours, every evaluation of every run (Fig. 1);
* ``fig4_mmap_per_epoch.png``: mmAP per epoch, the LR decays as dashed lines (Fig. 4);
* ``loss_lr.png``: training loss and learning rate against iteration;
* ``pos_neg_ratio.png``: RPN and RoI positive/negative ratio per epoch (Table 1).

Matplotlib's object API (no pyplot), so drawing needs no display and touches no global state; each
PNG is written under a temporary name and renamed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from hvd_megdet import lr_schedule
from hvd_megdet.fileio import atomic_path
from hvd_megdet.tools.report_runs import RATIO_KEYS, Run

FIGURES = ("fig1_mmap_vs_hours.png", "fig4_mmap_per_epoch.png", "loss_lr.png", "pos_neg_ratio.png")


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


def _finish_mmap(fig, ax, drawn: bool, path: Path) -> Path:
    """What both mmAP figures share: axes from zero (a zoomed axis makes small differences look
    large), the mmAP label, the legend or a note that there is nothing to draw; then the file."""
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("COCO mmAP (AP@[.5:.95], %)")
    if drawn:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "no evaluations in these runs (set data.val_path and train.eval_epochs)")
    return _save(fig, path)


def plot_mmap_vs_hours(runs: Sequence[Run], path: Path) -> Path:
    fig, (ax,) = _figure()
    drawn = _plot_mmap(ax, runs, "hours")
    ax.set_xlabel("training time (hours, resumed segments summed)")
    ax.set_title("mmAP vs training time (MegDet Fig. 1)")
    return _finish_mmap(fig, ax, drawn, path)


def plot_mmap_per_epoch(runs: Sequence[Run], path: Path) -> Path:
    fig, (ax,) = _figure()
    drawn = _plot_mmap(ax, runs, "epoch")
    styles = {"normal": "--", "long": ":"}
    for policy in sorted({run.policy for run in runs if run.decay_epochs}):
        for i, epoch in enumerate(lr_schedule.POLICIES[policy].decay_epochs):
            ax.axvline(epoch, color="0.35", linestyle=styles.get(policy, "-."), linewidth=1,
                       label=f"LR decay ({policy} policy)" if i == 0 else None)
    ax.set_xlabel("epochs trained")
    ax.set_title("mmAP per epoch, LR decays dashed (MegDet Fig. 4)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finish_mmap(fig, ax, drawn, path)


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
