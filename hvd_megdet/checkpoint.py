"""Checkpoints: written by rank 0 atomically, found again on resume, pruned to the last K, loaded
without running code.

A checkpoint holds everything needed to continue exactly: model, optimizer, AMP scaler, iteration,
epoch and batches done in it (the sampler position), every rank's RNG states, the world size and
the global batch it was trained with, and the config as a plain dict.

Only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None) go in, and every
load uses ``torch.load(weights_only=True)``, which refuses anything else: unpickling a checkpoint
someone else wrote cannot run code. RNG states are stored in that form (:func:`rng_state`).
Checkpoints written before this (NumPy arrays in the RNG states) are refused with a message; a user
who trusts such a file converts it once with ``python -m hvd_megdet.checkpoint upgrade --trust PATH``.

Faults: a write that fails (full disk, quota, I/O error, permission) raises :class:`CheckpointError`
naming the file and the free space, removes its temporary file and leaves the earlier checkpoints as
they were (``fileio.atomic_write``). On resume, :func:`find_resumable` skips an unreadable newest
checkpoint (a warning names it) and takes the newest loadable one.
"""
from __future__ import annotations

import argparse
import collections
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvd_megdet.errors import CheckpointError
from hvd_megdet.fileio import WriteError, atomic_write, free_space, remove_stale_temporaries

log = logging.getLogger("hvd_megdet.checkpoint")

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
# With tensors, what weights_only loading reads. Exact types: a subclass (np.float64 is a float, a
# namedtuple a tuple) pickles as its own class, which the loader refuses.
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, torch.Size)


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


