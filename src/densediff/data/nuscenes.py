"""nuScenes (v1.0) for BEV map segmentation: tables, splits, LiDAR sweeps and the vector map.

Layout (``root`` is the nuScenes folder as downloaded and unpacked)::

    root/<version>/scene.json, sample.json, sample_data.json, calibrated_sensor.json,
                   sensor.json, ego_pose.json, log.json      (other tables are not read)
    root/samples/<CHANNEL>/...     key frames: camera JPEGs, LIDAR_TOP ``.pcd.bin``
    root/sweeps/<CHANNEL>/...      the frames in between (LiDAR sweeps)
    root/maps/expansion/<location>.json    the map expansion (v1.3)
    root/splits/<split>.txt        optional: the scene names of a split, one a line

``<version>`` is ``data.bev.version`` (``v1.0-trainval``, ``v1.0-mini``). A split's scene
names come from ``splits/<split>.txt`` when it exists, else from nuscenes-devkit
(``nuscenes.utils.splits.create_splits_scenes()``: train, val, test, mini_train, mini_val,
...) when that is installed. Scenes of the split that the tables lack are skipped and counted
(:attr:`NuScenesDataset.skipped`), so the devkit's ``train`` list works on a partial download.

Frames. Table rows hold translations in metres and rotations as unit quaternions (w, x, y, z):
a ``calibrated_sensor`` row maps its sensor frame into the ego frame (camera frames: x right,
y down, z forward), an ``ego_pose`` row maps the ego frame into the global (map) frame. The
ego frame is x forward, y left, z up.

A sample (:meth:`NuScenesDataset.load`) is, in the ego frame of its LIDAR_TOP key frame
(``data.bev.frame: lidar``: in the LIDAR_TOP sensor frame, as BEVFusion):

- the key-frame image of each camera of ``data.bev.cameras``, its ``camera_intrinsic`` and
  its sensor-to-ego pose (the cameras' own ego poses are not used: they differ by a few
  centimetres and BEVFusion ignores that too for the map task);
- with ``data.bev.lidar``, the LIDAR_TOP key-frame points plus up to ``data.bev.lidar_sweeps``
  earlier frames (following ``prev``, as BEVFusion's info files do), each moved sensor -> its
  ego -> global -> the key frame's ego; sweep points within 1 m of their sensor in x and in y
  are dropped (BEVFusion ``remove_close``); the fifth value is the time lag in seconds
  (0 for the key frame);
- the map of the scene's location: per class the map-expansion shapes near the ego, in the ego
  frame (2-D: translation and yaw of the ego pose). Class ``divider`` is ``road_divider`` +
  ``lane_divider``; any other class is the map layer of that name.

With nuscenes-devkit installed, ``tests/test_nuscenes_devkit.py`` checks all of this against
the devkit on the fixture (:func:`densediff.testing.fixtures.write_nuscenes`): tables, poses,
calibration, sweeps (``LidarPointCloud.from_file_multisweep``) and the map labels
(:func:`devkit_map_labels`: ``NuScenesMap.get_map_mask``, which BEVFusion's labels come from).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from densediff.data.bev import BEVDataset, BEVRecord, MapGeometry
from densediff.data.io import _load
from densediff.errors import DataError, one_line
from densediff.utils.checks import read_text
from densediff.utils.grid import BEVGrid

if TYPE_CHECKING:
    from densediff.config import DataConfig

__all__ = ["NuScenesDataset", "NuScenesTables", "VectorMap", "check_nuscenes", "class_layers",
           "devkit_label_pairs", "devkit_map_labels", "load_vector_map", "map_path",
           "pose_matrix", "quaternion_matrix", "read_points", "remove_close",
           "split_scene_names"]

LIDAR_CHANNEL = "LIDAR_TOP"
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "sensor": ("token", "channel", "modality"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "log": ("token", "location"),
    "scene": ("token", "name", "log_token"),
    "sample": ("token", "scene_token", "timestamp"),
    "sample_data": ("token", "sample_token", "calibrated_sensor_token", "ego_pose_token",
                    "timestamp", "is_key_frame", "filename", "prev"),
    "ego_pose": ("token", "translation", "rotation"),
}
"""The tables read, in loading order, with the fields this module uses (others are kept)."""
MAP_POLYGON_LAYERS = ("drivable_area", "road_segment", "road_block", "lane", "ped_crossing",
                      "walkway", "stop_line", "carpark_area", "lane_connector")
"""Map-expansion layers whose records point at polygons (``polygon_token``; drivable_area:
``polygon_tokens``)."""
MAP_LINE_LAYERS = ("road_divider", "lane_divider", "traffic_light")
"""Map-expansion layers whose records point at lines (``line_token``)."""
CLASS_LAYERS = {"divider": ("road_divider", "lane_divider")}
"""Map classes made of several layers."""
POINT_DIMS = 5
"""Values per point in a ``.pcd.bin`` file: x, y, z, intensity, ring index (float32)."""
CLOSE_RADIUS = 1.0
"""Sweep points with ``|x| < 1`` and ``|y| < 1`` m in their sensor frame are dropped."""
MAP_MARGIN = 10.0
"""Metres added around the rotated output grid when selecting map shapes."""


# --------------------------------------------------------------------------------------------
# geometry


def quaternion_matrix(w: float, x: float, y: float, z: float) -> np.ndarray:
    """3 x 3 rotation matrix of the quaternion ``w + xi + yj + zk`` (Hamilton convention, as
    nuScenes / pyquaternion); the quaternion is normalised first.

    Raises:
        ValueError: a zero (or non-finite) quaternion.
    """
    q = np.array([w, x, y, z], np.float64)
    n = float(np.linalg.norm(q))
    if not (math.isfinite(n) and n > 0):
        raise ValueError(f"not a rotation quaternion: {[w, x, y, z]}")
    w, x, y, z = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def pose_matrix(translation: Sequence[float], rotation: Sequence[float]) -> np.ndarray:
    """4 x 4 rigid transform ``p -> R p + t`` from a translation (x, y, z) and a rotation
    quaternion (w, x, y, z)."""
    m = np.eye(4)
    m[:3, :3] = quaternion_matrix(*rotation)
    m[:3, 3] = translation
    return m


def remove_close(points: np.ndarray, radius: float = CLOSE_RADIUS) -> np.ndarray:
    """Drop points with ``|x| < radius`` and ``|y| < radius`` (BEVFusion ``remove_close``:
    returns of the car itself), in the points' own sensor frame."""
    close = (np.abs(points[:, 0]) < radius) & (np.abs(points[:, 1]) < radius)
    return points[~close]


