"""Run configuration: frozen dataclasses, loaded from YAML, overridden by ``key=value`` strings.

    cfg = load_config("configs/megdet_bs256_bn32.yaml", ["solver.base_lr=0.02", "train.max_iters=10"])

Unknown keys (in the file or an override) are errors that name the key; values are type-checked.
Derived values (global batch, scaled LR) are computed by the trainer and logged, never stored here.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class DataConfig:
    train_path: str = "data/synthetic/shards/train"  # directory of HDF5 shards with manifest.json
    val_path: str = ""            # shards of the evaluation split ("" = no evaluation)
    val_annotations: str = ""     # optional COCO json for evaluation instead of the shards' own
    images_per_rank: int = 2      # images each rank sees per backward pass
    min_size: int = 800           # shorter side after resizing (paper: FPN setting)
    max_size: int = 1333          # cap on the longer side
    flip_prob: float = 0.5        # random horizontal flip in training
    num_workers: int = 2          # DataLoader workers per rank
    aspect_ratio_grouping: bool = True  # batches of all-landscape or all-portrait images
    shard_shuffle: bool = False   # shuffle whole shards so each rank opens few files


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"    # resnet18 | resnet34 | resnet50 | resnet101
    norm: str = "cgbn"            # frozen | local | cgbn (paper Table 3: 16-base | BN size 2 | BN size >= 16)
    bn_group_size: int | None = None  # ranks per CGBN group; None = every rank of a host (paper)
    bn_in_fpn: bool = False       # BN (of `norm`) in the FPN's lateral and output convolutions
    bn_in_head: bool = False      # 4conv-1fc box head with BN instead of the 2fc head
    backbone_weights: str = ""    # torchvision-format ResNet state dict on disk ("" = random init)
    trainable_layers: int = 5     # ResNet stages trained (5 = all); frozen stages use frozen BN
    sublinear_memory: bool = False  # activation checkpointing of every bottleneck block
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box head (paper, torchvision: 512)
    box_fc_dim: int = 1024        # width of the box head's fully connected layers (paper, torchvision: 1024)


@dataclass(frozen=True)
class SolverConfig:
    base_lr: float = 0.02         # LR r for base_batch images (paper: 0.02 for 16)
    base_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4    # on every parameter, as the paper (Sec. 4)
    no_decay_bias_norm: bool = False  # true: no weight decay on biases and norm weights (a common variant)
    policy: str = "normal"        # normal (11 epochs) | long (18 epochs)
    warmup_iters: int = 500       # linear warm-up from r to the scaled LR
    backward_passes_per_step: int = 1  # gradient accumulation inside DistributedOptimizer
    clip_grad_norm: float = 0.0   # 0 = no clipping
    amp: str = "none"             # none | bf16 | fp16
    fp16_allreduce: bool = False  # Horovod fp16 compression of gradients
    on_nonfinite: str = "stop"    # stop | skip: what a non-finite loss does


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/megdet"
    seed: int = 42
    log_every: int = 20           # iterations between JSON-lines metric records
    checkpoint_every: int = 1000  # iterations between checkpoints (also one at each epoch end)
    keep_checkpoints: int = 3
    eval_epochs: tuple[int, ...] = ()  # 1-based epochs after which to evaluate (last epoch: `eval_at_end`)
    eval_at_end: bool = True      # evaluate when training ends at an epoch boundary
    max_iters: int = 0            # stop after this many iterations (0 = the whole schedule)
    tensorboard: bool = False
    device: str = "auto"          # auto | cpu | cuda
    progress: bool = True         # rank 0: a bar in a terminal, a plain line every 30 s in a batch log
    stall_timeout_s: float = 600.0  # a rank without progress for this long ends the job, naming itself (0: off)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    ("model", "backbone"): ("resnet18", "resnet34", "resnet50", "resnet101"),
    ("model", "norm"): ("frozen", "local", "cgbn"),
    ("solver", "policy"): ("normal", "long"),
    ("solver", "amp"): ("none", "bf16", "fp16"),
    ("solver", "on_nonfinite"): ("stop", "skip"),
    ("train", "device"): ("auto", "cpu", "cuda"),
}
NON_NEGATIVE = {"train.stall_timeout_s"}


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation (str, int, float, bool, Optional, tuple[int, ...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(annotation)
        return tuple(_coerce(v, inner, key) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is str and value is None:
        return ""
    if type(value) is not annotation:
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _merge(section_obj: Any, values: dict, section: str) -> Any:
    hints = typing.get_type_hints(type(section_obj))
    updates = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key '{key}' (known keys in '{section}': {known})")
        updates[name] = _coerce(value, hints[name], key)
        allowed = CHOICES.get((section, name))
        if allowed and updates[name] not in allowed:
            raise ConfigError(f"{key}: must be one of {allowed}, got {updates[name]!r}")
        if key in NON_NEGATIVE and updates[name] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {updates[name]!r}")
    return dataclasses.replace(section_obj, **updates)


def from_dict(raw: dict | None, base: Config | None = None) -> Config:
    """Apply a nested ``{section: {key: value}}`` dict on top of ``base`` (default: defaults)."""
    cfg = base or Config()
    for section, values in (raw or {}).items():
        if section not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"unknown config section '{section}' (known: data, model, solver, train)")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        cfg = dataclasses.replace(cfg, **{section: _merge(getattr(cfg, section), values, section)})
    return cfg


def parse_override(text: str) -> dict:
    """``"solver.base_lr=0.04"`` -> ``{"solver": {"base_lr": 0.04}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.key, e.g. solver.base_lr")
    return {parts[0]: {parts[1]: yaml.safe_load(raw_value) if raw_value.strip() else ""}}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then each override in order (the last one wins)."""
    cfg = Config()
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        try:
            cfg = from_dict(raw, cfg)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        cfg = from_dict(parse_override(text), cfg)
    return cfg


def load_or_exit(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """``load_config`` for command lines: a bad config ends the program with its message, exit code 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            for f in dataclasses.fields(cfg)}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from hvd_megdet.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
