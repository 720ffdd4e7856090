"""hvd_megdet.checkpoint: atomic writes that survive a full disk, resume past an unreadable newest
checkpoint, loading that runs no code, RNG states that round-trip through a weights-only load."""
from __future__ import annotations

import errno
import logging
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hvd_megdet import checkpoint
from hvd_megdet.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "checkpoints").iterdir())


def test_save_keeps_the_last_k_and_latest_is_the_highest_iteration(tmp_path):
    for it in (5, 10, 15, 20):
        checkpoint.save_checkpoint({"it": it}, tmp_path, it, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000015.pt", "ckpt_00000020.pt"]
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)) == {"it": 20}


def test_half_written_files_are_ignored_and_cleaned_by_the_next_save(tmp_path):
    checkpoint.save_checkpoint({"it": 1}, tmp_path, 1, keep=3)
    stale = tmp_path / "checkpoints" / ".ckpt_00000002.pt.tmp.4242"  # a writer killed mid-save
    stale.write_bytes(b"\x80partial")
    assert checkpoint.latest_checkpoint(tmp_path).name == "ckpt_00000001.pt"
    checkpoint.save_checkpoint({"it": 3}, tmp_path, 3, keep=3)
    assert not stale.exists()
    assert _names(tmp_path) == ["ckpt_00000001.pt", "ckpt_00000003.pt"]


def test_missing_and_unreadable_checkpoints_are_one_line_errors(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None and checkpoint.find_resumable(tmp_path) is None
    bad = tmp_path / "checkpoints" / "ckpt_00000007.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt_00000007.pt: not a readable hvd_megdet checkpoint") as err:
        checkpoint.load_checkpoint(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")
    # Checkpoints exist but none loads: refuse to start over on top of them.
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoints loads \(ckpt_00000007.pt\)"):
        checkpoint.find_resumable(tmp_path)


def test_truncated_newest_checkpoint_is_skipped_on_resume(tmp_path, caplog):
    for it in (10, 20, 30):
        checkpoint.save_checkpoint({"it": it, "w": torch.full((1000,), float(it))}, tmp_path, it, keep=3)
    newest = checkpoint.checkpoint_path(tmp_path, 30)
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])  # a crash outside our writer
    with caplog.at_level(logging.WARNING, logger="hvd_megdet.checkpoint"):
        path, state = checkpoint.find_resumable(tmp_path)
    assert path == checkpoint.checkpoint_path(tmp_path, 20)
    assert state["it"] == 20 and torch.equal(state["w"], torch.full((1000,), 20.0))
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping unreadable checkpoint: {newest}: not a readable hvd_megdet checkpoint (truncated or damaged? "
        f"RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory)"]
    with pytest.raises(CheckpointError, match="ckpt_00000030.pt: not a readable"):  # --resume names it: refused
        checkpoint.load_checkpoint(newest)


@pytest.mark.parametrize("fault", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EIO, "Input/output error"),
    PermissionError(errno.EACCES, "Permission denied"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),  # torch's own text
    "torch-swallowed-ENOSPC",
], ids=["ENOSPC", "EDQUOT", "EIO", "EACCES", "torch-unexpected-pos", "torch-swallowed-ENOSPC"])
def test_failed_write_names_the_file_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, fault):
    earlier = {"it": 10, "w": torch.arange(6.0)}
    checkpoint.save_checkpoint(earlier, tmp_path, 10, keep=1)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 4096)  # part of the file is written when the disk fails
        if fault != "torch-swallowed-ENOSPC":
            raise fault
        try:  # what torch.save does when the file's write() fails: its RuntimeError hides the OSError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as err:
        checkpoint.save_checkpoint({"it": 20, "w": torch.zeros(2**18)}, tmp_path, 20, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    line = str(err.value)
    target = checkpoint.checkpoint_path(tmp_path, 20)
    reason = "No space left on device" if isinstance(fault, str) else getattr(fault, "strerror", None) or str(fault)
    assert line.startswith(f"checkpoint not saved: could not write {target}: {reason} (")
    assert " free); it needs about 1 MiB; kept: ckpt_00000010.pt" in line and "\n" not in line
    assert _names(tmp_path) == ["ckpt_00000010.pt"]  # no temporary file left, nothing pruned
    loaded = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 10))
    assert loaded["it"] == 10 and torch.equal(loaded["w"], earlier["w"])


