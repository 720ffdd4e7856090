"""hvd_megdet.tools.report and report_runs: the Table 3 row computed from a run's log, and PNG figures."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hvd_megdet.tools import report, report_runs

ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")


def _write_run(run_dir: Path, records: list[dict], policy: str = "normal") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"solver": {"policy": policy}, "train": {}}))
    return run_dir


def _train(t, it, epoch, loss, ratio, img_s, lr=0.02):
    return {"type": "train", "time": t, "iter": it, "epoch": epoch, "loss": loss, "lr": lr, "img_per_s": img_s,
            "rpn_pos_neg_ratio": ratio, "roi_pos_neg_ratio": ratio / 2, "global_batch": 8, "bn_size": 4}


START = {"type": "start", "world_size": 2, "hosts": 1, "global_batch": 8, "bn_size": 4, "iters_per_epoch": 4,
         "total_iters": 44}
EVAL2 = {"mmAP": 0.05, "AP50": 0.1, "AP75": 0.02, "mmAR": 0.08}
EVAL3 = {"mmAP": 0.123, "AP50": 0.3456, "AP75": 0.1, "mmAR": 0.2}


@pytest.fixture
def resumed_run(tmp_path) -> Path:
    """Trained to iteration 10, crashed, resumed from the checkpoint at 8, trained to 12.

    Segment 1 runs from t=1000 to t=1600, segment 2 from t=5000 to t=5310. Iteration 10 is logged
    in both; the second record is the one training continued from.
    """
    return _write_run(tmp_path / "a" / "run", [
        {**START, "time": 1000.0, "start_iter": 0},
        _train(1100.0, 2, 0, 3.0, 0.01, 10.0, lr=0.01),
        _train(1200.0, 4, 0, 2.0, 0.03, 20.0),
        _train(1300.0, 6, 1, 1.5, 0.04, 30.0),
        _train(1400.0, 8, 1, 1.2, NAN, 40.0),
        {"type": "checkpoint", "time": 1410.0, "iter": 8, "epoch": 2},
        {"type": "eval", "time": 1500.0, "epoch": 2, "iter": 8, **EVAL2},
        _train(1600.0, 10, 2, 9.9, 0.5, 1000.0),  # lost to the crash
        {**START, "time": 5000.0, "start_iter": 8},
        _train(5100.0, 10, 2, 1.1, 0.07, 50.0),
        _train(5200.0, 12, 2, 1.0, 0.09, 60.0, lr=0.002),
        {"type": "eval", "time": 5300.0, "epoch": 3, "iter": 12, **EVAL3},
        {"type": "checkpoint", "time": 5310.0, "iter": 12, "epoch": 3},
    ])


@pytest.fixture
def other_run(tmp_path) -> Path:
    """Same directory name, another parent; long policy; evaluated only by eval_epoch01/metrics.json."""
    run = _write_run(tmp_path / "b" / "run", [
        {**START, "time": 0.0, "world_size": 4, "global_batch": 16, "bn_size": 16, "iters_per_epoch": 2},
        _train(360.0, 2, 0, 2.5, 0.2, 100.0), _train(720.0, 4, 1, 2.0, 0.3, 120.0)], policy="long")
    (run / "eval_epoch01").mkdir()
    (run / "eval_epoch01" / "metrics.json").write_text(json.dumps({**EVAL2, "mmAP": 0.07}))
    return run


def test_segments_and_hours_of_a_resumed_run(resumed_run):
    run = report_runs.load_run(resumed_run)
    assert run.segments == [(1000.0, 1600.0), (5000.0, 5310.0)]
    assert run.hours == pytest.approx((600 + 310) / 3600, rel=1e-12)
    assert report_runs.hours_at(run.segments, 1500.0) == pytest.approx(500 / 3600)
    assert report_runs.hours_at(run.segments, 3000.0) == pytest.approx(600 / 3600)  # between the launches
    assert [(e["epoch"], e["hours"]) for e in run.evals] == [(2, pytest.approx(500 / 3600)),
                                                             (3, pytest.approx(900 / 3600))]
    assert [r["loss"] for r in run.train] == [3.0, 2.0, 1.5, 1.2, 1.1, 1.0]  # iteration 10: the later record


def test_row_values(resumed_run):
    row = report.summarize(report_runs.load_run(resumed_run))
    assert (row["global_batch"], row["bn_size"], row["ranks"], row["policy"]) == (8, 4, 2, "normal")
    assert {k: row[k] for k in EVAL3} == EVAL3 and row["eval_epoch"] == 3
    assert row["img_per_s"] == 35.0  # median of 10, 20, 30, 40, 50, 60 (the lost record left out)
    assert row["epochs_trained"] == 3.0 and row["policy_epochs"] == 11
    # Mean of each epoch's finite window ratios; the NaN window and the lost record left out.
    rpn = [(1, (0.01 + 0.03) / 2), (2, 0.04), (3, (0.07 + 0.09) / 2)]
    assert row["RPN_pos_neg_ratio"] == [(e, pytest.approx(v, rel=1e-12)) for e, v in rpn]
    assert row["RoI_pos_neg_ratio"] == [(e, pytest.approx(v / 2, rel=1e-12)) for e, v in rpn]


def test_markdown_table_and_report_files(resumed_run, other_run, tmp_path):
    paths = report.write_report([resumed_run, other_run], tmp_path / "out")
    rows = paths.table.splitlines()
    assert rows[0].startswith("| run | batch | BN size | ranks | policy | epochs | mmAP | AP50 | AP75 | mmAR | hours")
    hours = f"{910 / 3600:.3g}"
    assert rows[2] == (f"| a/run | 8 | 4 | 2 | normal | 3/11 | 12.3 | 34.6 | 10.0 | 20.0 | {hours} | 35.0 "
                       f"| 2.00 / 4.00 / 8.00 | 1.00 / 2.00 / 4.00 | 1 / 2 / 3 |")
    assert rows[3] == ("| b/run | 16 | 16 | 4 | long | 2/18 | 7.0 | 10.0 | 2.0 | 8.0 | 0.2 | 110.0 "
                       "| 20.00 / 30.00 | 10.00 / 15.00 | 1 / 2 |")
    assert paths.table in paths.markdown.read_text()
    saved = json.loads(paths.data.read_text())
    assert [r["run"] for r in saved] == ["a/run", "b/run"] and saved[0]["hours"] == pytest.approx(910 / 3600)
    for figure in paths.figures:
        assert f"]({figure.name})" in paths.markdown.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*report.FIGURES, "report.md", "report.json"])


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])


def _pixels_of(png: Path, color: str) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - _rgb(color)).sum(axis=1) <= 6).sum())


def test_figures_are_pngs_with_each_run_drawn(resumed_run, other_run, tmp_path):
    paths = report.write_report([resumed_run, other_run], tmp_path / "out")
    first, second = "#1f77b4", "#ff7f0e"  # matplotlib's C0 and C1: the two runs
    for png in paths.figures:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 500
    by_name = {p.name: p for p in paths.figures}
    assert _pixels_of(by_name["fig1_mmap_vs_hours.png"], first) > 50
    assert _pixels_of(by_name["fig1_mmap_vs_hours.png"], second) == 0  # no hours for a file-only evaluation
    assert _pixels_of(by_name["fig4_mmap_per_epoch.png"], second) > 20  # ... but it has an epoch
    for name in ("loss_lr.png", "pos_neg_ratio.png"):
        assert _pixels_of(by_name[name], first) > 100 and _pixels_of(by_name[name], second) > 100


def test_cli_prints_the_table_and_paths(resumed_run, tmp_path, capsys):
    assert report.main([str(resumed_run)]) == 0
    out = capsys.readouterr().out
    assert "| run | batch |" in out and f"figure:  {resumed_run / 'report' / 'loss_lr.png'}" in out


def test_cli_names_a_directory_without_a_log(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'empty'}: no log.jsonl (not a hvd_megdet.train output directory?)"
    assert not (tmp_path / "r").exists()


def test_epoch_means_without_epoch_fields_use_iters_per_epoch():
    records = [{"iter": 1, "r": 1.0}, {"iter": 4, "r": 3.0}, {"iter": 5, "r": 10.0}, {"iter": 6, "r": math.inf}]
    assert report_runs.epoch_means(records, "r", iters_per_epoch=4) == {1: 2.0, 2: 10.0}


def test_report_of_a_real_training_run(tiny_train_shards, tmp_path):
    """The smoke config's 2 iterations, trained for real: the report reads what train.py writes."""
    out = tmp_path / "smoke"
    subprocess.run([sys.executable, "-m", "hvd_megdet.train", "--config", "configs/smoke_cpu.yaml", "--set",
                    f"data.train_path={tiny_train_shards}", f"train.output_dir={out}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    row = report.summarize(report_runs.load_run(out))
    start = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if '"start"' in l][-1]
    assert (row["global_batch"], row["ranks"], row["policy"]) == (start["global_batch"], 1, "normal")
    assert row["epochs_trained"] == pytest.approx(2 / start["iters_per_epoch"])
    assert row["mmAP"] is None and row["hours"] > 0 and row["img_per_s"] > 0
    assert [e for e, _ in row["RPN_pos_neg_ratio"]] == [1]
    paths = report.write_report([out], out / "report")
    assert all(p.stat().st_size > 10_000 for p in paths.figures)
