"""Generated BEV worlds: random road layouts on a ground plane (the world of the ``generated``
BEV data; rendered by :mod:`densediff.data.worlds.raycast`, served by
:mod:`densediff.data.worlds.bev_dataset`).

Everything is in the ego frame (x forward, y left, z up, metres; the ground is ``z = 0``).
A world (:func:`sample_world`) around the ego vehicle covers a square of half-size ``1.5 *
extent + 20`` m, where ``extent`` is the largest coordinate of the label grid (25 m gives
+-57.5 m), and holds:

* **roads** (1-3): 6-12 m wide strips along a centreline that is straight or a
  constant-curvature arc (road 0 with probability 0.3, radius 60-160 m; others 0.15,
  80-200 m). Road 0 passes under the ego, heading
  within +-12 degrees of x, the ego in a right-hand lane. A second road crosses it at 35-145
  degrees (a junction within the label grid; with probability 0.3 only one side of it, a T
  junction) or, with probability 0.25, runs parallel 14+ m away; a third crosses road 0
  elsewhere. Where two centrelines cross, a junction disc (radius 0.6-0.85 x the wider road)
  rounds the corners with probability 0.5;
* **car parks** (0-2): rectangles 12-30 x 10-20 m beside a road, beyond its walkway, joined
  to it by a 4-6 m driveway, with white parking-bay lines. Roads, junction discs, car parks
  and driveways are the ``drivable_area`` (a car park is drivable, as in nuScenes);
* **walkways**: 2-4 m strips along road edges (0-0.5 m outside the road; each side has one
  with probability 0.8), cut into pieces by random 2-8 m gaps and wherever they would reach
  another road, a junction, a car park or a driveway;
* **dividers**: roads under 9 m have two lanes, wider ones four. The centre line is a dashed
  white, solid yellow or double yellow line; four-lane roads add dashed white lane lines at
  +-w/4; a narrow road is unmarked with probability 0.2. The ``divider`` map class is the
  continuous polyline of every such line (as nuScenes' road and lane dividers), ending where
  the line does: at other roads and before crossings. Some roads (0.5) also carry solid
  white edge lines, which are paint only (no map class);
* **pedestrian crossings**: 3-5 m deep rectangles across a road just outside a junction or
  mid-block, within the label grid, painted as zebra bars 0.45-0.6 m wide;
* **stop lines**: 0.4-0.6 m deep rectangles across the incoming (right-hand) half of the
  road 1-2.5 m before a crossing, each side with probability 0.7;
* **terrain**: grass or dirt with 4-12 patches of the other;
* **obstacles** (``obstacles=True``): 0-6 cars (boxes 3.8-5 x 1.7-2 x 1.4-1.9 m) in lanes
  at least 7 m from the ego, parked cars in a quarter of the car-park bays, and 0-5
  buildings (8-25 x 6-18 m footprints, 4-15 m high) beside roads beyond the walkways. They are not
  map classes but occlude the ground for the cameras and the LiDAR.

The ground paint is a material raster (0.1 m cells, each painted by the last polygon that
holds its centre: :func:`densediff.data.bev.polygon_cells`, the rule of the labels): grass,
dirt, asphalt, car-park asphalt, concrete, white paint, yellow paint. Every scene draws its
own colour per material (asphalt grey 70-115, paint brightness, grass hue, ...), modulated by
a smooth world-space texture (four sine waves of 0.8-13 m, fading with distance against
aliasing), so no class is one exact colour. Off the raster the ground is the base terrain.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from densediff.data.bev import MapGeometry, polygon_cells
from densediff.utils.grid import BEVGrid

if TYPE_CHECKING:
    from densediff.config import BEVDataConfig

__all__ = ["ASPHALT", "Box", "CONCRETE", "DIRT", "GRASS", "LOT", "MATERIALS", "REFLECTIVITY",
           "WHITE", "World", "YELLOW", "sample_world", "world_extent"]

MATERIALS = ("grass", "dirt", "asphalt", "lot", "concrete", "white_paint", "yellow_paint")
"""Ground materials of the paint raster (indices into ``World.palette``)."""
GRASS, DIRT, ASPHALT, LOT, CONCRETE, WHITE, YELLOW = range(len(MATERIALS))
REFLECTIVITY = np.array([30.0, 22.0, 8.0, 10.0, 35.0, 110.0, 90.0])
"""Mean LiDAR intensity (nuScenes scale 0..255) per material."""


# --------------------------------------------------------------------------------------------
# the world


@dataclass
class Box:
    """An obstacle standing on the ground: a box yawed about z."""

    centre: np.ndarray
    """(x, y) of the footprint centre."""
    size: np.ndarray
    """(length along the yaw direction, width, height)."""
    yaw: float
    """Radians, about z."""
    colour: np.ndarray
    """RGB 0..255."""
    kind: str = "car"
    """car | building (buildings get windows)."""
    reflectivity: float = 40.0


def _default_palette() -> np.ndarray:
    return np.array([[70, 120, 50], [130, 105, 75], [95, 95, 98], [85, 85, 90], [170, 168, 160],
                     [230, 230, 225], [220, 185, 60]], np.float64)


@dataclass
class World:
    """A ground-plane scene in the ego frame (see the module docstring).

    The paint is ``material`` (X x Y uint8 indices into ``palette``): cell ``[ix, iy]`` covers
    ``[ox + ix res, ox + (ix + 1) res) x [oy + iy res, oy + (iy + 1) res)`` for ``origin =
    (ox, oy)``; outside it the ground is ``far_material``. A hit's colour is ``palette[m] * (1 +
    texture[m] * w(x, y))`` with ``w`` the mean of the sine ``waves`` (K x 3 rows (kx, ky,
    phase)), in [-1, 1].
    """

    material: np.ndarray
    origin: tuple[float, float]
    res: float
    palette: np.ndarray = field(default_factory=_default_palette)
    """M x 3 colours (0..255) of the materials."""
    texture: np.ndarray | None = None
    """M texture amplitudes (None: flat colours)."""
    reflectivity: np.ndarray = field(default_factory=lambda: REFLECTIVITY.copy())
    """M mean LiDAR intensities."""
    far_material: int = GRASS
    map: MapGeometry = field(default_factory=MapGeometry)
    boxes: list[Box] = field(default_factory=list)
    sky_horizon: np.ndarray = field(default_factory=lambda: np.array([205.0, 214.0, 224.0]))
    sky_zenith: np.ndarray = field(default_factory=lambda: np.array([85.0, 135.0, 205.0]))
    haze: float = math.inf
    """E-folding distance (m) of the fade into ``sky_horizon``; inf: no haze."""
    exposure: float = 1.0
    sun: np.ndarray = field(default_factory=lambda: np.array([0.4, 0.3, 0.866]))
    """Unit vector towards the sun (box shading)."""
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    def geometry(self) -> MapGeometry:
        """The vector map (polygons per class; ``divider`` lines), a copy."""
        return self.map.transformed(np.eye(3))

    def material_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Material index of the ground at points (x, y) (nearest cell)."""
        nx, ny = self.material.shape
        ix = np.floor((np.asarray(x) - self.origin[0]) * (1.0 / self.res)).astype(np.int32)
        iy = np.floor((np.asarray(y) - self.origin[1]) * (1.0 / self.res)).astype(np.int32)
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        m = self.material.ravel()[np.where(inside, ix * ny + iy, 0)]
        return np.where(inside, m, np.uint8(self.far_material))

    def ground_colour(self, x: np.ndarray, y: np.ndarray, dist: np.ndarray | None = None
                      ) -> np.ndarray:
        """N x 3 float32 colour of the ground at points (x, y), before exposure and haze. With
        ``dist`` (metres from the viewer) the texture fades out with distance (a crude
        mip-map against aliasing): its amplitude is divided by ``1 + (dist / 20)^2``."""
        m = self.material_at(x, y)
        colour = self.palette.astype(np.float32)[m]
        if self.texture is not None and len(self.waves):
            w = np.zeros(len(m), np.float32)
            for kx, ky, phase in self.waves.astype(np.float32):
                w += np.sin(kx * x + ky * y + phase)
            amp = np.asarray(self.texture, np.float32)[m] / len(self.waves)
            if dist is not None:
                amp /= 1.0 + (dist / 20.0) ** 2
            colour *= (1.0 + amp * w)[:, None]
        return colour


