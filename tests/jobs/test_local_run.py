"""jobs/local/run.sh trains for real: 2 ranks, 2 iterations, a checkpoint at the end.

This is the instant end-to-end test (detectron2's run_instant_tests.sh): the job script, horovodrun,
Horovod, the data loader, the model and the checkpoint writer, all for real, on tiny synthetic shards.
"""
import os
import subprocess
import sys

from tests.jobs._fakes import LOCAL, REPO_ROOT

CONFIG = "configs/demo_cpu.yaml"


def _make_tiny_shards(tmp_path):
    """8 synthetic 64x48 images as COCO files, packed into HDF5 shards the way a user would."""
    coco, shards = tmp_path / "coco", tmp_path / "shards"
    for cmd in (["synthetic", "--out", str(coco), "--images", "8", "--size", "64x48", "--seed", "0"],
                ["coco_to_hdf5", "--images", str(coco / "images"),
                 "--annotations", str(coco / "annotations" / "instances_train.json"), "--out", str(shards),
                 "--images-per-shard", "4"]):
        subprocess.run([sys.executable, "-m", "data_prep", *cmd], cwd=REPO_ROOT, check=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert (shards / "manifest.json").is_file()
    return shards


def test_local_run_two_ranks_two_iterations(tmp_path):
    shards = _make_tiny_shards(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, NP="2", CONFIG=CONFIG, DATA_PATH=str(shards), VAL_PATH=str(shards),
               OUTPUT_DIR=str(out), OMP_NUM_THREADS="1")
    # 64 sampled RoIs per image, not the demo's 512, and a 128-wide box head: nothing here judges the model.
    # Every run into the directory keeps the head its checkpoints were trained with.
    small = ["model.box_batch_size_per_image=64", "model.box_fc_dim=128"]
    proc = subprocess.run(["bash", str(LOCAL), "train.max_iters=2", *small], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checkpoints = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    assert [c.name for c in checkpoints] == ["ckpt_00000002.pt"], proc.stdout[-2000:] + proc.stderr[-2000:]

    assert (out / "finished.json").is_file()

    # Running again into the finished run is refused before anything starts, in one line.
    again = subprocess.run(["bash", str(LOCAL), "train.max_iters=2", *small], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 1 and f"{out} holds a finished run" in again.stderr, again.stderr[-4000:]
    assert "running:" not in again.stderr

    # EXTEND=1 resumes from that checkpoint instead of starting over (the requeue path of the cluster
    # jobs); with max_iters already reached the trainer says so and does nothing.
    extended = subprocess.run(["bash", str(LOCAL), "train.max_iters=2", *small], env={**env, "EXTEND": "1"}, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=900)
    assert extended.returncode == 0, extended.stdout[-4000:] + extended.stderr[-4000:]
    assert "resumed from" in extended.stdout + extended.stderr
    assert "holds a finished run" in extended.stdout + extended.stderr  # train.py: nothing to do
    assert [c.name for c in sorted((out / "checkpoints").glob("ckpt_*.pt"))] == ["ckpt_00000002.pt"]
