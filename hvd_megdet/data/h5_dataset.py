"""ShardedCocoDataset: COCO detection samples read from HDF5 shards (layout in ``h5_schema.py``).

Shards are opened lazily, read-only and without HDF5 locking, in the process that reads them: a
handle opened before DataLoader workers fork is never used by a worker (the pid is checked), and
pickling (spawn / forkserver workers) drops open handles. Open shards stay open in their process (up
to ``max_open_files``), so a persistent DataLoader worker opens each shard it reads once per run, even
under the global shuffle. Sizes and ids come from the manifest, so ``len``, ``image_ids`` and
``aspect_ratios()`` open no shard at all.

A shard that cannot be opened or read (missing, truncated, damaged, permission denied) raises
:class:`~hvd_megdet.errors.DataError` naming the shard file and the image id, in the main process or
in a DataLoader worker (torch re-raises it in the main process, still one line).

Targets follow torchvision's detection references: xyxy float32 boxes in pixels, int64 labels in
1..K (categories sorted by id; 0 is background), and COCO's own ``area``/``iscrowd``.
"""
from __future__ import annotations

import bisect
import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hvd_megdet.data import h5_schema as S
from hvd_megdet.errors import DataError

BACKGROUND_CATEGORY_ID = -1  # label_to_category_id[0]: no COCO category is background

# What h5py, HDF5 and Pillow raise for a file that is missing, truncated or damaged (h5py: OSError,
# KeyError for a missing dataset; Pillow: OSError, SyntaxError, ValueError for a broken image).
_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, SyntaxError, EOFError)

Transform = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _OpenShard:
    """One open shard with its small arrays read once, so a sample costs a single HDF5 read."""

    def __init__(self, path: Path) -> None:
        self.file = S.open_shard(path)
        try:
            f = self.file
            self.image_offsets = f[S.IMAGE_OFFSETS][:]
            self.ann_offsets = f[S.ANN_OFFSETS][:]
            self.bbox = f[S.ANN_BBOX][:]
            self.category_id = f[S.ANN_CATEGORY_ID][:]
            self.iscrowd = f[S.ANN_ISCROWD][:]
            self.area = f[S.ANN_AREA][:]
            self.data = f[S.IMAGE_DATA]
        except BaseException:
            self.file.close()  # opened but damaged inside: do not leak the handle
            raise

    def image_array(self, k: int) -> np.ndarray:
        """The stored file of image k as a uint8 array (one contiguous read)."""
        return self.data[self.image_offsets[k]:self.image_offsets[k + 1]]


