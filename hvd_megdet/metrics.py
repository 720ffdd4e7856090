"""Rank-0 logging: JSON lines for machines, one readable line per record for people, a tqdm bar.

Every rank holds a MetricLogger; only rank 0's writes anything, so call sites need no rank checks.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG_FILE = "log.jsonl"
logger = logging.getLogger("hvd_megdet")


def setup_console_logging(is_main: bool) -> None:
    """Human-readable console lines on rank 0; warnings only elsewhere."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("hvd_megdet")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.propagate = False


def _readable(kind: str, record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        parts.append(f"{key}={value}")
    return f"[{kind}] " + " ".join(parts)


class MetricLogger:
    """Appends ``{"type": kind, "time": ..., **record}`` to ``output_dir/log.jsonl`` on rank 0.

    Args:
        output_dir: where log.jsonl (and TensorBoard events, if asked) go.
        enabled: True on rank 0 only.
        progress: show a tqdm bar (rank 0 and a terminal or a log file alike).
        tensorboard: also write scalars for TensorBoard (needs the tensorboard package).
    """

    def __init__(self, output_dir: str | Path, enabled: bool, progress: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.path = Path(output_dir) / LOG_FILE
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:
                    raise RuntimeError("train.tensorboard=true needs the tensorboard package "
                                       "(pip install tensorboard)") from err
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"type": kind, "time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")
        if self.show_progress:
            tqdm.write(_readable(kind, record), file=sys.stderr)
        else:
            logger.info(_readable(kind, record))
        if self._tb is not None and "iter" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self._tb.add_scalar(f"{kind}/{key}", value, record["iter"])

    def progress_bar(self, total: int, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, disable=not self.show_progress, desc="train",
                    unit="it", dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``log.jsonl`` (optionally of one kind)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("type") == kind]


def write_loss_plot(log_path: str | Path, out_path: str | Path) -> Path:
    """A small SVG of the training loss and LR over iterations (no plotting library needed)."""
    records = [r for r in read_log(log_path, "train") if math.isfinite(r.get("loss", float("nan")))]
    width, height, pad = 640, 320, 40
    out_path = Path(out_path)
    if not records:
        out_path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"/>')
        return out_path
    iters = [r["iter"] for r in records]
    x0, x1 = min(iters), max(max(iters), min(iters) + 1)

    def polyline(values, color):
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        pts = " ".join(f"{pad + (i - x0) / (x1 - x0) * (width - 2 * pad):.1f},"
                       f"{height - pad - (v - lo) / (hi - lo) * (height - 2 * pad):.1f}"
                       for i, v in zip(iters, values))
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>', lo, hi

    loss_line, lo, hi = polyline([r["loss"] for r in records], "#c0392b")
    lr_line, _, lr_hi = polyline([r["lr"] for r in records], "#2980b9")
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">'
           f'<rect width="100%" height="100%" fill="white"/>'
           f'<text x="{pad}" y="20">training loss (red, {lo:.3g}..{hi:.3g}) and LR (blue, max {lr_hi:.3g}) vs iteration {x0}..{x1}</text>'
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>'
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>'
           f'{loss_line}{lr_line}</svg>')
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(svg)
    tmp.replace(out_path)
    return out_path
