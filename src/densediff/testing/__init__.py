"""Helpers for tests and fixtures only: not part of the runtime library.

:mod:`densediff.testing.fixtures` writes tiny datasets in each real on-disk layout (CamVid,
ADE20K, Cityscapes, folder, KITTI, NYU, SUN RGB-D, nuScenes) for the test suite and for
benchmarks that need one on disk. The rest is what the test modules share (none imports
another): :mod:`~densediff.testing.tiny` (override lists of the tiny runs),
:mod:`~densediff.testing.runs` (tiny configs, untrained checkpoints, run folders),
:mod:`~densediff.testing.models` (small models), :mod:`~densediff.testing.assertions`,
:mod:`~densediff.testing.spies` (denoiser call recording) and
:mod:`~densediff.testing.reference` (slow reference implementations).

Nothing under ``densediff`` outside this package imports it (the top layer of the
import-linter contract in ``pyproject.toml``).
"""