def read_points(path: str | os.PathLike) -> np.ndarray:
    """A nuScenes ``.pcd.bin`` LiDAR file: P x 5 float32 (x, y, z, intensity, ring index) in
    the sensor frame.

    Raises:
        DataError: missing or unreadable file, or a size that is not a whole number of points.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: LiDAR file not found")
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read LiDAR file ({one_line(e)})") from None
    if raw.size % POINT_DIMS:
        raise DataError(f"{path}: {raw.size} float32 values is not a whole number of "
                        f"{POINT_DIMS}-value points (x, y, z, intensity, ring)")
    return raw.reshape(-1, POINT_DIMS)


def _move(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Points (P x >= 3) with x, y, z moved by the 4 x 4 transform ``m`` (float64)."""
    out = np.asarray(points, np.float64).copy()
    out[:, :3] = out[:, :3] @ m[:3, :3].T + m[:3, 3]
    return out


# --------------------------------------------------------------------------------------------
# tables


def _read_json(path: Path, what: str, object_hook: Callable | None = None) -> Any:
    """Parse a JSON file; DataError (naming ``what``) when it is missing or invalid."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f, object_hook=object_hook)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({one_line(e)})") from None
    except RecursionError:
        raise DataError(f"{path}: {what} is nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({one_line(e)})") from None


class _BadRecord:
    """A table record that lacks required keys (found while parsing)."""

    def __init__(self, rec: dict, missing: list[str]):
        self.token, self.missing = rec.get("token"), missing


def read_table(path: str | os.PathLike, keys: Sequence[str],
               keep: Callable[[dict], bool] | None = None) -> list[dict]:
    """A nuScenes table: a JSON list of records, each with at least ``keys``.

    Args:
        path: the ``.json`` file.
        keys: required fields.
        keep: optional filter applied while parsing (dropped records never stay in memory; the
            kept ones are trimmed to ``keys``). Used for ``sample_data``, by far the largest
            table (2.6 M rows in v1.0-trainval).

    Raises:
        DataError: missing file, invalid JSON, not a list of objects, or a record without one
            of ``keys`` (the message names the file, the record's token and the key).
    """
    path, keyset = Path(path), frozenset(keys)

    def hook(rec: dict) -> Any:
        if not keyset <= rec.keys():
            return _BadRecord(rec, [k for k in keys if k not in rec])
        if keep is None:
            return rec
        return {k: rec[k] for k in keys} if keep(rec) else None

    records = _read_json(path, "nuScenes table", hook)
    if not isinstance(records, list):
        kind = "an object" if isinstance(records, (dict, _BadRecord)) else type(records).__name__
        raise DataError(f"{path}: expected a JSON list of records, got {kind}")
    for i, rec in enumerate(records):
        if isinstance(rec, _BadRecord):
            raise DataError(f"{path}: record {i} (token {rec.token!r}) has no {rec.missing[0]!r} "
                            "field")
        if rec is not None and not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is not a JSON object")
    return [r for r in records if r is not None]


def _ref(table: str, rec: dict) -> str:
    """``table 'token'``, naming a record in messages."""
    return f"{table} {rec['token']!r}"


class NuScenesTables:
    """The tables of ``root/<version>`` that this module needs, each indexed by token.

    Args:
        root: the nuScenes folder.
        version: the table folder (``v1.0-trainval``, ``v1.0-mini``).
        channels: keep the ``sample_data`` key frames of these sensor channels only (None:
            every channel).
        sweep_channels: keep the non-key frames (sweeps) of these channels too (None: of every
            kept channel).

    Attributes:
        scenes: the scene records in table order.
        tables: ``{table: {token: record}}``.
        channel: ``{calibrated_sensor token: sensor channel}``.

    Raises:
        DataError: a table missing or malformed (:func:`read_table`), a dangling token.
    """

    def __init__(self, root: str | os.PathLike, version: str,
                 channels: Iterable[str] | None = None,
                 sweep_channels: Iterable[str] | None = None):
        self.root = Path(root).expanduser()
        self.version = version
        self.dir = self.root / version
        self.tables: dict[str, dict[str, dict]] = {}
        self.scenes: list[dict] = []
        self.channel: dict[str, str] = {}
        chans = None if channels is None else frozenset(channels)
        sweeps = chans if sweep_channels is None else frozenset(sweep_channels)

        def keep(sd: dict) -> bool:
            ch = self.channel.get(sd["calibrated_sensor_token"])
            if ch is None:  # dangling: kept so that the lookup below names it
                return True
            return (chans is None or ch in chans) and (
                bool(sd["is_key_frame"]) or sweeps is None or ch in sweeps)

        for name, keys in TABLE_KEYS.items():
            rows = read_table(self.path(name), keys, keep if name == "sample_data" else None)
            self.tables[name] = {r["token"]: r for r in rows}
            if name == "scene":
                self.scenes = rows
            if name == "calibrated_sensor":
                self.channel = {r["token"]: self.get("sensor", r["sensor_token"],
                                                     _ref("calibrated_sensor", r))["channel"]
                                for r in rows}
        self.key_frames: dict[tuple[str, str], dict] = {}
        """``{(sample token, channel): key-frame sample_data record}``."""
        for sd in self.tables["sample_data"].values():
            if sd["is_key_frame"]:
                ch = self.channel.get(sd["calibrated_sensor_token"])
                if ch is None:
                    self.get("calibrated_sensor", sd["calibrated_sensor_token"],
                             _ref("sample_data", sd))
                self.key_frames.setdefault((sd["sample_token"], ch), sd)

    def path(self, table: str) -> Path:
        """The file of a table."""
        return self.dir / f"{table}.json"

    def get(self, table: str, token: str, ref: str = "") -> dict:
        """The record of ``table`` with ``token``; DataError when there is none (naming
        ``ref``, the record that refers to it, e.g. ``"sample_data 'abc'"``)."""
        rec = self.tables[table].get(token)
        if rec is None:
            by = f" (referenced by {ref})" if ref else ""
            raise DataError(f"{self.path(table)}: no record with token {token!r}{by}")
        return rec

    def key_frame(self, sample_token: str, channel: str) -> dict:
        """The key-frame ``sample_data`` record of a sample's sensor channel.

        Raises:
            DataError: the sample has none.
        """
        sd = self.key_frames.get((sample_token, channel))
        if sd is None:
            raise DataError(f"{self.path('sample_data')}: sample {sample_token!r} has no key frame "
                            f"of {channel}")
        return sd

    def pose(self, table: str, rec: dict) -> np.ndarray:
        """4 x 4 transform of a ``calibrated_sensor`` or ``ego_pose`` record.

        Raises:
            DataError: the translation or rotation is not 3 / 4 numbers, or a zero quaternion.
        """
        try:
            t = np.asarray(rec["translation"], np.float64).reshape(3)
            q = np.asarray(rec["rotation"], np.float64).reshape(4)
            return pose_matrix(t, q)
        except (TypeError, ValueError) as e:
            raise DataError(f"{self.path(table)}: record {rec['token']!r} has a bad translation or "
                            f"rotation ({one_line(e)})") from None

    def intrinsics(self, rec: dict) -> np.ndarray:
        """3 x 3 ``camera_intrinsic`` of a ``calibrated_sensor`` record.

        Raises:
            DataError: not a 3 x 3 matrix (e.g. a LiDAR's empty list).
        """
        try:
            return np.asarray(rec["camera_intrinsic"], np.float64).reshape(3, 3)
        except (TypeError, ValueError):
            raise DataError(f"{self.path('calibrated_sensor')}: record {rec['token']!r} has no 3 x 3 "
                            "camera_intrinsic") from None

    def location(self, sample: dict) -> str:
        """The map location of a sample (scene -> log -> location)."""
        scene = self.get("scene", sample["scene_token"], _ref("sample", sample))
        return self.get("log", scene["log_token"], _ref("scene", scene))["location"]

    def split_samples(self, scene_names: Iterable[str]) -> tuple[list[str], int]:
        """The sample tokens of the named scenes, by scene (table order) then timestamp, and
        how many of the names are not scenes of these tables."""
        wanted = set(scene_names)
        by_scene: dict[str, list[dict]] = {}
        for s in self.tables["sample"].values():
            by_scene.setdefault(s["scene_token"], []).append(s)
        found, samples = set(), []
        for scene in self.scenes:
            if scene["name"] in wanted:
                found.add(scene["name"])
                rows = sorted(by_scene.get(scene["token"], []), key=lambda s: s["timestamp"])
                samples += [s["token"] for s in rows]
        return samples, len(wanted - found)

    def sweeps(self, key: dict, count: int) -> list[dict]:
        """Up to ``count`` ``sample_data`` records before ``key`` of the same sensor, newest
        first (following ``prev``; earlier key frames included, as BEVFusion's info files).

        Raises:
            DataError: a ``prev`` token that is not in the table (e.g. sweeps not kept).
        """
        out, sd = [], key
        while len(out) < count and sd["prev"]:
            sd = self.get("sample_data", sd["prev"], f"'prev' of {_ref('sample_data', sd)}")
            out.append(sd)
        return out


def split_scene_names(root: str | os.PathLike, split: str) -> list[str]:
    """The scene names of ``split``: ``root/splits/<split>.txt`` (one a line; blank lines and
    ``#`` comments skipped) if it exists, else nuscenes-devkit's ``create_splits_scenes()``.

    Raises:
        DataError: no split file and no devkit, or a split the devkit does not know.
    """
    path = Path(root).expanduser() / "splits" / f"{split}.txt"
    if path.is_file():
        lines = (line.strip() for line in read_text(path, error=DataError).splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    try:
        from nuscenes.utils.splits import create_splits_scenes
    except ImportError:
        raise DataError(f"{path}: split file not found and nuscenes-devkit is not installed; "
                        "write the split's scene names there (one a line) or pip install "
                        "nuscenes-devkit") from None
    splits = create_splits_scenes()
    if split not in splits:
        raise DataError(f"{path}: split file not found and nuscenes-devkit has no split {split!r} "
                        f"(it has {', '.join(sorted(splits))})")
    return list(splits[split])


# --------------------------------------------------------------------------------------------
# map expansion


def class_layers(name: str) -> tuple[str, ...]:
    """The map-expansion layers of a map class: ``divider`` -> road_divider + lane_divider,
    a layer name -> itself.

    Raises:
        DataError: neither.
    """
    if name in CLASS_LAYERS:
        return CLASS_LAYERS[name]
    if name in MAP_POLYGON_LAYERS or name in MAP_LINE_LAYERS:
        return (name,)
    raise DataError(f"data.bev.classes: {name!r} is not a nuScenes map class (use divider or a "
                    f"map-expansion layer: {', '.join(MAP_POLYGON_LAYERS + MAP_LINE_LAYERS)})")


def map_path(root: str | os.PathLike, location: str) -> Path:
    """The map-expansion file of a location."""
    return Path(root).expanduser() / "maps" / "expansion" / f"{location}.json"


class VectorMap:
    """One map-expansion file (v1.3): node coordinates and, per layer (built on first use),
    the shapes in global coordinates with their bounding boxes.

    Raises:
        DataError: missing or invalid file, no ``node``/``line``/``polygon`` table.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        obj = _read_json(self.path, "map-expansion file")
        if not isinstance(obj, dict) or not all(
                isinstance(obj.get(k), list) for k in ("node", "line", "polygon")):
            raise DataError(f"{self.path}: not a map-expansion file (needs node, line and polygon "
                            "lists)")
        try:
            self._node = {n["token"]: i for i, n in enumerate(obj["node"])}
            self._xy = np.array([[n["x"], n["y"]] for n in obj["node"]], np.float64).reshape(-1, 2)
            self._line = {r["token"]: r for r in obj["line"]}
            self._polygon = {r["token"]: r for r in obj["polygon"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.path}: malformed node/line/polygon record ({one_line(e)})") \
                from None
        self._raw = {k: v for k, v in obj.items()
                     if k in MAP_POLYGON_LAYERS or k in MAP_LINE_LAYERS}
        self._layers: dict[str, tuple[list, np.ndarray]] = {}

    def _coords(self, tokens: Sequence[str], owner: str) -> np.ndarray:
        try:
            return self._xy[[self._node[t] for t in tokens]].reshape(-1, 2)
        except KeyError as e:
            raise DataError(f"{self.path}: {owner} refers to unknown node {e.args[0]!r}") from None

    def _polygon_shape(self, token: str, owner: str):
        rec = self._polygon.get(token)
        if rec is None:
            raise DataError(f"{self.path}: {owner} refers to unknown polygon {token!r}")
        owner = f"polygon {token!r}"
        try:
            return (self._coords(rec["exterior_node_tokens"], owner),
                    [self._coords(h["node_tokens"], owner) for h in rec.get("holes", [])])
        except (KeyError, TypeError) as e:
            raise DataError(f"{self.path}: {owner} is malformed ({one_line(e)})") from None

    def _line_shape(self, token: str, owner: str) -> np.ndarray:
        rec = self._line.get(token)
        if rec is None:
            raise DataError(f"{self.path}: {owner} refers to unknown line {token!r}")
        return self._coords(rec.get("node_tokens", []), f"line {token!r}")

    def layer(self, name: str) -> tuple[list, np.ndarray]:
        """All shapes of a layer in global coordinates and their boxes (S x 4: x min, y min,
        x max, y max). Polygon layers give (exterior, [holes]), line layers N x 2 arrays.

        Raises:
            DataError: the file has no such layer, or a record is malformed.
        """
        if name in self._layers:
            return self._layers[name]
        if name not in self._raw:
            raise DataError(f"{self.path}: no map layer {name!r}")
        shapes = []
        for rec in self._raw[name]:
            owner = f"{name} {rec.get('token')!r}" if isinstance(rec, dict) else name
            if not isinstance(rec, dict):
                raise DataError(f"{self.path}: {owner} record is not a JSON object")
            if name in MAP_LINE_LAYERS:
                if "line_token" not in rec:
                    raise DataError(f"{self.path}: {owner} has no 'line_token' field")
                shapes.append(self._line_shape(rec["line_token"], owner))
                continue
            tokens = rec.get("polygon_tokens", [rec["polygon_token"]] if "polygon_token" in rec
                             else None)
            if tokens is None:
                raise DataError(f"{self.path}: {owner} has no 'polygon_token(s)' field")
            shapes += [self._polygon_shape(t, owner) for t in tokens]
        boxes = np.full((len(shapes), 4), np.nan)
        for i, s in enumerate(shapes):
            pts = s[0] if isinstance(s, tuple) else s
            if len(pts):
                boxes[i] = [*pts.min(0), *pts.max(0)]
        self._layers[name] = shapes, boxes
        return shapes, boxes

    def near(self, name: str, centre: Sequence[float], half: float) -> list:
        """The shapes of a layer whose box meets the square of half-size ``half`` (metres)
        around ``centre`` (x, y), in global coordinates."""
        shapes, boxes = self.layer(name)
        cx, cy = centre
        hit = ((boxes[:, 0] <= cx + half) & (boxes[:, 2] >= cx - half)
               & (boxes[:, 1] <= cy + half) & (boxes[:, 3] >= cy - half))
        return [shapes[i] for i in np.flatnonzero(hit)]


@functools.lru_cache(maxsize=8)
def _cached_map(path: str, mtime_ns: int, size: int) -> VectorMap:
    return VectorMap(path)


def load_vector_map(path: str | os.PathLike) -> VectorMap:
    """The :class:`VectorMap` of a file, parsed once per process (cached by path, modification
    time and size; real maps are tens of MB).

    Raises:
        DataError: missing or invalid file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: map-expansion file not found")
    st = path.stat()
    return _cached_map(str(path), st.st_mtime_ns, st.st_size)


def ego_map(vmap: VectorMap, classes: Sequence[str], ego: np.ndarray, half: float) -> MapGeometry:
    """The map near an ego pose, in that ego frame (2-D: ``p_ego = R(yaw)^T (p - t)``).

    Args:
        vmap: the location's map.
        classes: map classes (:func:`class_layers`).
        ego: 4 x 4 ego-to-global pose; its x-y translation and yaw are used.
        half: half-size (metres) of the square around the ego whose shapes are kept.
    """
    t = ego[:2, 3]
    yaw = math.atan2(ego[1, 0], ego[0, 0])
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, -s], [s, c]])
    to_ego = lambda p: (p - t) @ rot  # row-vector form of R^T (p - t)
    geom = MapGeometry()
    for name in classes:
        for layer in class_layers(name):
            for shape in vmap.near(layer, t, half):
                if isinstance(shape, tuple):
                    ext, holes = shape
                    geom.polygons.setdefault(name, []).append(
                        (to_ego(ext), [to_ego(h) for h in holes]))
                else:
                    geom.lines.setdefault(name, []).append(to_ego(shape))
    return geom


def devkit_map_labels(nusc_map: Any, xy: Sequence[float], yaw: float, grid: BEVGrid,
                      classes: Sequence[str]) -> np.ndarray:
    """The nuScenes devkit's raster of the map around an ego pose, as K x X x Y {0, 1} layers on
    ``grid`` (for comparison with :func:`~densediff.data.bev.rasterize_map`; BEVFusion's
    ``LoadBEVSegmentation`` makes its labels this way, in its LiDAR frame).

    ``nusc_map.get_map_mask`` of the patch centred on the grid's centre (``xy`` + the rotated
    centre offset; height = the y extent, width = the x extent), ``patch_angle`` = the yaw in
    degrees, canvas (Y cells, X cells); the devkit's mask is ``[layer, row = y, column = x]``
    with y growing with the row, so it is transposed to ``[ix, iy]``, no flip. Class
    ``divider`` is road_divider | lane_divider.

    Args:
        nusc_map: a ``nuscenes.map_expansion.map_api.NuScenesMap``.
        xy: the ego position (global x, y).
        yaw: the ego yaw (radians, about z).
        grid: the label grid (ego frame).
        classes: map classes (:func:`class_layers`).

    Raises:
        DataError: a class with a layer the devkit does not rasterise (traffic_light,
            lane_connector).
    """
    (nx, ny), (lx, hx, ly, hy) = grid.shape, grid.extent()
    c, s = math.cos(yaw), math.sin(yaw)
    cx, cy = (lx + hx) / 2, (ly + hy) / 2
    box = (xy[0] + c * cx - s * cy, xy[1] + s * cx + c * cy, hy - ly, hx - lx)
    drawn = set(nusc_map.non_geometric_layers) - {"traffic_light"}
    out = np.zeros((len(classes), nx, ny), np.uint8)
    for k, name in enumerate(classes):
        layers = list(class_layers(name))
        if not set(layers) <= drawn:
            raise DataError(f"devkit_map_labels: class {name!r}: the devkit's get_map_mask draws "
                            f"only {', '.join(sorted(drawn))}")
        mask = nusc_map.get_map_mask(box, math.degrees(yaw), layers, (ny, nx))
        out[k] = np.asarray(mask).any(0).T
    return out


def devkit_label_pairs(data: DataConfig, root: str | os.PathLike, nusc: Any,
                       splits: Sequence[str] = ("train", "val")
                       ) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Our labels next to the devkit's, sample by sample: ``(split, sample token, ours,
    theirs)``, both K x X x Y bool on the label grid. Ours come from :class:`NuScenesDataset`
    (test pipeline); the devkit's from :func:`devkit_map_labels` at the LIDAR_TOP ego pose as
    the devkit (``nusc``: a ``nuscenes.nuscenes.NuScenes`` of ``root``) reads it.
    """
    from nuscenes.map_expansion.map_api import NuScenesMap
    from pyquaternion import Quaternion

    from densediff.utils.grid import output_grid

    grid, classes = output_grid(data.bev), list(data.bev.classes)
    maps: dict[str, Any] = {}
    for split in splits:
        ds = NuScenesDataset(data, root, split, train=False)
        for i, token in enumerate(ds.samples):
            sample = nusc.get("sample", token)
            location = nusc.get("log", nusc.get("scene", sample["scene_token"])["log_token"])[
                "location"]
            if location not in maps:
                maps[location] = NuScenesMap(str(root), location)
            sd = nusc.get("sample_data", sample["data"][LIDAR_CHANNEL])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            yaw = Quaternion(pose["rotation"]).yaw_pitch_roll[0]
            theirs = devkit_map_labels(maps[location], pose["translation"][:2], yaw, grid,
                                       classes)
            yield split, token, ds[i]["label"].numpy().astype(bool), theirs.astype(bool)


# --------------------------------------------------------------------------------------------
# dataset


class NuScenesDataset(BEVDataset):
    """nuScenes samples of one split for BEV map segmentation (module docstring).

    Args:
        data: the ``data`` config section (``data.bev``: classes, cameras, lidar, lidar_sweeps,
            version, grids).
        root: the nuScenes folder.
        split: split name (:func:`split_scene_names`).
        train: training augmentation if True.
        seed: run seed (:class:`~densediff.data.bev.BEVDataset`).

    Attributes:
        samples: the sample tokens, by scene (table order) then timestamp.
        skipped: scenes of the split not in the tables.

    Raises:
        DataError: a missing or malformed table, no split file and no devkit, a map class that
            is no map layer, no sample in the split, a sample without a key frame of a camera
            or of LIDAR_TOP.
    """

    def __init__(self, data: DataConfig, root: str | os.PathLike, split: str, train: bool,
                 seed: int = 0):
        super().__init__(data, train, seed, name=f"nuscenes/{split}")
        bev = data.bev
        for c in self.class_names:
            class_layers(c)
        self.root = Path(root).expanduser()
        self.split = split
        self.cameras = list(bev.cameras)
        self.tables = NuScenesTables(self.root, bev.version, self.cameras + [LIDAR_CHANNEL],
                                     [LIDAR_CHANNEL] if bev.lidar and bev.lidar_sweeps else [])
        self.samples, self.skipped = self.tables.split_samples(split_scene_names(self.root, split))
        if not self.samples:
            raise DataError(f"{self.tables.dir}: no samples in split {split!r} ({self.skipped} "
                            "scenes of the split are not in these tables)")
        for token in self.samples:
            for ch in self.cameras + [LIDAR_CHANNEL]:
                self.tables.key_frame(token, ch)
        lx, hx, ly, hy = self.grid.extent()
        self.map_half = math.sqrt(2) * max(abs(lx), abs(hx), abs(ly), abs(hy)) + MAP_MARGIN
        """Half-size of the square around the ego whose map shapes are loaded: covers the
        output grid under any scene rotation, plus :data:`MAP_MARGIN`."""

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        skipped = f", {self.skipped} scenes of the split not found" if self.skipped else ""
        return super().__repr__()[:-1] + skipped + ")"

    def points(self, key: dict) -> np.ndarray:
        """P x 5 float32 points of a LIDAR_TOP key frame and its sweeps in the key frame's ego
        frame: x, y, z, intensity, time lag (s)."""
        t = self.tables
        key_ego = t.pose("ego_pose", t.get("ego_pose", key["ego_pose_token"],
                                           _ref("sample_data", key)))
        global2key = np.linalg.inv(key_ego)
        out = []
        for sd in [key] + t.sweeps(key, self.bev.lidar_sweeps):
            pts = read_points(self.root / sd["filename"])
            cs = t.get("calibrated_sensor", sd["calibrated_sensor_token"], _ref("sample_data", sd))
            m = t.pose("calibrated_sensor", cs)
            if sd is not key:
                pts = remove_close(pts)
                ego = t.get("ego_pose", sd["ego_pose_token"], _ref("sample_data", sd))
                m = global2key @ t.pose("ego_pose", ego) @ m
            pts = _move(pts, m)
            pts[:, 4] = (key["timestamp"] - sd["timestamp"]) / 1e6
            out.append(pts)
        return np.concatenate(out).astype(np.float32)

    def load(self, index: int) -> BEVRecord:
        """The untransformed sample ``index`` (module docstring).

        Raises:
            DataError: a missing or unreadable image, LiDAR or map file, a dangling token, a
                bad calibration.
        """
        t = self.tables
        token = self.samples[index]
        sample = t.get("sample", token)
        images: list[Image.Image] = []
        intrinsics, cam2ego, paths = [], [], []
        for ch in self.cameras:
            sd = t.key_frame(token, ch)
            cs = t.get("calibrated_sensor", sd["calibrated_sensor_token"], _ref("sample_data", sd))
            path = self.root / sd["filename"]
            images.append(_load(path).convert("RGB"))
            intrinsics.append(t.intrinsics(cs))
            cam2ego.append(t.pose("calibrated_sensor", cs))
            paths.append(str(path))
        key = t.key_frame(token, LIDAR_CHANNEL)
        ego = t.pose("ego_pose", t.get("ego_pose", key["ego_pose_token"], _ref("sample_data", key)))
        # data.bev.frame lidar: everything in the LIDAR_TOP frame (BEVFusion's BEV frame)
        frame = (t.pose("calibrated_sensor", t.get("calibrated_sensor",
                                                   key["calibrated_sensor_token"],
                                                   _ref("sample_data", key)))
                 if self.bev.frame == "lidar" else np.eye(4))
        to_frame = np.linalg.inv(frame)
        vmap = load_vector_map(map_path(self.root, t.location(sample)))
        geom = ego_map(vmap, self.class_names, ego @ frame, self.map_half)
        points = self.points(key) if self.bev.lidar else None
        if points is not None and self.bev.frame == "lidar":
            points = _move(points, to_frame).astype(np.float32)
        return BEVRecord(images, np.stack(intrinsics), to_frame @ np.stack(cam2ego), geom,
                         points, name=token, paths=paths)


def check_nuscenes(root: str | os.PathLike, version: str, split: str, cameras: Sequence[str],
                   lidar: bool, lidar_sweeps: int = 0,
                   classes: Sequence[str] | None = None) -> list[str]:
    """Every problem of a nuScenes split that would stop :class:`NuScenesDataset`, without
    decoding images: missing tables (all named), a malformed table, no split, unknown map
    classes, samples without a key frame of a camera (or LIDAR_TOP), missing image / LiDAR
    files (with ``lidar``; ``lidar_sweeps`` earlier sweeps too) and missing map files.
    An empty list means the split looks loadable."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return [f"{root}: dataset folder not found"]
    problems = [f"{root / version / name}.json: nuScenes table not found" for name in TABLE_KEYS
                if not (root / version / f"{name}.json").is_file()]
    for c in classes or []:
        try:
            class_layers(c)
        except DataError as e:
            problems.append(str(e))
    if any("table not found" in p for p in problems):
        return problems
    channels = list(cameras) + [LIDAR_CHANNEL]
    try:
        tables = NuScenesTables(root, version, channels,
                                [LIDAR_CHANNEL] if lidar and lidar_sweeps else [])
        samples, _ = tables.split_samples(split_scene_names(root, split))
    except DataError as e:
        return problems + [str(e)]
    if not samples:
        problems.append(f"{tables.dir}: no samples in split {split!r}")
    locations = set()
    for token in samples:
        try:
            locations.add(tables.location(tables.get("sample", token)))
            frames = [tables.key_frame(token, ch) for ch in cameras]
            key = tables.key_frame(token, LIDAR_CHANNEL)  # its ego pose places the map
            if lidar:
                frames += [key] + tables.sweeps(key, lidar_sweeps)
        except DataError as e:
            problems.append(str(e))
            continue
        problems += [f"{root / sd['filename']}: file not found (sample {token!r})" for sd in frames
                     if not (root / sd["filename"]).is_file()]
    problems += [f"{map_path(root, loc)}: map-expansion file not found (location of samples of "
                 f"split {split!r})" for loc in sorted(locations)
                 if not map_path(root, loc).is_file()]
    return problems
