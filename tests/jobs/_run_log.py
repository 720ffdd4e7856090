"""What a job's trainer wrote to OUTPUT_DIR/log.jsonl, read the same way for Slurm and PBS jobs."""
from __future__ import annotations

from pathlib import Path

from hvd_megdet.metrics import read_log


class RunLog:
    """``self.out``: the job's OUTPUT_DIR."""

    out: Path

    def records(self, kind: str | None = None) -> list[dict]:
        path = self.out / "log.jsonl"
        return read_log(path, kind) if path.exists() else []

    def runs(self) -> list[list[dict]]:
        """log.jsonl split at each "start" record: one list per run of the trainer."""
        runs: list[list[dict]] = []
        for r in self.records():
            if r["type"] == "start":
                runs.append([])
            if runs:
                runs[-1].append(r)
        return runs
