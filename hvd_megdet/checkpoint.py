"""Checkpoints: written by rank 0 atomically, found again on resume, pruned to the last K.

A checkpoint holds everything needed to continue exactly: model, optimizer, AMP scaler, iteration,
epoch and batches done in it (the sampler position), every rank's RNG states, the world size and
the global batch it was trained with.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary files are ignored)."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, iteration: int, keep: int) -> Path:
    """Write ``state`` under a temporary name, rename it into place, then drop all but the last ``keep``.

    Call on rank 0 only. A crash mid-write leaves the previous checkpoints untouched.
    """
    path = checkpoint_path(output_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in path.parent.glob(".ckpt_*.tmp.*"):  # left by a writer that was killed mid-save
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which one
        raise ValueError(f"{path}: not a readable hvd_megdet checkpoint ({err})") from err


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, Python, NumPy)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def check_world(state: dict[str, Any], world_size: int, global_batch: int, path: str | Path) -> None:
    """Refuse to resume with another world size or global batch.

    Continuing exactly needs the same sampler split and the same LR schedule; a different world size
    would change the global batch (hence the scaled LR and iterations per epoch) and the per-rank
    RNG streams. Start a new output directory, or keep the world size, instead.
    """
    if state["world_size"] != world_size or state["global_batch"] != global_batch:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} ranks with global batch {state['global_batch']}; "
            f"this run has {world_size} ranks and global batch {global_batch}. Resuming with another "
            f"world size is refused: the LR schedule, the sampler split and the RNG streams would not "
            f"continue exactly. Relaunch with {state['world_size']} ranks, or use a new train.output_dir "
            f"(optionally with model.backbone_weights) to start over.")
