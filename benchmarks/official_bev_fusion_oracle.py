"""The official DDP BEV camera + LiDAR model on CPU, as a test oracle (run in the oracle venv).

Extends :mod:`official_bev_oracle` (the camera model; same imports and shims) with the LiDAR
branch of ``ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5``: BEVFusion's ``Voxelization``
(``ops/voxel``), the vendored spconv 1.x (``ops/spconv``), ``SparseEncoder``, ``ConvFuser``,
``SECOND`` and ``SECONDFPN``. The two compiled ops are built from the official C++ sources for
the CPU (their CPU code paths; the CUDA kernels are not built), outside densediff:

- ``sparse_conv_ext``: ``ops/spconv/src/{all,indice,reordering,maxpool}.cc`` with
  ``torch.utils.cpp_extension.load``; ``torch_utils.h`` includes ``ATen/cuda/CUDAContext.h``,
  which a CPU torch cannot compile, so a one-line shim header (``getCurrentCUDAStream`` ->
  nullptr) is put first on the include path; the GPU functors stay undefined and the module
  is imported with ``RTLD_LAZY`` (they are bound only if a CUDA tensor reaches them);
- ``voxel_layer``: ``ops/voxel/src/{voxelization,voxelization_cpu,scatter_points_cpu}.cpp``
  with ONE change, in a copy: ``hard_voxelize_cpu`` allocates its coordinate -> voxel table as
  ``(gz, gy, gx)`` but indexes it ``[x][y][z]`` (BEVFusion reordered the coordinates to x, y, z
  and left the table), which runs out of bounds on a 1024 x 1024 x 40 grid; the copy allocates
  ``(gx, gy, gz)``. The CUDA kernel the authors ran has no such table; its voxel order (first
  appearance of a voxel in the point order) and point order within a voxel are the CPU's.

Recipe (``build`` writes the shim, the patched copy and both ``.so`` files under BUILD;
``SPCONV_EXT`` / ``VOXEL_EXT`` name them for the other commands)::

    ORACLE=/work/oracle BEV=/work/oracle-bev/DDP/bev \\
      $ORACLE/venv/bin/python benchmarks/official_bev_fusion_oracle.py build /work/oracle-bev/build
    ORACLE=/work/oracle BEV=/work/oracle-bev/DDP/bev BEV_SITE=/work/oracle-bev/site \\
    SPCONV_EXT=/work/oracle-bev/build/spconv_build/sparse_conv_ext.so \\
    VOXEL_EXT=/work/oracle-bev/build/voxel_build/voxel_layer.so \\
      $ORACLE/venv/bin/python benchmarks/official_bev_fusion_oracle.py keys tests/fixtures/official
    ... official_bev_fusion_oracle.py dump OUT_DIR [--size 64 176] [--points 4000] [--seed 0]
    ... official_bev_fusion_oracle.py sparse OUT_DIR [--points 2000]  (LiDAR branch only)

Nothing of the official code is copied into densediff; this file only imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import official_bev_oracle as cam  # noqa: E402

NAME = "ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5"
SPCONV_EXT = Path(os.environ.get("SPCONV_EXT",
                                 "/work/oracle-bev/build/spconv_build/sparse_conv_ext.so"))
VOXEL_EXT = Path(os.environ.get("VOXEL_EXT", "/work/oracle-bev/build/voxel_build/voxel_layer.so"))
log = cam.log


SHIM = """// oracle shim: the CPU build of the vendored spconv never touches a CUDA stream
#pragma once
#include <cuda_runtime_api.h>
namespace at { namespace cuda { inline cudaStream_t getCurrentCUDAStream() { return nullptr; } } }
"""
TABLE = "{grid_size[2], grid_size[1], grid_size[0]}, coors.options()"


def build_ops(out: Path, cuda_include: str = "/usr/local/cuda/include") -> None:
    """Build ``sparse_conv_ext`` and ``voxel_layer`` for the CPU under ``out`` (see the module
    docstring; needs g++, ninja and the CUDA runtime headers, no GPU)."""
    import shutil

    from torch.utils.cpp_extension import load as _load_ext

    def load(name, sources, build_directory, **kw):
        """Compile; torch then dlopens with RTLD_NOW, which the undefined GPU functors fail:
        the library is checked by a lazy import instead."""
        try:
            _load_ext(name, sources, build_directory=build_directory, **kw)
        except OSError:
            pass
        _extension(name, Path(build_directory) / f"{name}.so")

    sp = cam.BEV / "mmdet3d" / "ops" / "spconv"
    shim = out / "shim" / "ATen" / "cuda"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "CUDAContext.h").write_text(SHIM)
    (out / "spconv_build").mkdir(exist_ok=True)
    load("sparse_conv_ext", [str(sp / "src" / f"{f}.cc")
                             for f in ("all", "indice", "reordering", "maxpool")],
         extra_include_paths=[str(out / "shim"), str(sp / "include"), cuda_include],
         extra_cflags=["-O2", "-w"], build_directory=str(out / "spconv_build"),
         is_python_module=False)
    src = out / "voxel_src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(cam.BEV / "mmdet3d" / "ops" / "voxel" / "src", src)
    cpu = src / "voxelization_cpu.cpp"
    text = cpu.read_text()
    if text.count(TABLE) != 1:
        raise SystemExit(f"{cpu}: the coor_to_voxelidx allocation to fix was not found once")
    cpu.write_text(text.replace(TABLE, TABLE.replace("[2], grid_size[1], grid_size[0]",
                                                     "[0], grid_size[1], grid_size[2]")))
    (out / "voxel_build").mkdir(exist_ok=True)
    load("voxel_layer", [str(src / f) for f in ("voxelization.cpp", "voxelization_cpu.cpp",
                                                "scatter_points_cpu.cpp")],
         extra_cflags=["-O2", "-w"], build_directory=str(out / "voxel_build"),
         is_python_module=False)
    log(f"built {out / 'spconv_build' / 'sparse_conv_ext.so'} and "
        f"{out / 'voxel_build' / 'voxel_layer.so'}")


def _extension(name: str, path: Path):
    """Import a compiled extension lazily bound (undefined CUDA functors never resolved)."""
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.setdlopenflags(flags)
    sys.modules[name] = mod
    return mod


def import_official():
    """The camera oracle's imports plus the LiDAR branch; returns the ``DDP`` class."""
    DDP = cam.import_official()
    m3, md = cam.BEV / "mmdet3d", cam.BEV_SITE / "mmdet" / "models"
    ops = sys.modules["mmdet3d.ops"]
    with cam._ForceRegister():
        # mmdet's BasicBlock (SparseBasicBlock derives from it)
        res_layer = cam._load("mmdet.models.utils.res_layer", md / "utils" / "res_layer.py")
        sys.modules["mmdet.models.utils"].ResLayer = res_layer.ResLayer
        cam._load("mmdet.models.backbones.resnet", md / "backbones" / "resnet.py")
        cam._package("mmdet3d.ops.spconv", m3 / "ops" / "spconv")
        sys.modules["mmdet3d.ops.spconv.sparse_conv_ext"] = _extension(
            "mmdet3d.ops.spconv.sparse_conv_ext", SPCONV_EXT)
        sp = cam._load("mmdet3d.ops.spconv", m3 / "ops" / "spconv" / "__init__.py")
        sp.__path__ = [str(m3 / "ops" / "spconv")]
        cam._package("mmdet3d.ops.voxel", m3 / "ops" / "voxel")
        _extension("mmdet3d.ops.voxel.voxel_layer", VOXEL_EXT)
        vox = cam._load("mmdet3d.ops.voxel.voxelize", m3 / "ops" / "voxel" / "voxelize.py")
        ops.spconv, ops.Voxelization = sp, vox.Voxelization
        # bevfusion.py was loaded by the camera oracle with Voxelization = None
        sys.modules["mmdet3d.models.fusion_models.bevfusion"].Voxelization = vox.Voxelization
        block = cam._load("mmdet3d.ops.sparse_block", m3 / "ops" / "sparse_block.py")
        ops.SparseBasicBlock = block.SparseBasicBlock
        ops.make_sparse_convmodule = block.make_sparse_convmodule
        cam._package("mmdet3d.models.fusers", m3 / "models" / "fusers")
        for mod in ("backbones/sparse_encoder", "backbones/second", "necks/second",
                    "fusers/conv"):
            cam._load("mmdet3d.models." + mod.replace("/", "."), m3 / "models" / f"{mod}.py")
    return DDP