class ShardedCocoDataset(torch.utils.data.Dataset):
    """A packed COCO split (see ``data_prep.coco_to_hdf5``).

    Args:
        path: the directory holding ``manifest.json`` and the shards.
        transforms: ``(image, target) -> (image, target)``, applied last (see ``transforms.py``).
        skip_crowd: leave crowd boxes out of training targets, as torchvision's detection reference
            does (the detector has no ignore regions); ``coco_gt()`` always keeps them for evaluation.
        max_open_files: shards kept open per process; least recently used ones are closed beyond it.
            COCO train2017 is 116 shards of 1024 (data_prep's default), so with the default 256 every
            shard a worker reads stays open for the whole run: one open per shard per persistent worker,
            whichever sampler. The bound only matters for splits of more than 256 shards (e.g. packed
            with --images-per-shard 256 or less), where it keeps a worker under a typical 1024-file
            descriptor limit; a global shuffle over more shards than this reopens some files.

    Raises:
        DataError: at construction, a missing or malformed split directory or manifest; when reading,
            a shard that cannot be opened or read (the message names the file and the image id).
    """

    def __init__(self, path: str | Path, transforms: Transform | None = None, skip_crowd: bool = True,
                 max_open_files: int = 256) -> None:
        self.root = Path(path)
        self.manifest = S.load_manifest(self.root)
        problem = S.manifest_count_problem(self.manifest)
        if problem:
            raise DataError(f"{self.root / S.MANIFEST_NAME}: malformed manifest: {problem}; repack the split")
        self.transforms = transforms
        self.skip_crowd = skip_crowd
        self.max_open_files = max_open_files
        shards = self.manifest[S.M_SHARDS]
        self.shard_files = [self.root / s[S.S_FILE] for s in shards]
        self.shard_sizes = [s[S.S_NUM_IMAGES] for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).tolist()
        self.image_ids = [i for s in shards for i in s[S.S_IMAGE_IDS]]
        self._widths = [w for s in shards for w in s[S.S_WIDTHS]]
        self._heights = [h for s in shards for h in s[S.S_HEIGHTS]]
        self.categories = self.manifest[S.M_CATEGORIES]
        category_ids = sorted(c["id"] for c in self.categories)
        self.label_to_category_id = (BACKGROUND_CATEGORY_ID, *category_ids)
        self.category_id_to_label = {cid: label for label, cid in enumerate(category_ids, start=1)}
        self.num_classes = len(category_ids) + 1
        self._label_of = np.zeros(max(category_ids) + 1, dtype=np.int64)  # category id -> label lookup
        self._label_of[category_ids] = np.arange(1, len(category_ids) + 1)
        self._pid: int | None = None
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()

    def __len__(self) -> int:
        return len(self.image_ids)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position inside the shard) of dataset index ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _shard(self, k: int) -> _OpenShard:
        if self._pid != os.getpid():
            # A forked worker inherits the parent's handles; HDF5 state must not cross fork, so start over.
            self._open = OrderedDict()
            self._pid = os.getpid()
        shard = self._open.get(k)
        if shard is None:
            shard = self._open[k] = _OpenShard(self.shard_files[k])
            while len(self._open) > self.max_open_files:
                self._open.popitem(last=False)[1].file.close()
        self._open.move_to_end(k)
        return shard

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        """Stored image size, from the manifest (torchvision's fast path for aspect grouping)."""
        return self._heights[index], self._widths[index]

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, in dataset order, without decoding anything."""
        return [w / h for w, h in zip(self._widths, self._heights)]

    def read_error(self, index: int | None, err: BaseException, shard: int | None = None) -> DataError:
        """The one-line error for dataset image ``index`` (or, with ``index`` None, for shard number
        ``shard`` as a whole) that could not be read because of ``err``."""
        k = self.locate(index)[0] if index is not None else shard
        what = f"image id {self.image_ids[index]}" if index is not None else "its image and annotation records"
        if isinstance(err, PermissionError):
            reason = "permission denied"
        elif isinstance(err, FileNotFoundError) or not os.path.exists(self.shard_files[k]):
            reason = "the file is missing"
        elif isinstance(err, UnidentifiedImageError):  # its text names a BytesIO object, not the image
            reason = "UnidentifiedImageError: the stored image bytes are not an image Pillow can read"
        else:
            text = str(err).strip().splitlines()
            reason = f"{type(err).__name__}: {text[0][:300] if text else '(no message)'}"
        return DataError(f"{self.shard_files[k]}: cannot read {what} ({reason}); "
                         f"check the split with: python -m data_prep verify {self.root}")

    def read_record(self, index: int) -> tuple[bytes, dict[str, Any], list[dict[str, Any]]]:
        """The original image file bytes, image entry and annotation entries (as in the source JSON)."""
        k, j = self.locate(index)
        try:
            shard = self._shard(k)
            a, b = shard.ann_offsets[j], shard.ann_offsets[j + 1]
            info = json.loads(shard.file[S.IMAGE_JSON].asstr()[j])
            anns = [json.loads(s) for s in shard.file[S.ANN_JSON].asstr()[a:b]] if b > a else []
            return shard.image_array(j).tobytes(), info, anns
        except _READ_ERRORS as err:
            raise self.read_error(index, err) from err

    @staticmethod
    def _decode(data: np.ndarray) -> torch.Tensor:
        """Image file bytes -> float CxHxW in [0, 1] (any format Pillow reads, as data_prep accepts).

        Like torchvision's ``pil_to_tensor(...).float()`` the result is a CHW view of HWC memory:
        converting without the transpose copy is the cheaper path, and every op downstream accepts it.
        """
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.array(im if im.mode == "RGB" else im.convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        """The target of ``index`` before transforms (no image decode)."""
        k, j = self.locate(index)
        try:
            return self._target(self._shard(k), index, j)
        except _READ_ERRORS as err:
            raise self.read_error(index, err) from err

    def _target(self, shard: _OpenShard, index: int, j: int) -> dict[str, torch.Tensor]:
        a, b = shard.ann_offsets[j], shard.ann_offsets[j + 1]
        height, width = self._heights[index], self._widths[index]
        keep = np.arange(a, b)
        if self.skip_crowd:
            keep = keep[shard.iscrowd[a:b] == 0]
        xyxy = shard.bbox[keep].copy()
        xyxy[:, 2:] += xyxy[:, :2]
        # COCO boxes may stick out by a fraction of a pixel (data_prep drops anything worse).
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
        valid = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        keep, xyxy = keep[valid], xyxy[valid]
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "boxes": torch.from_numpy(xyxy.astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(self._label_of[shard.category_id[keep]]),
            "image_id": torch.tensor(self.image_ids[index], dtype=torch.int64),
            "area": torch.from_numpy(shard.area[keep].astype(np.float32)),
            "iscrowd": torch.from_numpy(shard.iscrowd[keep].astype(np.int64)),
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(image float CxHxW in [0, 1], target), transformed if ``transforms`` was given."""
        k, j = self.locate(index)
        try:
            shard = self._shard(k)
            image = self._decode(shard.image_array(j))
            target = self._target(shard, index, j)
        except _READ_ERRORS as err:
            raise self.read_error(index, err) from err
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self) -> dict[str, Any]:
        """The split as a COCO ground-truth dict with the original values, for ``pycocotools.coco.COCO``.

        Opens each shard briefly (metadata only) and closes it again.
        """
        images, annotations = [], []
        for k, path in enumerate(self.shard_files):
            try:
                with S.open_shard(path) as f:
                    images += [json.loads(s) for s in f[S.IMAGE_JSON].asstr()[:]]
                    if len(f[S.ANN_JSON]):
                        annotations += [json.loads(s) for s in f[S.ANN_JSON].asstr()[:]]
            except _READ_ERRORS as err:
                raise self.read_error(None, err, shard=k) from err
        return {"info": self.manifest.get(S.M_INFO, {}), "licenses": self.manifest.get(S.M_LICENSES, []),
                "images": images, "annotations": annotations, "categories": self.categories}

    def close(self) -> None:
        """Close this process's open shards (they reopen on the next read)."""
        if self._pid == os.getpid():
            for shard in self._open.values():
                shard.file.close()
        self._open = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Open HDF5 handles do not pickle and must not travel to another process anyway.
        state = self.__dict__.copy()
        state["_open"], state["_pid"] = OrderedDict(), None
        return state
