"""Export a trained checkpoint as one file that plain torchvision rebuilds, without hvd_megdet.

    python -m hvd_megdet.tools.export --checkpoint runs/demo/checkpoints/ckpt_00000132.pt --out model.pt

The file is a dict that ``torch.load(path, weights_only=True)`` reads (tensors, strings, numbers,
lists and dicts only): "model" (the state dict), "backbone" (resnet18/34/50/101), "fpn_in_channels",
"bn_in_fpn", "bn_in_head", "box_fc_dim", "categories" ({"id", "name", ...} in label order: label i is
categories[i - 1]; COCO category ids, not labels, are what a results file holds), "min_size",
"max_size" and, for the record, "norm" and "config" (the training run's).

Norm layers: whatever the run trained with (frozen BN, per-rank BN, CGBN), a detector in eval mode
normalises with each layer's weight, bias and running statistics. Those four tensors are what is
exported, under torchvision's key names, and :data:`LOAD_SNIPPET` puts them into torchvision's
``FrozenBatchNorm2d``, which computes exactly eval-mode BN. ``num_batches_tracked`` (training-only
bookkeeping) is left out, so the state dict loads strictly. docs/after_training.md shows LOAD_SNIPPET, and
tests/test_export.py runs exactly it, with hvd_megdet made unimportable, and compares the rebuilt
model's detections with hvd_megdet's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from hvd_megdet.config import to_dict
from hvd_megdet.errors import UserError
from hvd_megdet.fileio import atomic_path
from hvd_megdet.tools.predict import Detector, load_detector

FORMAT = "hvd_megdet.export/1"

# The lines docs/after_training.md shows: a torchvision FasterRCNN from an exported file, with nothing of hvd_megdet.
LOAD_SNIPPET = """\
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

m = torch.load("model.pt", weights_only=True)
norm = FrozenBatchNorm2d  # eval-mode BN: the trained weight, bias and running statistics
resnet = getattr(torchvision.models, m["backbone"])(weights=None, norm_layer=norm)
backbone = BackboneWithFPN(resnet, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           m["fpn_in_channels"], 256, norm_layer=norm if m["bn_in_fpn"] else None)
fc = m.get("box_fc_dim", 1024)  # the box head's width (not in files exported before it could differ)
box_head = (FastRCNNConvFCHead((256, 7, 7), [256] * 4, [fc], norm_layer=norm) if m["bn_in_head"]
            else TwoMLPHead(256 * 7 * 7, fc))
model = FasterRCNN(backbone, box_head=box_head, box_predictor=FastRCNNPredictor(fc, len(m["categories"]) + 1),
                   min_size=m["min_size"], max_size=m["max_size"])
model.load_state_dict(m["model"])  # strict: every weight has its place
model.eval()
class_names = {label: c["name"] for label, c in enumerate(m["categories"], start=1)}
"""


def _plain(value: Any) -> Any:
    """Only what weights_only loading accepts: dicts, lists, str, int, float, bool, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def export_dict(detector: Detector) -> dict[str, Any]:
    """The exported file's contents (see the module docstring)."""
    model, cfg = detector.model, detector.config
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    return {
        "format": FORMAT,
        "model": state,
        "backbone": cfg.model.backbone,
        "fpn_in_channels": [int(block[0].in_channels) for block in model.backbone.fpn.inner_blocks],
        "bn_in_fpn": cfg.model.bn_in_fpn,
        "bn_in_head": cfg.model.bn_in_head,
        "box_fc_dim": cfg.model.box_fc_dim,
        "categories": [_plain({k: c[k] for k in ("id", "name", "supercategory") if k in c})
                       for c in detector.categories],
        "min_size": cfg.data.min_size,
        "max_size": cfg.data.max_size,
        "norm": cfg.model.norm,
        "config": _plain(to_dict(cfg)),
    }


def export(checkpoint_path: str | Path, out: str | Path, categories: str | Path | None = None) -> Path:
    """Write the export of ``checkpoint_path`` to ``out`` atomically, and read it back as a check."""
    exported = export_dict(load_detector(checkpoint_path, categories))
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(exported, tmp)
        torch.load(tmp, weights_only=True)  # what a user will do: refuse to publish a file that fails it
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by hvd_megdet.train")
    parser.add_argument("--out", required=True, help="the file to write, e.g. model.pt")
    parser.add_argument("--categories", default=None,
                        help="COCO json or shard directory with the class names (default: the training data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.categories)
    except (OSError, ValueError, UserError) as err:  # a bad checkpoint, categories file or disk: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}. Without hvd_megdet, torchvision rebuilds the detector with"
          f"{' (the file as model.pt)' if out.name != 'model.pt' else ''}:\n")
    print(LOAD_SNIPPET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
