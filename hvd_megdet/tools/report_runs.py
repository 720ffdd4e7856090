"""One training output directory as the report reads it: log.jsonl, config.yaml, eval_epochNN/.

:func:`load_run` turns a directory that ``hvd_megdet.train`` wrote into a :class:`Run`; report.py
makes the table from it and report_figures.py the figures.

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
* **pos/neg %** is positives / negatives x 100 of the samples the RPN and RoI heads drew, the mean of
  an epoch's logged windows (the paper's Table 1 lists it at epochs 1, 6 and 12).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from hvd_megdet import lr_schedule
from hvd_megdet.metrics import LOG_FILE, read_log

log = logging.getLogger("hvd_megdet.report")

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