def world_extent(bev: BEVDataConfig) -> float:
    """The ``extent`` of :func:`sample_world` for a label grid: its largest coordinate."""
    return float(max(abs(v) for v in (*bev.xbound[:2], *bev.ybound[:2])))


# --------------------------------------------------------------------------------------------
# layout helpers


def _runs(mask: np.ndarray, s: np.ndarray, min_len: float) -> list[tuple[float, float]]:
    """(start, end) arclengths of the runs of consecutive True in ``mask`` sampled at ``s``,
    at least ``min_len`` long."""
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    starts, ends = np.flatnonzero(np.diff(m) == 1), np.flatnonzero(np.diff(m) == -1) - 1
    return [(s[a], s[b]) for a, b in zip(starts, ends) if s[b] - s[a] >= min_len]


@dataclass
class _Road:
    """A road along a centreline of constant curvature ``kappa`` (0: straight) through ``p0``
    with direction ``heading`` there; arclength ``s`` runs over [-length / 2, length / 2], or
    [0, length / 2] for a road that ``starts`` at ``p0`` (the stem of a T junction)."""

    p0: np.ndarray
    heading: float
    kappa: float
    length: float
    width: float
    lanes: int
    starts: bool = False

    @property
    def s0(self) -> float:
        return 0.0 if self.starts else -self.length / 2

    @property
    def s1(self) -> float:
        return self.length / 2

    def at(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points and unit left normals at arclengths ``s``."""
        s = np.atleast_1d(np.asarray(s, np.float64))
        th = self.heading + self.kappa * s
        if self.kappa == 0.0:
            p = self.p0 + s[:, None] * np.array([math.cos(self.heading), math.sin(self.heading)])
        else:
            p = self.p0 + np.stack([np.sin(th) - math.sin(self.heading),
                                    math.cos(self.heading) - np.cos(th)], 1) / self.kappa
        return p, np.stack([-np.sin(th), np.cos(th)], 1)

    def project(self, pts: np.ndarray) -> np.ndarray:
        """Arclengths of the centreline points nearest to ``pts`` (N x 2)."""
        n0 = np.array([-math.sin(self.heading), math.cos(self.heading)])
        if self.kappa == 0.0:
            s = (pts - self.p0) @ np.array([n0[1], -n0[0]])
        else:
            q = pts - (self.p0 + n0 / self.kappa)  # relative to the centre of curvature
            phi0 = self.heading - math.copysign(math.pi / 2, self.kappa)
            dphi = (np.arctan2(q[:, 1], q[:, 0]) - phi0 + math.pi) % (2 * math.pi) - math.pi
            s = dphi / self.kappa
        return np.clip(s, self.s0, self.s1)

    def distance(self, pts: np.ndarray) -> np.ndarray:
        """Distance of points (N x 2) to the centreline."""
        return np.linalg.norm(pts - self.at(self.project(pts))[0], axis=1)

    def samples(self, s0: float, s1: float, step: float = 1.0) -> np.ndarray:
        """Arclengths from ``s0`` to ``s1`` (both included) about ``step`` apart."""
        return np.linspace(s0, s1, max(2, int(math.ceil((s1 - s0) / step)) + 1))

    def line(self, s0: float, s1: float, offset: float) -> np.ndarray:
        """The polyline at lateral ``offset`` (left positive) from ``s0`` to ``s1``."""
        p, n = self.at(self.samples(s0, s1, 1.0 if self.kappa else s1 - s0))
        return p + offset * n

    def strip(self, s0: float, s1: float, o0: float, o1: float) -> np.ndarray:
        """Polygon between lateral offsets ``o0`` and ``o1`` from ``s0`` to ``s1``."""
        return np.concatenate([self.line(s0, s1, o0), self.line(s0, s1, o1)[::-1]])

    def ego_s(self) -> float:
        """Arclength of the centreline point nearest the ego."""
        return float(self.project(np.zeros((1, 2)))[0])


@dataclass
class _Rect:
    centre: np.ndarray
    axes: np.ndarray
    """2 x 2 rows: unit axis u, unit axis v."""
    half: np.ndarray

    def polygon(self) -> np.ndarray:
        c = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * self.half
        return self.centre + c @ self.axes

    def distance(self, pts: np.ndarray) -> np.ndarray:
        """0 inside, else the distance to the rectangle."""
        local = np.abs((pts - self.centre) @ self.axes.T) - self.half
        return np.linalg.norm(np.maximum(local, 0.0), axis=1)


def _rect_on_road(road: _Road, s: float, side: int, along: tuple[float, float],
                  offset: tuple[float, float]) -> _Rect:
    """A rectangle aligned with ``road`` at ``s``: ``along`` (a0, a1) metres along its tangent,
    lateral ``offset`` (o0, o1) metres on ``side`` (+1 left, -1 right)."""
    p, n = road.at(s)
    p, n = p[0], n[0] * side
    t = np.array([n[1], -n[0]]) * side  # the road tangent
    centre = p + t * (along[0] + along[1]) / 2 + n * (offset[0] + offset[1]) / 2
    return _Rect(centre, np.stack([t, n]),
                 np.array([(along[1] - along[0]) / 2, (offset[1] - offset[0]) / 2]))


def _disc(centre: np.ndarray, r: float, n: int = 32) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + r * np.stack([np.cos(a), np.sin(a)], 1)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


class _Layout:
    """Builds one world; holds the drivable pieces so later elements can avoid them."""

    def __init__(self, rng: np.random.Generator, extent: float, half: float, obstacles: bool):
        self.rng, self.extent, self.half, self.obstacles = rng, extent, half, obstacles
        self.roads: list[_Road] = []
        self.junctions: list[tuple[np.ndarray, float]] = []
        self.lots: list[_Rect] = []
        self.driveways: list[_Rect] = []
        self.crossings: list[tuple[int, float, float, float, float]] = []
        """(road, s0, s1, lines before, lines after): ends of the crossing and of its stop lines."""
        self.buildings: list[_Rect] = []
        self.polys: dict[str, list[np.ndarray]] = {k: [] for k in (
            "drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area")}
        self.dividers: list[np.ndarray] = []
        self.paint: list[tuple[int, np.ndarray]] = []
        """(material, polygon) drawn over the base layers, in order."""
        self.boxes: list[Box] = []

    # -- queries

    def drivable_distance(self, pts: np.ndarray, skip_road: int | None = None) -> np.ndarray:
        """Distance from points to the nearest drivable surface (0 inside), ignoring the road
        ``skip_road``."""
        d = np.full(len(pts), np.inf)
        for i, road in enumerate(self.roads):
            if i != skip_road:
                d = np.minimum(d, np.maximum(road.distance(pts) - road.width / 2, 0))
        for c, r in self.junctions:
            d = np.minimum(d, np.maximum(np.linalg.norm(pts - c, axis=1) - r, 0))
        for rect in self.lots + self.driveways:
            d = np.minimum(d, rect.distance(pts))
        return d

    def in_focus(self, p: np.ndarray, scale: float = 1.0) -> np.ndarray:
        return np.abs(p).max(-1) < self.extent * scale

    # -- roads

    def add_roads(self) -> None:
        rng, half = self.rng, self.half
        length = 2.9 * half
        w0 = rng.uniform(6.0, 12.0)
        lanes0 = 2 if w0 < 9.0 else 4
        heading = math.radians(rng.uniform(-12.0, 12.0))
        lane_centre = w0 / 4 if lanes0 == 2 else w0 / 8 * rng.choice([1, 3])
        lat = lane_centre + rng.uniform(-0.4, 0.4)  # the ego drives right of the centreline
        p0 = lat * np.array([-math.sin(heading), math.cos(heading)])
        kappa = 0.0
        if rng.random() < 0.3:
            kappa = rng.choice([-1, 1]) / rng.uniform(60.0, 160.0)
            length = min(length, 1.5 * math.pi / abs(kappa))
        self.roads.append(_Road(p0, heading, kappa, length, w0, lanes0))
        n_more = int(rng.choice([0, 1, 2], p=[0.25, 0.45, 0.3]))
        used: list[float] = []
        for k in range(n_more):
            w = rng.uniform(6.0, 12.0)
            lanes = 2 if w < 9.0 else 4
            if k == 0 and rng.random() < 0.25:  # a parallel street
                off = rng.choice([-1, 1]) * ((w0 + w) / 2 + rng.uniform(14.0, max(15.0, 0.9 * self.extent)))
                h = heading + math.radians(rng.uniform(-8.0, 8.0))
                p = off * np.array([-math.sin(heading), math.cos(heading)])
                self.roads.append(_Road(p, h, 0.0, 2.9 * half, w, lanes))
                continue
            road0 = self.roads[0]
            for _ in range(10):  # a crossing road, its junction apart from the others
                s = road0.ego_s() + rng.uniform(-0.8, 0.8) * self.extent
                if all(abs(s - u) > 15.0 + w0 for u in used):
                    break
            used.append(s)
            p, n = road0.at(s)
            t = np.array([n[0, 1], -n[0, 0]])
            h = math.atan2(t[1], t[0]) + math.radians(rng.uniform(35.0, 145.0))
            kap = 0.0 if rng.random() < 0.85 else rng.choice([-1, 1]) / rng.uniform(80.0, 200.0)
            ln = 2.9 * half if kap == 0.0 else min(2.9 * half, 1.5 * math.pi / abs(kap))
            self.roads.append(_Road(p[0], h, kap, ln, w, lanes, starts=bool(rng.random() < 0.3)))
        for i in range(len(self.roads)):
            for j in range(i + 1, len(self.roads)):
                for c in self._crossing_points(self.roads[i], self.roads[j]):
                    if rng.random() < 0.5:
                        r = max(self.roads[i].width, self.roads[j].width) * rng.uniform(0.6, 0.85)
                        self.junctions.append((c, r))

    @staticmethod
    def _crossing_points(a: _Road, b: _Road) -> list[np.ndarray]:
        """Intersections of two centrelines (as polylines with 2 m segments)."""
        pa, pb = a.at(a.samples(a.s0, a.s1, 2.0))[0], b.at(b.samples(b.s0, b.s1, 2.0))[0]
        p, r = pa[:-1], np.diff(pa, axis=0)
        q, s = pb[:-1], np.diff(pb, axis=0)
        cross = r[:, None, 0] * s[None, :, 1] - r[:, None, 1] * s[None, :, 0]
        qp = q[None] - p[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (qp[..., 0] * s[None, :, 1] - qp[..., 1] * s[None, :, 0]) / cross
            u = (qp[..., 0] * r[:, None, 1] - qp[..., 1] * r[:, None, 0]) / cross
        ii, jj = np.nonzero((t >= 0) & (t < 1) & (u >= 0) & (u < 1))
        return [p[i] + t[i, j] * r[i] for i, j in zip(ii, jj)]

    # -- elements on roads

    def add_crossings(self) -> None:
        rng = self.rng
        for ri, road in enumerate(self.roads):
            s = road.samples(road.s0, road.s1, 0.5)
            p, _ = road.at(s)
            blocked = self.drivable_distance(p, skip_road=ri) < road.width / 2
            cands = []  # (start, depth)
            for a, b in _runs(blocked, s, 0.0):  # junction intervals: exits on both sides
                depth = rng.uniform(3.0, 5.0)
                cands.append((b + rng.uniform(1.0, 3.0), depth))
                cands.append((a - rng.uniform(1.0, 3.0) - depth, depth))
            if rng.random() < 0.3:
                cands.append((road.ego_s() + rng.uniform(-0.8, 0.8) * self.extent,
                              rng.uniform(3.0, 5.0)))
            for c0, depth in cands:
                if rng.random() < 0.5:
                    self._try_crossing(ri, c0, depth)

    def _try_crossing(self, ri: int, c0: float, depth: float) -> None:
        """A crossing over ``[c0, c0 + depth]`` of road ``ri`` with its stop lines, unless it
        would leave the label area, touch another road or come near another crossing."""
        rng, road = self.rng, self.roads[ri]
        c1, w = c0 + depth, road.width
        if c0 < road.s0 or c1 > road.s1:
            return
        mid, _ = road.at((c0 + c1) / 2)
        if not self.in_focus(mid[0]):
            return
        grid = np.stack(np.meshgrid(road.samples(c0 - 0.5, c1 + 0.5, 0.5),
                                    np.linspace(-w / 2, w / 2, 7)), -1).reshape(-1, 2)
        pts = road.at(grid[:, 0])
        pts = pts[0] + grid[:, 1:] * pts[1]
        if (self.drivable_distance(pts, skip_road=ri) < 0.5).any():
            return
        if any(r == ri and c0 < e1 + 4.0 and c1 > e0 - 4.0 for r, e0, e1, _, _ in self.crossings):
            return
        self.polys["ped_crossing"].append(road.strip(c0, c1, -w / 2, w / 2))
        bar, gap = rng.uniform(0.45, 0.6), rng.uniform(0.45, 0.8)
        o = -w / 2 + rng.uniform(0.1, 0.4)
        while o + bar <= w / 2 - 0.1:
            self.paint.append((WHITE, road.strip(c0 + 0.15, c1 - 0.15, o, o + bar)))
            o += bar + gap
        before, after = c0 - 0.5, c1 + 0.5
        for sign in (-1, 1):  # stop line before (right half) / after (left half) the crossing
            if rng.random() >= 0.7:
                continue
            gap_s, t = rng.uniform(1.0, 2.5), rng.uniform(0.4, 0.6)
            a, b = (c0 - gap_s - t, c0 - gap_s) if sign < 0 else (c1 + gap_s, c1 + gap_s + t)
            lo, hi = (-w / 2, 0.0) if sign < 0 else (0.0, w / 2)
            poly = road.strip(a, b, lo, hi)
            if (self.drivable_distance(poly, skip_road=ri) < 0.3).any():
                continue
            self.polys["stop_line"].append(poly)
            self.paint.append((WHITE, poly))
            before, after = (a - 0.3, after) if sign < 0 else (before, b + 0.3)
        self.crossings.append((ri, c0, c1, before, after))

    def add_lots(self) -> None:
        rng = self.rng
        n = int(rng.choice([0, 1, 2], p=[0.3, 0.45, 0.25]))
        for _ in range(30):
            if len(self.lots) >= n:
                break
            placed = self._roadside_rect(0.9, 15.0, (12.0, 30.0), (10.0, 20.0), (4.5, 6.0))
            if placed is None:
                continue
            lot, pts, road, side, s, length, depth, near = placed
            if not self.in_focus(lot.centre, 1.3):
                continue
            if (self.drivable_distance(pts) < 1.5).any():
                continue
            a = rng.uniform(-length / 2 + 3.0, length / 2 - 3.0)
            dw = rng.uniform(4.0, 6.0)
            drive = _rect_on_road(road, s, side, (a - dw / 2, a + dw / 2),
                                  (road.width / 2 - 0.2, near + 0.5))
            self.lots.append(lot)
            self.driveways.append(drive)
            self.polys["carpark_area"].append(lot.polygon())
            self._bays(lot, depth)

    def _roadside_rect(self, spread: float, margin: float, length: tuple[float, float],
                       depth: tuple[float, float], gap: tuple[float, float]):
        """A random rectangle beside a random road (car park, building): at arc length within
        ``spread`` x extent of the ego's, at least ``margin`` m from the road's ends, ``length``
        along and ``depth`` across the road, ``gap`` m beyond its edge. Returns ``(rect, 7 x 7
        sample points of it, road, side, s, length, depth, near)``, or None when the arc length
        falls too near an end."""
        rng = self.rng
        road = self.roads[int(rng.integers(len(self.roads)))]
        side = int(rng.choice([-1, 1]))
        s = road.ego_s() + rng.uniform(-spread, spread) * self.extent
        if not road.s0 + margin < s < road.s1 - margin:
            return None
        ln, dp = rng.uniform(*length), rng.uniform(*depth)
        near = road.width / 2 + rng.uniform(*gap)
        rect = _rect_on_road(road, s, side, (-ln / 2, ln / 2), (near, near + dp))
        u, v = np.meshgrid(np.linspace(-1, 1, 7), np.linspace(-1, 1, 7))
        pts = rect.centre + (np.stack([u.ravel(), v.ravel()], 1) * rect.half) @ rect.axes
        return rect, pts, road, side, s, ln, dp, near

    def _bays(self, lot: _Rect, depth: float) -> None:
        """Parking-bay lines across the far edge (and the near edge of deep lots), and maybe
        parked cars."""
        rng = self.rng
        pitch, lw = rng.uniform(2.4, 2.8), rng.uniform(0.12, 0.18)
        (hu, hv), (u, v) = lot.half, lot.axes
        # rows of 5 m deep bays: (lateral start of the bays, lateral position of their aisle edge)
        rows = [(hv - 5.0, hv - 5.0)] + ([(-hv, 5.0 - hv)] if depth >= 15.0 else [])
        for v0, aisle in rows:
            xs = np.arange(-hu + 0.5, hu - 0.4, pitch)
            for x in xs:
                c = lot.centre + u * x + v * (v0 + 2.5)
                self.paint.append((WHITE, _Rect(c, lot.axes, np.array([lw / 2, 2.5])).polygon()))
            self.paint.append((WHITE, _Rect(lot.centre + v * aisle, lot.axes,
                                             np.array([hu - 0.4, lw / 2])).polygon()))
            for x in xs[:-1]:
                if rng.random() < 0.25 and self.obstacles:
                    c = lot.centre + u * (x + pitch / 2) + v * (v0 + 2.5)
                    self._car(c, math.atan2(v[1], v[0]), rng)

    def add_walkways(self) -> None:
        rng = self.rng
        for ri, road in enumerate(self.roads):
            for side in (-1, 1):
                if rng.random() >= 0.8:
                    continue
                ww, curb = rng.uniform(2.0, 4.0), rng.uniform(0.0, 0.5)
                o0 = road.width / 2 + curb
                s = road.samples(road.s0, road.s1, 0.5)
                p, n = road.at(s)
                mid = p + side * (o0 + ww / 2) * n
                ok = self.drivable_distance(mid, skip_road=ri) > ww / 2 + 0.3
                ok &= np.abs(mid).max(1) < self.half
                cut = s[0] + rng.uniform(0, 20)
                while cut < s[-1]:  # random gaps
                    g = rng.uniform(2.0, 8.0) if rng.random() < 0.6 else 0.0
                    ok &= ~((s >= cut) & (s < cut + g))
                    cut += g + rng.uniform(10.0, 40.0)
                for a, b in _runs(ok, s, 3.0):
                    lo, hi = sorted((side * o0, side * (o0 + ww)))
                    self.polys["walkway"].append(road.strip(a, b, lo, hi))

    def add_markings(self) -> None:
        rng = self.rng
        for ri, road in enumerate(self.roads):
            w = road.width
            s = road.samples(road.s0, road.s1, 0.5)
            p, _ = road.at(s)
            free = self.drivable_distance(p, skip_road=ri) > w / 2 + 0.5
            free &= np.abs(p).max(1) < self.half
            for r, _, _, before, after in self.crossings:
                if r == ri:
                    free &= ~((s > before) & (s < after))
            runs = _runs(free, s, 1.0)
            if rng.random() < 0.5:  # edge lines: paint only
                lw = rng.uniform(0.12, 0.2)
                for a, b in runs:
                    for o in (-w / 2 + 0.3, w / 2 - 0.3):
                        self.paint.append((WHITE, road.strip(a, b, o - lw / 2, o + lw / 2)))
            if road.lanes == 2 and w < 8.0 and rng.random() < 0.2:
                continue  # unmarked
            lines = [(0.0, str(rng.choice(["dashed", "yellow", "double"], p=[0.4, 0.35, 0.25])))]
            if road.lanes == 4:
                lines = [(0.0, str(rng.choice(["yellow", "double"]))), (-w / 4, "dashed"),
                         (w / 4, "dashed")]
            lw = rng.uniform(0.15, 0.25)
            dash = rng.uniform(2.0, 4.0)
            period = dash + rng.uniform(3.0, 8.0)
            for o, kind in lines:
                for a, b in runs:
                    self.dividers.append(road.line(a, b, o))
                    if kind == "dashed":
                        for d0 in np.arange(a, b, period):
                            self.paint.append((WHITE, road.strip(d0, min(d0 + dash, b),
                                                                 o - lw / 2, o + lw / 2)))
                    elif kind == "yellow":
                        self.paint.append((YELLOW, road.strip(a, b, o - lw / 2, o + lw / 2)))
                    else:
                        for c in (o - lw, o + lw):
                            self.paint.append((YELLOW, road.strip(a, b, c - lw / 2, c + lw / 2)))

    # -- obstacles

    def _car(self, centre: np.ndarray, yaw: float, rng: np.random.Generator) -> None:
        h, s, v = [(0.0, 0.0, 0.9), (0.0, 0.0, 0.15), (0.0, 0.0, 0.5), (0.0, 0.75, 0.6),
                   (0.6, 0.6, 0.5), (0.0, 0.02, 0.75)][int(rng.integers(6))]
        self.boxes.append(Box(np.asarray(centre, np.float64),
                              np.array([rng.uniform(3.8, 5.0), rng.uniform(1.7, 2.0),
                                        rng.uniform(1.4, 1.9)]),
                              float(yaw), _hsv(h + rng.uniform(-0.03, 0.03), s, v), "car",
                              float(rng.uniform(30.0, 60.0))))

    def add_obstacles(self) -> None:
        rng = self.rng
        n_cars, placed = int(rng.integers(0, 7)), 0
        for _ in range(40):
            if placed >= n_cars:
                break
            road = self.roads[int(rng.integers(len(self.roads)))]
            w = road.width
            lanes = [-w / 4, w / 4] if road.lanes == 2 else [-3 * w / 8, -w / 8, w / 8, 3 * w / 8]
            o = float(rng.choice(lanes))
            s = road.ego_s() + rng.uniform(-1.2, 1.2) * self.extent
            p, n = road.at(s)
            c = p[0] + o * n[0]
            if (not road.s0 < s < road.s1 or np.linalg.norm(c) < 7.0
                    or any(np.linalg.norm(c - b.centre) < 6.5 for b in self.boxes)):
                continue
            yaw = math.atan2(-n[0, 0], n[0, 1]) + (math.pi if o > 0 else 0.0)
            self._car(c, yaw, rng)
            placed += 1
        n_build = int(rng.integers(0, 6))
        for _ in range(40):
            if len(self.buildings) >= n_build:
                break
            placed = self._roadside_rect(1.3, 12.0, (8.0, 25.0), (6.0, 18.0), (5.0, 12.0))
            if placed is None:
                continue
            rect, pts = placed[:2]
            if (self.drivable_distance(pts) < 5.0).any() or np.abs(rect.centre).max() > self.half:
                continue
            if any((other.distance(pts) < 2.0).any() for other in self.buildings):
                continue
            self.buildings.append(rect)
            tone = rng.uniform(0.45, 0.85)
            colour = _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.35), tone)
            self.boxes.append(Box(rect.centre, np.array([2 * rect.half[0], 2 * rect.half[1],
                                                         rng.uniform(4.0, 15.0)]),
                                  math.atan2(rect.axes[0, 1], rect.axes[0, 0]), colour, "building",
                                  float(rng.uniform(15.0, 35.0))))

    # -- output

    def world(self, res: float) -> World:
        rng, half = self.rng, self.half
        n = int(round(2 * half / res))
        origin = (-n * res / 2, -n * res / 2)
        base, patch = (GRASS, DIRT) if rng.random() < 0.7 else (DIRT, GRASS)
        material = np.full((n, n), base, np.uint8)  # cell [ix, iy], as World.material_at
        cells = BEVGrid((origin[0], origin[0] + n * res, res), (origin[1], origin[1] + n * res, res))

        def paint(poly: np.ndarray, mat: int) -> None:
            ix, iy = polygon_cells([poly], cells)  # the cells whose centre is inside
            material[ix, iy] = mat

        for _ in range(int(rng.integers(4, 13))):
            c = rng.uniform(-half, half, 2)
            a = rng.uniform(0, np.pi)
            e = _disc(np.zeros(2), 1.0, 24) * rng.uniform(2.0, 15.0, 2)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            paint(c + e @ rot.T, patch)
        asphalt = ([road.strip(road.s0, road.s1, -road.width / 2, road.width / 2)
                    for road in self.roads] + [_disc(c, r) for c, r in self.junctions]
                   + [r.polygon() for r in self.driveways])
        layers = [(LOT, self.polys["carpark_area"]), (CONCRETE, self.polys["walkway"]),
                  (ASPHALT, asphalt)]
        for mat, polys in layers + [(m, [p]) for m, p in self.paint]:
            for poly in polys:
                paint(poly, mat)
        grey = rng.uniform(70.0, 115.0)
        paint = rng.uniform(195.0, 245.0)
        palette = np.stack([
            _hsv(rng.uniform(0.2, 0.32), rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6)),
            _hsv(rng.uniform(0.06, 0.11), rng.uniform(0.25, 0.5), rng.uniform(0.4, 0.62)),
            grey + rng.uniform(-5, 5, 3),
            grey * rng.uniform(0.85, 1.15) + rng.uniform(-5, 5, 3),
            rng.uniform(145.0, 190.0) + rng.uniform(-8, 8, 3),
            paint + rng.uniform(-6, 4, 3),
            np.array([rng.uniform(200, 235), rng.uniform(165, 200), rng.uniform(40, 85)])])
        texture = np.array([0.18, 0.15, 0.07, 0.07, 0.06, 0.04, 0.04])
        k = 2 * np.pi / np.array([0.8, 2.3, 5.5, 13.0])
        ang = rng.uniform(0, 2 * np.pi, 4)
        waves = np.stack([k * np.cos(ang), k * np.sin(ang), rng.uniform(0, 2 * np.pi, 4)], 1)
        sun_az, sun_el = rng.uniform(0, 2 * np.pi), math.radians(rng.uniform(30.0, 65.0))
        sun = np.array([math.cos(sun_az) * math.cos(sun_el), math.sin(sun_az) * math.cos(sun_el),
                        math.sin(sun_el)])
        horizon = np.array([205.0, 214.0, 224.0]) * rng.uniform(0.9, 1.05) + rng.uniform(-8, 8, 3)
        zenith = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.35, 0.65), rng.uniform(0.7, 0.9))
        self.polys["drivable_area"] = asphalt + self.polys["carpark_area"]
        geom = MapGeometry({c: [(np.asarray(p), []) for p in polys] for c, polys in self.polys.items()},
                           {"divider": self.dividers})
        return World(material, origin, res, palette, texture, REFLECTIVITY.copy(), base, geom,
                     self.boxes, np.clip(horizon, 0, 255), zenith, float(rng.uniform(120.0, 300.0)),
                     float(rng.uniform(0.85, 1.15)), sun, waves)


def sample_world(rng: np.random.Generator, extent: float = 25.0, res: float = 0.1,
                 obstacles: bool = True) -> World:
    """Draw a random road layout around the ego (see the module docstring).

    Args:
        rng: the only source of randomness.
        extent: half-size (m) of the area that matters (the label grid): crossings, car parks
            and junctions are placed within it; the world covers +-(1.5 extent + 20) m.
        res: cell size (m) of the paint raster.
        obstacles: add cars and buildings.
    """
    lay = _Layout(rng, extent, 1.5 * extent + 20.0, obstacles)
    lay.add_roads()
    lay.add_crossings()
    lay.add_lots()
    lay.add_walkways()
    lay.add_markings()
    if obstacles:
        lay.add_obstacles()  # (parked cars were placed with the car parks)
    return lay.world(res)
