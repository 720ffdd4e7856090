"""hvd_megdet.lr_schedule against values worked out by hand from the MegDet paper (Sec. 3.2, 4)."""
import subprocess
import sys

import pytest

from hvd_megdet import lr_schedule as lrs
from tests.mpirun import REPO_ROOT


def _sequence(n, **kwargs):
    return [lrs.lr_at(i, **kwargs) for i in range(n)]


def test_scaled_lr_linear_rule():
    assert lrs.scaled_lr(16) == pytest.approx(0.02, rel=1e-12)
    assert lrs.scaled_lr(256) == pytest.approx(0.32, rel=1e-12)  # the paper's 256-image batch
    assert lrs.scaled_lr(32) == pytest.approx(0.04, rel=1e-12)
    assert lrs.scaled_lr(8) == pytest.approx(0.01, rel=1e-12)
    assert lrs.scaled_lr(64, base_lr=0.01) == pytest.approx(0.04, rel=1e-12)  # Table 2 "half LR"
    assert lrs.scaled_lr(10, base_lr=0.1, base_batch=5) == pytest.approx(0.2, rel=1e-12)


def test_global_batch_counts_every_image_of_one_step():
    assert lrs.global_batch_size(2, 128) == 256  # Table 3: 256 images on 128 GPUs
    assert lrs.global_batch_size(2, 8) == 16
    assert lrs.global_batch_size(4, 8, backward_passes_per_step=2) == 64


def test_iters_per_epoch_matches_the_trainers_samplers():
    # The samplers the trainer uses are the reference: the schedule and the data must agree on
    # where an epoch (and so every LR decay) ends.
    from hvd_megdet.data import DistributedShardSampler, GroupedBatchSampler

    class _Images:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    for n in (2, 7, 10, 16, 17, 33, 100):
        for world in (1, 2, 3, 4):
            for per_rank in (1, 2, 3):
                for passes in (1, 2):
                    sampler = DistributedShardSampler(_Images(n), rank=world - 1, size=world)
                    if len(sampler) < per_rank * passes:
                        with pytest.raises(ValueError, match="not one step"):
                            lrs.iters_per_epoch(n, per_rank, world, passes)
                        continue
                    batches = GroupedBatchSampler(sampler, [1.0] * n, per_rank)
                    assert lrs.iters_per_epoch(n, per_rank, world, passes) == len(batches) // passes, \
                        (n, world, per_rank, passes)
    assert lrs.iters_per_epoch(118287, 2, 128) == 462  # COCO train2017, Table 3's 256 batch
    assert lrs.iters_per_epoch(256, 2, 128) == 1


def test_total_iters_per_policy():
    assert lrs.total_iters(463, "normal") == 11 * 463
    assert lrs.total_iters(463, "long") == 18 * 463
    assert lrs.total_iters(5) == 55


def test_policies_describe_the_paper():
    assert lrs.POLICIES["normal"] == lrs.LRPolicy((8, 10), (0.1, 0.1), 11)
    assert lrs.POLICIES["long"] == lrs.LRPolicy((11, 14, 17), (0.1, 0.1, 0.5), 18)


def test_normal_policy_exact_sequence_with_warmup():
    # r = 0.02, r_hat = 0.32, 4 warm-up steps of (0.32 - 0.02) / 4 = 0.075; 2 steps per epoch, so
    # x0.1 from iteration 16 (8 epochs done), x0.01 from iteration 20 (10 done), end after 22.
    got = _sequence(22, global_batch=256, iters_per_epoch=2, warmup_iters=4)
    expected = [0.02, 0.095, 0.17, 0.245] + [0.32] * 12 + [0.032] * 4 + [0.0032] * 2
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_long_policy_exact_sequence():
    got = _sequence(18, global_batch=32, iters_per_epoch=1, policy="long", warmup_iters=0)
    expected = [0.04] * 11 + [0.004] * 3 + [0.0004] * 3 + [0.0002]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_warmup_endpoints_and_linearity_on_the_paper_setting():
    kw = dict(global_batch=256, iters_per_epoch=463, warmup_iters=500)
    assert lrs.lr_at(0, **kw) == 0.02  # the un-scaled base LR r
    assert lrs.lr_at(500, **kw) == pytest.approx(0.32, rel=1e-12)  # reaches r_hat
    assert lrs.lr_at(250, **kw) == pytest.approx(0.17, rel=1e-12)
    steps = [lrs.lr_at(i + 1, **kw) - lrs.lr_at(i, **kw) for i in range(500)]
    assert steps == pytest.approx([0.3 / 500] * 500, rel=1e-9)  # same rise after every iteration
    assert lrs.lr_at(8 * 463 - 1, **kw) == pytest.approx(0.32, rel=1e-12)
    assert lrs.lr_at(8 * 463, **kw) == pytest.approx(0.032, rel=1e-12)  # first step of epoch 8
    assert lrs.lr_at(10 * 463, **kw) == pytest.approx(0.0032, rel=1e-12)
    assert lrs.lr_at(11 * 463 - 1, **kw) == pytest.approx(0.0032, rel=1e-12)  # last step


