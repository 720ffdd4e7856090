"""hvd_megdet.tools.plan and its plan_time_model and plan_table3: each term of the time-to-train model
against hand computation, the fit, the CLI."""
import dataclasses
import json
import math

import numpy as np
import pytest

from hvd_megdet.tools import plan, plan_table3, plan_time_model
from hvd_megdet.tools.plan_time_model import Job, Platform

MIB = 2**20
LINKS = Platform(image_s=0.1, intra_bw=100e9, intra_latency_s=1e-5, inter_bw=10e9, inter_latency_s=1e-4,
                 gpus_per_node=8, bn_latency_s=1e-3, decode_s=0.0, fusion_bytes=64 * MIB)


def job(**changes) -> Job:
    fields = dict(images_per_gpu=2, grad_params=50 * MIB, bn_channels=(64, 256), norm="cgbn")
    return Job(**{**fields, **changes})


# ------------------------------------------------------------------------------------------- terms
def test_ring_allreduce_is_2_n_minus_1_steps_of_bytes_over_n():
    # 2(N-1)/N * bytes / bw + 2(N-1) * latency, N = 4: 1.5 * 1e9 / 1e10 + 6 * 1e-5
    assert plan_time_model.ring_allreduce_s(1e9, 4, 1e10, 1e-5) == pytest.approx(0.15 + 6e-5, rel=1e-12)
    assert plan_time_model.ring_allreduce_s(1e9, 128, 50e9, 5e-6) == pytest.approx(2 * 127 / 128 * 0.02 + 254 * 5e-6,
                                                                                  rel=1e-12)
    assert plan_time_model.ring_allreduce_s(1e9, 1, 1e10, 1e-5) == 0.0  # one rank: nothing to reduce


def test_gradient_allreduce_pays_one_latency_per_fusion_message_and_the_slow_link_across_nodes():
    nbytes = 50 * MIB * 4  # 200 MiB in 64 MiB messages: 4 of them
    within = plan_time_model.gradient_allreduce_s(job(), LINKS, 8)
    assert within == pytest.approx(2 * 7 / 8 * nbytes / 100e9 + 4 * 2 * 7 * 1e-5, rel=1e-12)
    across = plan_time_model.gradient_allreduce_s(job(), LINKS, 32)  # 4 nodes: InfiniBand's bandwidth and latency
    assert across == pytest.approx(2 * 31 / 32 * nbytes / 10e9 + 4 * 2 * 31 * 1e-4, rel=1e-12)
    # fp16 compression halves the bytes, and so the messages (2)
    half = plan_time_model.gradient_allreduce_s(job(grad_bytes_per_param=2), LINKS, 32)
    assert half == pytest.approx(2 * 31 / 32 * nbytes / 2 / 10e9 + 2 * 2 * 31 * 1e-4, rel=1e-12)
    # without tensor fusion every gradient tensor is a ring of its own: 150 latencies of 2(W-1) steps
    unfused = plan_time_model.gradient_allreduce_s(job(grad_tensors=150), dataclasses.replace(LINKS, fusion_bytes=0),
                                                   32)
    assert unfused == pytest.approx(2 * 31 / 32 * nbytes / 10e9 + 150 * 2 * 31 * 1e-4, rel=1e-12)
    # fused: the tensor count does not matter
    assert plan_time_model.gradient_messages(job(grad_tensors=150), LINKS) == 4


def test_cgbn_is_two_collectives_per_layer_within_the_group():
    # group of 8 (a node): per layer 2 latencies + ring bytes of (2C+1) + 2C float64
    expected = sum(2 * 1e-3 + 2 * 7 / 8 * 8 * (4 * c + 1) / 100e9 for c in (64, 256))
    assert plan_time_model.cgbn_s(job(), LINKS, 64) == pytest.approx(expected, rel=1e-12)
    assert plan_time_model.cgbn_s(job(bn_group=2), LINKS, 64) == pytest.approx(
        sum(2 * 1e-3 + 2 * 1 / 2 * 8 * (4 * c + 1) / 100e9 for c in (64, 256)), rel=1e-12)
    for silent in (job(norm="local"), job(norm="frozen"), job(bn_group=1), job(bn_channels=())):
        assert plan_time_model.cgbn_s(silent, LINKS, 64) == 0.0
    with pytest.raises(ValueError, match="does not divide"):
        plan_time_model.cgbn_s(job(bn_group=3), LINKS, 64)