def official_cfg(image_size=(256, 704)) -> dict:
    """The released fusion model's ``model`` section (merged yamls, ``${...}`` filled)."""
    import yaml
    from mmcv import ConfigDict

    name, cam.NAME = cam.NAME, NAME
    try:
        cfg = dict(cam.official_cfg(image_size))
    finally:
        cam.NAME = name
    root = cam.BEV / "configs" / "nuscenes"
    default = yaml.safe_load((root / "default.yaml").read_text())
    vox = cfg["encoders"]["lidar"]["voxelize"]
    vox["point_cloud_range"], vox["voxel_size"] = default["point_cloud_range"], default["voxel_size"]
    return ConfigDict(cfg)


def build(image_size=(256, 704), seed: int = 0):
    return cam.build(image_size, seed, import_official, official_cfg)


def record_keys(out: Path) -> Path:
    return cam.record_keys(out, NAME, build)


def random_points(n: int, seed: int) -> torch.Tensor:
    """n x 5 LiDAR-like points (x, y, z, intensity, time): clustered so that voxels hold
    several points, a few outside the range, and 1/10 of them in 20 tight clusters (voxels with
    more than the 10 points kept)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.cat([torch.rand(n // 8, 2, generator=g) * 110 - 55,
                         torch.rand(n // 8, 1, generator=g) * 9 - 5.5], 1)
    pick = torch.randint(0, len(centres), (n,), generator=g)
    xyz = centres[pick] + torch.randn(n, 3, generator=g) * torch.tensor([0.3, 0.3, 0.15])
    tight = n // 10
    xyz[:tight] = (centres[:20][torch.randint(0, 20, (tight,), generator=g)]
                   + torch.randn(tight, 3, generator=g) * 0.02)
    xyz = xyz[torch.randperm(n, generator=g)]
    rest = torch.rand(n, 2, generator=g)
    return torch.cat([xyz, rest], 1)


def _sparse(t) -> dict:
    return {"indices": t.indices.clone(), "features": t.features.clone(),
            "shape": list(t.spatial_shape)}


@torch.no_grad()
def dump(out: Path, size=(64, 176), seed: int = 0, ncam: int = 2, randsteps: int = 2,
         npoints: int = 4000) -> Path:
    """Random perturbed weights, ``ncam`` cameras at ``size`` and ``npoints`` points."""
    t0 = time.time()
    model = build(size, seed)
    cam.perturb(model, seed + 1)
    model.randsteps = randsteps
    official_state = {k: v.clone() for k, v in model.state_dict().items()}
    h, w = size
    g = torch.Generator().manual_seed(seed + 2)
    img = torch.randn(1, ncam, 3, h, w, generator=g)
    intr, cam2ego = cam.cameras(ncam, size, seed)
    eye = torch.eye(4).expand(1, ncam, 4, 4)
    k4 = torch.eye(4).repeat(1, ncam, 1, 1)
    k4[..., :3, :3] = intr
    points = random_points(npoints, seed + 3)
    d: dict = {"img": img, "intrinsics": intr[None], "cam2ego": cam2ego[None], "points": points}
    # LiDAR: voxelise (BEVFusion.voxelize: hard voxels, mean of their points)
    feats, coords, sizes = model.voxelize([points])
    d.update(voxel_feats=feats, voxel_coords=coords, voxel_sizes=sizes)
    log(f"{len(coords)} voxels, {int((sizes == 10).sum())} of them full (10 points kept)")
    enc = model.encoders["lidar"]["backbone"]
    from mmdet3d.ops import spconv

    x = spconv.SparseConvTensor(feats, coords.int(), enc.sparse_shape, 1)
    x = enc.conv_input(x)
    d["sparse_input"] = _sparse(x)
    stages = []
    for layer in enc.encoder_layers:
        x = layer(x)
        stages.append(_sparse(x))
    d["sparse_stages"] = stages
    d["sparse_out"] = _sparse(enc.conv_out(x))
    lidar_bev = model.extract_lidar_features([points])
    d["lidar_bev"] = lidar_bev
    # camera (as the camera oracle: camera2lidar := camera2ego, no augmentation)
    args = (img, None, cam2ego[None], torch.eye(4)[None], None, None, k4, cam2ego[None],
            eye.clone(), torch.eye(4)[None], [{}])
    cam_bev = model.extract_camera_features(*args)
    d["camera_bev"] = cam_bev
    fused = model.fuser([cam_bev, lidar_bev])
    d["fused_bev"] = fused
    dec = model.decoder["neck"](model.decoder["backbone"](fused))
    dec = dec[0] if isinstance(dec, (list, tuple)) else dec
    d["decoder"] = dec
    call = cam.head_call(model, dec, g)
    call["fused_in"] = call.pop("fused")  # "fused" here: the camera + LiDAR fuser
    d.update(call)
    head = model.heads["map"]
    with cam.SeededNoise(seed) as noise, cam.HeadRecorder(head) as rec:
        sample = model.ddim_sample([dec], head)
    d["noise"] = noise.drawn[0]
    d["step_probs"] = torch.stack(rec.out)
    d["sample"] = sample
    with cam.SeededNoise(seed):
        res = model.forward_single(img, [points], cam2ego[None], torch.eye(4)[None], None, None,
                                   k4, cam2ego[None], eye.clone(), torch.eye(4)[None], [{}],
                                   gt_masks_bev=torch.zeros(1, 6, 200, 200))
    d["masks_bev"] = res[0]["masks_bev"]
    d["info"] = dict(name=NAME, size=[h, w], cameras=ncam, seed=seed, points=npoints,
                     voxels=int(coords.shape[0]), steps=int(model.timesteps),
                     randsteps=randsteps, td=model.time_difference, bit_scale=model.bit_scale,
                     seconds=round(time.time() - t0, 1))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {}, "state_dict": official_state}, out / f"{NAME}.pth")
    path = out / f"{NAME}_{h}x{w}.pt"
    torch.save(d, path)
    log(f"{path}: {coords.shape[0]} voxels, active per stage "
        f"{[s['indices'].shape[0] for s in stages]}, lidar bev {tuple(lidar_bev.shape)}, "
        f"decoder {tuple(dec.shape)}, {time.time() - t0:.1f} s")
    return path


@torch.no_grad()
def sparse_dump(out: Path, seed: int = 0, npoints: int = 2000) -> Path:
    """Only the LiDAR branch (official ``Voxelization`` through ``BEVFusion.voxelize``, then the
    released config's ``SparseEncoder``), random perturbed weights: seconds, for the optional
    test ``tests/test_official_bev_fusion.py``."""
    import_official()
    from mmdet.models.builder import BACKBONES
    from torch import nn

    cfg = official_cfg()["encoders"]["lidar"]
    holder = nn.Module()  # what BEVFusion.voxelize reads of its model
    holder.encoders = nn.ModuleDict({"lidar": nn.ModuleDict(
        {"voxelize": sys.modules["mmdet3d.ops"].Voxelization(**cfg["voxelize"])})})
    holder.voxelize_reduce, holder.fp16_enabled = True, False
    holder.eval()
    torch.manual_seed(seed)
    enc = BACKBONES.build(dict(cfg["backbone"])).eval()
    cam.perturb(enc, seed + 1)
    points = random_points(npoints, seed + 3)
    bevfusion = sys.modules["mmdet3d.models.fusion_models.bevfusion"].BEVFusion
    feats, coords, sizes = bevfusion.voxelize(holder, [points])
    from mmdet3d.ops import spconv

    x = enc.conv_input(spconv.SparseConvTensor(feats, coords.int(), enc.sparse_shape, 1))
    stages = [_sparse(x)]
    for layer in enc.encoder_layers:
        x = layer(x)
        stages.append(_sparse(x))
    stages.append(_sparse(enc.conv_out(x)))
    d = dict(points=points, voxel_feats=feats, voxel_coords=coords, stages=stages,
             bev=enc(feats, coords, 1), state_dict=enc.state_dict(),
             voxelize=dict(cfg["voxelize"]), sparse_shape=list(enc.sparse_shape))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sparse_encoder.pt"
    torch.save(d, path)
    log(f"{path}: {len(coords)} voxels, {[s['indices'].shape[0] for s in stages]} active")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["build", "keys", "dump", "sparse"])
    p.add_argument("out", type=Path, nargs="?", default=Path("."))
    p.add_argument("--size", type=int, nargs=2, default=[64, 176])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--randsteps", type=int, default=2)
    p.add_argument("--points", type=int, default=4000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.command == "build":
        build_ops(a.out)
    elif a.command == "keys":
        record_keys(a.out)
    elif a.command == "sparse":
        sparse_dump(a.out, a.seed, a.points)
    else:
        dump(a.out, tuple(a.size), a.seed, a.cameras, a.randsteps, a.points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
