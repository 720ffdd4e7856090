"""Resize and flip move boxes with the pixels; build_transforms and collate_fn."""
from __future__ import annotations

import pytest
import torch

from hvd_megdet.data import build_transforms, collate_fn
from hvd_megdet.data.transforms import RandomHorizontalFlip, ResizeShorterSide, resized_shape


def _sample(h: int = 60, w: int = 80) -> tuple[torch.Tensor, dict]:
    """An image with one bright rectangle, and its box."""
    image = torch.zeros(3, h, w)
    image[:, 10:30, 10:50] = 1.0  # rows 10..29, columns 10..49 -> xyxy box (10, 10, 50, 30)
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([2]),
              "area": torch.tensor([800.0]), "iscrowd": torch.tensor([0]), "image_id": torch.tensor(7),
              "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
    return image, target


def _bright_box(image: torch.Tensor) -> list[float]:
    rows = torch.nonzero(image[0] > 0.5)
    return [rows[:, 1].min().item(), rows[:, 0].min().item(), rows[:, 1].max().item() + 1, rows[:, 0].max().item() + 1]


@pytest.mark.parametrize("h, w, min_size, max_size, expected", [
    (480, 640, 800, 1333, (800, 1067)),  # COCO landscape: shorter side -> 800
    (640, 480, 800, 1333, (1067, 800)),  # portrait
    (400, 1200, 800, 1333, (444, 1333)),  # very wide: longer side capped at 1333
    (800, 1000, 800, 1333, (800, 1000)),  # already there
])
def test_resized_shape(h, w, min_size, max_size, expected):
    assert resized_shape(h, w, min_size, max_size) == expected


def test_resize_scales_boxes_area_and_size():
    image, target = _sample()
    out, t = ResizeShorterSide(120, 1000)(image, target)
    assert out.shape == (3, 120, 160) and t["size"].tolist() == [120, 160]
    assert t["orig_size"].tolist() == [60, 80]
    assert t["boxes"].tolist() == [[20.0, 20.0, 100.0, 60.0]]
    assert t["area"].tolist() == [3200.0]
    assert _bright_box(out) == pytest.approx(t["boxes"][0].tolist(), abs=1)
    assert target["boxes"].tolist() == [[10.0, 10.0, 50.0, 30.0]]  # input left alone


def test_resize_unequal_axis_ratios_from_rounding():
    image, target = _sample(61, 83)
    out, t = ResizeShorterSide(100, 1000)(image, target)
    sx, sy = out.shape[2] / 83, out.shape[1] / 61
    assert out.shape[1:] == (100, 136)
    torch.testing.assert_close(t["boxes"], torch.tensor([[10 * sx, 10 * sy, 50 * sx, 30 * sy]]))
    torch.testing.assert_close(t["area"], torch.tensor([800 * sx * sy]))


def test_multiscale_picks_from_the_list():
    torch.manual_seed(0)
    resize = ResizeShorterSide((64, 96), 1000)
    seen = {resize(*_sample())[0].shape[1] for _ in range(20)}
    assert seen == {64, 96}


def test_flip_moves_boxes_with_pixels():
    image, target = _sample()
    out, t = RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(out, image.flip(-1))
    assert t["boxes"].tolist() == [[80 - 50.0, 10.0, 80 - 10.0, 30.0]]
    assert _bright_box(out) == t["boxes"][0].tolist()
    back, t2 = RandomHorizontalFlip(1.0)(out, t)
    assert torch.equal(back, image) and torch.equal(t2["boxes"], target["boxes"])
    same, t3 = RandomHorizontalFlip(0.0)(image, target)
    assert same is image and t3 is target


def test_flip_probability():
    torch.manual_seed(0)
    flip = RandomHorizontalFlip(0.5)
    image, target = _sample()
    flips = sum(not torch.equal(flip(image, target)[0], image) for _ in range(400))
    assert 160 < flips < 240


def test_flip_of_no_boxes():
    image, target = _sample()
    target["boxes"] = torch.zeros(0, 4)
    assert RandomHorizontalFlip(1.0)(image, target)[1]["boxes"].shape == (0, 4)


def test_build_transforms():
    train, val = build_transforms(True, 96, 200), build_transforms(False, 96, 200)
    assert [type(t).__name__ for t in train.transforms] == ["ResizeShorterSide", "RandomHorizontalFlip"]
    assert [type(t).__name__ for t in val.transforms] == ["ResizeShorterSide"]
    torch.manual_seed(1)
    image, target = _sample()
    out, t = train(image, target)
    assert out.shape == (3, 96, 128) and _bright_box(out) == pytest.approx(t["boxes"][0].tolist(), abs=1)
    defaults = build_transforms(False).transforms[0]
    assert (defaults.min_sizes, defaults.max_size) == ((800,), 1333)


def test_collate_keeps_lists():
    a, b = _sample(), _sample(40, 30)
    images, targets = collate_fn([a, b])
    assert isinstance(images, list) and isinstance(targets, list)
    assert images[0] is a[0] and images[1].shape == (3, 40, 30) and targets[1] is b[1]
