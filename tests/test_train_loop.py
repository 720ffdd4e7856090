"""The epoch loop of hvd_megdet.train.run: preemption at epoch ends, evaluation and exact resume,
the non-finite policy with gradient accumulation on real ranks, and the weight-decay default."""
import os
import signal

import pytest
import torch
from torch import nn

from hvd_megdet import checkpoint, engine, metrics, stop, train
from hvd_megdet.comm import DistContext
from hvd_megdet.config import SolverConfig, load_config
from hvd_megdet.metrics import read_log
from tests.mpirun import run_ranks

ITERS_PER_EPOCH = 4  # 16 tiny images, 4 per step on one rank


def _cfg(shards, out, *extra):
    return load_config(None, [
        f"data.train_path={shards}", f"data.val_path={shards}", f"train.output_dir={out}",
        "data.images_per_rank=4", "data.num_workers=0", "data.min_size=64", "data.max_size=96",
        "model.backbone=resnet18", "model.box_batch_size_per_image=64", "model.box_fc_dim=128",  # cheap: no quality test
        "solver.warmup_iters=2", "train.progress=false", "train.log_every=1",
        "train.checkpoint_every=1000", f"train.max_iters={2 * ITERS_PER_EPOCH}", "train.device=cpu", *extra])


def _signal_after(iteration: int, monkeypatch, sig=signal.SIGTERM):
    """Deliver ``sig`` to this process right after step ``iteration`` (as a scheduler would)."""
    real = engine.train_one_epoch

    def one_epoch_then_signal(*args, **kwargs):
        for progress in real(*args, **kwargs):
            if progress.iteration == iteration:
                os.kill(os.getpid(), sig)
            yield progress

    monkeypatch.setattr(engine, "train_one_epoch", one_epoch_then_signal)


def _evaluated_epochs(out):
    return [r["epoch"] for r in read_log(out / "log.jsonl", "eval")]


def test_sigterm_on_an_epochs_last_step_evaluates_that_epoch_on_resume(tiny_train_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(tiny_train_shards, out, "train.eval_epochs=[1]")
    _signal_after(ITERS_PER_EPOCH, monkeypatch)
    with pytest.raises(engine.Preempted):
        train.run(cfg, DistContext())
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    # Saved at once, the epoch's end still to do: no evaluation ran before the job stopped.
    assert state["progress"]["iteration"] == ITERS_PER_EPOCH and state["progress"]["epoch"] == 0
    assert not (out / "log.jsonl").exists() or _evaluated_epochs(out) == []
    monkeypatch.undo()
    summary = train.run(cfg, DistContext())
    assert summary["iterations"] == 2 * ITERS_PER_EPOCH
    assert _evaluated_epochs(out) == [1, 2]  # epoch 1 on resume, epoch 2 at the end
    assert (out / "eval_epoch01" / "metrics.json").exists() and (out / train.FINISHED).exists()


def test_sigterm_on_the_final_step_evaluates_on_resume_then_finishes(tiny_train_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(tiny_train_shards, out)
    _signal_after(2 * ITERS_PER_EPOCH, monkeypatch)
    with pytest.raises(engine.Preempted):
        train.run(cfg, DistContext())
    assert not (out / train.FINISHED).exists()
    monkeypatch.undo()
    summary = train.run(cfg, DistContext())
    assert summary["iterations"] == 2 * ITERS_PER_EPOCH and summary["epoch"] == 2
    assert _evaluated_epochs(out) == [2] and (out / train.FINISHED).exists()
    # A third start into the finished directory does nothing and says so.
    again = train.run(cfg, DistContext())
    assert again["already_finished"] and _evaluated_epochs(out) == [2]


def test_the_stop_record_is_written_once_the_stop_file_is_consumed(tiny_train_shards, tmp_path, monkeypatch):
    # Whoever reads the "stop" record (a job script, a test, a user) must find no request left over:
    # CI once saw the record with OUTPUT_DIR/STOP still there (consumed after the record was written).
    out = tmp_path / "run"
    real_epoch, real_log = engine.train_one_epoch, metrics.MetricLogger.log
    file_at_record = []

    def one_epoch_then_request(*args, **kwargs):
        for progress in real_epoch(*args, **kwargs):
            if progress.iteration == 2:
                stop.request_stop(out, "TERM")  # what jobs/lib/stop.sh does on a requeue
            yield progress

    def log(self, kind, record):
        if kind == "stop":
            file_at_record.append((out / stop.STOP_FILE).exists())
        real_log(self, kind, record)

    monkeypatch.setattr(engine, "train_one_epoch", one_epoch_then_request)
    monkeypatch.setattr(metrics.MetricLogger, "log", log)
    with pytest.raises(engine.Preempted):
        train.run(_cfg(tiny_train_shards, out), DistContext())
    assert file_at_record == [False]
    assert [r["iter"] for r in read_log(out / "log.jsonl", "stop")] == [2]


def test_resume_after_an_evaluated_epoch_is_exact(tiny_train_shards, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(_cfg(tiny_train_shards, straight, "train.eval_epochs=[1]"), DistContext())
    # One checkpoint per iteration at most: an evaluated epoch's end saves once, before evaluating.
    saved = [r["iter"] for r in read_log(straight / "log.jsonl", "checkpoint")]
    assert saved == [ITERS_PER_EPOCH, 2 * ITERS_PER_EPOCH], saved

    # The same run, killed (no save, no clean-up) at the first step after epoch 1's evaluation.
    class Killed(BaseException):
        pass

    real = engine.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        for progress in real(*args, **kwargs):
            if progress.iteration == ITERS_PER_EPOCH + 1:
                raise Killed
            yield progress

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_epoch_2)
    cfg = _cfg(tiny_train_shards, resumed, "train.eval_epochs=[1]")
    with pytest.raises(Killed):
        train.run(cfg, DistContext())
    monkeypatch.undo()
    assert checkpoint.latest_checkpoint(resumed).name == f"ckpt_{ITERS_PER_EPOCH:08d}.pt"
    train.run(cfg, DistContext())
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(straight))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(resumed))
    assert a["progress"] == b["progress"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=0, rtol=0, msg=key)
    assert _evaluated_epochs(straight) == _evaluated_epochs(resumed) == [1, 2]


