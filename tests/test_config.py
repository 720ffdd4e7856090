"""hvd_megdet.config (load, override, type checks, round trip) and the files in configs/.

The Table 3 expectations below are the paper's (MegDet, arXiv 1711.07240, Sec. 4 and Table 3), written
out here independently of the YAML files; nothing is parsed from the files' comments.
"""
import dataclasses
from pathlib import Path

import pytest
import yaml

from hvd_megdet import lr_schedule
from hvd_megdet.config import (Config, ConfigError, DataConfig, ModelConfig, SolverConfig, TrainConfig,
                               load_config, save_config, to_dict)
from tests.mpirun import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
GPUS_PER_NODE = 8  # the paper's machines; BN groups never span two of them

# Table 3 rows run by jobs/table3_configs.txt: file -> (GPUs, global batch, BN size; 0 = frozen BN).
TABLE3 = {
    "megdet_bs16_base_frozen.yaml": (8, 16, 0),
    "megdet_bs16_bn16.yaml": (8, 16, 16),
    "megdet_bs32_bn32.yaml": (8, 32, 32),
    "megdet_bs64_bn32.yaml": (16, 64, 32),
    "megdet_bs128_bn32.yaml": (32, 128, 32),
    "megdet_bs256_bn32.yaml": (64, 256, 32),
    "megdet_bs256_bn16.yaml": (128, 256, 16),
    "megdet_bs16_bn16_long.yaml": (8, 16, 16),
    "megdet_bs32_bn32_long.yaml": (8, 32, 32),
    "megdet_bs64_bn32_long.yaml": (16, 64, 32),
    "megdet_bs128_bn32_long.yaml": (32, 128, 32),
    "megdet_bs256_bn32_long.yaml": (64, 256, 32),
    "megdet_bs256_bn16_long.yaml": (128, 256, 16),
}
ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------
def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.solver.base_lr == 0.02 and cfg.solver.base_batch == 16  # Sec. 4
    assert cfg.solver.momentum == 0.9 and cfg.solver.weight_decay == 1e-4
    assert cfg.solver.policy == "normal"
    assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333)
    assert cfg.model.backbone == "resnet50" and cfg.model.norm == "cgbn"
    assert cfg.model.bn_group_size is None and cfg.train.eval_epochs == ()


def test_yaml_then_overrides_last_wins(tmp_path):
    path = _write(tmp_path, "solver:\n  base_lr: 0.04\n  momentum: 0.8\ndata:\n  images_per_rank: 4\n")
    cfg = load_config(path)
    assert cfg.solver.base_lr == 0.04 and cfg.solver.momentum == 0.8 and cfg.data.images_per_rank == 4
    assert cfg.solver.base_batch == SolverConfig().base_batch  # keys the file leaves out keep defaults
    cfg = load_config(path, ["solver.base_lr=0.08", "data.images_per_rank=1", "solver.base_lr=0.16"])
    assert cfg.solver.base_lr == 0.16  # the last override wins over the earlier one and the file
    assert cfg.data.images_per_rank == 1
    assert cfg.solver.momentum == 0.8  # file value, not overridden
    assert load_config(None, ["train.output_dir=runs/x"]).train.output_dir == "runs/x"


def test_override_values_are_read_as_yaml():
    cfg = load_config(None, ["train.tensorboard=true", "solver.weight_decay=0.0005", "train.output_dir="])
    assert cfg.train.tensorboard is True
    assert cfg.solver.weight_decay == 0.0005
    assert cfg.train.output_dir == ""


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.solver.base_lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.solver = SolverConfig()


