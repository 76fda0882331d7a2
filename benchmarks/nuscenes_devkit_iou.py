"""Our nuScenes map labels against the official devkit's raster, sample by sample.

Writes the tiny nuScenes fixture (:func:`densediff.testing.fixtures.write_nuscenes`) to a
temporary folder, loads every sample of its train and val splits with our loader
(:class:`densediff.data.nuscenes.NuScenesDataset`, labels by
:func:`densediff.data.bev.rasterize_map`) and rasterises the same patch with nuscenes-devkit
(``NuScenesMap.get_map_mask``, pose read by the devkit; :func:`densediff.data.nuscenes.
devkit_map_labels`). Prints per sample and layer:

- IoU of ours vs the devkit's;
- for polygon layers, IoU of ours grown by one cell towards +x and +y vs the devkit's (the
  devkit's ``cv2.fillPoly`` on rounded vertices sets that extra column and row);
- the mean over samples of the devkit's label centroid minus ours (metres, x and y).

Needs ``pip install nuscenes-devkit``. Takes a few seconds:

    python benchmarks/nuscenes_devkit_iou.py [overrides ...]    # e.g. data.bev.ybound=[-30,30,0.5]
"""

from __future__ import annotations

import argparse
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from densediff.data.nuscenes import devkit_label_pairs
from densediff.tasks import load_config
from densediff.testing.fixtures import write_nuscenes
from densediff.utils.grid import output_grid

POLYGON_CLASSES = {"drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area",
                   "road_segment", "road_block", "lane"}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else float("nan")


def _grow(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:, 1:] |= out[:, :-1].copy()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="config overrides (data.bev.*)")
    args = p.parse_args()
    from nuscenes.nuscenes import NuScenes

    data = load_config(None, ["task=bev", "data.dataset=nuscenes", "model.aux_head.enabled=false",
                              "data.bev.version=v1.0-mini", *args.overrides]).data
    grid, classes = output_grid(data.bev), list(data.bev.classes)
    print(f"nuscenes-devkit {version('nuscenes-devkit')}; grid x {data.bev.xbound} y "
          f"{data.bev.ybound} ({grid.shape[0]} x {grid.shape[1]} cells)")
    with tempfile.TemporaryDirectory() as tmp:
        info = write_nuscenes(Path(tmp) / "nuscenes")
        nusc = NuScenes(info["version"], str(info["root"]), verbose=False)
        head = f"{'sample':<14}" + "".join(f"{c[:13]:>14}" for c in classes)
        print("\nIoU ours vs devkit (polygon layers: / ours grown one cell towards +x, +y)")
        print(head + "\n" + "-" * len(head))
        ious, grown, offsets = [], [], []
        for split, token, ours, theirs in devkit_label_pairs(data, info["root"], nusc):
            ious.append([_iou(o, t) for o, t in zip(ours, theirs)])
            grown.append([_iou(_grow(o), t) if c in POLYGON_CLASSES else np.nan
                          for c, o, t in zip(classes, ours, theirs)])
            xs, ys = grid.centres()
            off = []
            for o, t in zip(ours, theirs):
                if o.any() and t.any():
                    (oi, oj), (ti, tj) = np.nonzero(o), np.nonzero(t)
                    off.append([xs[ti].mean() - xs[oi].mean(), ys[tj].mean() - ys[oj].mean()])
                else:
                    off.append([np.nan, np.nan])
            offsets.append(off)
            name = f"{split} {info['samples'][token]['scene']}/{info['samples'][token]['index']}"
            print(f"{name:<14}" + "".join(
                f"{a:>14.3f}" if np.isnan(b) else f"{f'{a:.3f} / {b:.3f}':>14}"
                for a, b in zip(ious[-1], grown[-1])))
        ious, grown, offsets = np.array(ious), np.array(grown), np.array(offsets)
        print("-" * len(head))
        print(f"{'mean':<14}" + "".join(
            f"{a:>14.3f}" if np.isnan(b).all() else f"{f'{a:.3f} / {np.mean(b):.3f}':>14}"
            for a, b in zip(np.nanmean(ious, 0), grown.T)))
        print(f"{'min':<14}" + "".join(f"{a:>14.3f}" for a in np.nanmin(ious, 0)))
        off = np.nanmean(offsets, 0)
        print(f"{'offset x, y':<14}" + "".join(f"{f'{x:+.2f}, {y:+.2f}':>14}" for x, y in off))
        print("\n(offset: devkit label centroid minus ours, metres, mean over samples)")


if __name__ == "__main__":
    main()
