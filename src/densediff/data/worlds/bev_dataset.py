"""The ``generated`` BEV dataset: a random road world per sample
(:mod:`densediff.data.worlds.roads`), seen by six ray-cast cameras and a simulated spinning
LiDAR (:mod:`densediff.data.worlds.raycast`).

Scenes are a pure function of ``(data.gen_seed, split, index)`` (:class:`GeneratedBEVDataset`;
counts from ``data.gen_num_{train,val,test}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from densediff.data.bev import BEVDataset, BEVRecord
from densediff.data.worlds.common import generated_items, scene_rng
from densediff.data.worlds.raycast import camera_rig, lidar_points, render_cameras
from densediff.data.worlds.roads import World, sample_world, world_extent

if TYPE_CHECKING:
    from densediff.config import DataConfig

__all__ = ["GeneratedBEVDataset"]


class GeneratedBEVDataset(BEVDataset):
    """Generated BEV worlds (see the module docstring) with the BEV pipelines.

    Sample ``index`` of ``split`` uses four independent streams spawned from
    ``scene_rng(data, split, index)``: the world (:func:`sample_world` with the label grid's
    :func:`world_extent`), the camera jitter (:func:`camera_rig`, cameras of
    ``data.bev.cameras``), the pixel noise (:func:`render_cameras` at
    ``data.bev.gen_image_size``) and, when ``data.bev.lidar``, the LiDAR sweep
    (:func:`lidar_points`). Counts come from ``data.gen_num_{train,val,test}``.

    Args:
        data: the ``data`` config section.
        split: train | val | test.
        train: training augmentation if True.
        seed: run seed of the augmentation RNG (scenes depend on ``data.gen_seed`` only).
    """

    def __init__(self, data: DataConfig, split: str, train: bool, seed: int = 0):
        self.items = generated_items(data, split)
        super().__init__(data, train, seed, name=f"generated/{split}")
        self.split = split

    def __len__(self) -> int:
        return len(self.items)

    def _streams(self, index: int) -> list[np.random.Generator]:
        return scene_rng(self.data, self.split, index).spawn(4)

    def world(self, index: int) -> World:
        """The world of sample ``index``."""
        return sample_world(self._streams(index)[0], world_extent(self.bev))

    def load(self, index: int) -> BEVRecord:
        world_rng, rig_rng, pixel_rng, lidar_rng = self._streams(index)
        world = sample_world(world_rng, world_extent(self.bev))
        size = tuple(self.bev.gen_image_size)
        intrinsics, cam2ego = camera_rig(size, rig_rng, self.bev.cameras)
        images = render_cameras(world, intrinsics, cam2ego, size, pixel_rng)
        points = lidar_points(world, lidar_rng) if self.bev.lidar else None
        return BEVRecord([Image.fromarray(img) for img in images], intrinsics, cam2ego,
                         world.geometry(), points, f"generated/{self.split}/{index:05d}")
