"""Rank-0 logging: JSON lines for machines, readable lines for people, and training progress.

Every rank holds a MetricLogger; only rank 0's writes anything, so call sites need no rank checks.

Progress looks different where it is read. In a terminal it is a tqdm bar. Where stderr is a pipe or
a file (horovodrun, mpirun and srun relay it line by line, prefixed ``[1,0]<stderr>:``; batch logs)
a bar would be one line per refresh, so rank 0 prints a plain line now and then instead::

    05:41:07 INFO train 36/132 (27%) | epoch 3 | loss 0.7412 | lr 0.02 | 8.3 img/s | 0:00:41 elapsed, ETA 0:01:50

The training loop uses both the same way::

    with logger.progress_bar(total=total_iters, initial=iteration) as bar:
        ...
        bar.update(1, epoch=epoch + 1, loss=loss, lr=lr, img_per_s=img_per_s)  # fields are optional

Fields given to ``update`` (or ``set_postfix``) stay until replaced, so the loop may pass them only
when it has new values. Numbers are formatted here; strings are shown as they are.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

LOG_FILE = "log.jsonl"
PROGRESS_STYLES = ("auto", "bar", "lines")
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


# ---------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------
def _format_field(key: str, value: Any) -> str:
    """One progress field for people: ``loss 0.7412``, ``8.3 img/s``, ``epoch 3``."""
    if isinstance(value, float) and not isinstance(value, bool):
        if key in ("img_per_s", "img_s"):
            return f"{value:.1f} img/s"
        value = f"{value:.4g}" if math.isfinite(value) else str(value)
    if key in ("img_per_s", "img_s"):
        return f"{value} img/s"
    return f"{key} {value}"


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


@dataclass
class ProgressState:
    """What the bars of one run share, so that the speed (hence the ETA), the print cadence and the
    last loss / LR carry over from one epoch's bar to the next."""

    created_time: float | None = None  # the first bar: "elapsed" counts from here
    first_time: float | None = None    # the first update: the speed counts from here, so start-up
    first_count: int = 0               # (model build, loader workers, a first slow step) is left out
    printed_time: float = -math.inf
    printed_count: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # the latest value of each field


class ProgressLines:
    """Plain progress lines through the ``hvd_megdet`` logger, for stderr that is not a terminal.

    A line is printed at the first update, whenever ``interval_s`` seconds or ``every`` iterations
    have passed since the last one (0 turns either off), and when ``total`` is reached. The ETA
    comes from the mean speed since the run's first update (start-up left out, checkpoints and
    evaluations along the way counted, as the remaining run will have them too); the first line,
    with no speed measured yet, shows "ETA ?".

    Args:
        total, initial: iterations of the whole run and those already done (a resumed run).
        desc: the first word of each line.
        interval_s, every: the print cadence (seconds, iterations).
        state: shared :class:`ProgressState` (a fresh one if None).
        now: the time source (``time.monotonic``; tests pass a fake).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", *, interval_s: float = 30.0,
                 every: int = 0, state: ProgressState | None = None, now: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc = total, initial, desc
        self.interval_s, self.every = interval_s, every
        self.state = state if state is not None else ProgressState()
        self.now = now
        if self.state.created_time is None:
            self.state.created_time = now()

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += n
        self.state.fields.update(fields)
        c, t = self.state, self.now()
        if c.first_time is None:
            c.first_time, c.first_count = t, self.n
        if (c.printed_count is None or self.n >= self.total
                or (self.every and self.n - c.printed_count >= self.every)
                or (self.interval_s and t - c.printed_time >= self.interval_s)):
            self.print_line(t)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **fields: Any) -> None:
        """tqdm's signature: the fields appear in the next line (printing nothing now)."""
        self.state.fields.update(ordered_dict or {}, **fields)

    def print_line(self, t: float | None = None) -> None:
        t = self.now() if t is None else t
        c = self.state
        if c.printed_count == self.n:
            return  # nothing new since the last line (e.g. close() right after the final update)
        elapsed = t - c.created_time
        done = self.n - c.first_count  # iterations timed since the first update
        eta = (self.total - self.n) * (t - c.first_time) / done if done > 0 else math.nan
        percent = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc} {self.n}/{self.total} ({percent:.0f}%)"]
        parts += [_format_field(k, v) for k, v in c.fields.items()]
        parts.append(f"{_format_duration(elapsed)} elapsed, ETA {_format_duration(eta)}")
        logger.info(" | ".join(parts))
        c.printed_time, c.printed_count = t, self.n

    def close(self) -> None:
        """Nothing to print: the loop ends at ``total`` (printed by update) or mid-run (an epoch's
        end; the next bar continues the count)."""

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar with the same ``update(n, **fields)`` as :class:`ProgressLines`."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", unit: str = "it",
                 state: ProgressState | None = None):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
        self.fields = (state if state is not None else ProgressState()).fields  # shared with the next bar
        if self.fields:
            self.set_postfix(refresh=False)

    def update(self, n: int = 1, **fields: Any) -> None:
        if fields:
            self.set_postfix(refresh=False, **fields)
        self.bar.update(n)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **fields: Any) -> None:
        self.fields.update(ordered_dict or {}, **fields)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in self.fields.items()}
        self.bar.set_postfix(shown, refresh=refresh)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoProgress:
    """What ranks other than 0 (and runs with progress off) get: every call does nothing."""

    def update(self, n: int = 1, **fields: Any) -> None:
        pass

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def resolve_style(style: str, stream: Any = None) -> str:
    """``"bar"`` or ``"lines"``: ``"auto"`` is a bar when ``stream`` (default stderr) is a terminal."""
    if style not in PROGRESS_STYLES:
        raise ValueError(f"progress style must be one of {PROGRESS_STYLES}, got {style!r}")
    if style != "auto":
        return style
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def progress_bar(total: int, initial: int = 0, *, desc: str = "train", unit: str = "it", enabled: bool = True,
                 style: str = "auto", interval_s: float = 30.0, every: int = 0,
                 state: ProgressState | None = None) -> ProgressLines | ProgressBar | NoProgress:
    """Progress for a loop of ``total`` steps: a tqdm bar in a terminal, plain lines otherwise.

    For loops outside training too (evaluation: ``progress_bar(n, desc="eval", unit="img",
    enabled=ctx.is_main)``). Arguments as for :class:`ProgressLines`; ``style`` as :func:`resolve_style`.
    """
    if not enabled:
        return NoProgress()
    if resolve_style(style) == "bar":
        return ProgressBar(total, initial, desc, unit, state)
    return ProgressLines(total, initial, desc, interval_s=interval_s, every=every, state=state)


