"""CrossGPUBatchNorm2d against float64 BatchNorm over the concatenated group batch.

The multi-rank cases run on 4 real MPI ranks as 2 simulated hosts x 2 ranks (one CGBN group per host);
each rank returns what it computed and the reference is computed here, independently.
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet import cgbn, comm
from hvd_megdet.cgbn import CrossGPUBatchNorm2d, convert_norm
from tests.mpirun import run_ranks

C = 3
GROUPS = [[0, 1], [2, 3]]
# (images, H, W) per rank: uneven counts and sizes; rank 3 holds no image in "empty".
SHAPES = {
    "uneven": [(2, 5, 7), (1, 6, 4), (3, 4, 4), (1, 3, 9)],
    "empty": [(2, 5, 7), (1, 6, 4), (3, 4, 4), (0, 4, 4)],
    "large_mean": [(2, 8, 8), (2, 8, 8), (2, 8, 8), (2, 8, 8)],
    "bf16": [(2, 5, 5), (1, 6, 6), (2, 5, 5), (1, 6, 6)],
}
MOMENTUM = 0.1


def _inputs(case: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input x and upstream gradient g (loss = sum(y * g)) of ``rank``, deterministic."""
    n, h, w = SHAPES[case][rank]
    gen = torch.Generator().manual_seed(1000 * len(case) + rank)
    x = torch.randn(n, C, h, w, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 2.0, 1.0]).view(1, C, 1, 1)
    x = x + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64).view(1, C, 1, 1)
    if case == "large_mean":
        x = x * 0 + 1000.0 + torch.randn(n, C, h, w, generator=gen, dtype=torch.float64)
    g = torch.randn(n, C, h, w, generator=gen, dtype=torch.float64)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    return x.to(dtype), g.to(dtype)


def _params() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([1.5, 0.5, -1.0]), torch.tensor([0.1, -0.2, 0.3])


# ------------------------------------------------------------------------------------- worker
def _cgbn_worker(cases, ctx=None):
    ctx = ctx or comm.init()
    out = {}
    for case in cases:
        x, g = _inputs(case, ctx.rank)
        weight, bias = _params()
        layer = CrossGPUBatchNorm2d(C, momentum=MOMENTUM, process_set=ctx.bn_process_set, name=f"t.{case}")
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16"):
            y = layer(x)
        (y.float() * g.float()).sum().backward()
        out[case] = {"y": y.detach(), "dtype": str(y.dtype), "dx": x.grad, "dw": layer.weight.grad,
                     "db": layer.bias.grad, "rm": layer.running_mean.clone(), "rv": layer.running_var.clone()}
    return {"bn_ranks": ctx.bn_ranks, "cases": out}


def _reference(case: str, group: list[int]):
    """float64 BN on the concatenation of the group's pixels, loss summed over the group."""
    xs, gs = zip(*(_inputs(case, r) for r in group))
    flat_x = torch.cat([x.double().transpose(0, 1).reshape(C, -1) for x in xs], dim=1)
    flat_g = torch.cat([g.double().transpose(0, 1).reshape(C, -1) for g in gs], dim=1)
    flat_x = flat_x.unsqueeze(0).unsqueeze(-1).requires_grad_(True)
    weight, bias = (p.double().requires_grad_(True) for p in _params())
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = F.batch_norm(flat_x, rm, rv, weight, bias, training=True, momentum=MOMENTUM, eps=1e-5)
    (y * flat_g.unsqueeze(0).unsqueeze(-1)).sum().backward()
    # Split back into each rank's N x C x H x W.
    ys, dxs, start = {}, {}, 0
    for r, x in zip(group, xs):
        n, _, h, w = x.shape
        count = n * h * w
        piece = lambda t: t[0, :, start:start + count, 0].reshape(C, n, h, w).transpose(0, 1)
        ys[r], dxs[r] = piece(y.detach()), piece(flat_x.grad)
        start += count
    return {"y": ys, "dx": dxs, "dw": weight.grad, "db": bias.grad, "rm": rm, "rv": rv}