def check_plain(value: Any, where: str = "state") -> int:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` would refuse, so that a
    checkpoint that could not be loaded back is never written; returns the bytes of tensor data."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    kind = type(value)
    if kind in _CONTAINERS and isinstance(value, dict):
        for key in value:
            check_plain(key, f"{where} key {key!r}")
        return sum(check_plain(v, f"{where}[{k!r}]") for k, v in value.items())
    if kind in _CONTAINERS:
        return sum(check_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if kind in _PLAIN:
        return 0
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds only "
                    f"tensors and plain Python values, so that loading it runs no code")


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, iteration: int, keep: int) -> Path:
    """Write ``state`` under a temporary name, rename it into place, then drop all but the last ``keep``.

    Call on rank 0 only. A failed or interrupted write leaves the previous checkpoints untouched.

    Raises:
        TypeError: ``state`` holds something other than tensors and plain values (a bug: see check_plain).
        CheckpointError: the write failed (disk full, quota, I/O error, permission); the message names
            the file, the free space, the size needed and the checkpoints kept.
    """
    size = check_plain(state)
    path = checkpoint_path(output_dir, iteration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, "ckpt_*.pt")  # a killed writer's debris: free its space first
        # An open file, not a path: given a path, torch's C++ writer keeps the file open for as long as
        # the exception lives, so the removed temporary would keep its space and the disk stay full.
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except OSError as err:  # WriteError from atomic_path (it removed the temporary file), or mkdir
        reason = err.strerror if isinstance(err, WriteError) else f"could not write {path}: {err.strerror or err} " \
                                                                   f"({free_space(path.parent)})"
        kept = [p.name for p in list_checkpoints(output_dir)]
        raise CheckpointError(f"checkpoint not saved: {reason}; it needs about {size / 2**20:.0f} MiB; "
                              f"kept: {', '.join(kept) if kept else 'no earlier checkpoint'}") from err
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        try:
            old.unlink(missing_ok=True)
        except OSError as err:  # the new checkpoint is safe; a full disk will say so at the next save
            log.warning("could not remove old checkpoint %s: %s", old, err)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code runs while unpickling).

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, damaged, not a checkpoint), or
            holds objects other than tensors and plain values (an old or foreign checkpoint: refused).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if refused:
            raise CheckpointError(
                f"{path}: refused: it holds a Python object ({refused.group(1)}) besides tensors and plain "
                f"values, and unpickling it could run code. A checkpoint written before weights-only loading "
                f"(NumPy RNG states) can be converted, if you trust where it came from: python -m "
                f"hvd_megdet.checkpoint upgrade --trust {path}") from err
        stopped = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        if stopped:  # a pickle, but not one torch.save wrote (a bare pickle stream, or bytes that are no pickle)
            raise CheckpointError(f"{path}: not a readable hvd_megdet checkpoint (not written by torch.save, or "
                                  f"damaged; the weights-only unpickler stopped at: {stopped.group(1)})") from err
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch appends paragraphs
        raise CheckpointError(f"{path}: not a readable hvd_megdet checkpoint (truncated or damaged? "
                              f"{type(err).__name__}: {first})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an hvd_megdet checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def find_resumable(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``output_dir`` that loads, and its state; None if there is none.

    Unreadable newer ones (a write cut short by a crash outside this code, a damaged disk) are skipped
    with a warning naming each. Call on rank 0, then broadcast the path.

    Raises:
        CheckpointError: checkpoints exist but none loads (starting over would silently discard them).
    """
    found = list_checkpoints(output_dir)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
    if found:
        raise CheckpointError(f"{Path(output_dir) / CHECKPOINT_DIR}: none of the {len(found)} checkpoints loads "
                              f"({', '.join(p.name for p in found)}); move them away to start over, "
                              f"or pass --resume with a good one")
    return None


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, Python, NumPy) as tensors and plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))


def check_world(state: dict[str, Any], world_size: int, global_batch: int, path: str | Path) -> None:
    """Refuse to resume with another world size or global batch.

    Continuing exactly needs the same sampler split and the same LR schedule; a different world size
    would change the global batch (hence the scaled LR and iterations per epoch) and the per-rank
    RNG streams. Start a new output directory, or keep the world size, instead.
    """
    if state["world_size"] != world_size or state["global_batch"] != global_batch:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} ranks with global batch {state['global_batch']}; "
            f"this run has {world_size} ranks and global batch {global_batch}. Resuming with another "
            f"world size is refused: the LR schedule, the sampler split and the RNG streams would not "
            f"continue exactly. Relaunch with {state['world_size']} ranks, or use a new train.output_dir "
            f"(optionally with model.backbone_weights) to start over.")


def check_model(state: dict[str, Any], model_state: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                path: str | Path) -> None:
    """Refuse to resume into a model that does not hold the checkpoint's parameters.

    ``model_state`` is the state dict of the model this run built from ``model_cfg`` (its config's
    ``model`` section as a dict). Names the first parameter that differs and the model settings that
    differ from the config the checkpoint records, instead of load_state_dict's traceback on every rank.
    """
    theirs = state["model"]
    only_here = [k for k in model_state if k not in theirs]
    only_there = [k for k in theirs if k not in model_state]
    shapes = [k for k in model_state if k in theirs and tuple(theirs[k].shape) != tuple(model_state[k].shape)]
    if not (only_here or only_there or shapes):
        return
    if shapes:
        k = shapes[0]
        first = f"{k} is {list(theirs[k].shape)} there, {list(model_state[k].shape)} here"
    elif only_there:
        first = f"{only_there[0]} is only there"
    else:
        first = f"{only_here[0]} is only here"
    recorded = (state.get("config") or {}).get("model", {})
    settings = [f"model.{k}={recorded[k]!r} there, {v!r} here" for k, v in model_cfg.items()
                if k in recorded and recorded[k] != v]
    raise CheckpointError(
        f"{path} holds another model than this run's config builds ({first}; "
        f"{'; '.join(settings) if settings else 'no model setting recorded with it differs'}). Resume with "
        f"the config it was trained with (config.yaml in its output directory), or use a new train.output_dir.")


def _plain_rng(old: dict[str, Any]) -> dict[str, Any]:
    """One rank's RNG states as written before weights-only loading (tuples with a NumPy array)."""
    version, internal, gauss = old["python"]
    name, keys, pos, has_gauss, cached = old["numpy"]
    return {"torch": old["torch"], "cuda": list(old["cuda"]),
            "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss},
            "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def upgrade(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite a checkpoint from before weights-only loading in the current form (in place by default).

    This unpickles ``path`` with ``weights_only=False``, which runs whatever code the file carries: call
    it only on files you wrote yourself or otherwise trust (the command line asks for --trust).
    """
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["rng"] = [_plain_rng(r) if isinstance(r.get("numpy"), tuple) else r for r in state.get("rng", [])]
    check_plain(state)
    out = Path(out) if out is not None else path
    with atomic_write(out, "wb") as f:
        torch.save(state, f)
    load_checkpoint(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvd_megdet.checkpoint",
                                     description="Convert a checkpoint written before weights-only loading.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="rewrite an old checkpoint so that weights_only=True loads it")
    up.add_argument("path")
    up.add_argument("--out", default=None, help="write here instead of replacing PATH")
    up.add_argument("--trust", action="store_true",
                    help="required: reading the old file unpickles it, which runs any code it carries")
    args = parser.parse_args(argv)
    if not args.trust:
        print(f"error: reading {args.path} runs any code it carries; pass --trust if you wrote it yourself "
              f"or trust its source", file=sys.stderr)
        return 2
    try:
        written = upgrade(args.path, args.out)
    except (OSError, CheckpointError, TypeError, KeyError, ValueError) as err:
        print(f"error: {args.path}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
