"""Ray hit tests shared by the procedural worlds' ray casters (the depth rooms of
:mod:`densediff.data.worlds.rooms` and the BEV cameras and LiDAR of
:mod:`densediff.data.worlds.raycast`).

Both casters are vectorised over rays and must stay bit-identical to what they always
produced (the generated datasets are pure functions of their seeds), so the two details in
which they differ are options here rather than a silent unification:

* ``reciprocal``: the BEV caster multiplies by ``1 / d`` (one division per axis), the rooms
  divide by ``d``; the results differ in the last bit.
* ``grazing``: a ray parallel to a slab whose origin lies exactly on one of its planes gives
  ``0 / 0 = nan`` for that plane. ``"miss"`` (rooms) takes the other plane's ``+-inf`` (the
  ray misses); ``"ignore"`` (BEV) ignores the slab (the ray may still hit another face).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["plane_hit", "slab_hit"]


def plane_hit(offset: np.ndarray | float, d: np.ndarray) -> np.ndarray:
    """Hit parameter ``t = offset / d`` of rays on an axis-aligned plane, where ``offset`` is
    the plane's coordinate minus the ray origin's and ``d`` the direction component along that
    axis (``+-inf``/``nan`` where the ray is parallel; floating-point warnings silenced)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return offset / d


def slab_hit(o: Sequence, dl: Sequence[np.ndarray], half: Sequence[float], *,
             reciprocal: bool = False, grazing: Literal["miss", "ignore"] = "miss"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab test of rays ``o + t dl`` against the axis-aligned box ``[-half, half]`` (all in
    the box frame).

    Args:
        o: the ray origin's 3 coordinates (scalars, or arrays broadcasting with ``dl``).
        dl: the 3 direction components, arrays of N rays (their dtype is kept).
        half: the box's 3 half-extents.
        reciprocal: compute ``(plane - o) * (1 / dl)`` instead of ``(plane - o) / dl``.
        grazing: how a ``nan`` plane parameter is treated (see the module docstring).

    Returns:
        ``(near, far, axis)``: entry and exit parameters (the box is hit where ``near <= far``
        and ``near`` is past the caller's minimum) and the int64 axis (0, 1, 2) of the slab
        the ray enters last, i.e. of the face hit (0 where no slab raised ``near`` above
        ``-inf``).
    """
    n = len(dl[0])
    dtype = np.result_type(dl[0])
    near, far = np.full(n, -np.inf, dtype), np.full(n, np.inf, dtype)
    axis = np.zeros(n, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            if reciprocal:
                inv = 1.0 / dl[k]
                t1, t2 = (-half[k] - o[k]) * inv, (half[k] - o[k]) * inv
            else:
                t1, t2 = (-half[k] - o[k]) / dl[k], (half[k] - o[k]) / dl[k]
            if grazing == "miss":
                lo = np.nan_to_num(np.fmin(t1, t2), nan=-np.inf)
                hi = np.nan_to_num(np.fmax(t1, t2), nan=np.inf)
                axis = np.where(lo > near, k, axis)
                near, far = np.maximum(near, lo), np.minimum(far, hi)
            else:
                lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)  # nan: the slab is ignored
                axis = np.where(lo > near, k, axis)
                near, far = np.fmax(near, lo), np.fmin(far, hi)
    return near, far, axis