@pytest.fixture(scope="module")
def four_rank_results():
    return run_ranks("tests.test_cgbn:_cgbn_worker", np=4, args=(list(SHAPES),), ranks_per_host=2)


# (statistics, outputs and gradients): the running statistics are fp32 in every case (a bf16 input
# is upcast exactly), while a bf16 output carries bf16's rounding (2^-8 relative) and the mean of
# 1000 costs fp32 digits in x itself.
TOLERANCES = {"uneven": (1e-5, 1e-5), "empty": (1e-5, 1e-5), "large_mean": (2e-3, 2e-3), "bf16": (1e-5, 3e-2)}


@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_float64_bn_on_concatenated_group(four_rank_results, case):
    assert_matches_float64_bn(four_rank_results, case, GROUPS)


def assert_matches_float64_bn(results: list[dict], case: str, groups: list[list[int]]) -> None:
    """Each rank's CGBN output, gradients and running statistics (``_cgbn_worker``) against float64 BN
    on the concatenation of its group's inputs; also used with real hosts (tests/jobs/test_hosts.py)."""
    stats_tol, tol = TOLERANCES[case]
    for group in groups:
        ref = _reference(case, group)
        dw_sum = sum(results[r]["cases"][case]["dw"].double() for r in group)
        db_sum = sum(results[r]["cases"][case]["db"].double() for r in group)
        for r in group:
            got = results[r]["cases"][case]
            assert results[r]["bn_ranks"] == tuple(group)
            assert got["y"].shape == ref["y"][r].shape
            assert got["dtype"] == ("torch.bfloat16" if case == "bf16" else "torch.float32")
            torch.testing.assert_close(got["y"].double(), ref["y"][r], atol=tol, rtol=tol)
            torch.testing.assert_close(got["dx"].double(), ref["dx"][r], atol=tol, rtol=tol)
            # Running stats: identical on every rank of the group, equal to the reference update.
            torch.testing.assert_close(got["rm"].double(), ref["rm"], atol=stats_tol, rtol=1e-5)
            torch.testing.assert_close(got["rv"].double(), ref["rv"], atol=stats_tol, rtol=1e-5)
            assert torch.equal(got["rm"], results[group[0]]["cases"][case]["rm"])
            assert torch.equal(got["rv"], results[group[0]]["cases"][case]["rv"])
        grad_tol = tol * 20 if case == "bf16" else tol
        torch.testing.assert_close(dw_sum, ref["dw"], atol=grad_tol, rtol=grad_tol)
        torch.testing.assert_close(db_sum, ref["db"], atol=grad_tol, rtol=grad_tol)


def test_large_mean_would_break_naive_formula():
    # Guards the test above: fp32 E[x^2] - E[x]^2 really is wrong on these inputs.
    xs = torch.cat([_inputs("large_mean", r)[0] for r in (0, 1)])
    naive_var = (xs * xs).mean(dim=(0, 2, 3)) - xs.mean(dim=(0, 2, 3)) ** 2
    true_var = xs.double().var(dim=(0, 2, 3), unbiased=False)
    assert (naive_var.double() - true_var).abs().max() > 0.05


# ---------------------------------------------------------------------- checkpointed block
class _Block(nn.Module):
    def __init__(self, process_set, checkpointed: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(C, 4, 3, padding=1, bias=False)
        self.bn1 = CrossGPUBatchNorm2d(4, process_set=process_set, name="blk.bn1")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = CrossGPUBatchNorm2d(4, process_set=process_set, name="blk.bn2")
        self.checkpointed = checkpointed

    def _body(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return cgbn.checkpoint(self._body, x) if self.checkpointed else self._body(x)


def _checkpoint_worker():
    ctx = comm.init()
    calls = []
    real_allreduce = comm.allreduce_sum_

    def counting_allreduce(tensor, process_set, name=None):
        calls.append(name)
        return real_allreduce(tensor, process_set, name)

    comm.allreduce_sum_ = counting_allreduce
    results = {}
    for checkpointed in (False, True):
        calls.clear()
        block = _Block(ctx.bn_process_set, checkpointed)
        x, g = _inputs("uneven", ctx.rank)
        # Ranks recompute in different orders in real models; here the ranks even differ in when
        # they start backward, which must not matter.
        y = block(x.requires_grad_(True))
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(ctx.rank))).sum().backward()
        results[checkpointed] = {"y": y.detach(), "dx": x.grad, "conv1": block.conv1.weight.grad,
                                 "rm": block.bn1.running_mean.clone(), "nbt": int(block.bn2.num_batches_tracked),
                                 "calls": list(calls)}
    comm.allreduce_sum_ = real_allreduce
    return results


