"""hvd_megdet.model in one process: every config builds, norm layers per mode, weights, sub-linear memory.

Reference counts come from torchvision's own modules (ResNet, FeaturePyramidNetwork, FastRCNNConvFCHead),
not from hvd_megdet. CGBN layers get a stand-in process set: building needs no Horovod, and the test can
then tell which layers would communicate.
"""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet.cgbn import CrossGPUBatchNorm2d
from hvd_megdet.comm import DistContext
from hvd_megdet.config import ModelConfig, load_config
from hvd_megdet.model import CheckpointedStage, build_backbone, build_model, count_norm_layers
from tests.mpirun import REPO_ROOT

NUM_CLASSES = 5
STAGES = ("layer1", "layer2", "layer3", "layer4")
RESNETS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
BN_SET = object()  # stands for the Horovod process set of this rank's BN group
CONFIG_NAMES = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))


def _kind(module: nn.Module) -> str | None:
    """Which Table 3 norm a layer implements: frozen, local (no communication) or cgbn (over BN_SET)."""
    if isinstance(module, FrozenBatchNorm2d):
        return "frozen"
    if isinstance(module, CrossGPUBatchNorm2d) and module.process_set is BN_SET:
        return "cgbn"
    if isinstance(module, nn.BatchNorm2d) and getattr(module, "process_set", None) is None:
        return "local"
    return None


def _kinds(module: nn.Module) -> list[str | None]:
    return [_kind(m) for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


def _bn_per_stage(backbone: str) -> dict[str, int]:
    """BatchNorm layers of a plain torchvision ResNet: 'conv1' (its bn1) and each of layer1..4."""
    resnet = RESNETS[backbone]()
    counts = {"conv1": 1}
    for stage in STAGES:
        counts[stage] = sum(isinstance(m, nn.BatchNorm2d) for m in getattr(resnet, stage).modules())
    return counts


def _stage_of(name: str) -> str:
    top = name.split(".")[0]
    return "conv1" if top in ("conv1", "bn1") else top


def _build(cfg: ModelConfig, **kwargs) -> nn.Module:
    return build_model(cfg, DistContext(bn_process_set=BN_SET), NUM_CLASSES, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Every config in configs/ builds
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds(name):
    cfg = load_config(REPO_ROOT / "configs" / name)
    m = cfg.model
    if m.backbone_weights and not Path(m.backbone_weights).is_file():
        # Table 3 rows point at ImageNet weights copied to the cluster; here the missing file is named.
        with pytest.raises(FileNotFoundError, match=re.escape(m.backbone_weights)):
            _build(m)
        m = dataclasses.replace(m, backbone_weights="")
    model = _build(m, min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:m.trainable_layers]
    expected = {}
    for stage, n in _bn_per_stage(m.backbone).items():
        kind = m.norm if stage in trained else "frozen"
        expected[kind] = expected.get(kind, 0) + n
    found = {}
    for kind in _kinds(model):
        found[kind] = found.get(kind, 0) + 1
    assert found == expected  # the FPN and head of these configs have no norm layers
    checkpointed = [s for s in STAGES if isinstance(getattr(model.backbone.body, s), CheckpointedStage)]
    assert checkpointed == (list(STAGES) if m.sublinear_memory else [])
    assert model.transform.min_size == (cfg.data.min_size,) and model.transform.max_size == cfg.data.max_size
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES


# ---------------------------------------------------------------------------------------------------
# Norm modes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["frozen", "local", "cgbn"])
def test_norm_mode_sets_every_backbone_layer(norm):
    model = _build(ModelConfig(backbone="resnet18", norm=norm))
    reference = sum(_bn_per_stage("resnet18").values())
    assert _kinds(model) == [norm] * reference
    names = {"frozen": "FrozenBatchNorm2d", "cgbn": "CrossGPUBatchNorm2d"}
    if norm in names:
        assert count_norm_layers(model) == {names[norm]: reference}
    assert sum(count_norm_layers(model).values()) == reference


@pytest.mark.parametrize("trainable_layers", [0, 3])
def test_frozen_stages_keep_frozen_bn_and_no_grad(trainable_layers):
    model = _build(ModelConfig(backbone="resnet18", norm="cgbn", trainable_layers=trainable_layers))
    body = model.backbone.body
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for name, module in body.named_modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            assert _kind(module) == ("cgbn" if _stage_of(name) in trained else "frozen"), name
    for name, param in body.named_parameters():
        assert param.requires_grad == (_stage_of(name) in trained), name
    # The FPN and the detection heads always train.
    for prefix in ("backbone.fpn.", "rpn.", "roi_heads."):
        params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        assert params and all(p.requires_grad for p in params), prefix
    counts = _bn_per_stage("resnet18")
    frozen = sum(n for s, n in counts.items() if s not in trained)
    assert _kinds(model).count("frozen") == frozen and _kinds(model).count("cgbn") == sum(counts.values()) - frozen


@pytest.mark.parametrize("norm", ["local", "cgbn"])
def test_bn_in_fpn_and_head_use_the_mode(norm):
    base = _kinds(_build(ModelConfig(backbone="resnet18", norm=norm)))
    model = _build(ModelConfig(backbone="resnet18", norm=norm, bn_in_fpn=True, bn_in_head=True))
    fpn_ref = FeaturePyramidNetwork([64, 128, 256, 512], 256, norm_layer=nn.BatchNorm2d)
    head_ref = FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    assert _kinds(model.backbone.fpn) == [norm] * len(_kinds(fpn_ref))
    assert _kinds(model.roi_heads.box_head) == [norm] * len(_kinds(head_ref))
    assert len(_kinds(fpn_ref)) == 8 and len(_kinds(head_ref)) == 4
    assert _kinds(model) == base + [norm] * 12
    fpn_only = _build(ModelConfig(backbone="resnet18", norm=norm, bn_in_fpn=True))
    assert len(_kinds(fpn_only)) == len(base) + 8 and not _kinds(fpn_only.roi_heads.box_head)


def test_cgbn_collective_names_are_module_paths():
    # Horovod matches collectives across ranks by name: every CGBN layer needs its own, the same everywhere.
    model = _build(ModelConfig(backbone="resnet18", norm="cgbn", bn_in_fpn=True, bn_in_head=True))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CrossGPUBatchNorm2d)]
    assert len(layers) == 32
    assert [m.collective_name for _, m in layers] == [f"cgbn.{n}" for n, _ in layers]


