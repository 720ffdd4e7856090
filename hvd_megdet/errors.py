"""Errors whose cause lies outside the program: one line for the user, naming the file, image or rank.

An entry point (the trainer's ``main``) ends a rank on one of them with :func:`end_rank`::

    try:
        summary = run(cfg, ctx, args.resume)
    except Exception as err:
        errors.end_rank(err, ctx.rank, debug=args.debug)  # prints "error: rank 1: <line>", exits 1
        raise  # not a UserError (or --debug): the full traceback

The launcher (mpirun, srun, horovodrun) then ends the other ranks, which print nothing more.

``str()`` of a :class:`UserError` is that line, also when the error happened in a DataLoader worker:
torch re-raises it in the main process as ``DataError("Caught DataError in DataLoader worker process
0.\\nOriginal Traceback ...")`` (``torch._utils.ExceptionWrapper.reraise`` calls the class with the
whole text), and the constructor takes the original line back out of that text, keeping the worker's
traceback in ``detail`` for ``--debug``. Torch-free, so ``data_prep`` raises these too.
"""
from __future__ import annotations

import logging
import os
import sys

_TORCH_WRAPPER = "\nOriginal Traceback (most recent call last):"


class UserError(RuntimeError):
    """A fault of the input, the disk or another process, explained in one line (``str(err)``).

    Attributes:
        detail: the traceback text of the process that raised it, when torch carried it across from
            a DataLoader worker (or pin-memory thread); "" otherwise.
    """

    def __init__(self, message: str) -> None:
        message = str(message)
        self.detail = ""
        if _TORCH_WRAPPER in message:
            self.detail = message
            message = _original_line(message, type(self))
        super().__init__(" ".join(message.split("\n")))  # one line, whatever a caller passed


class DataError(UserError):
    """A split directory, manifest or shard that cannot be read; names the file and the image id."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written, found or loaded; names the file (and the free space)."""


class PeerError(UserError):
    """This rank stopped because another rank ended the job first (Horovod was shut down under it)."""


# Horovod's text when a collective fails because a peer exited (HorovodInternalError, matched as text:
# this module imports neither torch nor Horovod).
_HOROVOD_SHUT_DOWN = "Horovod has been shut down"


def _original_line(wrapped: str, cls: type) -> str:
    """The message of ``cls`` as the worker raised it, from torch's re-raise text, plus where it was."""
    head = wrapped.split("\n", 1)[0]  # "Caught DataError in DataLoader worker process 0."
    where = head.split(" in ", 1)[1].rstrip(".") if head.startswith("Caught ") and " in " in head else ""
    # traceback.format_exception ends with "<module>.<qualname>: <message>" (the last exception of a chain).
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    for line in reversed(wrapped.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix):] + (f" (in {where})" if where else "")
    return head


def user_error(err: BaseException) -> UserError | None:
    """The :class:`UserError` that explains ``err``: ``err`` itself, or one it was raised from
    (``__cause__`` / ``__context__``), or a :class:`PeerError` for Horovod's "has been shut down" (the
    rank that ended the job printed the cause); None for anything else, which deserves a traceback."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        if _HOROVOD_SHUT_DOWN in str(current):
            return PeerError("stopped because another rank ended the job (Horovod has been shut down); "
                             "that rank's error above is the cause")
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def end_rank(err: BaseException, rank: int | None = None, debug: bool = False) -> None:
    """End this process with exit code 1 and the one line that explains ``err``: ``error: rank R: ...``.

    Returns, for the caller to re-raise, when ``err`` has no :class:`UserError` behind it (a bug
    deserves its traceback) or under ``debug`` (after printing a DataLoader worker's own traceback).
    ``os._exit``, not ``sys.exit``: Horovod's exit handler would show the other ranks a shutdown
    traceback, and the launcher ends them anyway.
    """
    user = user_error(err)
    if user is None or debug:
        if user is not None and user.detail:
            print(user.detail, file=sys.stderr, flush=True)
        return
    where = f"rank {rank}: " if rank is not None else ""
    print(f"error: {where}{user}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)
