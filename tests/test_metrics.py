"""hvd_megdet.metrics: JSON lines on rank 0 only, and the loss plot drawn from them."""
import json

from hvd_megdet.metrics import MetricLogger, read_log, write_loss_plot


def test_only_rank_zero_writes_json_lines(tmp_path):
    MetricLogger(tmp_path / "r1", enabled=False).log("train", {"iter": 1, "loss": 2.0})
    assert not (tmp_path / "r1").exists()
    logger = MetricLogger(tmp_path / "r0", enabled=True, progress=False)
    logger.log("train", {"iter": 1, "loss": 2.0, "lr": 0.01})
    logger.log("eval", {"epoch": 1, "mmAP": 0.5})
    lines = (tmp_path / "r0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["type"] for l in lines] == ["train", "eval"]
    assert read_log(tmp_path / "r0" / "log.jsonl", "eval")[0]["mmAP"] == 0.5


def test_loss_plot_has_one_point_per_record(tmp_path):
    logger = MetricLogger(tmp_path, enabled=True, progress=False)
    for it, loss in enumerate([3.0, 2.0, float("nan"), 1.0], start=1):
        logger.log("train", {"iter": it, "loss": loss, "lr": 0.01 * it})
    svg = write_loss_plot(tmp_path / "log.jsonl", tmp_path / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    loss_points = svg.split('points="')[1].split('"')[0].split()
    assert len(loss_points) == 3  # the non-finite record is left out
    assert "1..3" in svg  # loss range in the caption
