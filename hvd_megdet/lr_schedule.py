"""The MegDet learning-rate policy as pure functions (no torch): scaling, warm-up, step decay.

MegDet (arXiv 1711.07240, Sec. 3.2 and 4) trains with SGD at ``r = 0.02`` for a mini-batch of 16
images and applies the linear scaling rule of Goyal et al. (arXiv 1706.02677) to other batches:
``r_hat = r * N / 16``, so 256 images train at 0.32. The paper counts N as every image that
contributes to one SGD step, hence :func:`global_batch_size` = images per rank x ranks x backward
passes per step.

Conventions used by every function here (the trainer calls :func:`lr_at` before each step):

* **Iterations are 0-based.** Iteration ``i`` is the ``i``-th optimizer step; training runs
  iterations ``0 .. total_iters - 1``. ``lr_at(i)`` is the LR that step ``i`` uses.
* **Warm-up** (paper: "begin with a small learning rate (e.g., r) ... increase the learning rate
  linearly after every iteration until it reaches r_hat"): ``lr_at(0) = r`` (the *un-scaled* base
  LR), ``lr_at(i) = r + (r_hat - r) * i / warmup_iters`` for ``i < warmup_iters``, and
  ``lr_at(warmup_iters) = r_hat``. ``warmup_iters = 0`` starts at ``r_hat`` directly.
* **Batches below the reference (N < 16, so r_hat < r) get no warm-up**: the LR is ``r_hat`` from
  iteration 0. Warm-up exists to start *small*; starting at the larger r and then lowering it would
  invert its purpose, and ``r_hat`` is already no larger than the LR the reference recipe starts at.
* **Epochs are 0-based and decays happen at epoch boundaries**, Detectron-style: "decreased at
  epoch 8 and 10 ... ends at epoch 11" means LR x0.1 once 8 full epochs are done (at iteration
  ``8 * iters_per_epoch``, the first step of 0-based epoch 8), x0.1 again after 10 full epochs,
  and training stops after 11 full epochs (``total_iters = 11 * iters_per_epoch``). The *long*
  policy decays x0.1 after 11 and 14 epochs, x0.5 after 17, and ends after 18.
* **Warm-up and decay compose multiplicatively** (as detectron2's ``WarmupMultiStepLR``): should a
  decay fall inside the warm-up (only in tiny smoke runs), the warm-up value is multiplied by it.
* **An epoch is what the trainer's samplers yield**: each rank takes ``ceil(num_images / W)``
  images (its share, padded by repetition so all ranks step together), cut into full batches of
  ``B`` images (``GroupedBatchSampler`` drops the partial one), and ``k`` batches make a step:
  ``iters_per_epoch = ceil(n / W) // B // k``. COCO train2017 at 2 images x 128 ranks: 462.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BASE_LR = 0.02  # paper, Sec. 4: "The base learning rate for batch size 16 is 0.02"
BASE_BATCH = 16
DEFAULT_WARMUP_ITERS = 500  # Detectron's default; the paper does not give a length


@dataclass(frozen=True)
class LRPolicy:
    """A step schedule measured in epochs.

    Attributes:
        decay_epochs: number of completed epochs after which each decay applies (ascending).
        decay_factors: the factor applied at each of ``decay_epochs`` (cumulative).
        total_epochs: training ends after this many completed epochs.
    """

    decay_epochs: tuple[int, ...]
    decay_factors: tuple[float, ...]
    total_epochs: int

    def __post_init__(self) -> None:
        if len(self.decay_epochs) != len(self.decay_factors):
            raise ValueError(f"LRPolicy: {len(self.decay_epochs)} decay_epochs but "
                             f"{len(self.decay_factors)} decay_factors")
        if list(self.decay_epochs) != sorted(set(self.decay_epochs)):
            raise ValueError(f"LRPolicy: decay_epochs must be strictly ascending, got {self.decay_epochs}")
        if any(e < 1 or e >= self.total_epochs for e in self.decay_epochs):
            raise ValueError(f"LRPolicy: decay_epochs {self.decay_epochs} must lie in "
                             f"[1, total_epochs={self.total_epochs})")
        if any(not 0 < f for f in self.decay_factors):
            raise ValueError(f"LRPolicy: decay_factors must be positive, got {self.decay_factors}")


# Paper, Sec. 4: the two training policies.
POLICIES: dict[str, LRPolicy] = {
    "normal": LRPolicy(decay_epochs=(8, 10), decay_factors=(0.1, 0.1), total_epochs=11),
    "long": LRPolicy(decay_epochs=(11, 14, 17), decay_factors=(0.1, 0.1, 0.5), total_epochs=18),
}


def get_policy(policy: str | LRPolicy) -> LRPolicy:
    """Return ``POLICIES[policy]`` (or ``policy`` itself if it already is an :class:`LRPolicy`)."""
    if isinstance(policy, LRPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown LR policy {policy!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[policy]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def global_batch_size(images_per_rank: int, world_size: int, backward_passes_per_step: int = 1) -> int:
    """Images that contribute to one SGD step: the N of the paper's linear scaling rule."""
    return (_check_int("images_per_rank", images_per_rank, 1)
            * _check_int("world_size", world_size, 1)
            * _check_int("backward_passes_per_step", backward_passes_per_step, 1))