def test_full_tmpfs_keeps_earlier_checkpoints_and_frees_the_temporary(tmp_path):
    """A real disk that fills during torch.save: a 20 MiB tmpfs and a 32 MiB checkpoint."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}; "
                    f"the injected-fault test above covers the same code path")
    try:
        checkpoint.save_checkpoint({"it": 1, "w": torch.ones(2**18)}, mnt, 1, keep=3)  # 1 MiB
        free_before = shutil.disk_usage(mnt).free
        with pytest.raises(CheckpointError) as err:
            checkpoint.save_checkpoint({"it": 2, "w": torch.ones(2**23)}, mnt, 2, keep=3)  # 32 MiB
        line = str(err.value)
        assert re.fullmatch(f"checkpoint not saved: could not write {checkpoint.checkpoint_path(mnt, 2)}: No space "
                            r"left on device \(1\d\.\d MiB free\); it needs about 32 MiB; kept: ckpt_00000001.pt", line)
        assert _names(mnt) == ["ckpt_00000001.pt"]
        assert shutil.disk_usage(mnt).free == free_before  # the temporary file's space is given back
        assert torch.equal(checkpoint.load_checkpoint(checkpoint.checkpoint_path(mnt, 1))["w"], torch.ones(2**18))
        checkpoint.save_checkpoint({"it": 3, "w": torch.ones(2**18)}, mnt, 3, keep=3)  # room for a small one
        assert _names(mnt) == ["ckpt_00000001.pt", "ckpt_00000003.pt"]
    finally:
        busy = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if busy.returncode != 0:  # a file on it still open: detach it anyway, then fail
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            pytest.fail(f"a file on the small disk is still open after the failed save: {busy.stderr.strip()}")


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a malicious checkpoint."""

    marker: Path

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the bare pickle case: expected
@pytest.mark.parametrize("writer, refusal", [
    ("torch.save", r"refused: it holds a Python object \(getattr\) besides tensors and plain values, and unpickling "
                   r"it could run code"),
    ("pickle.dump", r"not a readable hvd_megdet checkpoint \(not written by torch.save, or damaged; the weights-only "
                    r"unpickler stopped at: Unsupported operand 149\)"),
], ids=["torch.save", "bare pickle"])
def test_checkpoint_carrying_code_is_refused_and_the_code_does_not_run(tmp_path, writer, refusal):
    payload = _Payload()
    payload.marker = tmp_path / "code_ran"
    state = {"model": {"w": torch.zeros(2)}, "extra": payload}
    path = tmp_path / "checkpoints" / "ckpt_00000005.pt"
    path.parent.mkdir()
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(CheckpointError, match=f"ckpt_00000005.pt: {refusal}") as err:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints loads"):
        checkpoint.find_resumable(tmp_path)
    assert not payload.marker.exists()
    pickle.loads(pickle.dumps(payload))  # the check above can see it: plain unpickling does run the code
    assert payload.marker.exists()


def test_state_that_could_not_be_loaded_back_is_never_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\[0\]\['numpy'\]\[1\] is a numpy.ndarray"):
        checkpoint.save_checkpoint({"rng": [{"numpy": np.random.get_state()}]}, tmp_path, 1, keep=1)
    with pytest.raises(TypeError, match=r"state\['lr'\] is a numpy.float64"):  # a float subclass pickles as numpy
        checkpoint.save_checkpoint({"lr": np.float64(0.1)}, tmp_path, 1, keep=1)
    assert checkpoint.list_checkpoints(tmp_path) == []


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(2).tolist(), \
        float(np.random.standard_normal())


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.gauss(0, 1)  # leave a cached Gaussian in both generators: part of the state to restore
    np.random.standard_normal()
    checkpoint.save_checkpoint({"rng": [checkpoint.rng_state()]}, tmp_path, 1, keep=1)
    expected = _draws()
    torch.rand(5), random.random(), np.random.rand(7)  # move every generator on
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 1))
    checkpoint.set_rng_state(state["rng"][0])
    assert _draws() == expected


def test_checkpoint_from_before_weights_only_is_refused_then_upgraded_on_request(tmp_path):
    np.random.seed(3)
    random.seed(4)
    old_rng = {"torch": torch.get_rng_state(), "cuda": [], "python": random.getstate(),
               "numpy": np.random.get_state()}  # the form written before: tuples holding a NumPy array
    path = tmp_path / "checkpoints" / "ckpt_00000100.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.ones(3)}, "rng": [old_rng, old_rng], "progress": {"iteration": 100}}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"refused: it holds a Python object \(numpy._core.multiarray."
                                              r"_reconstruct\).*python -m hvd_megdet.checkpoint upgrade --trust"):
        checkpoint.load_checkpoint(path)
    cmd = [sys.executable, "-m", "hvd_megdet.checkpoint", "upgrade", str(path)]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --trust" in refused.stderr and path.read_bytes() == before
    done = subprocess.run(cmd + ["--trust"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = checkpoint.load_checkpoint(path)
    assert state["progress"] == {"iteration": 100} and torch.equal(state["model"]["w"], torch.ones(3))
    np.random.set_state(old_rng["numpy"])
    random.setstate(old_rng["python"])
    expected = _draws()
    np.random.seed(0)
    checkpoint.set_rng_state(state["rng"][1])
    assert _draws() == expected
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # written atomically in place