def test_no_warmup_starts_at_scaled_lr():
    assert lrs.lr_at(0, global_batch=256, iters_per_epoch=10, warmup_iters=0) == pytest.approx(0.32)


def test_batch_below_reference_skips_warmup():
    got = _sequence(11, global_batch=8, iters_per_epoch=1, warmup_iters=5)
    assert got == pytest.approx([0.01] * 8 + [0.001] * 2 + [0.0001], rel=1e-12)


def test_batch_equal_to_reference_has_flat_warmup():
    assert _sequence(3, global_batch=16, iters_per_epoch=1, warmup_iters=3) == pytest.approx([0.02] * 3)


def test_warmup_overlapping_a_decay_multiplies():
    kw = dict(global_batch=256, iters_per_epoch=1, warmup_iters=10)
    assert lrs.lr_at(8, **kw) == pytest.approx((0.02 + 0.3 * 0.8) * 0.1, rel=1e-12)
    assert lrs.lr_at(10, **kw) == pytest.approx(0.32 * 0.01, rel=1e-12)


def test_custom_policy_object():
    policy = lrs.LRPolicy(decay_epochs=(1,), decay_factors=(0.5,), total_epochs=2)
    got = _sequence(4, global_batch=16, iters_per_epoch=2, policy=policy, warmup_iters=0)
    assert got == pytest.approx([0.02, 0.02, 0.01, 0.01])
    assert lrs.total_iters(2, policy) == 4


@pytest.mark.parametrize("call, message", [
    (lambda: lrs.lr_at(22, global_batch=256, iters_per_epoch=2), "past the end"),
    (lambda: lrs.lr_at(-1, global_batch=256, iters_per_epoch=2), "iteration"),
    (lambda: lrs.lr_at(0, global_batch=256, iters_per_epoch=2, policy="short"), "unknown LR policy 'short'"),
    (lambda: lrs.lr_at(0, global_batch=0, iters_per_epoch=2), "global_batch"),
    (lambda: lrs.lr_at(0, global_batch=16, iters_per_epoch=0), "iters_per_epoch"),
    (lambda: lrs.lr_at(0, global_batch=16, iters_per_epoch=2, warmup_iters=-1), "warmup_iters"),
    (lambda: lrs.lr_at(1.0, global_batch=16, iters_per_epoch=2), "iteration"),
    (lambda: lrs.scaled_lr(16, base_lr=0.0), "base_lr"),
    (lambda: lrs.scaled_lr(16, base_lr=float("nan")), "base_lr"),
    (lambda: lrs.scaled_lr(16.0), "global_batch"),
    (lambda: lrs.global_batch_size(2, 0), "world_size"),
    (lambda: lrs.global_batch_size(2, 4, backward_passes_per_step=0), "backward_passes_per_step"),
    (lambda: lrs.iters_per_epoch(0, 2, 8), "num_images"),
    (lambda: lrs.total_iters(10, "Normal"), "unknown LR policy"),
    (lambda: lrs.LRPolicy((8, 8), (0.1, 0.1), 11), "ascending"),
    (lambda: lrs.LRPolicy((8,), (0.1, 0.1), 11), "decay_factors"),
    (lambda: lrs.LRPolicy((11,), (0.1,), 11), "total_epochs"),
    (lambda: lrs.LRPolicy((3,), (0.0,), 11), "positive"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_module_does_not_import_torch():
    code = "import sys, hvd_megdet.lr_schedule; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