def test_default_box_head_is_torchvision_s_own_initialised_as_before():
    # box_fc_dim at its default builds no head of its own: FasterRCNN's, drawn from the seed in the same
    # order as a FasterRCNN given only the backbone (a seed's model is what it was before the knob).
    cfg = ModelConfig(backbone="resnet18", norm="frozen")
    torch.manual_seed(0)
    ours = build_model(cfg, DistContext(), NUM_CLASSES).state_dict()
    torch.manual_seed(0)
    ref = FasterRCNN(build_backbone(cfg, DistContext()), num_classes=NUM_CLASSES).state_dict()
    assert ours.keys() == ref.keys()
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor), name
    assert ours["roi_heads.box_head.fc6.weight"].shape == (1024, 256 * 7 * 7)


@pytest.mark.parametrize("bn_in_head", [False, True])
def test_box_fc_dim_sets_the_box_head_width(bn_in_head):
    # The images of _training_step at their own size (the default 800 px would upscale them 6x), and 64
    # sampled RoIs instead of 512 (the BN head's four convolutions run on every one).
    model = _build(ModelConfig(backbone="resnet18", norm="local", bn_in_head=bn_in_head, box_fc_dim=128,
                               box_batch_size_per_image=64), min_size=128, max_size=128)
    fcs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in fcs] == ([128] if bn_in_head else [128, 128])
    predictor = model.roi_heads.box_predictor
    assert (predictor.cls_score.in_features, predictor.cls_score.out_features) == (128, NUM_CLASSES)
    assert (predictor.bbox_pred.in_features, predictor.bbox_pred.out_features) == (128, 4 * NUM_CLASSES)
    losses, grads, _ = _training_step(model)  # trains: every head parameter gets a gradient
    assert all(torch.isfinite(v) for v in losses.values())
    assert {n for n, p in model.named_parameters() if n.startswith("roi_heads.")} <= grads.keys()


