"""A built-in procedural dataset: textured shapes in front of a sky/ground scene.

Each scene has a wavy, tilted horizon splitting the background into ``sky`` (above) and
``ground`` (below), and 3-6 shapes (``disc``, ``square``, ``triangle``, ``ring``) of random
size, rotation and position, which may occlude each other; a ring's hole shows what is behind.
Every region, background or shape, is filled with a texture drawn from the *same*
distribution (random colour pair; flat, stripes, checkerboard, blobs or gradient), plus pixel
noise. So colour and texture say nothing about the class: a pixel's class can only be decided
from context: the outline of the region it belongs to (round, cornered, three-cornered,
holed) or, for the background, which side of the horizon it lies on.

Scenes are a pure function of ``(data.gen_seed, split, index)``; sizes come from
``data.gen_size`` and counts from ``data.gen_num_{train,val,test}``. A small CNN learns it on
CPU in a few minutes to well above chance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from densediff.data.datasets import SegDataset
from densediff.data.worlds.common import colour_pair, generated_items, scene_rng

if TYPE_CHECKING:
    from densediff.config import DataConfig

GENERATED_CLASSES = ["sky", "ground", "disc", "square", "triangle", "ring"]
GENERATED_PALETTE = [(70, 130, 180), (140, 100, 50), (220, 20, 60), (0, 160, 140),
                     (250, 190, 30), (150, 60, 200)]


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, unit: float
             ) -> np.ndarray:
    """A full-frame H x W x 3 float texture: two colours mixed by a random pattern."""
    c1, c2 = colour_pair(rng)
    kind = int(rng.integers(5))
    theta, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == 0:  # flat
        m = np.zeros_like(xx)
    elif kind == 1:  # stripes
        m = 0.5 + 0.5 * np.sin(2 * np.pi * u / (rng.uniform(3.0, 9.0) * unit) + phase)
    elif kind == 2:  # checkerboard
        p = rng.uniform(3.0, 8.0) * unit
        m = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float64)
    elif kind == 3:  # smooth blobs
        grid = torch.from_numpy(rng.random((1, 1, int(rng.integers(3, 7)), int(rng.integers(3, 7)))))
        m = F.interpolate(grid, size=xx.shape, mode="bicubic", align_corners=True)[0, 0].numpy()
        m = np.clip((m - m.min()) / (np.ptp(m) + 1e-6), 0.0, 1.0)
    else:  # linear gradient
        m = (u - u.min()) / (np.ptp(u) + 1e-6)
    return c1 + (c2 - c1) * m[..., None]


def _shape_mask(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of a shape of class ``cls`` with centre (cy, cx) and size ``r``."""
    dy, dx = yy - cy, xx - cx
    theta = rng.uniform(0.0, 2 * np.pi)
    name = GENERATED_CLASSES[cls]
    if name == "disc":
        return dx**2 + dy**2 <= r**2
    if name == "square":
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        return np.maximum(np.abs(u), np.abs(v)) <= 0.9 * r
    if name == "triangle":  # equilateral, circumradius 1.5 r (inradius half of that)
        inside = np.ones(xx.shape, bool)
        for k in range(3):
            a = theta + 2 * np.pi * k / 3
            inside &= dx * np.cos(a) + dy * np.sin(a) <= 0.75 * r
        return inside
    if name == "ring":
        outer = 1.1 * r
        inner = outer * rng.uniform(0.45, 0.6)
        d2 = dx**2 + dy**2
        return (d2 <= outer**2) & (d2 >= inner**2)
    raise ValueError(f"not a shape class: {cls}")


def render_scene(rng: np.random.Generator, size: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene of ``size`` (h, w) from ``rng``.

    Returns:
        (uint8 RGB image H x W x 3, int64 label H x W with ids into ``GENERATED_CLASSES``).
    """
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    unit = min(h, w) / 64.0
    # background: sky above a wavy, tilted horizon, ground below
    y0, amp = h * rng.uniform(0.3, 0.65), h * rng.uniform(0.02, 0.08)
    freq, phase, tilt = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.15)
    horizon = y0 + amp * np.sin(2 * np.pi * freq * xx / w + phase) + tilt * (xx - w / 2)
    label = np.where(yy < horizon, 0, 1).astype(np.int64)
    img = np.where((label == 0)[..., None], _texture(rng, yy, xx, unit),
                   _texture(rng, yy, xx, unit))
    # shapes, later ones in front
    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(2, len(GENERATED_CLASSES)))
        r = rng.uniform(0.11, 0.21) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        mask = _shape_mask(cls, rng, yy, xx, cy, cx, r)
        img[mask] = _texture(rng, yy, xx, unit)[mask]
        label[mask] = cls
    img += rng.normal(0.0, 5.0, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), label


class GeneratedDataset(SegDataset):
    """The procedural dataset (see the module docstring) with the usual pipelines.

    Args:
        data: the ``data`` config section (``gen_size``, ``gen_num_*``, ``gen_seed``, pipeline).
        split: train | val | test (each its own stream of scenes).
        train: training pipeline if True, else the test pipeline.
        seed: run seed for the augmentation RNG (scenes depend on ``data.gen_seed`` only).
    """

    def __init__(self, data: DataConfig, split: str, train: bool, seed: int = 0):
        super().__init__(generated_items(data, split), GENERATED_CLASSES,
                         np.asarray(GENERATED_PALETTE, np.uint8), None, data, train, seed,
                         name=f"generated/{split}")
        self.split = split

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        img, label = render_scene(scene_rng(self.data, self.split, index),
                                  tuple(self.data.gen_size))
        return img, label, self.files[index][0]
