"""Detection transforms ``(image, target) -> (image, target)`` and the batch collate function.

MegDet (arXiv 1711.07240) trains FPN, whose input setting this is: the shorter side resized to 800
pixels with the longer side at most 1333, and random horizontal flips for training. Images are float
CxHxW tensors in [0, 1]; boxes are xyxy pixels and move with the image.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

Target = dict[str, torch.Tensor]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``min_size``, unless the longer side would
    exceed ``max_size``, in which case the longer side becomes ``max_size`` (aspect ratio kept)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ResizeShorterSide:
    """Bilinear resize (as torchvision's GeneralizedRCNNTransform) with boxes and area scaled to match.

    Args:
        min_size: target shorter side; a sequence picks one at random per image (multi-scale training).
        max_size: cap on the longer side.
    """

    def __init__(self, min_size: int | Sequence[int] = 800, max_size: int = 1333) -> None:
        self.min_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        # torch's RNG: DataLoader seeds it differently in every worker.
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))] if len(self.min_sizes) > 1 \
            else self.min_sizes[0]
        new_h, new_w = resized_shape(height, width, min_size, self.max_size)
        if (new_h, new_w) == (height, width):
            return image, target
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        sx, sy = new_w / width, new_h / height
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
        target["area"] = target["area"] * (sx * sy)
        target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShorterSide(min_size={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; x1' = W - x2 and x2' = W - x1."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(1).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def build_transforms(train: bool, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                     flip_prob: float = 0.5) -> Compose:
    """The paper's pipeline: resize (and, for training, a random horizontal flip).

    Args:
        train: add the flip.
        min_size, max_size: see :class:`ResizeShorterSide`.
        flip_prob: probability of flipping a training image.
    """
    transforms: list[Any] = [ResizeShorterSide(min_size, max_size)]
    if train and flip_prob > 0:
        transforms.append(RandomHorizontalFlip(flip_prob))
    return Compose(transforms)


def collate_fn(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Keep images of different sizes apart: the detector batches (and pads) them itself."""
    return [image for image, _ in batch], [target for _, target in batch]