# ---------------------------------------------------------------------------------------------------
# The run's log
# ---------------------------------------------------------------------------------------------------
class MetricLogger:
    """Appends ``{"type": kind, "time": ..., **record}`` to ``output_dir/log.jsonl`` on rank 0.

    Args:
        output_dir: where log.jsonl (and TensorBoard events, if asked) go.
        enabled: True on rank 0 only.
        progress: show training progress (see the module docstring).
        tensorboard: also write scalars for TensorBoard (needs the tensorboard package).
        progress_style: "auto" (a bar in a terminal, plain lines otherwise), "bar" or "lines".
        progress_interval_s, progress_every: plain lines at most this many seconds or iterations
            apart (0 turns either off); the defaults give a line every 30 s or each tenth of the run.

    With plain progress lines the console leaves out the "train" records (the lines carry loss, LR
    and speed, and log.jsonl has every record); other records (start, checkpoint, eval) are shown.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, progress: bool = True, tensorboard: bool = False,
                 *, progress_style: str = "auto", progress_interval_s: float = 30.0, progress_every: int | None = None):
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.style = resolve_style(progress_style) if self.show_progress else "none"
        self.progress_interval_s, self.progress_every = progress_interval_s, progress_every
        self.progress_state = ProgressState()
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
        if self.style == "bar":
            tqdm.write(_readable(kind, record), file=sys.stderr)
        elif not (self.style == "lines" and kind == "train"):
            logger.info(_readable(kind, record))
        if self._tb is not None and "iter" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self._tb.add_scalar(f"{kind}/{key}", value, record["iter"])

    def progress_bar(self, total: int, initial: int = 0) -> ProgressLines | ProgressBar | NoProgress:
        """Training progress from ``initial`` to ``total`` iterations (see the module docstring)."""
        every = self.progress_every if self.progress_every is not None else max(1, math.ceil(total / 10))
        return progress_bar(total, initial, desc="train", enabled=self.show_progress,
                            style=self.style if self.show_progress else "auto",
                            interval_s=self.progress_interval_s, every=every, state=self.progress_state)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``log.jsonl`` (optionally of one kind).

    A last line cut short (the writer was killed mid-write) is left out; any other line that is not
    JSON is an error naming the file and line.
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s:%d: incomplete last line left out (%s)", path, number, err.msg)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
    return [r for r in records if kind is None or r.get("type") == kind]
