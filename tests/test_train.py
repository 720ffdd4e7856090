"""hvd_megdet.train: distributed equivalence, exact resume, and the entry point's behaviour."""
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from data_prep import synthetic
from hvd_megdet import checkpoint, comm, stop, train
from hvd_megdet.config import ModelConfig
from hvd_megdet.metrics import read_log
from hvd_megdet.model import build_model
from tests.mpirun import run_ranks

ROOT = Path(__file__).resolve().parent.parent
# No test here asserts model quality: 64 sampled RoIs per image instead of 512 make a step ~3.5x cheaper,
# and a box head 128 wide instead of 1024 leaves 16M parameters to allreduce and checkpoint instead of 28M.
SMALL = ["model.backbone=resnet18", "model.box_batch_size_per_image=64", "model.box_fc_dim=128", "data.min_size=96",
         "data.max_size=128", "train.progress=false", "solver.warmup_iters=3", "train.log_every=1"]


# ------------------------------------------------------------ 2 ranks x 1 image == 1 rank x 2 images
class FirstKSampler(BalancedPositiveNegativeSampler):
    """Deterministic: the first positives and negatives in index order (no RNG), so a 1-rank and a
    2-rank run pick the same samples for the same image."""

    def __call__(self, matched_idxs):
        pos_masks, neg_masks = [], []
        for matched in matched_idxs:
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(int(self.batch_size_per_image * self.positive_fraction), positive.numel())
            num_neg = min(self.batch_size_per_image - num_pos, negative.numel())
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[:num_pos]] = 1
            neg_mask[negative[:num_neg]] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def _images_and_targets():
    gen = torch.Generator().manual_seed(7)
    images = [torch.rand(3, 224, 224, generator=gen, dtype=torch.float64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0], [130.0, 40.0, 200.0, 100.0]], dtype=torch.float64),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[50.0, 60.0, 180.0, 200.0]], dtype=torch.float64), "labels": torch.tensor([2])}]
    return images, targets


WATCHED = ["backbone.body.conv1.weight", "backbone.body.layer1.0.bn1.weight", "backbone.body.layer1.0.bn1.running_mean",
           "backbone.body.layer3.1.conv2.weight", "backbone.fpn.inner_blocks.0.0.weight",
           "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight", "roi_heads.box_predictor.cls_score.weight"]