def test_evaluation_leaves_training_randomness_alone(tiny_train_shards, tmp_path):
    # Training with an evaluation after epoch 1 ends on the same weights as training without it.
    with_eval, without = tmp_path / "with", tmp_path / "without"
    train.run(_cfg(tiny_train_shards, with_eval, "train.eval_epochs=[1]", "train.eval_at_end=false"), DistContext())
    train.run(_cfg(tiny_train_shards, without, "train.eval_at_end=false"), DistContext())
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(with_eval))["model"]
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(without))["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=0, rtol=0, msg=key)


# ------------------------------------------------------------ non-finite loss with accumulation
class _Linear(nn.Module):
    """A 'detector' whose loss is w * (the sum of its one image)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))

    def forward(self, images, targets):
        return {"loss": self.w * images[0].sum()}


def _batch(value):
    return [torch.tensor([value])], [{}]


def _skip_on_second_pass_worker():
    from hvd_megdet import comm

    ctx = comm.init()
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = comm.distributed_optimizer(optimizer, model, ctx, backward_passes_per_step=2)
    settings = engine.StepSettings(2, None, 0.0, "skip", torch.device("cpu"))
    progress = engine.Progress()
    # Rank 1's second pass is non-finite: both ranks skip, after one pass already went backward.
    bad = [_batch(1.0), _batch(float("nan") if ctx.rank == 1 else 1.0)]
    skipped = engine.train_step(model, optimizer, None, bad, settings, ctx, progress)
    after_skip = model.w.item()
    # The next steps accumulate two passes again and average over the ranks.
    losses = [engine.train_step(model, optimizer, None, [_batch(1.0 + ctx.rank), _batch(3.0)], settings, ctx,
                                progress) for _ in range(2)]
    return {"skipped": skipped, "after_skip": after_skip, "w": model.w.item(), "losses": losses,
            "skipped_steps": progress.skipped_steps}


def test_non_finite_second_pass_skips_on_every_rank_and_training_goes_on():
    results = run_ranks("tests.test_train_loop:_skip_on_second_pass_worker", np=2)
    for res in results:
        assert res["skipped"] is None and res["skipped_steps"] == 1
        assert res["after_skip"] == 2.0  # no update from the skipped step
        # Each step: grad = mean over ranks of (x1 + x2) / 2 = ((1 + 3) + (2 + 3)) / 4 = 2.25.
        assert res["w"] == pytest.approx(2.0 - 2 * 0.1 * 2.25, abs=1e-6)
    assert results[0]["w"] == results[1]["w"]


def test_weight_decay_is_uniform_by_default_and_the_exemption_is_an_option():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    uniform = train.build_optimizer(model, SolverConfig(), lr=0.1)
    assert [g["weight_decay"] for g in uniform.param_groups] == [1e-4]
    assert len(uniform.param_groups[0]["params"]) == 4  # conv weight and bias, BN weight and bias
    exempt = train.build_optimizer(model, SolverConfig(no_decay_bias_norm=True), lr=0.1)
    assert [(g["weight_decay"], len(g["params"])) for g in exempt.param_groups] == [(1e-4, 1), (0.0, 3)]


def test_resume_into_another_model_is_refused_naming_the_settings(tiny_train_shards, tmp_path):
    out = tmp_path / "run"
    train.run(_cfg(tiny_train_shards, out, "train.max_iters=1", "data.val_path="), DistContext())
    # The same directory with a narrower box head: one line naming the parameter and the setting,
    # not load_state_dict's traceback (every rank printed one before).
    with pytest.raises(checkpoint.CheckpointError) as refused:
        train.run(_cfg(tiny_train_shards, out, "train.max_iters=2", "data.val_path=", "model.box_fc_dim=64"),
                  DistContext())
    message = str(refused.value)
    assert message.startswith(f"{out / 'checkpoints' / 'ckpt_00000001.pt'} holds another model"), message
    assert "roi_heads.box_head.fc6.weight is [128, 12544] there, [64, 12544] here" in message
    assert "model.box_fc_dim=128 there, 64 here" in message and "\n" not in message
    assert [r["iter"] for r in read_log(out / "log.jsonl", "train")] == [1]  # nothing trained, nothing lost
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["ckpt_00000001.pt"]
