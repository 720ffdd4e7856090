"""CrossGPUBatchNorm2d under autocast, and without host reads.

Every case is checked against float64 ``F.batch_norm`` on the same values (16-bit inputs are upcast
exactly). Statistics (running mean and variance after one step with momentum 1, i.e. the batch's own
statistics) and the fp32 weight/bias gradients must agree to fp32 accuracy: relative 1e-5 is about
100 fp32 ulps, while the fp16 sum of squares that autocast would take overflows to inf on these maps
and bf16 loses about 0.4%. Outputs and input gradients in a 16-bit dtype can only agree to that
dtype's resolution.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from hvd_megdet import comm
from hvd_megdet.cgbn import CrossGPUBatchNorm2d
from tests.mpirun import run_ranks

STATS_RTOL = 1e-5
# Resolution of each output dtype (2 ulps at 1.0): outputs and input gradients are rounded to it.
OUTPUT_TOL = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# (N, C, H, W): the case, and one image's stride-4 FPN map (800x1333 / 4), both > 65504
# pixels per channel, so that fp16's largest finite value is passed by the sum of squares.
SHAPES = {"2x8x300x300": (2, 8, 300, 300), "stride4_800x1333": (1, 8, 200, 334)}


def _data(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    scale = torch.linspace(0.5, 2.0, c, dtype=torch.float64).view(1, c, 1, 1)
    shift = torch.linspace(-1.0, 2.0, c, dtype=torch.float64).view(1, c, 1, 1)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    weight, bias = torch.linspace(0.5, 1.5, c), torch.linspace(-0.2, 0.2, c)
    return x.to(dtype), g.to(dtype), weight, bias


def _reference(xs, gs, weight, bias, momentum=1.0):
    """float64 BN over the concatenation of ``xs`` (one batch per rank), loss = sum(y * g)."""
    c = xs[0].shape[1]
    flat = torch.cat([x.double().transpose(0, 1).reshape(c, -1) for x in xs], dim=1)
    flat_g = torch.cat([g.double().transpose(0, 1).reshape(c, -1) for g in gs], dim=1)
    flat = flat[None, :, :, None].requires_grad_(True)
    w, b = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y = F.batch_norm(flat, rm, rv, w, b, training=True, momentum=momentum, eps=1e-5)
    (y * flat_g[None, :, :, None]).sum().backward()
    ys, dxs, start = [], [], 0
    for x in xs:
        n, _, h, wd = x.shape
        piece = lambda t: t[0, :, start:start + n * h * wd, 0].reshape(c, n, h, wd).transpose(0, 1)
        ys.append(piece(y.detach()))
        dxs.append(piece(flat.grad))
        start += n * h * wd
    return {"y": ys, "dx": dxs, "dw": w.grad, "db": b.grad, "rm": rm, "rv": rv}


def _run_layer(x, g, weight, bias, amp_dtype, process_set=None, name="amp"):
    layer = CrossGPUBatchNorm2d(x.shape[1], momentum=1.0, process_set=process_set, name=name)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=amp_dtype):
        y = layer(x)
        # backward inside autocast too: the layer must not depend on where backward is called
        (y.float() * g.float()).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
            "rm": layer.running_mean.clone(), "rv": layer.running_var.clone()}


def _assert_matches(got, ref, index, in_dtype, dw=None, db=None):
    assert got["y"].dtype == in_dtype and got["dx"].dtype == in_dtype  # output in the input's dtype
    torch.testing.assert_close(got["rm"].double(), ref["rm"], rtol=STATS_RTOL, atol=1e-6)
    torch.testing.assert_close(got["rv"].double(), ref["rv"], rtol=STATS_RTOL, atol=1e-6)
    tol = OUTPUT_TOL[in_dtype]
    torch.testing.assert_close(got["y"].double(), ref["y"][index], rtol=tol, atol=tol)
    torch.testing.assert_close(got["dx"].double(), ref["dx"][index], rtol=tol, atol=tol)
    for grad, expected in ((got["dw"] if dw is None else dw, ref["dw"]), (got["db"] if db is None else db, ref["db"])):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected, rtol=STATS_RTOL, atol=STATS_RTOL * expected.abs().max().item())


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("input_is_16bit", [False, True], ids=["fp32_input", "16bit_input"])
def test_statistics_are_fp32_under_cpu_autocast(shape, amp_dtype, input_is_16bit):
    # A 16-bit input is what a convolution under autocast hands the layer; fp32 is the first layer's.
    in_dtype = amp_dtype if input_is_16bit else torch.float32
    x, g, weight, bias = _data(shape, in_dtype)
    got = _run_layer(x, g, weight, bias, amp_dtype)
    _assert_matches(got, _reference([x], [g], weight, bias), 0, in_dtype)


def test_fp16_sum_of_squares_really_overflows_on_these_maps():
    # Guards the test above: what autocast would compute (a fp16 vecdot) is inf here.
    x, _, _, _ = _data(SHAPES["stride4_800x1333"], torch.float32)
    centred = (x - x.mean(dim=(0, 2, 3), keepdim=True)).flatten(2)
    with torch.autocast("cpu", dtype=torch.float16):
        lowered = torch.linalg.vecdot(centred, centred, dim=2)
    assert lowered.dtype == torch.float16 and torch.isinf(lowered).any()


# ------------------------------------------------------------------------------ 2 real ranks
# Each rank holds a stride-4-sized fp16 map of its own size (> 65504 pixels per channel each).
TWO_RANK_SHAPES = [(1, 3, 200, 336), (2, 3, 152, 232)]


def _fp16_worker():
    ctx = comm.init()
    x, g, weight, bias = _data(TWO_RANK_SHAPES[ctx.rank], torch.float16, seed=ctx.rank)
    return _run_layer(x, g, weight, bias, torch.float16, ctx.bn_process_set, name="amp.fp16")


def test_two_rank_fp16_matches_float64_bn_on_group_batch():
    results = run_ranks("tests.test_cgbn_amp:_fp16_worker", np=2)
    data = [_data(shape, torch.float16, seed=r) for r, shape in enumerate(TWO_RANK_SHAPES)]
    ref = _reference([d[0] for d in data], [d[1] for d in data], data[0][2], data[0][3])
    # Weight and bias gradients are each rank's contribution: their sum is the group's gradient.
    dw, db = (sum(r[key] for r in results) for key in ("dw", "db"))
    for rank, got in enumerate(results):
        _assert_matches(got, ref, rank, torch.float16, dw=dw, db=db)
    assert torch.equal(results[0]["rv"], results[1]["rv"])


# ------------------------------------------------------------------------------ host reads
# The ways Python code can read a tensor's value on the host (each a CUDA synchronisation).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _count_host_reads():
    counts: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, fn):
        def wrapper(self, *args, **kwargs):
            counts.append(name)
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_host_read_counter_sees_reads():
    # Guards the test below: each kind of read used by the old code registers.
    t = torch.tensor(3.0)
    with _count_host_reads() as counts:
        t.item()
        bool(t > 0)
        float(t)
        max(t - 1.0, 1.0)
    assert counts == ["item", "__bool__", "__float__", "__bool__"]


def _two_identical_ranks(calls):
    def allreduce_sum_(tensor, process_set, name=None):
        """Stands in for the allreduce of a set of two ranks holding the same data: sums in place."""
        calls.append(name)
        return tensor if process_set is None else tensor.mul_(2)
    return allreduce_sum_


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("grouped", [False, True], ids=["local", "cgbn"])
def test_no_host_reads_per_layer_call(momentum, empty, grouped, monkeypatch):
    # "cgbn": the code path with a process set, its collective replaced (Horovod's own reads aside).
    calls = []
    monkeypatch.setattr(comm, "allreduce_sum_", _two_identical_ranks(calls))
    layer = CrossGPUBatchNorm2d(4, momentum=momentum, process_set="set of two" if grouped else None)
    x = torch.randn(0 if empty else 2, 4, 5, 6, requires_grad=True)
    for _ in range(2):  # the second call takes the running-average path with num_batches_tracked > 0
        with _count_host_reads() as forward_reads:
            y = layer(x)
        with _count_host_reads() as backward_reads:
            y.sum().backward()
        assert forward_reads == [] and backward_reads == []
    assert len(calls) == 4  # one collective per call per direction, each really made