@pytest.mark.parametrize("text, key", [
    ("model:\n  nrom: cgbn\n", "model.nrom"),
    ("modle:\n  norm: cgbn\n", "modle"),
    ("train:\n  eval_every: 3\n", "train.eval_every"),
])
def test_unknown_key_in_file_names_file_and_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("model.nrom=cgbn", "model.nrom"),
    ("modle.norm=cgbn", "modle"),
    ("solver.lr=0.1", "solver.lr"),
])
def test_unknown_key_in_override_names_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["solver.base_lr", "base_lr=0.1", "a.b.c=1"])
def test_malformed_override_is_rejected(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("data.images_per_rank=two", "data.images_per_rank"),
    ("data.images_per_rank=2.5", "data.images_per_rank"),  # a float is not an int
    ("data.images_per_rank=true", "data.images_per_rank"),  # nor is a bool
    ("solver.base_lr=fast", "solver.base_lr"),
    ("train.tensorboard=1", "train.tensorboard"),  # an int is not a bool
    ("model.backbone=50", "model.backbone"),  # an int is not a str
    ("train.eval_epochs=3", "train.eval_epochs"),  # a tuple field needs a list
    ("train.eval_epochs=[1, x]", "train.eval_epochs"),
])
def test_wrong_types_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_wrong_type_in_file_names_file_and_key(tmp_path):
    path = _write(tmp_path, "data:\n  min_size: big\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.min_size" in str(err.value) and str(path) in str(err.value)


def test_int_is_accepted_for_a_float():
    cfg = load_config(None, ["solver.base_lr=1"])
    assert cfg.solver.base_lr == 1.0 and type(cfg.solver.base_lr) is float


@pytest.mark.parametrize("override, key", [
    ("model.norm=batch", "model.norm"),
    ("model.backbone=vgg16", "model.backbone"),
    ("solver.policy=cosine", "solver.policy"),
    ("solver.amp=fp8", "solver.amp"),
    ("train.device=tpu", "train.device"),
])
def test_choices_are_enforced(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_optional_int_takes_null_and_ints(tmp_path):
    assert load_config(None, ["model.bn_group_size=4"]).model.bn_group_size == 4
    assert load_config(None, ["model.bn_group_size=4", "model.bn_group_size=null"]).model.bn_group_size is None
    assert load_config(_write(tmp_path, "model:\n  bn_group_size: null\n")).model.bn_group_size is None
    assert load_config(_write(tmp_path, "model:\n  bn_group_size: 2\n")).model.bn_group_size == 2
    with pytest.raises(ConfigError, match="model.bn_group_size"):
        load_config(None, ["model.bn_group_size=four"])


def test_tuple_field_from_a_list(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  eval_epochs: [1, 5, 11]\n"))
    assert cfg.train.eval_epochs == (1, 5, 11) and isinstance(cfg.train.eval_epochs, tuple)
    assert load_config(None, ["train.eval_epochs=[2, 3]"]).train.eval_epochs == (2, 3)
    assert load_config(None, ["train.eval_epochs=[]"]).train.eval_epochs == ()
    hash(cfg)  # tuples keep the whole config hashable


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(None, ["model.bn_group_size=4", "train.eval_epochs=[1, 2]", "solver.base_lr=0.05",
                             "model.norm=local", "data.val_path=x/y", "train.tensorboard=true"])
    plain = to_dict(cfg)
    assert plain["train"]["eval_epochs"] == [1, 2] and plain["model"]["bn_group_size"] == 4
    assert set(plain) == {"data", "model", "solver", "train"}
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == plain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary file left
    save_config(Config(), path)  # overwrites in place
    assert load_config(path) == Config()


# ---------------------------------------------------------------------------------------------------
# configs/
# ---------------------------------------------------------------------------------------------------
def test_table3_files_are_the_job_list():
    listed = (REPO_ROOT / "jobs" / "table3_configs.txt").read_text().split()
    assert sorted(listed) == sorted(TABLE3)
    assert set(TABLE3) | {"demo_cpu.yaml", "smoke_cpu.yaml"} == set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads_and_is_complete(name):
    path = CONFIGS / name
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Each file writes out every key (no includes, no silent defaults).
    raw = yaml.safe_load(path.read_text())
    sections = {"data": DataConfig, "model": ModelConfig, "solver": SolverConfig, "train": TrainConfig}
    assert set(raw) == set(sections)
    for section, cls in sections.items():
        assert set(raw[section]) == {f.name for f in dataclasses.fields(cls)}, f"{name}: {section}"


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_table3_row(name):
    gpus, batch, bn_size = TABLE3[name]
    cfg = load_config(CONFIGS / name)
    # The row's launch: GPUs x images per GPU is the paper's batch, with one rank per GPU.
    assert cfg.data.images_per_rank * gpus == batch
    assert lr_schedule.global_batch_size(cfg.data.images_per_rank, gpus, cfg.solver.backward_passes_per_step) == batch
    if bn_size == 0:
        assert cfg.model.norm == "frozen"  # the 16-base row
    else:
        assert cfg.model.norm == "cgbn"
        group = cfg.model.bn_group_size or GPUS_PER_NODE
        assert group <= GPUS_PER_NODE and GPUS_PER_NODE % group == 0  # a group stays within one node
        assert cfg.data.images_per_rank * group == bn_size
    # Table 3 note: "When the BN size >= 32, the sublinear memory is applied".
    assert cfg.model.sublinear_memory == (bn_size >= 32)
    assert cfg.solver.policy == ("long" if name.endswith("_long.yaml") else "normal")
    assert cfg.train.output_dir == f"runs/{name.removesuffix('.yaml')}"
    assert cfg.train.max_iters == 0  # the whole policy
    if cfg.solver.policy == "long":  # Figure 4: mmAP after every epoch of the long policy
        assert cfg.train.eval_epochs == tuple(range(1, lr_schedule.POLICIES["long"].total_epochs + 1))


def test_table3_configs_share_the_recipe():
    cfgs = {name: load_config(CONFIGS / name) for name in TABLE3}
    for name, cfg in cfgs.items():
        # Paper Sec. 4: ResNet-50 FPN, SGD momentum 0.9, weight decay 1e-4, LR 0.02 for batch 16.
        assert cfg.model.backbone == "resnet50", name
        assert (cfg.solver.base_lr, cfg.solver.base_batch) == (0.02, 16), name
        assert (cfg.solver.momentum, cfg.solver.weight_decay) == (0.9, 1e-4), name
        assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333), name
        assert cfg.model.backbone_weights, f"{name}: the paper starts from ImageNet weights"
        assert cfg.data.train_path.endswith("train2017") and cfg.data.val_path.endswith("val2017"), name
    # Everything but the row's own settings is identical across the rows.
    row_keys = {("data", "images_per_rank"), ("model", "norm"), ("model", "bn_group_size"),
                ("model", "trainable_layers"), ("model", "sublinear_memory"), ("solver", "policy"),
                ("train", "output_dir"), ("train", "eval_epochs")}

    def common(cfg):
        return {(s, k): v for s, values in to_dict(cfg).items() for k, v in values.items() if (s, k) not in row_keys}

    reference = common(cfgs["megdet_bs16_bn16.yaml"])
    for name, cfg in cfgs.items():
        assert common(cfg) == reference, name
    # All CGBN rows train every stage; the frozen baseline keeps conv1 and layer1 fixed.
    assert {cfg.model.trainable_layers for cfg in cfgs.values() if cfg.model.norm == "cgbn"} == {5}


def test_long_rows_match_their_normal_rows():
    for name in TABLE3:
        if name.endswith("_long.yaml"):
            long_cfg = to_dict(load_config(CONFIGS / name))
            normal = to_dict(load_config(CONFIGS / name.replace("_long", "")))
            for cfg in (long_cfg, normal):
                del cfg["solver"]["policy"], cfg["train"]["output_dir"], cfg["train"]["eval_epochs"]
            assert long_cfg == normal, name


def test_demo_config_warm_up_and_schedule():
    cfg = load_config(CONFIGS / "demo_cpu.yaml")
    s = cfg.solver
    assert cfg.model.backbone == "resnet18" and cfg.model.norm == "cgbn" and cfg.model.bn_group_size is None
    assert cfg.data.train_path == "data/synthetic/shards/train" and cfg.data.val_path == "data/synthetic/shards/val"
    batch = lr_schedule.global_batch_size(cfg.data.images_per_rank, 2, s.backward_passes_per_step)
    assert batch == 4  # horovodrun -np 2, 2 images per rank
    ipe = 16  # e.g. 64 synthetic images / 4

    def lr(i):
        return lr_schedule.lr_at(i, global_batch=batch, iters_per_epoch=ipe, policy=s.policy,
                                 warmup_iters=s.warmup_iters, base_lr=s.base_lr, base_batch=s.base_batch)

    assert lr(0) == pytest.approx(0.01, rel=1e-12)  # warm-up starts at the un-scaled base LR
    assert 15 <= s.warmup_iters <= 30
    for i in range(s.warmup_iters):  # linear rise, one step at a time (Sec. 3.2)
        assert lr(i) == pytest.approx(0.01 + 0.01 * i / s.warmup_iters, rel=1e-12)
    assert lr(s.warmup_iters) == pytest.approx(0.02, rel=1e-12)  # 0.01 x 4 / 2
    assert lr(8 * ipe - 1) == pytest.approx(0.02, rel=1e-12)
    assert lr(8 * ipe) == pytest.approx(0.002, rel=1e-12)  # normal policy: x0.1 after epoch 8
    assert lr(10 * ipe) == pytest.approx(0.0002, rel=1e-12)  # and after epoch 10
    assert lr_schedule.total_iters(ipe, s.policy) == 11 * ipe
    t = cfg.train
    assert (cfg.data.num_workers, t.log_every, t.checkpoint_every) == (1, 5, 50)
    assert t.eval_at_end and t.progress and t.max_iters == 0 and t.device == "cpu"


def test_smoke_config_is_tiny():
    cfg = load_config(CONFIGS / "smoke_cpu.yaml")
    assert cfg.train.max_iters == 2 and cfg.data.num_workers == 0
    assert cfg.model.backbone == "resnet18" and cfg.data.max_size <= 128
    assert not cfg.model.backbone_weights  # needs no file but the shards