def _one_step_worker():
    ctx = comm.init()
    torch.manual_seed(0)
    norm = "cgbn" if ctx.size > 1 else "local"
    model = build_model(ModelConfig(backbone="resnet18", norm=norm, box_fc_dim=128),  # a narrow head: cheap in float64
                        ctx, num_classes=4, min_size=224, max_size=224)
    # float64: proposal selection is a ranking (top-k, NMS), and fp32 rounding differences between
    # summing statistics on one rank or two could reorder near-ties and change the sampled boxes.
    model.double()
    model.rpn.fg_bg_sampler = FirstKSampler(256, 0.5)
    model.roi_heads.fg_bg_sampler = FirstKSampler(512, 0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    optimizer = comm.distributed_optimizer(optimizer, model, ctx)
    comm.broadcast_state(model, optimizer, ctx)
    images, targets = _images_and_targets()
    mine = slice(ctx.rank, None, ctx.size)  # rank r holds image r of the pair
    model.train()
    losses = model(images[mine], targets[mine])
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    state = model.state_dict()
    return {"loss": loss.item(), "terms": {k: v.item() for k, v in losses.items()},
            "weights": {k: state[k].clone() for k in WATCHED}}


def test_two_rank_cgbn_step_equals_one_rank_local_bn_step():
    (single,) = run_ranks("tests.test_train:_one_step_worker", np=1)
    pair = run_ranks("tests.test_train:_one_step_worker", np=2)
    # Each loss term is a mean over the sampled anchors/proposals, and every image here fills its
    # quota, so the mean over both images is the average of the two ranks' means.
    for term, value in single["terms"].items():
        assert (pair[0]["terms"][term] + pair[1]["terms"][term]) / 2 == pytest.approx(value, rel=1e-9, abs=1e-12), term
    for key in WATCHED:
        torch.testing.assert_close(pair[0]["weights"][key], pair[1]["weights"][key], atol=0, rtol=0)
        torch.testing.assert_close(pair[0]["weights"][key], single["weights"][key], atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------- kill and resume
def _train_cmd(shards: Path, out: Path, max_iters: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "hvd_megdet.train", "--set", f"data.train_path={shards}",
            f"train.output_dir={out}", f"train.max_iters={max_iters}", "data.num_workers=1",
            "train.checkpoint_every=3", "data.images_per_rank=2", *SMALL, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def test_kill_and_resume_matches_uninterrupted_run(tiny_train_shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_train_cmd(tiny_train_shards, straight, 6), env=_env(), cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    # Same run, killed (SIGKILL, no chance to clean up) once its iteration-3 checkpoint exists.
    proc = subprocess.Popen(_train_cmd(tiny_train_shards, resumed, 6), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while checkpoint.latest_checkpoint(resumed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in checkpoint.list_checkpoints(resumed)] == ["ckpt_00000003.pt"]
    done = subprocess.run(_train_cmd(tiny_train_shards, resumed, 6), env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(straight))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(resumed))
    assert a["progress"] == b["progress"] and a["progress"]["iteration"] == 6
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=0, rtol=0, msg=key)
    # Losses logged after the resume equal the uninterrupted run's.
    straight_log = {r["iter"]: r["loss"] for r in read_log(straight / "log.jsonl", "train")}
    resumed_log = {r["iter"]: r["loss"] for r in read_log(resumed / "log.jsonl", "train")}
    for it in (4, 5, 6):
        assert resumed_log[it] == straight_log[it]


def test_resume_with_another_world_size_is_refused(tmp_path):
    state = {"world_size": 8, "global_batch": 16}
    with pytest.raises(RuntimeError, match=r"written by 8 ranks with global batch 16; this run has 4 ranks"):
        checkpoint.check_world(state, 4, 8, tmp_path / "ckpt_00000010.pt")
    checkpoint.check_world(state, 8, 16, tmp_path / "ckpt_00000010.pt")


# ------------------------------------------------------------------------------ entry point
def test_unknown_config_key_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--set", "solver.warmup=10"])
    assert exit_info.value.code == 2
    assert "unknown config key 'solver.warmup'" in capsys.readouterr().err


def _short_run_worker(shards, out, iters=2):
    return train.main(["--set", f"data.train_path={shards}", f"train.output_dir={out}", f"train.max_iters={iters}",
                       "data.num_workers=0", *SMALL])


def test_two_ranks_train_log_and_checkpoint(tiny_train_shards, tmp_path):
    out = tmp_path / "run"
    assert run_ranks("tests.test_train:_short_run_worker", np=2, args=(str(tiny_train_shards), str(out))) == [0, 0]
    start = read_log(out / "log.jsonl", "start")[0]
    assert start["world_size"] == 2 and start["global_batch"] == 4 and start["bn_size"] == 4
    assert start["scaled_lr"] == pytest.approx(0.02 * 4 / 16)
    records = read_log(out / "log.jsonl", "train")
    assert [r["iter"] for r in records] == [1, 2]
    for key in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr",
                "img_per_s", "data_time", "step_time", "global_batch", "peak_mem_mb",
                "rpn_pos_neg_ratio", "roi_pos_neg_ratio", "bn_size"):
        assert key in records[0], key
    assert 0 < records[0]["rpn_pos_neg_ratio"] < 1
    assert all(r["bn_size"] == 4 for r in records)  # every record says which Table 3 row it is
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["ckpt_00000002.pt"]
    assert (out / "config.yaml").exists() and (out / train.FINISHED).exists()
    # Resume on 2 ranks: rank 0 finds the checkpoint, the others learn it by broadcast.
    assert run_ranks("tests.test_train:_short_run_worker", np=2, args=(str(tiny_train_shards), str(out), 3)) == [0, 0]
    assert read_log(out / "log.jsonl", "start")[-1]["start_iter"] == 2
    assert [r["iter"] for r in read_log(out / "log.jsonl", "train")] == [1, 2, 3]


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tiny_train_shards, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(tiny_train_shards, out, 40, extra=["train.checkpoint_every=1000", "data.num_workers=0"])
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    log = out / "log.jsonl"
    while proc.poll() is None and time.time() < deadline and not (log.exists() and read_log(log, "train")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1, err[-3000:]  # no periodic checkpoint was due: this one is the preemption's
    stopped_at = checkpoint.load_checkpoint(saved[0])["progress"]["iteration"]
    assert 1 <= stopped_at < 40
    again = subprocess.run(_train_cmd(tiny_train_shards, out, stopped_at + 1, extra=["data.num_workers=0"]),
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {saved[0]} at iteration {stopped_at}" in again.stderr


def _stop_file_worker(shards, out):
    return train.main(["--set", f"data.train_path={shards}", f"train.output_dir={out}", "train.max_iters=40",
                       "train.checkpoint_every=1000", "data.num_workers=0", *SMALL])


def test_the_stop_file_stops_every_rank_at_one_iteration_with_exit_0(tiny_train_shards, tmp_path):
    # What a job script does on a requeue, a time limit or qdel (jobs/lib/stop.sh): write OUTPUT_DIR/STOP.
    out = tmp_path / "run"
    log = out / "log.jsonl"

    def request_after_the_first_step():
        deadline = time.time() + 600
        while time.time() < deadline and not (log.exists() and read_log(log, "train")):
            time.sleep(0.05)
        stop.request_stop(out, "TERM")

    requester = threading.Thread(target=request_after_the_first_step, daemon=True)
    requester.start()
    # Exit 0 on every rank, not 143: mpirun would abort the job on a non-zero exit and sit out
    # odls_base_sigkill_timeout before ending (the job script reports 143 itself).
    assert run_ranks("tests.test_train:_stop_file_worker", np=2, args=(str(tiny_train_shards), str(out)),
                     timeout=600) == [0, 0]
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 1
    it = checkpoint.load_checkpoint(saved[0])["progress"]["iteration"]
    (record,) = read_log(log, "stop")
    assert record["iter"] == it and 1 <= it < 40
    # Rank 0 saw the file, nobody was signalled; the record names every rank, written before any exit.
    assert [(r["file"], r["signalled"]) for r in record["ranks"]] == [(True, False), (False, False)]
    assert not (out / stop.STOP_FILE).exists()  # consumed: the rerun does not stop at once
    assert not (out / train.FINISHED).exists()
    assert run_ranks("tests.test_train:_short_run_worker", np=2, args=(str(tiny_train_shards), str(out), it + 1)) == [0, 0]
    assert read_log(log, "start")[-1]["start_iter"] == it and (out / train.FINISHED).exists()


def _workers_left_worker(shards, val, out):
    # With the cyclic garbage collector off, whatever still holds the loader keeps it until exit.
    gc.disable()
    rc = train.main(["--set", f"data.train_path={shards}", f"data.val_path={val}", f"train.output_dir={out}",
                     "train.max_iters=4", "train.eval_at_end=true", "data.num_workers=1", "data.images_per_rank=2",
                     *SMALL])
    return rc, [p.pid for p in multiprocessing.active_children()]


def test_training_leaves_no_worker_process_behind(tiny_train_shards, tmp_path):
    # The DataLoader's persistent workers ignore SIGTERM (train._ignore_sigterm). A loader still
    # alive at interpreter exit made multiprocessing's exit handler send them SIGTERM and join them
    # forever: `make demo`'s rank 0 hung after training and evaluating. train.run now stops them itself.
    val = synthetic.make_shards(tmp_path / "val", 4, "128x96", seed=5, split="val")
    results = run_ranks("tests.test_train:_workers_left_worker", np=2,
                        args=(str(tiny_train_shards), str(val), str(tmp_path / "run")), timeout=300)
    assert results == [(0, []), (0, [])]
    assert (tmp_path / "run" / train.FINISHED).exists() and (tmp_path / "run" / "eval_epoch01").is_dir()
