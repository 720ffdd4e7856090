"""The detector: torchvision Faster R-CNN on a ResNet FPN backbone, with MegDet's norm choices.

    model = build_model(cfg.model, dist, num_classes=dataset.num_classes, min_size=..., max_size=...)

Norm layers follow the paper's Table 3 through ``convert_norm``: frozen ImageNet statistics (16-base),
BN on each rank's own images ("local"), or CGBN over the ranks of ``dist.bn_process_set``. Stages that
``trainable_layers`` leaves frozen keep frozen BN whatever the mode, so they neither communicate nor
move their statistics. Sub-linear memory (Chen et al., arXiv 1604.06174) checkpoints each bottleneck
block through ``cgbn.checkpoint``, which keeps CGBN exact and collective-free on recomputation.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet import cgbn
from hvd_megdet.comm import DistContext
from hvd_megdet.config import ModelConfig

STAGES = ("layer1", "layer2", "layer3", "layer4")
RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
}


class CheckpointedStage(nn.Sequential):
    """A ResNet stage whose blocks are recomputed in backward instead of keeping their activations.

    A subclass of ``nn.Sequential`` with the same children, so state_dict keys do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.training and torch.is_grad_enabled():
                x = cgbn.checkpoint(block, x)
            else:
                x = block(x)
        return x


def load_backbone_weights(resnet: nn.Module, path: str) -> None:
    """Load a torchvision-format ResNet state dict from disk (compute nodes have no internet)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"model.backbone_weights: no such file {path}; on a machine with internet, "
            f"`python -m hvd_megdet.tools.fetch_weights --out {file.parent}` fetches torchvision's ImageNet ResNet-50 "
            f"(--arch resnet18/34/101 the others; copy the directory to nodes without internet), or set "
            f"model.backbone_weights=\"\" to start from random weights")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one holding more than tensors
        raise ValueError(f"model.backbone_weights: {path} is not a PyTorch state dict ({type(err).__name__})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone_weights: {path} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. ResNet-18 weights for a ResNet-50
        raise ValueError(f"model.backbone_weights: {path} does not fit {type(resnet).__name__}: {err}") from err
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{path}: not a torchvision {type(resnet).__name__} state dict "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _bn_set(mode: str, dist: DistContext):
    # "local" BN is CrossGPUBatchNorm2d without a process set rather than nn.BatchNorm2d: the same
    # statistics, but safe under sub-linear memory (nn.BatchNorm2d would update its running
    # statistics again when checkpointing recomputes the block).
    return dist.bn_process_set if mode == "cgbn" else None


def _norm_factory(mode: str, dist: DistContext):
    """A ``norm_layer(num_channels)`` callable for layers built fresh (FPN, box head)."""
    return functools.partial(cgbn.CrossGPUBatchNorm2d, process_set=_bn_set(mode, dist))


def build_backbone(cfg: ModelConfig, dist: DistContext) -> BackboneWithFPN:
    """ResNet + FPN with norm layers of ``cfg.norm`` in the trainable stages."""
    if not 0 <= cfg.trainable_layers <= 5:
        raise ValueError(f"model.trainable_layers must be in 0..5, got {cfg.trainable_layers}")
    if cfg.norm == "frozen" and (cfg.bn_in_fpn or cfg.bn_in_head):
        raise ValueError("model.bn_in_fpn / model.bn_in_head add trainable BN: they need model.norm "
                         "local or cgbn, not frozen")
    layer_mode = "frozen" if cfg.norm == "frozen" else "cgbn"  # see _bn_set
    resnet = RESNETS[cfg.backbone](weights=None, norm_layer=FrozenBatchNorm2d)
    if cfg.backbone_weights:
        load_backbone_weights(resnet, cfg.backbone_weights)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:cfg.trainable_layers]
    for name, param in resnet.named_parameters():
        param.requires_grad_(any(name.startswith(t) for t in trainable) or
                             (name.startswith("bn1") and "conv1" in trainable))
    for stage in STAGES:
        if stage in trainable:
            module = cgbn.convert_norm(getattr(resnet, stage), layer_mode, _bn_set(cfg.norm, dist), _prefix=stage)
            setattr(resnet, stage, module)
    if "conv1" in trainable:
        resnet.bn1 = cgbn.convert_norm(resnet.bn1, layer_mode, _bn_set(cfg.norm, dist), _prefix="bn1")
    if cfg.sublinear_memory:
        for stage in STAGES:
            setattr(resnet, stage, CheckpointedStage(*getattr(resnet, stage)))
    channels = resnet.layer4[-1].conv3.out_channels if hasattr(resnet.layer4[-1], "conv3") else 512
    in_channels = [channels // 8, channels // 4, channels // 2, channels]
    fpn_norm = _norm_factory(cfg.norm, dist) if cfg.bn_in_fpn else None
    return BackboneWithFPN(
        resnet, return_layers={s: str(i) for i, s in enumerate(STAGES)}, in_channels_list=in_channels,
        out_channels=256, extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)


TORCHVISION_BOX_FC_DIM = 1024  # FasterRCNN's own box head and predictor width


def build_model(cfg: ModelConfig, dist: DistContext, num_classes: int, *,
                min_size: int = 800, max_size: int = 1333) -> FasterRCNN:
    """Faster R-CNN with FPN, as in MegDet Sec. 4.

    Args:
        cfg: the model section of the run config.
        dist: where this rank sits; its BN process set is what CGBN reduces over.
        num_classes: foreground classes + 1 (background), from the dataset.
        min_size, max_size: the data pipeline's resize, given to the model too so that its own
            resize leaves already-resized images as they are.
    """
    backbone = build_backbone(cfg, dist)
    # torchvision builds the box head's predictor, 1024 wide (the paper's), after the RPN; it is built
    # here only for another width, so that a seed still initialises the default model as before.
    roi = (backbone.out_channels, 7, 7)  # MultiScaleRoIAlign's 7x7 output per FPN channel
    box_head = box_predictor = None
    if cfg.bn_in_head:
        box_head = FastRCNNConvFCHead(roi, [256, 256, 256, 256], [cfg.box_fc_dim],
                                      norm_layer=_norm_factory(cfg.norm, dist))
    elif cfg.box_fc_dim != TORCHVISION_BOX_FC_DIM:
        box_head = TwoMLPHead(roi[0] * roi[1] * roi[2], cfg.box_fc_dim)
    if cfg.box_fc_dim != TORCHVISION_BOX_FC_DIM:
        box_predictor = FastRCNNPredictor(cfg.box_fc_dim, num_classes)
    model = FasterRCNN(backbone, num_classes=None if box_predictor else num_classes, min_size=min_size,
                       max_size=max_size, box_head=box_head, box_predictor=box_predictor,
                       box_batch_size_per_image=cfg.box_batch_size_per_image)
    _name_collectives(model)
    return model


def _name_collectives(model: nn.Module) -> None:
    # Collective names must match across ranks: the module path is the same on every rank.
    for name, module in model.named_modules():
        if isinstance(module, cgbn.CrossGPUBatchNorm2d):
            module.collective_name = f"cgbn.{name}"


def count_norm_layers(model: nn.Module) -> dict[str, int]:
    """How many layers of each norm type the model holds (for logs and tests)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
