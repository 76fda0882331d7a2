"""What every generated dataset shares: item names, the per-scene RNG and colour pairs.

The procedural datasets (:mod:`~densediff.data.worlds.shapes`, :mod:`~densediff.data.worlds.rooms`,
:mod:`~densediff.data.worlds.bev_dataset`) are pure functions of ``(data.gen_seed, split,
index)``: scene ``index`` of ``split`` draws everything from :func:`scene_rng`.
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np

from densediff.errors import DataError

if TYPE_CHECKING:
    from densediff.config import DataConfig

__all__ = ["SPLIT_CODES", "colour_pair", "generated_items", "scene_rng"]

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
"""The split code in :func:`scene_rng`'s seed."""


def colour_pair(rng: np.random.Generator, sat: tuple[float, float] = (0.25, 0.9),
                val: tuple[float, float] = (0.3, 0.95), hue_shift: float = 0.12,
                sat_mult: tuple[float, float] = (0.5, 1.3),
                val_mult: tuple[float, float] = (0.5, 1.4)) -> tuple[np.ndarray, np.ndarray]:
    """Two related colours (0..255): a random HSV one (saturation in ``sat``, value in
    ``val``) and a nearby variation of it (hue +- ``hue_shift``, saturation and value scaled
    by factors from ``sat_mult`` / ``val_mult``). Shared by the shape scenes and the depth rooms."""
    h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
    h2 = (h + rng.uniform(-hue_shift, hue_shift)) % 1.0
    s2 = float(np.clip(s * rng.uniform(*sat_mult), 0.0, 1.0))
    v2 = float(np.clip(v * rng.uniform(*val_mult), 0.1, 1.0))
    c1 = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0
    c2 = np.array(colorsys.hsv_to_rgb(h2, s2, v2)) * 255.0
    return c1, c2


def generated_items(data: DataConfig, split: str) -> list[tuple[str, None]]:
    """The item names of a generated split (``generated:<split>/<index>``, no files), shared
    by every generated dataset; ``data.gen_num_<split>`` of them."""
    if split not in SPLIT_CODES:
        raise DataError(f"generated dataset: split must be train, val or test (got {split!r})")
    return [(f"generated:{split}/{i:05d}", None) for i in range(getattr(data, f"gen_num_{split}"))]


def scene_rng(data: DataConfig, split: str, index: int) -> np.random.Generator:
    """The RNG of generated scene ``index`` of ``split``: ``default_rng([data.gen_seed, code,
    index])`` with code 0/1/2 for train/val/test."""
    return np.random.default_rng([data.gen_seed, SPLIT_CODES[split], index])
