"""The segmentation dataset class and the batch collate function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from densediff.data.bev import collate_bev
from densediff.data.classes import ColourMap, map_label
from densediff.data.io import check_same_size, read_image, read_label
from densediff.data.transforms import test_transform, to_tensor, train_transform

if TYPE_CHECKING:
    from densediff.config import DataConfig


class SegDataset(Dataset):
    """Image/label pairs read from disk, run through the train or test pipeline.

    Args:
        files: (image path, label path) pairs.
        class_names: the K class names (class id = position).
        palette: (K, 3) uint8 colours for visualisation.
        lut: raw label value -> class id / ignore index / ``INVALID``; see
            :func:`densediff.data.classes.label_lut` (None: raw values are used as they are).
        data: the ``data`` config section (pipeline, mean/std, ignore index).
        train: training pipeline (random resize/crop/flip/photometric, pad) if True, else the
            test pipeline (test-time resize; the label keeps its original size).
        seed: run seed; with an int item the augmentation RNG is ``default_rng([seed, index])``.
        name: dataset name for messages.
        colours: colour -> class id table of colour-coded (RGB) masks
            (:class:`~densediff.data.classes.ColourMap`; None: masks must hold class ids).

    Items are an int index or ``(index, seed)``; the RNG is then ``default_rng(seed)``. A
    sample is a dict: ``image`` float32 3 x H x W (normalised), ``label`` int64 H x W (class ids
    and ``ignore_index``), ``meta`` dict with ``path``, ``ori_size`` (h, w) of the original
    image, ``img_size`` (h, w) of the returned image, ``index`` and ``ignore_index``.
    """

    def __init__(self, files: Sequence[tuple[Path | str, Path | str | None]],
                 class_names: Sequence[str], palette: np.ndarray, lut: np.ndarray | None,
                 data: DataConfig, train: bool, seed: int = 0, name: str = "dataset",
                 colours: ColourMap | None = None):
        self.files = [(img, lab) for img, lab in files]
        self.colours = colours
        self.class_names = list(class_names)
        self.palette = np.asarray(palette, np.uint8).reshape(-1, 3)
        self.lut = lut
        self.data = data
        self.train = train
        self.seed = seed
        self.name = name
        self.num_classes = len(self.class_names)
        self.ignore_index = data.ignore_index
        if len(self.palette) != self.num_classes:
            raise ValueError(f"{name}: {len(self.palette)} colours for {self.num_classes} classes")

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        mode = "train" if self.train else "test"
        return (f"{type(self).__name__}({self.name}, {len(self)} images, "
                f"{self.num_classes} classes, {mode} pipeline)")

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """The untransformed sample: (uint8 RGB H x W x 3, int64 mapped label H x W, path).

        A pair without a label file gets a label that is all ``ignore_index``.

        Raises:
            DataError: unreadable image/label, size mismatch, or invalid label values.
        """
        img_path, lab_path = self.files[index]
        img = read_image(img_path)
        if lab_path is None:
            label = np.full(img.shape[:2], self.ignore_index, np.int64)
        else:
            label = read_label(lab_path, self.colours)
            if self.lut is not None:
                label = map_label(label, self.lut, lab_path)
            check_same_size(img_path, img.shape[:2], lab_path, label.shape)
        return img, label, str(img_path)

    def train_transform(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The training pipeline of one sample (a depth dataset overrides it)."""
        return train_transform(img, label, self.data, rng)

    def test_transform(self, img: np.ndarray) -> np.ndarray:
        """The test pipeline of one image (the label keeps its loaded size)."""
        return test_transform(img, self.data)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        if index < 0:
            index += len(self)
        img, label, path = self.load(index)
        ori_size = label.shape[:2]
        if self.train:
            rng = np.random.default_rng(seed if seed is not None else [self.seed, index])
            img, label = self.train_transform(img, label, rng)
        else:
            img = self.test_transform(img)
        return {
            "image": to_tensor(img),
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "meta": {"path": path, "ori_size": tuple(ori_size), "img_size": tuple(img.shape[:2]),
                     "index": index, "ignore_index": self.ignore_index},
        }


def to_device(x: torch.Tensor | dict[str, torch.Tensor], device: torch.device | str
              ) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch's ``image`` (a tensor, or the dict of a BEV sample) on ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def _pad_stack(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    """Stack tensors (... x H x W) padding each at the bottom/right to the largest H, W."""
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value)
                        for t in tensors])


def collate(batch: list[dict[str, Any]], ignore_index: int | None = None) -> dict[str, Any]:
    """Batch samples: ``image`` B x 3 x H x W, ``label`` B x H x W, ``meta`` list of dicts
    (BEV samples, whose ``image`` is a dict: :func:`densediff.data.bev.collate_bev`).

    Samples of different sizes are padded at the bottom/right to the largest one, images with
    0 and labels with ``ignore_index`` (default: the ``ignore_index`` in the samples' meta,
    else 255); ``meta[i]["img_size"]`` keeps each image's unpadded size.
    """
    if isinstance(batch[0]["image"], dict):  # BEV: several cameras, calibration, points
        return collate_bev(batch)
    if ignore_index is None:
        ignore_index = batch[0].get("meta", {}).get("ignore_index", 255)
    return {
        "image": _pad_stack([b["image"] for b in batch], 0.0),
        "label": _pad_stack([b["label"] for b in batch], ignore_index),
        "meta": [b.get("meta", {}) for b in batch],
    }