def test_compute_scales_images_and_the_norm_and_sublinear_factors():
    p = dataclasses.replace(LINKS, iteration_s=0.5, frozen_factor=0.8, sublinear_factor=1.3)
    assert plan_time_model.compute_s(job(), p) == pytest.approx(0.5 + 2 * 0.1)
    assert plan_time_model.compute_s(job(norm="frozen"), p) == pytest.approx(0.5 + 2 * 0.1 * 0.8)
    assert plan_time_model.compute_s(job(sublinear=True, images_per_gpu=4), p) == pytest.approx(0.5 + 4 * 0.1 * 1.3)
    assert plan_time_model.compute_s(job(backward_passes=3), p) == pytest.approx(0.5 + 6 * 0.1)
    # the step time a benchmark measured gives back t
    assert plan_time_model.image_time_from_step(0.5 + 0.0, 4, p, "cgbn", sublinear=True) == pytest.approx(
        0.5 / (4 * 1.3))
    assert plan_time_model.image_time_from_step(0.16, 2, p, "frozen") == pytest.approx(0.1)


def test_iteration_is_the_slower_of_the_gpu_and_the_data_loader():
    slow_disk = dataclasses.replace(LINKS, decode_s=2.0)
    it = plan_time_model.iteration(job(loader_cores=2), slow_disk, 8)
    assert it.data == pytest.approx(2 * 2.0 / 2)
    assert it.total == it.data > it.compute + it.cgbn + it.allreduce
    it = plan_time_model.iteration(job(loader_cores=2), LINKS, 8)
    assert it.total == pytest.approx(it.compute + it.cgbn + it.allreduce)


def test_predict_hours_and_efficiency_by_hand():
    j = job()
    p = plan_time_model.predict(j, LINKS, nodes=16)
    # 118287 images over 128 ranks: ceil(118287 / 128) = 925 per rank, // 2 = 462 steps per epoch, x 11
    assert p.gpus == 128 and p.global_batch == 256 and p.iterations == 462 * 11
    per_iter = 0.2 + plan_time_model.cgbn_s(j, LINKS, 128) + plan_time_model.gradient_allreduce_s(j, LINKS, 128)
    assert p.iteration.total == pytest.approx(per_iter, rel=1e-12)
    assert p.hours == pytest.approx(per_iter * 462 * 11 / 3600, rel=1e-12)
    assert p.efficiency == pytest.approx(0.2 / per_iter, rel=1e-12)  # one GPU alone: compute only
    long = plan_time_model.predict(dataclasses.replace(j, epochs_policy="long"), LINKS, nodes=16)
    assert long.iterations == 462 * 18


# ----------------------------------------------------------------------------------------------- fit
def test_nnls_matches_the_constrained_optimum():
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([3.0, 2.0, 1.0])  # unconstrained: intercept 4, slope -1
    np.testing.assert_allclose(np.linalg.lstsq(a, b, rcond=None)[0], [4.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(plan_table3.nnls(a, b), [2.0, 0.0], atol=1e-12)  # slope held at 0: the mean of b
    np.testing.assert_allclose(plan_table3.nnls(a, a @ np.array([0.5, 0.25])), [0.5, 0.25], atol=1e-12)


def test_fit_recovers_known_platform_constants_from_synthetic_rows():
    truth = dataclasses.replace(LINKS, image_s=0.21, iteration_s=0.4, frozen_factor=0.85, sublinear_factor=1.3,
                                bn_latency_s=2.5e-3)
    jobs = [job(norm="frozen", bn_channels=()), job(norm="local"), job(), job(images_per_gpu=1),
            job(images_per_gpu=4, sublinear=True), job(images_per_gpu=8, sublinear=True),
            job(images_per_gpu=4, sublinear=True, bn_group=4)]
    seconds = [plan_time_model.iteration(j, truth, 8).total for j in jobs]
    start = dataclasses.replace(LINKS, image_s=1.0, iteration_s=9.0, frozen_factor=1.0, sublinear_factor=1.0,
                                bn_latency_s=0.0)
    fitted = plan_table3.fit_platform(jobs, seconds, start, [8] * len(jobs))
    for name in ("image_s", "iteration_s", "frozen_factor", "sublinear_factor", "bn_latency_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-9), name
    assert (fitted.intra_bw, fitted.inter_bw) == (LINKS.intra_bw, LINKS.inter_bw)  # links are not fitted


SIZES = {"frozen": plan_time_model.ModelSize(41_481_636, 150, ()),
         "cgbn": plan_time_model.ModelSize(41_757_156, 189, (64,) * 53)}


def test_table3_rows_become_jobs_as_the_paper_describes():
    rows = {(r.batch, r.bn_size, r.gpus, r.policy): plan_table3.paper_job(r, SIZES) for r in plan_table3.TABLE3}
    base = rows[(16, 0, 8, "normal")]
    assert (base.norm, base.grad_params, base.grad_tensors, base.bn_channels, base.sublinear) == (
        "frozen", 41_481_636, 150, (), False)
    assert rows[(16, 2, 8, "normal")].norm == "local"  # BN size 2 = the 2 images of one GPU
    big = rows[(256, 16, 128, "normal")]
    assert (big.images_per_gpu, big.norm, big.bn_group, big.sublinear) == (2, "cgbn", 8, False)
    assert rows[(64, 64, 8, "normal")].sublinear and rows[(64, 64, 8, "normal")].bn_group == 8  # BN >= 32
    assert rows[(256, 32, 64, "long")].epochs_policy == "long"
    # 16-base: 33.2 h over 11 epochs of ceil(118287 / 8) // 2 = 7393 steps
    assert plan_table3.paper_seconds_per_iteration(plan_table3.TABLE3[0], base) == pytest.approx(
        33.2 * 3600 / (7393 * 11))
    assert plan_table3.nodes_of(plan_table3.TABLE3[1]) == (1, 2)
    assert plan_table3.nodes_of(plan_table3.TABLE3[-1]) == (16, 8)


# -------------------------------------------------------------------------------- inputs and the CLI
def test_read_bench_keys_and_errors(tmp_path):
    good = tmp_path / "bench_gpu.json"
    good.write_text(json.dumps({"step_time_s": 0.09, "images_per_gpu": 2, "device": "H100"}))
    assert plan.read_bench(good) == {"step_time_s": 0.09, "images_per_gpu": 2, "norm": "cgbn",
                                     "sublinear_memory": False, "device": "H100"}
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"seconds": 1}))
    with pytest.raises(ValueError, match=r"other\.json: not a bench_gpu result \(KeyError"):
        plan.read_bench(bad)
    dry = tmp_path / "dry.json"
    dry.write_text(json.dumps({"step_time_s": 0.09, "images_per_gpu": 2, "dry_run": True}))
    with pytest.raises(ValueError, match=r"dry\.json: a dry run"):
        plan.read_bench(dry)


