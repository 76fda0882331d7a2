"""Procedural worlds: the ``generated`` datasets, pure functions of ``(data.gen_seed, split,
index)``.

- :mod:`~densediff.data.worlds.common`: item names, the per-scene RNG, colour pairs;
- :mod:`~densediff.data.worlds.shapes`: textured shapes over a sky/ground scene
  (segmentation, :class:`~densediff.data.worlds.shapes.GeneratedDataset`);
- :mod:`~densediff.data.worlds.rooms`: ray-cast rooms with exact depth
  (:class:`~densediff.data.worlds.rooms.GeneratedDepthDataset`);
- :mod:`~densediff.data.worlds.roads`: random road layouts on a ground plane (BEV worlds);
- :mod:`~densediff.data.worlds.raycast`: their six cameras and spinning LiDAR;
- :mod:`~densediff.data.worlds.bev_dataset`: the generated BEV dataset
  (:class:`~densediff.data.worlds.bev_dataset.GeneratedBEVDataset`);
- :mod:`~densediff.data.worlds.geometry`: the ray/plane and ray/box hit tests shared by the
  two ray casters.

This package imports nothing itself, so :mod:`densediff.data.bev` can use the camera rig of
:mod:`~densediff.data.worlds.raycast` without loading the worlds.
"""
