"""Class names, colour palettes and label-value mappings of the supported datasets.

A *label LUT* (look-up table) maps every raw pixel value a label file may hold to a class id
``0..K-1``, to the ignore index, or to :data:`INVALID` when the value is not valid for that
dataset: ``mapped = lut[raw]``. It encodes each dataset's convention in one place (CamVid void
11, ADE20K reduce-zero-label, Cityscapes trainIds/labelIds, folder 255 = ignore) and is used
both to load labels and to validate them (:func:`map_label`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from densediff.errors import DataError
from densediff.utils.checks import read_text

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                  (0, 128, 192)]
CAMVID_VOID = 11
"""CamVid (SegNet version) label value for unlabelled pixels; mapped to the ignore index."""

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag"]
# The standard mmsegmentation ADE20K palette.
ADE20K_PALETTE = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255)]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
                      (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
                      (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
                      (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230),
                      (119, 11, 32)]
# Cityscapes labelIds 0..33 -> trainIds (cityscapesScripts labels.py); 255 = ignored.
CITYSCAPES_ID_TO_TRAINID = [255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255,
                            255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18]

INVALID = np.iinfo(np.int64).min
"""LUT entry of raw label values that are not valid for a dataset."""

FOLDER_IGNORE = 255
"""Mask value for unlabelled pixels in a folder dataset (mapped to ``data.ignore_index``)."""


def default_palette(n: int) -> np.ndarray:
    """A deterministic palette of ``n`` distinct-looking colours (PASCAL VOC bit scheme)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0  # +1: skip black, which reads as "nothing"
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


IGNORE_NAME = "[ignore]"
"""``classes.txt``: a line ``[ignore] R G B`` names a mask colour of unlabelled pixels
(colour-coded masks; any number of such lines, not a class)."""


@dataclass
class ClassesFile:
    """A parsed ``classes.txt``: the classes, their palette, which colours the file gives,
    and the ``[ignore]`` colours."""

    names: list[str]
    palette: np.ndarray
    given: list[bool]
    ignore_colours: list[tuple[int, int, int]] = field(default_factory=list)
    path: str = "classes.txt"

    def colour_map(self) -> ColourMap:
        """The colour -> mask value table of colour-coded masks (:class:`ColourMap`)."""
        missing = [n for n, g in zip(self.names, self.given) if not g]
        colours = [tuple(int(v) for v in c) for c in self.palette] + list(self.ignore_colours)
        values = list(range(len(self.names))) + [FOLDER_IGNORE] * len(self.ignore_colours)
        error = None
        if missing:
            error = (f"colour-coded masks need a colour for every class in {self.path}; "
                     f"{missing[0]!r} has none (write '{missing[0]} R G B')")
        seen: dict[tuple, int] = {}
        for c, v in zip(colours, values):
            if seen.setdefault(c, v) != v:
                error = (f"{self.path}: colour {c} is given twice (to "
                         f"{_value_name(self.names, seen[c])!r} and {_value_name(self.names, v)!r});"
                         " colour-coded masks need one colour per class")
                break
        return ColourMap(colours, values, error, self.path)


def _value_name(names: list[str], v: int) -> str:
    return names[v] if v < len(names) else IGNORE_NAME


