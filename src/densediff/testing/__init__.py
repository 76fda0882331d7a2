"""Helpers for tests and fixtures only: not part of the runtime library.

:mod:`densediff.testing.fixtures` writes tiny datasets in each real on-disk layout (CamVid,
ADE20K, Cityscapes, folder, KITTI, NYU, SUN RGB-D, nuScenes) for the test suite and for
benchmarks that need one on disk. Nothing under ``densediff`` outside this package imports it.
"""
