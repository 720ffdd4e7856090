"""benchmarks/recipe_sweep.py and hvd_megdet.tools.report_sweep (issue 23), almost without training:
the plan obeys the linear rule and holds the controls, the hard synthetic set is opt-in, the report
judges divergence right on run directories written here as hvd_megdet.train and the sweep leave them,
and a TERM to the sweep stops the run it has in progress."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import recipe_sweep as sweep
from data_prep import coco_records as R
from data_prep.synthetic import CLASSES, make_synthetic_coco
from hvd_megdet import lr_schedule
from hvd_megdet.config import load_config, save_config
from hvd_megdet.tools import report_sweep

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ the plan
def test_dry_run_plan_obeys_the_linear_rule_and_holds_the_controls(tmp_path, capsys):
    args = sweep.get_args_parser().parse_args(["--dry-run", "--out", str(tmp_path / "runs"),
                                               "--data", str(tmp_path / "data")])
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "estimated total:" in printed
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # a dry run writes nothing

    plan = sweep.build_plan(sweep.FULL)
    assert len({s.name for s in plan}) == len(plan)
    assert {s.global_batch for s in plan} == {2, 8, 32}
    for s in plan:
        assert s.name in printed
        # The config each run trains with: the trainer's own global batch and linear rule give the spec's.
        cfg = load_config(ROOT / sweep.BASE_CONFIG, sweep.overrides(s, sweep.FULL, 1, tmp_path, tmp_path / s.name))
        batch = lr_schedule.global_batch_size(cfg.data.images_per_rank, s.ranks, cfg.solver.backward_passes_per_step)
        assert batch == s.global_batch == s.ranks * s.images_per_rank * s.passes
        assert lr_schedule.scaled_lr(batch, cfg.solver.base_lr, cfg.solver.base_batch) == pytest.approx(
            0.02 * batch / 16) == pytest.approx(s.scaled_lr)
        assert (cfg.model.norm, cfg.solver.policy, cfg.train.seed) == (s.norm, s.policy, 1)
        assert (cfg.solver.warmup_iters > 0) == s.warmup and cfg.solver.on_nonfinite == "stop"
        ipe = sweep.iters_per_epoch(s, sweep.FULL)
        steps, _, _ = sweep.steps_and_evals(s, sweep.FULL)
        assert steps == ipe * lr_schedule.POLICIES[s.policy].total_epochs  # equal epochs, whatever the batch
        assert sweep.estimate_s(s, sweep.FULL) > 0
    controls = [s for s in plan if s.control]
    assert {(s.global_batch, s.norm, s.warmup) for s in controls} == {(32, "cgbn", False), (32, "frozen", True)}
    assert all(s.warmup for s in plan if not s.control)
    assert {s.bn_size for s in plan if s.global_batch == 8 and s.policy == "normal"} == {0, 2, 8}
    assert {s.policy for s in plan} == {"normal", "long"}


def test_a_set_or_a_run_of_another_plan_is_refused_not_resumed(tmp_path):
    """The sizes changed between sweeps (256 training images before 4b674e7): resuming would train the
    old plan's run on, or this plan on the old set, and report it as this plan's."""
    shards = tmp_path / "data" / "shards" / "train"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(json.dumps({"num_images": sweep.FULL.train_images * 4}))
    with pytest.raises(SystemExit, match=f"{shards / 'manifest.json'}: {sweep.FULL.train_images * 4} train images, "
                                         f"the plan needs {sweep.FULL.train_images}"):
        sweep.prepare_data(tmp_path / "data", sweep.FULL)

    spec = sweep.build_plan(sweep.FULL)[0]
    out = tmp_path / "runs" / f"{spec.name}_seed1"
    out.mkdir(parents=True)
    other = dataclasses.replace(sweep.FULL, train_images=sweep.FULL.train_images * 4)
    record = out / report_sweep.SPEC_FILE
    record.write_text(json.dumps({"spec": sweep.describe(spec, other, 1), "seed": 1, "launches": []}))
    before = record.read_text()
    with pytest.raises(SystemExit, match=f"{record}: a run of another plan"):
        sweep.train_one(spec, sweep.FULL, 1, tmp_path / "data", out, estimate=1.0)
    assert record.read_text() == before and not (out / report_sweep.CONSOLE_FILE).exists()  # nothing launched


def test_quick_plan_is_a_handful_of_two_step_runs():
    plan = sweep.build_plan(sweep.QUICK)
    assert 3 <= len(plan) <= 6
    for s in plan:
        steps, eval_epochs, evals = sweep.steps_and_evals(s, sweep.QUICK)
        assert steps <= 2 and evals == 1 and eval_epochs == ()  # each ends at an epoch's end: evaluated


# ------------------------------------------------------------------------------- the hard synthetic set
# Recorded with the code before the hard variant existed (numpy and Pillow as pinned in requirements.txt).
DEFAULT_JSON_SHA256 = "e2a66846fcdd4482853ca27c36b6ff1d2184c4fa89b01080fe0e6616d4cdfff1"
DEFAULT_IMAGES_SHA256 = "3f3b611854e243b689d8164f582dff6f06803df0946a11ed91997602677bfce9"


def _images_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((root / "images").iterdir()):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_hard_set_is_opt_in_and_harder(tmp_path):
    default = make_synthetic_coco(tmp_path / "default", 12, (96, 64), seed=5, split="val")
    assert hashlib.sha256(default.read_bytes()).hexdigest() == DEFAULT_JSON_SHA256
    assert _images_sha256(tmp_path / "default") == DEFAULT_IMAGES_SHA256

    hard = make_synthetic_coco(tmp_path / "hard", 12, (96, 64), seed=5, split="val", hard=True)
    easy, coco = json.loads(default.read_text()), json.loads(hard.read_text())
    records, issues = R.validate_coco(coco)
    assert issues == [] and len(records) == 12
    assert len(coco["categories"]) == 8 and {c[0] for c in CLASSES} < {c["id"] for c in coco["categories"]}
    for name in (i["file_name"] for i in coco["images"]):
        assert (tmp_path / "hard/images" / name).read_bytes() != (tmp_path / "default/images" / name).read_bytes()

    def objects(c):
        return [a for a in c["annotations"] if not a["iscrowd"]]
    assert len(objects(coco)) > len(objects(easy))
    median_area = [sorted(a["bbox"][2] * a["bbox"][3] for a in objects(c))[len(objects(c)) // 2] for c in (easy, coco)]
    assert median_area[1] < median_area[0]


# ------------------------------------------------------------------------------------------ the report
def _write_run(root: Path, spec: sweep.RunSpec, seed: int, losses: list[float], evals: dict[int, float],
               finished: bool, returncode: int, console: str = "") -> Path:
    """A run directory as hvd_megdet.train and the sweep leave it: ``losses[i]`` is step i's logged loss."""
    out = root / f"{spec.name}_seed{seed}"
    out.mkdir(parents=True)
    overrides = sweep.overrides(spec, sweep.FULL, seed, root / "data", out)
    save_config(load_config(ROOT / sweep.BASE_CONFIG, overrides), out / "config.yaml")
    ipe = sweep.iters_per_epoch(spec, sweep.FULL)
    steps, _, _ = sweep.steps_and_evals(spec, sweep.FULL)
    t = 1000.0
    records = [{"type": "start", "time": t, "world_size": spec.ranks, "hosts": 1, "global_batch": spec.global_batch,
                "bn_size": spec.bn_size, "bn_groups": [], "base_lr": 0.01, "scaled_lr": spec.scaled_lr,
                "warmup_iters": ipe if spec.warmup else 0, "iters_per_epoch": ipe, "total_iters": steps,
                "start_iter": 0, "images": 256, "device": "cpu", "norm_layers": {"CrossGPUBatchNorm2d": 20}}]
    for i, loss in enumerate(losses, start=1):
        t += 1.2
        parts = {"loss_classifier": loss * 0.4, "loss_box_reg": loss * 0.3, "loss_objectness": loss * 0.2,
                 "loss_rpn_box_reg": loss * 0.1}
        records.append({"type": "train", "time": t, "iter": i, "epoch": (i - 1) // ipe, **parts, "loss": loss,
                        "rpn_pos_neg_ratio": 0.05, "roi_pos_neg_ratio": 0.2, "lr": spec.scaled_lr, "img_per_s": 6.5,
                        "data_time": 0.01, "step_time": 1.2, "global_batch": spec.global_batch,
                        "bn_size": spec.bn_size, "skipped_steps": 0, "peak_mem_mb": 900.0})
        if i % ipe == 0:
            records.append({"type": "checkpoint", "time": t, "iter": i, "epoch": i // ipe, "path": "ckpt.pt"})
            if i // ipe in evals:
                m = evals[i // ipe]
                records.append({"type": "eval", "time": t + 5, "epoch": i // ipe, "iter": i, "mmAP": m,
                                "AP50": min(1.0, 2 * m), "AP75": m / 2, "mmAR": m * 1.3})
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (out / "finished.json").write_text(json.dumps({"output_dir": str(out), "iterations": len(losses)}))
    (out / report_sweep.CONSOLE_FILE).write_text(console)
    record = {"spec": sweep.describe(spec, sweep.FULL, seed), "seed": seed, "estimate_s": 440.0,
              "launches": [{"started": 1000.0, "returncode": returncode, "wall_s": t - 1000.0 + 20}]}
    (out / report_sweep.SPEC_FILE).write_text(json.dumps(record))
    return out


def test_report_rows_pool_seeds_and_flag_divergence(tmp_path):
    plan = {s.name: s for s in sweep.build_plan(sweep.FULL)}
    good = plan["bs8_4x2x1_cgbn8_warmup_normal"]
    no_warmup = plan["bs32_4x2x4_cgbn8_nowarmup_normal"]
    no_bn = plan["bs32_4x2x4_frozen_warmup_normal"]
    steps = {s.name: sweep.steps_and_evals(s, sweep.FULL)[0] for s in (good, no_bn)}
    epochs = sweep.steps_and_evals(good, sweep.FULL)[1] + (11,)  # evaluated, then at the end
    falling = [2.5 * math.exp(-i * 2 / steps[good.name]) + 0.3 for i in range(steps[good.name])]
    dirs = [
        _write_run(tmp_path, good, 1, falling, dict(zip(epochs, (0.05, 0.12, 0.18, 0.20)[-len(epochs):])), True, 0),
        _write_run(tmp_path, good, 2, falling, dict(zip(epochs, (0.06, 0.15, 0.27, 0.30)[-len(epochs):])), True, 0),
        # Seeds 3 and 4 still training when the report is written (--report-only mid-sweep): in no median.
        _write_run(tmp_path, good, 3, falling[:5], {}, False, 0),
        _write_run(tmp_path, good, 4, falling[:9], {}, False, 0),
        # Stopped at step 13 on a NaN: the log just ends, the console and exit status tell.
        _write_run(tmp_path, no_warmup, 1, [2.4, 3.0, 5.5, 9.0, 14.0, 30.0, 55.0, 80.0, 120.0, 200.0, 400.0, 900.0],
                   {}, False, 3, console="[1,0]<stderr>:05:01:07 ERROR non-finite loss at iteration 12 on rank(s) "
                                          "[0, 2]: {'loss_classifier': nan} (rank 0); set solver.on_nonfinite=skip\n"),
        # Finished without a NaN, but its loss ended 15x where it began: diverged all the same.
        _write_run(tmp_path, no_bn, 1, [2.0] + [30.0] * (steps[no_bn.name] - 1), dict.fromkeys(epochs, 0.0), True, 0),
    ]
    report = report_sweep.write_sweep_report(report_sweep.find_run_dirs(tmp_path), tmp_path / "report")
    assert report_sweep.find_run_dirs(tmp_path) == sorted(dirs)
    rows = {r["run"]: r for r in report.rows}
    assert list(rows) == [good.name, no_warmup.name, no_bn.name]  # the plan's order

    r = rows[good.name]
    assert (r["seeds"], r["judged"], r["diverged"]) == (4, 2, 0) and r["statuses"][2:] == ["interrupted"] * 2
    assert (r["mmAP"], r["mmAP_min"], r["mmAP_max"]) == (pytest.approx(0.25), 0.20, 0.30)
    assert r["wall_s"] == pytest.approx(1.2 * steps[good.name] + 20)
    assert r["steps"] == steps[good.name] and (r["global_batch"], r["bn_size"], r["warmup"]) == (8, 8, True)
    r = rows[no_warmup.name]
    assert (r["judged"], r["diverged"], r["mmAP"]) == (1, 1, None) and r["steps"] == 12
    assert r["reasons"] == ["stopped on a non-finite loss"] and r["control"]
    r = rows[no_bn.name]
    assert (r["judged"], r["diverged"], r["mmAP"]) == (1, 1, None)
    assert r["reasons"][0].startswith("loss grew 15x")

    lines = {line.split(" | ")[0].strip("| "): line for line in report.table.splitlines() if line.startswith("| bs")}
    assert "| 25.0 (20.0-30.0) |" in lines[good.name] and lines[good.name].endswith("| – | – |")
    for name in (no_warmup.name, no_bn.name):
        assert "| failed |" in lines[name] and lines[name].endswith("| fails | yes (1/1 seeds diverged) |")
    assert report.table.index("Table 2") < report.table.index(no_bn.name) < report.table.index("Table 3")
    assert report.markdown.read_text().count("| bs") == 3
    for png in report.figures:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seeds = json.loads(report.data.read_text())["seeds"]
    assert sorted(s["status"] for s in seeds) == ["diverged", "diverged", "finished", "finished"] + ["interrupted"] * 2


@pytest.mark.filterwarnings("error")  # matplotlib warned of an empty legend when no run had an mmAP yet
def test_mid_sweep_the_figure_marks_diverged_what_the_table_marks_failed(tmp_path, monkeypatch):
    # One seed stopped on a NaN, the other still training: the table's "failed" counts ended seeds only,
    # and the per-epoch figure must say the same of the run (it once required every seed, running ones too).
    no_warmup = {s.name: s for s in sweep.build_plan(sweep.FULL)}["bs32_4x2x4_cgbn8_nowarmup_normal"]
    _write_run(tmp_path, no_warmup, 1, [2.4, 3.0, 900.0], {}, False, 3)  # exit 3: stopped on a NaN
    _write_run(tmp_path, no_warmup, 2, [2.4, 3.1], {}, False, 0)
    figures, real_save = {}, report_sweep._save

    def keep(fig, path):
        figures[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(report_sweep, "_save", keep)
    report = report_sweep.write_sweep_report(report_sweep.find_run_dirs(tmp_path), tmp_path / "report")
    (row,) = report.rows
    assert (row["judged"], row["diverged"]) == (1, 1)
    assert "| failed |" in report.table
    labels = [t.get_text() for legend in figures[report_sweep.FIGURES[1]].legends for t in legend.get_texts()]
    assert labels == [f"{no_warmup.name} (diverged)"]


@pytest.mark.parametrize("launches, console, losses, finished, mmap, expected", [
    ([{"returncode": 0}], "", [2.0, 1.0], True, 0.2, False),
    ([{"returncode": 3}], "", [2.0], False, None, True),                     # exit status alone
    ([{"returncode": 1}], "", [2.0, 1.0], False, None, None),                # crashed otherwise: unknown
    ([], "", [], False, None, None),                                         # not run
    ([{"returncode": 0}], "", [2.0, float("nan"), 1.0], True, 0.1, True),  # a logged NaN
    ([{"returncode": 0}], "", [2.0, 19.0], True, 0.1, False),                # grew, but under 10x
])
def test_judge(launches, console, losses, finished, mmap, expected):
    train = [{"iter": i + 1, "epoch": 0, "loss": v, "skipped_steps": 0} for i, v in enumerate(losses)]
    assert report_sweep.judge(launches, console, train, finished, mmap).diverged is expected


def test_judge_skipped_steps_and_zero_mmap():
    train = [{"iter": 1, "epoch": 0, "loss": 2.0, "skipped_steps": 0}, {"iter": 2, "epoch": 0, "loss": 1.9,
                                                                       "skipped_steps": 3}]
    assert report_sweep.judge([{"returncode": 0}], "", train, True, 0.0).diverged is True
    assert report_sweep.judge([{"returncode": 0}], "", train, True, 0.2).diverged is False


# ------------------------------------------------------------------------------------ stopping the sweep
def _trainers(out: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hvd_megdet.train" in argv and any(str(out).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def test_a_term_to_the_sweep_stops_the_run_in_progress_too(tmp_path):
    # The run trains in a process group of its own (a hung run is killed with its ranks), so a TERM or
    # Ctrl-C to the sweep reached no rank: the sweep ended and left its run training, orphaned.
    out = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "benchmarks/recipe_sweep.py", "--quick", "--out", str(out),
                             "--data", str(tmp_path / "data")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not _trainers(out):
            assert proc.poll() is None and time.monotonic() < deadline, "no run started"
            time.sleep(0.05)
        proc.terminate()
        output = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "run the same command again to resume" in output
    assert _trainers(out) == []  # the sweep waited for its run to end