def _code(rgb: np.ndarray) -> np.ndarray:
    """``... x 3`` uint8 colours as ``r << 16 | g << 8 | b`` int64 codes."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class ColourMap:
    """Colour-coded masks (RGB) as mask values: a class's colour -> its id, an ``[ignore]``
    colour -> :data:`FOLDER_IGNORE` (:meth:`map`). ``error``: why this ``classes.txt`` cannot
    decode colour masks (a class without a colour, a colour given twice), raised on use."""

    def __init__(self, colours: list[tuple[int, int, int]], values: list[int],
                 error: str | None = None, source: str = "classes.txt"):
        codes = _code(np.asarray(colours, np.int64).reshape(-1, 3))
        order = np.argsort(codes, kind="stable")
        self.codes, self.values = codes[order], np.asarray(values, np.int64)[order]
        self.error, self.source = error, source

    def map(self, rgb: np.ndarray, path: str | os.PathLike) -> np.ndarray:
        """``H x W x 3`` uint8 mask -> ``H x W`` int64 mask values; one DataError naming
        ``path``, the first unknown colour, a pixel of it (x, y) and its pixel count."""
        if self.error:
            raise DataError(f"{path}: {self.error}")
        code = _code(rgb)
        idx = np.minimum(np.searchsorted(self.codes, code), len(self.codes) - 1)
        known = self.codes[idx] == code
        if known.all():
            return self.values[idx]
        y, x = (int(v) for v in np.argwhere(~known)[0])
        bad = int(code[y, x])
        count = int((code == bad).sum())
        others = len(np.unique(code[~known])) - 1
        colour = ((bad >> 16) & 255, (bad >> 8) & 255, bad & 255)
        more = f"; and {others} other unknown colour(s)" if others else ""
        raise DataError(f"{path}: colour {colour} at pixel (x={x}, y={y}) is not in "
                        f"{self.source} ({count} pixels{more}); give it a class line "
                        f"'name {colour[0]} {colour[1]} {colour[2]}' or '{IGNORE_NAME} "
                        f"{colour[0]} {colour[1]} {colour[2]}'")


def read_classes(path: str | os.PathLike) -> ClassesFile:
    """Read a folder dataset's ``classes.txt``.

    One class per line, in class-id order (line i -> id i): ``name`` or ``name R G B`` with
    0..255 colour components; names may contain spaces. Blank lines and lines starting with
    ``#`` are skipped. Classes without a colour get one from :func:`default_palette`. Lines
    ``[ignore] R G B`` name the colours of unlabelled pixels in colour-coded masks.

    Raises:
        DataError: missing/empty file, a bad colour, a duplicate name, or more than 255 classes.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DataError(f"{path}: classes file not found")
    # UTF-8, a byte-order mark dropped (else class 0's name would carry it)
    lines = read_text(path, error=DataError, kind="classes file").splitlines()
    names: list[str] = []
    colours: list[tuple[int, int, int] | None] = []
    ignore: list[tuple[int, int, int]] = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        colour = None
        if len(parts) >= 4 and all(p.lstrip("-").isdigit() for p in parts[-3:]):
            rgb = tuple(int(p) for p in parts[-3:])
            if not all(0 <= v <= 255 for v in rgb):
                raise DataError(f"{path}:{lineno}: colour components must be 0..255, got {rgb}")
            colour, parts = rgb, parts[:-3]
        elif len(parts) >= 2 and parts[-1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: expected 'name' or 'name R G B', got {line!r}")
        name = " ".join(parts)
        if name == IGNORE_NAME:
            if colour is None:
                raise DataError(f"{path}:{lineno}: expected '{IGNORE_NAME} R G B', got {line!r}")
            ignore.append(colour)
            continue
        if name in names:
            raise DataError(f"{path}:{lineno}: duplicate class name {name!r}")
        names.append(name)
        colours.append(colour)
    if not names:
        raise DataError(f"{path}: no classes listed (one 'name [R G B]' per line)")
    if len(names) > FOLDER_IGNORE:
        raise DataError(f"{path}: {len(names)} classes; at most {FOLDER_IGNORE} are supported "
                        f"(mask value {FOLDER_IGNORE} means ignore)")
    palette = default_palette(len(names))
    for i, c in enumerate(colours):
        if c is not None:
            palette[i] = c
    return ClassesFile(names, palette, [c is not None for c in colours], ignore, str(path))


def read_classes_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(names, palette (K, 3) uint8)`` of a ``classes.txt`` (:func:`read_classes`)."""
    c = read_classes(path)
    return c.names, c.palette


def label_lut(fmt: str, num_classes: int, ignore_index: int, label_ids: bool = False) -> np.ndarray:
    """The raw-value -> class-id table of a dataset format (see the module docstring);
    values that are not valid for the format map to :data:`INVALID`.

    Args:
        fmt: camvid | ade20k | cityscapes | folder.
        num_classes: K (used by ``folder``; the others have fixed counts).
        ignore_index: value written for ignored pixels.
        label_ids: Cityscapes only: the files hold labelIds (0..33), not trainIds.
    """
    lut = np.full(256, INVALID, np.int64)
    if fmt == "camvid":
        lut[:CAMVID_VOID] = np.arange(CAMVID_VOID)
        lut[CAMVID_VOID] = ignore_index
    elif fmt == "ade20k":  # reduce_zero_label: 0 (other) -> ignore, v -> v - 1; 255 stays ignored
        lut[0] = ignore_index
        lut[1:151] = np.arange(150)
        lut[255] = ignore_index
    elif fmt == "cityscapes":
        if label_ids:
            ids = np.asarray(CITYSCAPES_ID_TO_TRAINID, np.int64)
            lut[: len(ids)] = np.where(ids == 255, ignore_index, ids)
        else:
            lut[:19] = np.arange(19)
        lut[255] = ignore_index
    elif fmt == "folder":
        lut[:num_classes] = np.arange(num_classes)
        lut[FOLDER_IGNORE] = ignore_index
    else:
        raise ValueError(f"unknown dataset format {fmt!r}")
    return lut


def _ranges(values: np.ndarray) -> str:
    """Sorted ints as compact ranges: [0,1,2,3,255] -> '0..3, 255'."""
    out, start = [], None
    vals = [int(v) for v in values]
    for i, v in enumerate(vals):
        if start is None:
            start = v
        if i + 1 == len(vals) or vals[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}..{v}")
            start = None
    return ", ".join(out)


def map_label(raw: np.ndarray, lut: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Map raw label values through ``lut``; DataError naming ``path`` if any value is invalid."""
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
        bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])
    else:
        mapped = lut[raw]
        invalid = mapped == INVALID
        if not invalid.any():
            return mapped
        bad = np.unique(raw[invalid])
    shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
    raise DataError(f"{path}: label values {shown} are outside the valid values "
                    f"{_ranges(np.flatnonzero(lut != INVALID))}")


BEV_MAP_PALETTE = [(166, 206, 227), (251, 154, 153), (227, 26, 28), (253, 191, 111),
                   (255, 127, 0), (106, 61, 154)]
"""Colours of the six BEV map classes (drivable area, ped crossing, walkway, stop line,
car-park area, divider), as BEVFusion's map visualisation."""