def test_bench_rows_give_the_cgbn_collective_cost(tmp_path, capsys):
    # bench_gpu's layout: the headline at the top level, every row under "rows"
    rows = [{"name": "hvd_local/fp32", "images_per_gpu": 2, "step_time_s": 0.080},
            {"name": "hvd_cgbn1/fp32", "images_per_gpu": 2, "step_time_s": 0.080 + 53 * 2 * 0.3e-3},
            {"name": "hvd_cgbn1/bf16", "images_per_gpu": 2, "step_time_s": 0.5}]
    path = tmp_path / "bench_gpu_H100.json"
    path.write_text(json.dumps({"step_time_s": 0.08, "images_per_gpu": 2, "norm": "local", "device": "H100",
                                "dry_run": False, "rows": rows}))
    measured = plan.read_bench(path)
    assert measured["cgbn_extra_s"] == pytest.approx(53 * 2 * 0.3e-3, rel=1e-12)
    plan_table3.h100_table(measured, SIZES)  # SIZES: 53 CGBN layers
    out = capsys.readouterr().out
    assert "CGBN collective 0.3 ms (measured" in out
    cgbn = [line.split() for line in out.splitlines() if line.split()[:3] == ["256", "16", "128"]][0]
    assert float(cgbn[5]) == pytest.approx(53 * 2 * 0.3e-3, abs=5e-4)  # the CGBN column, per iteration


def test_read_run_log_takes_the_median_step_after_the_first(tmp_path):
    records = [{"type": "start", "world_size": 4, "global_batch": 8, "device": "cuda:0"}]
    records += [{"type": "train", "iter": i, "step_time": s} for i, s in enumerate([9.0, 0.3, 0.5, 0.4], 1)]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.yaml").write_text("model:\n  norm: frozen\n  sublinear_memory: true\n")
    measured = plan.read_run_log(log)
    assert measured["step_time_s"] == 0.4 and measured["images_per_gpu"] == 2
    assert (measured["norm"], measured["sublinear_memory"]) == ("frozen", True)


def test_model_size_counts_the_trainable_parameters_and_cgbn_layers():
    from hvd_megdet.config import ModelConfig

    size = plan_time_model.model_size(ModelConfig(backbone="resnet50", norm="cgbn", trainable_layers=5))
    channels = size.bn_channels
    assert len(channels) == 53 and channels[0] == 64 and max(channels) == 2048  # ResNet-50's BN layers
    assert size.params == 41_757_156  # FPN Faster R-CNN, 81 classes, every parameter trainable
    # 53 convs + 53 BN (weight, bias) in the trunk; FPN 8 convs, RPN 3, box head 2 fc, predictor 2 fc,
    # each a weight and a bias
    assert size.tensors == 53 + 2 * 53 + 2 * (8 + 3 + 2 + 2)
    frozen = plan_time_model.model_size(ModelConfig(backbone="resnet50", norm="frozen", trainable_layers=3))
    assert frozen.bn_channels == () and frozen.params < size.params and frozen.tensors < size.tensors


