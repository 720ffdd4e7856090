"""Faults end the job with one line naming the rank, file or image: one-line errors across DataLoader
workers and ranks, the stall watchdog (a stopped rank, a hung DataLoader worker), kill -9 of a rank.

The multi-rank tests start real ranks with mpirun (or horovodrun --gloo) on tests/_fault_rank.py, then
stop, hang or kill one of them from outside, as a user or a failing node would.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hvd_megdet import checkpoint, errors, watchdog
from hvd_megdet.errors import DataError
from hvd_megdet.ranks import local_mpirun_command
from tests.data_prep.conftest import make_tiny_coco, pack

ROOT = Path(__file__).resolve().parent.parent
STALL_S = 4  # the watchdog's timeout in the multi-rank tests


# ---------------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------------
def test_error_raised_in_a_worker_reads_as_one_line_after_torch_reraises_it():
    try:
        raise DataError("/data/train-00003-of-00116.h5: cannot read image id 42 (OSError: truncated)")
    except DataError:
        wrapper = torch._utils.ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(DataError) as caught:  # what the DataLoader does in the main process
        wrapper.reraise()
    err = caught.value
    assert str(err) == ("/data/train-00003-of-00116.h5: cannot read image id 42 (OSError: truncated) "
                        "(in DataLoader worker process 3)")
    assert err.detail.startswith("Caught DataError in DataLoader worker process 3.\nOriginal Traceback")
    assert errors.user_error(err) is err


def test_user_error_is_found_in_a_chain_and_horovod_shutdown_is_a_peer_error():
    cause = errors.CheckpointError("checkpoint not saved: could not write /x: No space left on device")
    try:
        try:
            raise cause
        except errors.CheckpointError:
            raise KeyError("while handling")  # noqa: B904 - an implicit chain (__context__)
    except KeyError as outer:
        assert errors.user_error(outer) is cause
    shutdown = RuntimeError("Horovod has been shut down. This was caused by an exception on one of the ranks")
    peer = errors.user_error(shutdown)
    assert isinstance(peer, errors.PeerError) and "another rank ended the job" in str(peer)
    assert errors.user_error(ValueError("a bug")) is None
    assert str(errors.UserError("two\nlines")) == "two lines"


# ---------------------------------------------------------------------------------------------------
# The watchdog in one process
# ---------------------------------------------------------------------------------------------------
def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_watchdog_ends_a_process_that_stops_progressing_with_one_line():
    start = time.monotonic()
    done = _python("import time\nfrom hvd_megdet.watchdog import Watchdog\n"
                   "wd = Watchdog(0, 1.0, poll_s=0.1).start()\nwd.beat('reading the moon')\ntime.sleep(60)")
    assert done.returncode == 1
    assert done.stderr == ("error: rank 0: no progress for 1 s (waiting on: reading the moon); no other rank to "
                           "compare with; ending this rank (train.stall_timeout_s=1)\n")
    assert time.monotonic() - start < 30  # long before the 60 s sleep ends


def test_watchdog_stays_quiet_while_beats_come_and_honours_a_longer_limit():
    done = _python("import time\nfrom hvd_megdet.watchdog import Watchdog\n"
                   "with Watchdog(0, 1.0, poll_s=0.1) as wd:\n"
                   "    for i in range(15):\n        wd.beat(f'step {i}')\n        time.sleep(0.2)\n"
                   "    wd.beat('evaluation', timeout_s=30)\n    time.sleep(2.5)\n"
                   "print('finished')")
    assert done.returncode == 0 and done.stdout == "finished\n" and done.stderr == ""


def test_watched_loader_beats_around_every_batch_and_is_the_loader_otherwise():
    loader = DataLoader(list(range(6)), batch_size=2)
    wd = watchdog.Watchdog(0, 60)
    watched = watchdog.watched(loader, wd)
    assert watched.batch_size == 2 and len(watched) == 3 and watched.dataset is loader.dataset
    seen = []
    for batch in watched:
        seen.append((batch.tolist(), wd.batches, wd.waiting_on))
    assert seen == [([0, 1], 1, "the training step on batch 1 of the run (forward, backward, allreduce)"),
                    ([2, 3], 2, "the training step on batch 2 of the run (forward, backward, allreduce)"),
                    ([4, 5], 3, "the training step on batch 3 of the run (forward, backward, allreduce)")]
    assert wd.beats == 3 * 2 + 2 and wd.waiting_on == "the work after an epoch's last batch (checkpoint, evaluation)"
    assert watchdog.watched(loader, watchdog.Watchdog(0, 0)) is loader  # timeout 0: no watchdog at all


def _status(rank: int, alive_at: float, batches: int, waiting_on: str, host: str = "node01") -> dict:
    return {"rank": rank, "host": host, "alive_at": alive_at, "batches": batches, "waiting_on": waiting_on}


def test_diagnose_names_the_silent_rank_or_the_one_behind():
    now = 1000.0
    step, data = "the training step on batch 9", "batch 9 from the DataLoader workers"
    silent = {0: _status(0, now, 9, step), 1: _status(1, now - 41, 9, step), 2: _status(2, now - 1, 9, step)}
    assert watchdog.diagnose(silent, now, stale_s=5) == \
        "stalled: rank 1 on node01 (no sign of life for 41 s: stopped, dead, or hung in the kernel; a lost host?)"
    behind = {0: _status(0, now, 9, step), 1: _status(1, now, 8, data), 2: None}
    assert watchdog.diagnose(behind, now, stale_s=5) == \
        ("stalled: rank 1 on node01 (behind the others, waiting on: batch 9 from the DataLoader workers); "
         "no status from rank 2 (not started, or the status directory is not shared or readable)")
    same = {0: _status(0, now, 9, step), 1: _status(1, now, 9, step)}
    assert watchdog.diagnose(same, now, stale_s=5) == (
        "every rank is alive at the same batch (a collective some ranks never joined? Horovod's stall warning "
        "lists the ranks missing from it)")
    # Two hosts, all alive and waiting in the same step: a cut network looks like this (tests/jobs/test_hosts.py).
    cut = {0: _status(0, now, 9, step), 1: _status(1, now, 9, step, host="node02")}
    assert watchdog.diagnose(cut, now, stale_s=5).endswith("; or the network between hosts node01, node02 is cut)")


# ---------------------------------------------------------------------------------------------------
# Several ranks: a stopped rank, a hung worker, a damaged shard, kill -9
# ---------------------------------------------------------------------------------------------------
def _launch(mode: str, status_dir: Path, *extra: str, np: int = 2, stall_s: float = STALL_S,
            launcher: str = "mpirun") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", FAULT_STALL_TIMEOUT_S=str(stall_s),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    rank_cmd = [sys.executable, "-m", "tests._fault_rank", mode, str(status_dir), *extra]
    if launcher == "mpirun":
        cmd = local_mpirun_command(np) + rank_cmd
    else:
        cmd = [str(Path(sys.executable).with_name("horovodrun")), "--gloo", "-np", str(np), "-H",
               f"localhost:{np}"] + rank_cmd
    status_dir.mkdir(parents=True, exist_ok=True)
    # Its own session: the test can end everything it started, whatever happens.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _statuses(status_dir: Path, np: int) -> dict[int, dict]:
    found = {}
    for rank in range(np):
        try:
            found[rank] = json.loads((status_dir / f"rank{rank:05d}.json").read_text())
        except (OSError, ValueError):
            pass
    return found


def _wait_until_training(proc: subprocess.Popen, status_dir: Path, np: int = 2, batches: int = 5) -> dict:
    deadline = time.monotonic() + 180  # start-up: every rank imports torch and Horovod on 2 shared cores
    while time.monotonic() < deadline:
        found = _statuses(status_dir, np)
        if len(found) == np and all(s["batches"] >= batches for s in found.values()):
            return found
        if proc.poll() is not None:
            pytest.fail(f"the job ended before training started:\n{proc.stdout.read()}")
        time.sleep(0.2)
    _end(proc)
    pytest.fail("the ranks never reported training progress")


def _end(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, float]:
    """(exit code, output, seconds) of the job; killed (and the test failed) if it outlives ``timeout``."""
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the job did not end within {timeout:.0f} s:\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - start


def _gone(pid: int, within: float = 10) -> bool:
    """The process ``pid`` has ended (checked until ``within`` seconds have passed)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie has ended
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if not _gone(pid, within=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stopped_rank_ends_every_rank_naming_it(tmp_path):
    status = tmp_path / "status"
    proc = _launch("run", status)
    pids = [s["pid"] for s in _wait_until_training(proc, status).values()]
    try:
        os.kill(pids[1], signal.SIGSTOP)  # a stalled node, a debugger, ^Z
        code, out, seconds = _end(proc)
        assert code != 0
        line = re.search(r"^error: rank 0: no progress for \d+ s \(waiting on: the training step on batch \d+ of "
                         r"the run \(forward, backward, allreduce\)\); stalled: rank 1 on \S+ \(no sign of life for \d+ s: "
                         r"stopped, dead, or hung in the kernel; a lost host\?\); ending this rank \(train.stall_timeout_s=4\)$",
                         out, re.M)
        assert line, out
        assert "Traceback" not in out
        assert _gone(pids[0]) and _gone(pids[1])  # the stopped rank too: the launcher killed it
        print(f"stopped rank: job ended {seconds:.1f} s after SIGSTOP (watchdog timeout {STALL_S} s): {line[0]}")
    finally:
        _kill_leftovers(pids)


def test_hung_dataloader_worker_ends_every_rank_naming_its_rank(tmp_path):
    status = tmp_path / "status"
    proc = _launch("hang_worker", status)
    pids = [s["pid"] for s in _wait_until_training(proc, status, batches=1).values()]
    try:
        code, out, seconds = _end(proc)
        assert code != 0
        # Whichever rank's watchdog fires first names rank 1: still waiting for its 8th batch, which
        # the others have.
        line = re.search(r"^error: rank [01]: no progress for \d+ s \(waiting on: .*\); stalled: rank 1 on \S+ \(behind "
                         r"the others, waiting on: batch 8 of the run from the DataLoader workers\); ending this "
                         r"rank \(train.stall_timeout_s=4\)$", out, re.M)
        assert line, out
        assert "Traceback" not in out
        assert _gone(pids[0]) and _gone(pids[1])
        print(f"hung worker: job ended {seconds:.1f} s after training started (watchdog timeout {STALL_S} s): "
              f"{line[0]}")
    finally:
        hung = status / "hung_worker_rank1.pid"
        _kill_leftovers(pids + ([int(hung.read_text())] if hung.exists() else []))


@pytest.fixture(scope="module")
def truncated_split(tmp_path_factory) -> tuple[Path, Path]:
    """A packed split whose last shard is cut at half its size: of 2 ranks reading contiguous halves
    (tests/_fault_rank.py), only rank 1 reads it."""
    root = tmp_path_factory.mktemp("truncated_split")
    split = root / "train"
    assert pack(make_tiny_coco(root / "coco"), split) == 0
    shard = sorted(split.glob("*.h5"))[-1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return split, shard


def test_damaged_shard_in_one_rank_ends_every_rank_with_one_line(tmp_path, truncated_split):
    split, shard = truncated_split
    proc = _launch("bad_shard", tmp_path / "status", str(split))
    code, out, _ = _end(proc, timeout=180)
    assert code != 0
    errors_printed = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors_printed) == 1, out  # rank 0 is ended by the launcher, with nothing to add
    assert re.fullmatch(rf"error: rank 1: {re.escape(str(shard))}: cannot read image id \d+ \(OSError: Unable to "
                        rf"synchronously open file \(truncated file: eof = \d+, .*\)\); check the split with: "
                        rf"python -m data_prep verify {re.escape(str(split))} \(in DataLoader worker process 0\)",
                        errors_printed[0]), errors_printed[0]
    assert "Traceback" not in out


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun --gloo"])
def test_kill_9_of_one_rank_ends_every_rank(tmp_path, launcher):
    status = tmp_path / "status"
    if launcher != "mpirun" and shutil.which("horovodrun", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("horovodrun is not installed next to this Python: run `make setup`")
    proc = _launch("run", status, stall_s=600, launcher=launcher.split()[0])  # the watchdog plays no part
    pids = [s["pid"] for s in _wait_until_training(proc, status).values()]
    try:
        os.kill(pids[1], signal.SIGKILL)
        code, out, seconds = _end(proc, timeout=60)
        assert code != 0
        assert _gone(pids[0])
        print(f"kill -9 under {launcher}: every rank ended {seconds:.1f} s later, exit code {code}; output:\n"
              f"{out[-3000:]}")
    finally:
        _kill_leftovers(pids)


def test_failed_checkpoint_write_ends_every_rank_with_one_line_and_keeps_the_earlier(tmp_path):
    status = tmp_path / "status"
    proc = _launch("disk_full", status)
    code, out, _ = _end(proc, timeout=180)
    assert code != 0
    printed = [line for line in out.splitlines() if line.startswith("error: ")]
    target = status / "run" / "checkpoints" / "ckpt_00000010.pt"
    assert len(printed) == 1 and re.fullmatch(
        rf"error: rank 0: checkpoint not saved: could not write {re.escape(str(target))}: No space left on device "
        rf"\([\d.]+ [KMGT]?i?B free\); it needs about 0 MiB; kept: ckpt_00000005.pt", printed[0]), out
    assert "Traceback" not in out
    assert sorted(p.name for p in (status / "run" / "checkpoints").iterdir()) == ["ckpt_00000005.pt"]
    assert checkpoint.load_checkpoint(status / "run" / "checkpoints" / "ckpt_00000005.pt")["step"] == 5


# ---------------------------------------------------------------------------------------------------
# The same faults through the trainer itself (python -m hvd_megdet.train under mpirun)
# ---------------------------------------------------------------------------------------------------
def _launch_trainer(train_path: Path, out: Path, *sets: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = local_mpirun_command(2) + [sys.executable, "-m", "hvd_megdet.train", "--set", f"data.train_path={train_path}",
                                     "data.val_path=", f"train.output_dir={out}", "model.backbone=resnet18",
                                     "model.box_batch_size_per_image=64", "model.box_fc_dim=128",
                                     "data.images_per_rank=2", "data.min_size=64", "data.max_size=96",
                                     "data.num_workers=1", "train.device=cpu", "train.progress=false", *sets]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_trainer_with_a_damaged_shard_ends_every_rank_with_one_line(tmp_path, truncated_split):
    split, shard = truncated_split
    proc = _launch_trainer(split, tmp_path / "run", "train.max_iters=50")
    code, out, _ = _end(proc, timeout=300)
    assert code != 0
    printed = [line for line in out.splitlines() if line.startswith("error: ")]
    assert printed, out
    for line in printed:  # whichever rank reads the shard first; the launcher ends the other
        assert re.fullmatch(rf"error: rank [01]: {re.escape(str(shard))}: cannot read image id \d+ \(OSError: .*\); "
                            rf"check the split with: python -m data_prep verify {re.escape(str(split))} "
                            rf"\(in DataLoader worker process 0\)", line), line
    assert "Traceback" not in out


def test_trainer_with_a_stopped_rank_ends_every_rank_naming_it(tmp_path, tiny_train_shards):
    out_dir = tmp_path / "run"
    stall_s = 20  # far above a training step's time on 2 loaded cores (~1 s at 64 sampled RoIs per image)
    proc = _launch_trainer(tiny_train_shards, out_dir, "train.max_iters=100000", f"train.stall_timeout_s={stall_s}")
    pids = [s["pid"] for s in _wait_until_training(proc, out_dir / "status", batches=3).values()]
    try:
        os.kill(pids[1], signal.SIGSTOP)
        code, out, seconds = _end(proc, timeout=stall_s + 90)
        assert code != 0
        assert re.search(rf"^error: rank 0: no progress for \d+ s \(waiting on: .*\); stalled: rank 1 on \S+ \(no sign of "
                         rf"life for \d+ s: stopped, dead, or hung in the kernel; a lost host\?\); ending this rank "
                         rf"\(train.stall_timeout_s={stall_s}(\.0)?\)$", out, re.M), out
        assert "Traceback" not in out
        assert _gone(pids[0]) and _gone(pids[1])
        print(f"trainer, stopped rank: the job ended {seconds:.1f} s after SIGSTOP (stall_timeout_s={stall_s})")
    finally:
        _kill_leftovers(pids)
