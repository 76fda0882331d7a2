"""Official parity, BEV camera + LiDAR model: densediff on the converted official checkpoint
against the official code's own outputs (the dump of
``benchmarks/official_bev_fusion_oracle.py dump``: BEVFusion's voxelisation and spconv 1.x run
through their CPU code paths, built from the vendored sources).

Runs in densediff's venv; it never imports the official code. It converts
``<dumps>/ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5.pth`` (random perturbed weights in the
official layout) with ``densediff convert`` (the CLI, in a subprocess), loads the result with
``densediff.load`` and compares, on the same inputs (images, cameras and one point cloud; no
augmentation), max |diff| of:

- the hard voxels (``voxelize``: coordinates must be identical, in the same order; features);
- every SparseEncoder stage on the official voxels (``conv_input``, the 4 stages, ``conv_out``:
  the active sites must be the same set; features compared site by site) and the LiDAR BEV
  features from the points (``view.lidar``);
- the camera BEV features (``view.lift``), the ConvFuser on the official camera and LiDAR BEV
  features, the SECOND + SECONDFPN decoder output from the inputs (``model.extract``);
- then as the camera model (:mod:`official_parity_bev`): time embedding, fused input, one
  map-head call, start noise, every step, the sampler output, the whole model
  (``predict_map``) and the 0.5-thresholded maps.

Pass: every max |diff| <= ``--tol`` (1e-4), identical voxel coordinates and active sites, and a
thresholded cell may differ only at a round-off tie (as the camera parity).

    .venv/bin/python benchmarks/official_parity_bev_fusion.py --dumps /tmp/fusion --work /tmp/fw
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from official_parity_bev import compare_sampling, maxdiff, run  # noqa: E402

NAME = "ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5"
NOT_DIFFS = ("voxel_coords_equal", "sites_equal", "thresholded_agree", "thresholded_differ",
             "official_margin_at_differ", "voxels", "active_sites", "official_max_abs")


def _by_site(coords: torch.Tensor, feats: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    from densediff.encoders.bevfusion_lidar import _keys

    keys = _keys(coords.long(), shape)
    order = keys.argsort()
    return keys[order], feats[order]


@torch.no_grad()
def compare(model, d: dict) -> dict:
    from densediff.encoders.bevfusion_lidar import voxelize

    img, intr, cam2ego, pts = d["img"], d["intrinsics"], d["cam2ego"], d["points"]
    size = tuple(img.shape[-2:])
    view = model.view
    lidar = view.lidar
    out: dict = {}
    feats, coords = voxelize(pts, lidar.point_range, lidar.voxel_size, lidar.max_points,
                             lidar.max_voxels[1])
    ref_c = d["voxel_coords"].long()
    out["voxel_coords_equal"] = bool(torch.equal(coords, ref_c[:, 1:]))
    out["voxels"] = int(len(coords))
    out["voxel_feats"] = maxdiff(feats, d["voxel_feats"])
    stages = lidar.backbone.stages(d["voxel_feats"], ref_c, 1)
    refs = [d["sparse_input"], *d["sparse_stages"], d["sparse_out"]]
    diffs, same, active = [], True, []
    for ours, ref in zip(stages, refs):
        ko, fo = _by_site(ours.coords, ours.feats, ours.shape)
        kr, fr = _by_site(ref["indices"], ref["features"], ours.shape)
        same &= list(ours.shape) == list(ref["shape"]) and torch.equal(ko, kr)
        diffs.append(maxdiff(fo, fr) if torch.equal(ko, kr) else float("inf"))
        active.append(int(len(kr)))
    out["sites_equal"], out["active_sites"], out["sparse_stages"] = bool(same), active, diffs
    points, mask = pts[None], torch.ones(1, len(pts), dtype=torch.bool)
    out["lidar_bev"] = maxdiff(lidar(points, mask), d["lidar_bev"])
    levels = model.encoder(img.flatten(0, 1))
    neck = model.neck(levels)
    out["camera_bev"] = maxdiff(view.lift(neck, size, intr, cam2ego), d["camera_bev"])
    out["fuser"] = maxdiff(view.fuser([d["camera_bev"], d["lidar_bev"]]), d["fused_bev"])
    inputs = {"images": img, "intrinsics": intr, "cam2ego": cam2ego, "points": points,
              "points_mask": mask}
    feat = model.extract(inputs)
    out["bev_decoder"] = maxdiff(feat, d["decoder"])
    out["decoder_on_official_fused"] = maxdiff(view.neck(view.backbone(d["fused_bev"])),
                                               d["decoder"])
    out["fused_input"] = maxdiff(model.fuse(torch.cat([d["decoder"], d["x_t"]], 1)),
                                 d["fused_in"])
    out.update(compare_sampling(model, d, feat, inputs))
    # the size of what was compared (a diff means little next to a map of zeros)
    out["official_max_abs"] = {
        "voxel_feats": float(d["voxel_feats"].abs().max()),
        "sparse_out": float(d["sparse_out"]["features"].abs().max()),
        "lidar_bev": float(d["lidar_bev"].abs().max()),
        "camera_bev": float(d["camera_bev"].abs().max()),
        "fused_bev": float(d["fused_bev"].abs().max()),
        "decoder": float(d["decoder"].abs().max())}
    # the LiDAR branch matters: the decoder output without it (zero LiDAR features)
    zero = view.fuser([d["camera_bev"], torch.zeros_like(d["lidar_bev"])])
    out["official_max_abs"]["decoder_change_without_lidar"] = maxdiff(
        view.neck(view.backbone(zero)), d["decoder"])
    return out


def passed(r: dict, tol: float) -> bool:
    vals = []
    for k, v in r.items():
        if k not in NOT_DIFFS:
            vals.extend(v if isinstance(v, list) else [v])
    return (max(vals) <= tol and r["voxel_coords_equal"] and r["sites_equal"]
            and r["official_margin_at_differ"] <= r["whole_model"])


def table(r: dict, info: dict, tol: float) -> str:
    def f(v):
        return " / ".join(f"{x:.1e}" for x in v) if isinstance(v, list) else (
            f"{v:.1e}" if isinstance(v, float) else str(v))

    rows = [f"| {k} | {f(v)} |" for k, v in r.items() if k not in NOT_DIFFS]
    rows.insert(0, f"| voxels: coordinates identical (same order) | {r['voxel_coords_equal']} "
                   f"({r['voxels']} voxels) |")
    rows.insert(2, f"| sparse stages: active sites identical | {r['sites_equal']} "
                   f"({' / '.join(map(str, r['active_sites']))}) |")
    rows.append(f"| 0.5-thresholded maps agree | {100 * r['thresholded_agree']:.4f} % "
                f"({r['thresholded_differ']} cells differ; official |p - 0.5| there <= "
                f"{r['official_margin_at_differ']:.1e}) |")
    rows.append("| official max abs value (scale of the above) | " + ", ".join(
        f"{k} {v:.2g}" for k, v in r["official_max_abs"].items()) + " |")
    head = (f"{NAME}, random perturbed weights, {info['cameras']} cameras at "
            f"{info['size'][0]}x{info['size'][1]}, {info['points']} points, {info['steps']} "
            f"steps, {info['randsteps']} starts, seed {info['seed']}: "
            f"{'PASS' if passed(r, tol) else 'FAIL'} (tol {tol:g})")
    return "\n".join([head, "", "| stage | max abs diff |", "|---|---|", *rows])


def main(argv=None) -> int:
    return run(argv, NAME, compare, table, passed, "bev_fusion_parity.json", __doc__)


if __name__ == "__main__":
    sys.exit(main())