def test_checkpointed_block_reuses_first_forward_statistics():
    results = run_ranks("tests.test_cgbn:_checkpoint_worker", np=4, ranks_per_host=2)
    for res in results:
        plain, ckpt = res[False], res[True]
        torch.testing.assert_close(ckpt["y"], plain["y"], atol=0, rtol=0)
        torch.testing.assert_close(ckpt["dx"], plain["dx"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ckpt["conv1"], plain["conv1"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ckpt["rm"], plain["rm"], atol=0, rtol=0)
        assert ckpt["nbt"] == plain["nbt"] == 1  # running stats updated once, not twice
        # Same collectives, one per layer per direction: no second forward round on recompute.
        assert sorted(ckpt["calls"]) == sorted(plain["calls"]) == sorted(
            ["blk.bn1.fwd", "blk.bn2.fwd", "blk.bn1.bwd", "blk.bn2.bwd"])


# --------------------------------------------------------------------- single process
def test_without_process_set_equals_nn_batchnorm2d():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 5) * 3 + 1
    ref, ours = nn.BatchNorm2d(4), CrossGPUBatchNorm2d(4)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for layer in (ref, ours):
            layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (ref(xr) * g).sum().backward()
    (ours(xo) * g).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_cumulative_average_momentum_none_equals_nn_batchnorm2d():
    ref, ours = nn.BatchNorm2d(3, momentum=None), CrossGPUBatchNorm2d(3, momentum=None)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(2 + step, 3, 4, 5, generator=gen) * (step + 1) + step
        ref(x)
        ours(x)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_group_without_pixels_returns_input_and_keeps_running_stats():
    # Every rank of the group empty (here: a group of one with no image), counted on the device.
    layer = CrossGPUBatchNorm2d(3, momentum=None)
    layer(torch.randn(2, 3, 4, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.isfinite(layer.weight.grad).all()


def test_eval_mode_uses_running_stats_and_no_collective():
    layer = CrossGPUBatchNorm2d(2, process_set=object())  # a set it must never touch in eval
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -2.0]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25]))
        layer.weight.copy_(torch.tensor([2.0, 1.0]))
    layer.eval()
    x = torch.randn(2, 2, 3, 3)
    expected = (x - layer.running_mean.view(1, 2, 1, 1)) / torch.sqrt(layer.running_var.view(1, 2, 1, 1) + 1e-5)
    expected = expected * layer.weight.view(1, 2, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_convert_norm_on_resnet50_keeps_eval_outputs():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    for m in model.modules():  # non-trivial statistics so a lost buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    bn_set = object()  # stands in for a process set: eval mode never touches it
    for mode, layer_type, process_set in [("frozen", FrozenBatchNorm2d, None), ("cgbn", CrossGPUBatchNorm2d, bn_set),
                                          ("local", CrossGPUBatchNorm2d, None)]:
        model = convert_norm(model, mode, bn_set)
        layers = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert len(layers) == 53 and all(type(m) is layer_type for m in layers), mode
        # "local" is the layer training uses for it: CGBN without a process set, whatever set is passed.
        assert all(getattr(m, "process_set", None) is process_set for m in layers), mode
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, atol=1e-3, rtol=1e-3)
    cg = convert_norm(model, "cgbn")
    assert cg.layer1[0].bn1.collective_name == "cgbn.layer1.0.bn1"
    with pytest.raises(ValueError, match="norm mode must be one of"):
        convert_norm(model, "sync")