# ---------------------------------------------------------------------------------------------------
# Backbone weights
# ---------------------------------------------------------------------------------------------------
def _torchvision_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18()
    with torch.no_grad():  # statistics unlike a fresh layer's, so that loading them is visible
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return resnet.state_dict()


@pytest.mark.parametrize("norm, wrapped", [("frozen", False), ("cgbn", False), ("cgbn", True)])
def test_backbone_weights_are_loaded(tmp_path, norm, wrapped):
    state = _torchvision_resnet18_state(seed=3)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    torch.manual_seed(4)
    model = _build(ModelConfig(backbone="resnet18", norm=norm, trainable_layers=3, backbone_weights=str(path)))
    body = model.backbone.body.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue  # the detector has no classifier; frozen BN keeps no batch counter
        assert torch.equal(body[key], value), key
        compared += 1
    assert compared == len([k for k in body if not k.endswith("num_batches_tracked")])
    torch.manual_seed(4)
    fresh = _build(ModelConfig(backbone="resnet18", norm=norm, trainable_layers=3))
    assert not torch.equal(fresh.backbone.body.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("content", ["missing", "text", "tensor", "detector_keys", "wrong_shape"])
def test_wrong_backbone_weights_file_names_the_path(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "detector_keys":  # a whole detector's checkpoint instead of a ResNet's
        torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    elif content == "wrong_shape":  # e.g. ResNet-18 weights for a ResNet-50 config
        torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        _build(ModelConfig(backbone="resnet18", backbone_weights=str(path)))
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Sub-linear memory (activation checkpointing)
# ---------------------------------------------------------------------------------------------------
def _images_and_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g), torch.rand(3, 112, 128, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [40.0, 30.0, 120.0, 100.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 50.0]]), "labels": torch.tensor([3])}]
    return images, targets


def _training_step(model: nn.Module):
    model.train()
    images, targets = _images_and_targets()
    torch.manual_seed(1)  # the same RPN / RoI sampling in both models
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads, model.state_dict()


@pytest.mark.parametrize("norm", ["local", "cgbn"])
def test_sublinear_memory_gives_the_same_step(norm):
    # Checkpointing is the backbone's: a small box head (64 RoIs, 128 features) keeps the step cheap.
    small_head = {"box_batch_size_per_image": 64, "box_fc_dim": 128}
    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone="resnet18", norm=norm, **small_head), DistContext(), NUM_CLASSES,
                        min_size=128, max_size=128)
    ckpt = build_model(ModelConfig(backbone="resnet18", norm=norm, sublinear_memory=True, **small_head),
                       DistContext(), NUM_CLASSES, min_size=128, max_size=128)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    ckpt.load_state_dict(plain.state_dict())
    assert all(isinstance(getattr(ckpt.backbone.body, s), CheckpointedStage) for s in STAGES)

    losses_a, grads_a, state_a = _training_step(plain)
    losses_b, grads_b, state_b = _training_step(ckpt)
    assert losses_a.keys() == losses_b.keys()
    for k in losses_a:
        torch.testing.assert_close(losses_b[k], losses_a[k], rtol=1e-5, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    # Running statistics moved once (recomputation in backward must not update them again).
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    tracked = [v.item() for k, v in state_b.items() if k.endswith("num_batches_tracked")]
    assert tracked and set(tracked) == {1}


def test_sublinear_memory_keeps_state_dict_keys_resnet50():
    keys = {flag: list(build_model(ModelConfig(norm="cgbn", sublinear_memory=flag), DistContext(),
                                   NUM_CLASSES).state_dict()) for flag in (False, True)}
    assert keys[True] == keys[False]