def test_cli_prints_a_row_per_node_count(capsys):
    assert plan.main(["--config", "configs/megdet_bs256_bn16.yaml", "--step-time", "0.08", "--images-per-gpu", "2",
                      "--nodes", "1,16"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["16"])]
    assert [r[1] for r in rows] == ["8", "128"] and [r[2] for r in rows] == ["16", "256"]
    hours = [float(r[-2]) for r in rows]
    assert hours[1] < hours[0] / 10  # 16x the GPUs, a bit less than 16x faster
    assert float(rows[1][-1].rstrip("%")) < float(rows[0][-1].rstrip("%")) <= 100


def test_cli_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--config", "configs/megdet_bs256_bn16.yaml"])
    assert exit_info.value.code == 2 and "--step-time" in capsys.readouterr().err
    assert plan.main(["--config", "configs/megdet_bs256_bn16.yaml", "--from-bench", str(tmp_path / "none.json")]) == 2
    assert "none.json: not a bench_gpu result" in capsys.readouterr().err


def test_check_table3_fits_on_the_8_gpu_rows_only(monkeypatch):
    before = plan_table3.check_table3(SIZES)
    assert [role for _, role, _, _ in before.rows].count("fit") == 8
    assert all(row.gpus == 8 for row, role, _, _ in before.rows if role == "fit")
    # Any change to the hours of rows on other GPU counts leaves the fitted constants as they were...
    changed = tuple(dataclasses.replace(r, hours=r.hours * 3) if r.gpus != 8 else r for r in plan_table3.TABLE3)
    monkeypatch.setattr(plan_table3, "TABLE3", changed)
    after = plan_table3.check_table3(SIZES)
    assert after.fitted == before.fitted
    # ... and so the predictions; only the errors move (by the factor put in)
    for (_, _, _, p), (_, _, _, p2) in zip(before.rows, after.rows):
        assert p2.hours == pytest.approx(p.hours, rel=1e-12)
    assert len(before.held_out()) == 10  # 16, 32 (2), 64 (2), 128 GPUs; normal and long
    for (_, e), (_, e2) in zip(before.held_out(), after.held_out()):
        assert e2 == pytest.approx((1 + e) / 3 - 1, rel=1e-9)
    # ...while a change to one 8-GPU row does move them
    monkeypatch.setattr(plan_table3, "TABLE3", tuple(dataclasses.replace(r, hours=r.hours * 1.5) if r.label == "8"
                                                      else r for r in plan_table3.TABLE3))
    assert plan_table3.check_table3(SIZES).fitted != before.fitted


def test_table3_cli_reports_every_row_with_the_measured_step(capsys, tmp_path):
    bench = tmp_path / "bench_gpu.json"
    bench.write_text(json.dumps({"step_time_s": 0.1, "images_per_gpu": 2, "norm": "cgbn", "device": "NVIDIA H100"}))
    assert plan.main(["--table3", "--from-bench", str(bench)]) == 0
    out = capsys.readouterr().out
    roles = ("fit", "held out", "< 8 GPUs")
    paper = [line for line in out.splitlines() if line.rstrip().endswith(roles)]
    assert len(paper) == len(plan_table3.TABLE3)
    assert sum(line.rstrip().endswith("fit") for line in paper) == 8  # the 8-GPU rows only
    assert sum(line.rstrip().endswith("held out") for line in paper) == 10  # 16-128 GPUs
    assert "Held-out rows (16-128 GPUs):" in out and "ASSUMED" in out  # the paper's links are assumed
    errors = [float(next(t for t in line.split() if t.endswith("%")).rstrip("%")) for line in paper]
    assert errors[0] == 0  # 16-base is the only frozen-BN row: the fit matches it exactly
    assert all(math.isfinite(e) for e in errors)
    # the H100 part takes the measured step: 0.1 s for 2 images with CGBN = 50 ms per image
    assert "0.100 s at 2 images, cgbn BN (NVIDIA H100) -> 50.0 ms per image" in out
    h100 = out[out.index("8-GPU H100 nodes"):].splitlines()[2:]
    assert len(h100) == len(plan_table3.TABLE3)


def test_h100_table_states_an_assumed_step_time(capsys):
    plan_table3.h100_table(None, SIZES)
    out = capsys.readouterr().out
    assert "ASSUMED: detectron2's 0.21 s/iter on a V100 / 3 for an H100" in out and "400 Gb/s" in out
