"""hvd_megdet.engine: one training step, the non-finite loss policy, and the Table 1 sample counters."""
import pytest
import torch
from torch import nn

from hvd_megdet import engine
from hvd_megdet.comm import DistContext


class _Scalar(nn.Module):
    """A 'detector' whose only loss is w * value."""

    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))
        self.value = value

    def forward(self, images, targets):
        return {"loss_a": (self.w * self.value).sum(), "loss_b": (self.w * 0.5).sum()}


def _step(value: float, policy: str, progress: engine.Progress):
    model = _Scalar(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = engine.StepSettings(1, None, 0.0, policy, torch.device("cpu"))
    batch = ([torch.zeros(3, 4, 4)], [{"boxes": torch.zeros(0, 4)}])
    return model, engine.train_step(model, optimizer, None, [batch], settings, DistContext(), progress)


def test_finite_step_updates_weights_and_returns_loss_terms():
    model, losses = _step(3.0, "stop", engine.Progress())
    assert losses == {"loss_a": 6.0, "loss_b": 1.0}
    assert model.w.item() == pytest.approx(2.0 - 0.1 * 3.5)  # d(3w + 0.5w)/dw = 3.5


def test_non_finite_loss_stops_naming_iteration_and_rank():
    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite loss at iteration 7 on rank\(s\) \[0\]"):
        _step(float("nan"), "stop", engine.Progress(iteration=7))


def test_non_finite_loss_can_skip_the_step():
    progress = engine.Progress(iteration=3)
    model, losses = _step(float("inf"), "skip", progress)
    assert losses is None and progress.skipped_steps == 1
    assert model.w.item() == 2.0 and model.w.grad is None


def test_sample_ratio_counter_counts_what_the_sampler_picked():
    def sampler(matched):
        return ([m >= 1 for m in matched], [m == 0 for m in matched])

    counter = engine.SampleRatioCounter(sampler)
    counter([torch.tensor([1, 0, 0, -1]), torch.tensor([2, 2, 0])])
    assert counter.take() == (3, 3)
    assert counter.take() == (0, 0)
