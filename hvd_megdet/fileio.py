"""Atomic file writes: the one helper every writer in the package uses.

    with atomic_path(out / "shard_0003.h5") as tmp:   # writers that need a path (h5py)
        h5py.File(tmp, "w") ...
    with atomic_write(out / "metrics.json", "w") as f: # writers that need a file object
        json.dump(metrics, f)
    with atomic_write(out / "model.pt", "wb") as f:    # torch.save: a file object, not a path (given a
        torch.save(state, f)                           # path, torch keeps it open after a failed write)
    atomic_write_text(out / "config.yaml", text)

The data goes to a temporary name beside the target, is fsynced, then renamed over the target, and
the directory entry is fsynced: a reader sees the old file or the new one, never half of one. If
anything fails (ENOSPC, EIO, quota, a kill signal turned into an exception) the temporary file is
removed, so a full disk is not kept full by our own debris, and an OSError (:class:`WriteError`)
names the target and the free space left there. Torch-free, so ``data_prep`` uses it too.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

TMP_MARK = ".tmp."  # temporary names are ".<name>.tmp.<pid>"


class WriteError(OSError):
    """Writing a file failed; the message names the file and the free space on its disk."""


def free_space(path: str | Path) -> str:
    """Free space on the file system holding ``path`` (or its nearest existing parent), readable."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown free space"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return "unknown free space"  # pragma: no cover


def temporary_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def remove_stale_temporaries(directory: str | Path, name_glob: str = "*") -> None:
    """Remove temporary files a killed writer left in ``directory`` (``name_glob`` of the targets)."""
    for stale in Path(directory).glob(f".{name_glob}{TMP_MARK}*"):
        stale.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it is fsynced and renamed into
    place, on any failure it is removed and the target is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(err.errno or errno.EIO,
                             f"could not write {path}: {err.strerror or err} ({free_space(path.parent)})") from err
        if isinstance(err, RuntimeError) and _looks_like_disk_error(err):
            # torch.save reports a failed write as RuntimeError ("unexpected pos ..."), not OSError; when
            # it wrote through a Python file, the OSError it swallowed (ENOSPC, EDQUOT) is its context.
            cause = err.__context__ if isinstance(err.__context__, OSError) else None
            reason = cause.strerror if cause is not None and cause.strerror else str(err).splitlines()[0][:200]
            raise WriteError(cause.errno if cause is not None and cause.errno else errno.EIO,
                             f"could not write {path}: {reason} ({free_space(path.parent)})") from err
        raise
    _fsync_directory(path.parent)


def _looks_like_disk_error(err: RuntimeError) -> bool:
    text = str(err)
    return any(s in text for s in ("unexpected pos", "No space left", "Disk quota", "file write failed",
                                   "Input/output error", "PytorchStreamWriter failed"))


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yield an open file for ``path`` (mode "w" or "wb"), written atomically (see :func:`atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)