def iters_per_epoch(num_images: int, images_per_rank: int, world_size: int,
                    backward_passes_per_step: int = 1) -> int:
    """Optimizer steps in one epoch, ``ceil(n / W) // B // k`` (see module docstring); at least 1."""
    _check_int("num_images", num_images, 1)
    per_rank = -(-num_images // _check_int("world_size", world_size, 1))
    steps = (per_rank // _check_int("images_per_rank", images_per_rank, 1)
             // _check_int("backward_passes_per_step", backward_passes_per_step, 1))
    if steps < 1:
        raise ValueError(f"{num_images} images give each of {world_size} ranks {per_rank}: not one step of "
                         f"{images_per_rank} images x {backward_passes_per_step} backward passes")
    return steps


def scaled_lr(global_batch: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
    """Linear scaling rule: ``base_lr * global_batch / base_batch`` (0.32 for 256 images)."""
    _check_int("global_batch", global_batch, 1)
    _check_int("base_batch", base_batch, 1)
    return _check_positive_float("base_lr", base_lr) * global_batch / base_batch


def total_iters(iters_per_epoch: int, policy: str | LRPolicy = "normal") -> int:
    """Number of optimizer steps of a whole run: ``total_epochs * iters_per_epoch``."""
    _check_int("iters_per_epoch", iters_per_epoch, 1)
    return get_policy(policy).total_epochs * iters_per_epoch


def decay_multiplier(iteration: int, iters_per_epoch: int, policy: str | LRPolicy = "normal") -> float:
    """Product of the decay factors whose epoch boundary ``iteration`` has reached."""
    p = get_policy(policy)
    multiplier = 1.0
    for epoch, factor in zip(p.decay_epochs, p.decay_factors):
        if iteration >= epoch * iters_per_epoch:
            multiplier *= factor
    return multiplier


def lr_at(
    iteration: int,
    *,
    global_batch: int,
    iters_per_epoch: int,
    policy: str | LRPolicy = "normal",
    warmup_iters: int = DEFAULT_WARMUP_ITERS,
    base_lr: float = BASE_LR,
    base_batch: int = BASE_BATCH,
) -> float:
    """The learning rate of optimizer step ``iteration`` (0-based).

    Args:
        iteration: the step about to be taken, ``0 <= iteration < total_iters(...)``.
        global_batch: images per SGD step over all ranks (:func:`global_batch_size`).
        iters_per_epoch: optimizer steps per epoch (:func:`iters_per_epoch`).
        policy: "normal", "long" or an :class:`LRPolicy`.
        warmup_iters: steps of linear warm-up from ``base_lr`` to the scaled LR (0: none).
        base_lr, base_batch: the reference recipe the scaling rule starts from.

    Returns:
        ``decay(iteration) * warm(iteration)``, where ``warm`` rises linearly from
        ``min(base_lr, r_hat)`` at iteration 0 to ``r_hat`` at ``warmup_iters`` and stays there.

    >>> lr_at(0, global_batch=256, iters_per_epoch=100, warmup_iters=10)
    0.02
    >>> lr_at(10, global_batch=256, iters_per_epoch=100, warmup_iters=10)
    0.32
    """
    _check_int("iters_per_epoch", iters_per_epoch, 1)
    _check_int("warmup_iters", warmup_iters, 0)
    target = scaled_lr(global_batch, base_lr, base_batch)
    end = total_iters(iters_per_epoch, policy)
    _check_int("iteration", iteration, 0)
    if iteration >= end:
        raise ValueError(f"iteration {iteration} is past the end of training: the {policy!r} policy "
                         f"runs iterations 0..{end - 1} ({iters_per_epoch} per epoch)")
    lr = target
    if iteration < warmup_iters:
        start = min(float(base_lr), target)  # r_hat < r: no warm-up (module docstring)
        lr = start + (target - start) * iteration / warmup_iters
    return lr * decay_multiplier(iteration, iters_per_epoch, policy)
