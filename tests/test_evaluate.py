"""hvd_megdet.tools.evaluate (the command): a short training run beats a floor a random model cannot reach."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from hvd_megdet import checkpoint
from hvd_megdet.comm import DistContext
from hvd_megdet.config import load_config
from hvd_megdet.data import ShardedCocoDataset
from hvd_megdet.model import build_model

ROOT = Path(__file__).resolve().parent.parent
SETS = ["data.min_size=96", "data.max_size=128", "data.num_workers=0", "train.progress=false"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _evaluate(ckpt: Path, shards: Path, out: Path) -> dict:
    _run("hvd_megdet.tools.evaluate", "--config", "configs/demo_cpu.yaml", "--checkpoint", str(ckpt),
         "--data", str(shards), "--output", str(out), "--set", *SETS)
    return json.loads((out / "metrics.json").read_text())


def test_short_training_beats_random_model_floor(tiny_train_shards, tmp_path):
    run = tmp_path / "run"
    _run("hvd_megdet.train", "--config", "configs/demo_cpu.yaml", "--set", f"data.train_path={tiny_train_shards}",
         "data.val_path=",
         f"train.output_dir={run}", "train.max_iters=30", "solver.warmup_iters=6", "train.log_every=10",
         "model.box_batch_size_per_image=256", *SETS)
    trained = _evaluate(checkpoint.latest_checkpoint(run), tiny_train_shards, tmp_path / "eval_trained")

    # The same architecture at its random initialisation, through the same command.
    cfg = load_config("configs/demo_cpu.yaml", SETS)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, DistContext(), ShardedCocoDataset(tiny_train_shards).num_classes,
                        min_size=96, max_size=128)
    random_ckpt = tmp_path / "random.pt"
    torch.save({"model": model.state_dict()}, random_ckpt)
    untrained = _evaluate(random_ckpt, tiny_train_shards, tmp_path / "eval_random")

    assert set(trained) >= {"mmAP", "AP50", "AP75", "APs", "APm", "APl", "mmAR", "ARs", "ARm", "ARl"}
    assert untrained["mmAP"] < 0.02
    print(f"\n[evaluate] trained {trained['mmAP']:.3f} mmAP, random {untrained['mmAP']:.3f}")
    # 30 iterations at 256 sampled RoIs per image give about 0.20 (measured 2026-12-03, one process
    # alone: 0.202 after 30, 0.177 after 40 in 25% more time; at 40 iterations 0.129 with 128 RoIs and
    # 0.022 with 64, which would not clear the floor); random < 0.02.
    assert trained["mmAP"] > 0.05, trained
    assert trained["mmAR"] > untrained["mmAR"] + 0.1
    detections = json.loads((tmp_path / "eval_trained" / "detections.json").read_text())
    categories = {c["id"] for c in ShardedCocoDataset(tiny_train_shards).categories}
    assert detections and {d["category_id"] for d in detections} <= categories
