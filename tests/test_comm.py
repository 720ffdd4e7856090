"""hvd_megdet.comm: pure grouping, and Horovod on real MPI ranks grouped into per-host process sets."""
import pytest
import torch

from hvd_megdet import comm
from tests.mpirun import RankFailure, run_ranks


# --------------------------------------------------------------------------------------- pure
def test_host_groups_by_hostname_in_rank_order():
    assert comm.host_groups(["a", "b", "a", "b", "c"]) == [[0, 2], [1, 3], [4]]


def test_host_groups_split_into_bn_groups():
    names = ["n0"] * 4 + ["n1"] * 4
    assert comm.host_groups(names, group_size=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert comm.host_groups(names, group_size=1) == [[r] for r in range(8)]
    assert comm.host_groups(names, group_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_host_groups_rejects_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match=r"bn_group_size=3 does not divide the 4 ranks on host 'n0'"):
        comm.host_groups(["n0"] * 4, group_size=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        comm.host_groups(["n0"] * 4, group_size=0)


def test_simulated_hostnames_make_blocks_of_ranks_separate_hosts():
    names = comm.simulated_hostnames(["vm"] * 4, ranks_per_host=2)
    assert comm.host_groups(names) == [[0, 1], [2, 3]]
    assert comm.simulated_hostnames(["a", "b"], None) == ["a", "b"]


def test_init_without_launcher_is_a_world_of_one():
    # Runs in its own process: hvd.init may only happen once per process.
    ctx = run_ranks("tests.test_comm:_single_process_worker", np=1)[0]
    assert ctx == {"rank": 0, "size": 1, "bn_ranks": (0,), "has_set": False, "horovod": True,
                   "reduced": {"a": 1.5}, "gathered": ["x"]}


def _single_process_worker():
    ctx = comm.init()
    return {"rank": ctx.rank, "size": ctx.size, "bn_ranks": ctx.bn_ranks,
            "has_set": ctx.bn_process_set is not None, "horovod": ctx.horovod,
            "reduced": comm.reduce_dict({"a": 1.5}, ctx), "gathered": comm.allgather_object("x", ctx)}


# ----------------------------------------------------------------------------- 4 real ranks
def _process_set_allreduce_worker():
    """2 simulated hosts x 2 ranks; a differentiable allreduce over this rank's host set."""
    ctx = comm.init()
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    # Rank-dependent input: rank r holds (r + 1) * [1, 2, 3].
    y = comm.allreduce_differentiable(x * (ctx.rank + 1), ctx.bn_process_set, name="test.sum")
    # Loss weights differ per rank, so the gradient shows the backward reduced over the set.
    loss = (y * (ctx.rank + 1)).sum()
    loss.backward()
    world = comm.allreduce_mean(torch.tensor([float(ctx.rank)]), ctx)
    return {"rank": ctx.rank, "host_rank": ctx.host_rank, "host_size": ctx.host_size, "device_index": ctx.device_index,
            "host_index": ctx.host_index, "num_hosts": ctx.num_hosts, "bn_ranks": ctx.bn_ranks,
            "y": y.detach().tolist(), "grad": x.grad.tolist(), "world_mean": world.item(),
            "hosts": comm.allgather_object(ctx.host_index, ctx)}


def test_allreduce_over_host_process_sets_on_4_ranks():
    results = run_ranks("tests.test_comm:_process_set_allreduce_worker", np=4, ranks_per_host=2)
    for r, res in enumerate(results):
        group = [0, 1] if r < 2 else [2, 3]
        assert res["rank"] == r
        assert res["bn_ranks"] == tuple(group)
        assert (res["host_index"], res["num_hosts"]) == (r // 2, 2)
        assert (res["host_rank"], res["host_size"]) == (r % 2, 2)
        assert res["device_index"] == r  # one physical machine: the GPU index ignores simulated hosts
        # Forward: sum over the set of (q + 1) * [1, 2, 3]; host 0 -> 3x, host 1 -> 7x.
        factor = sum(q + 1 for q in group)
        assert res["y"] == [factor * 1.0, factor * 2.0, factor * 3.0]
        # Backward: dL/dx_r = (r + 1) * sum over the set of dL/dy_q = (r + 1) * sum (q + 1).
        assert res["grad"] == [(r + 1) * factor] * 3
        assert res["world_mean"] == pytest.approx(1.5)
        assert res["hosts"] == [0, 0, 1, 1]


def _bn_group_worker(group_size):
    ctx = comm.init(bn_group_size=group_size)
    return ctx.bn_ranks, ctx.bn_process_set is not None


def test_bn_group_size_splits_hosts_and_single_host_uses_global_set():
    assert run_ranks("tests.test_comm:_bn_group_worker", np=4, args=(1,), ranks_per_host=2) == [
        ((0,), False), ((1,), False), ((2,), False), ((3,), False)]
    # One host of 4 ranks: the group is the whole world (Horovod's global set), still communicated.
    assert run_ranks("tests.test_comm:_bn_group_worker", np=4, args=(None,)) == [((0, 1, 2, 3), True)] * 4


def _failing_worker():
    ctx = comm.init()
    if ctx.rank == 1:
        raise ValueError("rank one is broken")
    comm.barrier(ctx)  # rank 0 would wait here forever without the harness' abort


def test_harness_reports_the_failing_rank_instead_of_hanging():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 raised:.*ValueError: rank one is broken"):
        run_ranks("tests.test_comm:_failing_worker", np=2, timeout=60)


# ------------------------------------------------------------------ shipped settings (docs/benchmarks.md)
# What benchmarks/bench_collectives.py and bench_cgbn.py chose (docs/benchmarks.md, docs/design.md:
# Horovod settings): a change here is a change of measured behaviour, so it has to be made on purpose.
SHIPPED = {"HOROVOD_CYCLE_TIME": "0.1"}


def test_shipped_horovod_defaults_are_the_measured_ones():
    assert comm.HOROVOD_DEFAULTS == SHIPPED
    # Horovod parses the cycle time with strtof (operations.cc): a plain decimal number of ms.
    assert 0 < float(comm.HOROVOD_DEFAULTS["HOROVOD_CYCLE_TIME"]) < 1  # below Horovod's own 1 ms


@pytest.mark.parametrize("user_key", sorted(SHIPPED))
def test_apply_horovod_defaults_fills_only_what_the_user_left_unset(user_key):
    environ = {user_key: "7", "UNRELATED": "x"}
    applied = comm.apply_horovod_defaults(environ, gpu=True)
    assert applied == {k: v for k, v in comm.HOROVOD_DEFAULTS.items() if k != user_key}
    assert environ == {**comm.HOROVOD_DEFAULTS, user_key: "7", "UNRELATED": "x"}  # the user's value wins
    assert comm.apply_horovod_defaults(environ, gpu=True) == {}  # nothing left to fill
    empty: dict = {}
    assert comm.apply_horovod_defaults(empty, gpu=True) == comm.HOROVOD_DEFAULTS == empty


def test_cpu_ranks_keep_horovods_own_settings():
    environ: dict = {}
    assert comm.apply_horovod_defaults(environ, gpu=False) == {} and environ == {}


def _shipped_settings_worker(user: dict):
    import os

    for key in comm.HOROVOD_DEFAULTS:  # the harness' environment aside: a user who set only `user`
        os.environ.pop(key, None)
    os.environ.update(user)
    seen = {}
    real_init = comm.hvd.init

    def recording_init(*args, **kwargs):
        # Horovod's background thread reads its settings from the environment during hvd.init.
        seen.update({k: os.environ.get(k) for k in comm.HOROVOD_DEFAULTS})
        return real_init(*args, **kwargs)

    comm.hvd.init = recording_init
    try:
        ctx = comm.init()
    finally:
        comm.hvd.init = real_init
    # The job still works at these settings: a CGBN-sized allreduce over the BN set.
    total = comm.allreduce_sum_(torch.ones(129, dtype=torch.float64), ctx.bn_process_set, name="shipped")
    return seen, total.tolist()


@pytest.mark.parametrize("user_sets_cycle", [False, True], ids=["defaults", "user_value"])
def test_shipped_settings_are_in_place_when_horovod_starts_on_2_ranks(user_sets_cycle):
    user = {"HOROVOD_CYCLE_TIME": "5"} if user_sets_cycle else {}
    for seen, total in run_ranks("tests.test_comm:_shipped_settings_worker", np=2, args=(user,)):
        # This machine has no GPU: Horovod's own settings, or the user's (comm.apply_horovod_defaults).
        expected = {**comm.HOROVOD_DEFAULTS, **user} if torch.cuda.is_available() else {
            **{k: None for k in comm.HOROVOD_DEFAULTS}, **user}
        assert seen == expected
        assert total == [2.0] * 129
