"""The official DDP BEV model (camera only) on CPU, as a test oracle (run in the oracle venv).

The official BEV code (``JiYuanFeng/DDP`` ``bev/``, BEVFusion's ``mmdet3d`` fork) needs compiled
CUDA ops for LiDAR (voxelisation, sparse conv) and for ``bev_pool``; the camera-only model needs
only ``bev_pool``. This script never imports the ``mmdet3d`` package as a whole: it loads the
few module files the camera model uses (fusion_models/{base,bevfusion,ddp}.py,
necks/{generalized_lss,lss}.py, backbones/resnet.py, vtransforms/{base,lss}.py,
heads/segm/deformable_head_with_time.py, ops/norm.py) under their own names, with

- ``mmdet3d.ops.bev_pool`` replaced by :func:`bev_pool_reference`, a plain-PyTorch statement of
  what ``ops/bev_pool/src/bev_pool_cuda.cu`` computes (see its doc), checked against a loop
  over the points by :func:`check_bev_pool`;
- mmdet 2.20.0 (pure Python, installed with ``pip install --no-deps --target $BEV_SITE``;
  it asserts mmcv <= 1.5.0, so ``mmcv.__version__`` reads 1.5.0 while it imports) for
  ``SwinTransformer`` and the registries;
- the DDP segmentation fork's ``mmseg/models/utils/transformer.py`` loaded as a standalone file
  for the time-aware ``BaseTransformerLayer`` (``use_time_mlp``), which ``bev/`` does not define
  (reference notes §1.12): the BEV yaml asks for it, so the released model was trained with it.
  Its registrations are forced over mmdet's (same names, same code for the rest).

Nothing of the official code is copied into densediff; this file only imports it.

    ORACLE=/work/oracle BEV=/work/oracle-bev/DDP/bev BEV_SITE=/work/oracle-bev/site \\
      $ORACLE/venv/bin/python benchmarks/official_bev_oracle.py keys tests/fixtures/official
    ... benchmarks/official_bev_oracle.py dump OUT_DIR [--size 64 176] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

ORACLE = Path(os.environ.get("DENSEDIFF_ORACLE", os.environ.get("ORACLE", "/work/oracle")))
BEV = Path(os.environ.get("BEV", "/work/oracle-bev/DDP/bev"))
BEV_SITE = Path(os.environ.get("BEV_SITE", "/work/oracle-bev/site"))
NAME = "ddp-camera-bev256d2-lss-scale001-d5-lr5e-5"


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ bev_pool


def bev_pool_reference(feats, coords, B, D, H, W):
    """What BEVFusion's CUDA ``bev_pool`` returns, in PyTorch.

    ``coords`` rows are (x, y, z, batch) cell indices of kept points. The Python wrapper sorts
    the points by ``rank = x (W D B) + y (D B) + z B + b``; the kernel then sums the features of
    each run of equal ranks (one run per occupied cell) and *writes* the sum into
    ``out[b, z, x, y, :]`` of a zero-initialised B x D x H x W x C tensor (bev_pool.cpp), so a
    cell holds the sum of its points and empty cells are 0. The wrapper returns
    ``out.permute(0, 4, 1, 2, 3)``: B x C x D x H x W. Summation order inside a cell is the
    sorted order (float round-off only).
    """
    coords = coords.long()
    ranks = coords[:, 0] * (W * D * B) + coords[:, 1] * (D * B) + coords[:, 2] * B + coords[:, 3]
    order = ranks.argsort()
    feats, coords = feats[order], coords[order]
    flat = ((coords[:, 3] * D + coords[:, 2]) * H + coords[:, 0]) * W + coords[:, 1]
    out = feats.new_zeros(B * D * H * W, feats.shape[1]).index_add_(0, flat, feats)
    return out.view(B, D, H, W, -1).permute(0, 4, 1, 2, 3).contiguous()


def check_bev_pool() -> float:
    """The reference against a per-point loop (duplicates, empty cells, 2 batches)."""
    g = torch.Generator().manual_seed(0)
    B, D, H, W, C, n = 2, 2, 5, 4, 3, 200
    coords = torch.stack([torch.randint(0, H, (n,), generator=g),
                          torch.randint(0, W, (n,), generator=g),
                          torch.randint(0, D, (n,), generator=g),
                          torch.randint(0, B, (n,), generator=g)], 1)
    feats = torch.randn(n, C, generator=g, dtype=torch.float64)
    ref = torch.zeros(B, D, H, W, C, dtype=torch.float64)
    for (x, y, z, b), f in zip(coords.tolist(), feats):
        ref[b, z, x, y] += f
    out = bev_pool_reference(feats, coords.int(), B, D, H, W)
    return float((out - ref.permute(0, 4, 1, 2, 3)).abs().max())


# ------------------------------------------------------------------------------ imports


def _package(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)] if path is not None else []
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    if "." in name:
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, mod)
    return mod


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    if "." in name:
        parent, _, leaf = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], leaf, mod)
    return mod


class _ForceRegister:
    """mmcv registries accept re-registration while active (mmdet and the DDP seg fork register
    the same transformer names)."""

    def __enter__(self):
        from mmcv.utils import Registry

        self._orig = Registry._register_module

        def reg(registry, module, module_name=None, force=False):
            return self._orig(registry, module, module_name, True)

        Registry._register_module = reg
        return self

    def __exit__(self, *exc):
        from mmcv.utils import Registry

        Registry._register_module = self._orig


def import_official():
    """Load the official camera-model modules; returns the ``DDP`` class."""
    sys.path[:0] = [str(BEV_SITE), str(ORACLE / "shims")]
    import mmcv
    import mmcv_lite_ops_shim  # noqa: F401  (mmcv.ops importable without compiled ops)

    real = mmcv.__version__
    mmcv.__version__ = "1.5.0"  # mmdet 2.20.0 asserts mmcv <= 1.5.0
    try:
        import mmdet  # noqa: F401
    finally:
        mmcv.__version__ = real
    # only the mmdet modules the camera model uses (its package __init__ pulls in all heads)
    md = BEV_SITE / "mmdet" / "models"
    _package("mmdet.models", md)
    mb = _load("mmdet.models.builder", md / "builder.py")
    sys.modules["mmdet.models"].__dict__.update(BACKBONES=mb.BACKBONES, NECKS=mb.NECKS,
                                                HEADS=mb.HEADS)
    _package("mmdet.models.utils", md / "utils")
    _package("mmdet.models.backbones", md / "backbones")
    with _ForceRegister():
        _load("mmdet.models.utils.ckpt_convert", md / "utils" / "ckpt_convert.py")
        _load("mmdet.models.utils.transformer", md / "utils" / "transformer.py")
        _load("mmdet.models.backbones.swin", md / "backbones" / "swin.py")
    m3 = BEV / "mmdet3d"
    _package("mmdet3d", m3)
    _package("mmdet3d.ops", m3 / "ops", bev_pool=bev_pool_reference,
             Voxelization=None, DynamicScatter=None)  # LiDAR ops: not used by the camera model
    _load("mmdet3d.ops.norm", m3 / "ops" / "norm.py")
    _package("mmdet3d.models", m3 / "models")
    builder = _load("mmdet3d.models.builder", m3 / "models" / "builder.py")
    sys.modules["mmdet3d.models"].FUSIONMODELS = builder.FUSIONMODELS
    for sub in ("necks", "backbones", "vtransforms", "heads", "heads.segm", "fusion_models"):
        _package(f"mmdet3d.models.{sub}", m3 / "models" / sub.replace(".", "/"))
    with _ForceRegister():
        for mod in ("necks/generalized_lss", "necks/lss", "backbones/resnet", "vtransforms/base",
                    "vtransforms/lss", "heads/segm/deformable_head_with_time"):
            _load("mmdet3d.models." + mod.replace("/", "."), m3 / "models" / f"{mod}.py")
        # the time-aware BaseTransformerLayer of the DDP segmentation fork (standalone file)
        _load("ddp_seg_transformer",
              ORACLE / "DDP" / "segmentation" / "mmseg" / "models" / "utils" / "transformer.py")
        for mod in ("base", "bevfusion", "ddp"):
            _load(f"mmdet3d.models.fusion_models.{mod}", m3 / "models" / "fusion_models" / f"{mod}.py")
    return sys.modules["mmdet3d.models.fusion_models.ddp"].DDP


def official_cfg(image_size=(256, 704)) -> dict:
    """The released camera model's ``model`` section: nuscenes/default.yaml, seg/default.yaml and
    the model yaml merged as torchpack does, with its ``${...}`` values filled in."""
    import yaml

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k) or {}, v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    root = BEV / "configs" / "nuscenes"
    default = yaml.safe_load((root / "default.yaml").read_text())
    cfg = merge(yaml.safe_load((root / "seg" / "default.yaml").read_text()),
                yaml.safe_load((root / "seg" / f"{NAME}.yaml").read_text()))["model"]
    vt = cfg["encoders"]["camera"]["vtransform"]
    vt["image_size"] = list(image_size)
    vt["feature_size"] = [image_size[0] // 8, image_size[1] // 8]
    cfg["heads"]["map"]["classes"] = default["map_classes"]
    cfg["encoders"]["camera"]["backbone"]["init_cfg"] = None
    cfg.pop("type")
    from mmcv import ConfigDict

    return ConfigDict(cfg)  # attribute access, as torchpack / mmcv configs give


def build(image_size=(256, 704), seed: int = 0, official=None, cfg_of=None):
    """The official model (``official``: its importer, ``cfg_of``: its config; default the
    camera model's), seeded, initialised, in eval mode."""
    DDP = (official or import_official)()
    torch.manual_seed(seed)
    model = DDP(**(cfg_of or official_cfg)(image_size))
    model.init_weights()
    return model.eval()


# ------------------------------------------------------------------------------ commands


def head_call(model, dec: torch.Tensor, g: torch.Generator) -> dict:
    """One map-head call at a fixed noisy map (``g``) and t = 0.5, with its inputs:
    ``x_t``, ``t``, ``log_snr``, ``time_emb``, ``fused`` (the head's input), ``head_probs``."""
    fh, fw = dec.shape[2], dec.shape[3]
    x_t = torch.randn((1, 256, fh, fw), generator=g) * 0.6
    t = torch.tensor([0.5])
    log_snr = model.log_snr(t)
    time_emb = model.time_mlp(log_snr)
    fused = model.transform(torch.cat([dec, x_t], 1))
    probs = model.heads["map"]([fused], time_emb, target=None)
    return dict(x_t=x_t, t=t, log_snr=log_snr, time_emb=time_emb, fused=fused,
                head_probs=probs)


def record_keys(out: Path, name: str = NAME, build_fn=None) -> Path:
    """``out/keys_<name>.json``: every tensor name and shape of the official model."""
    model = (build_fn or build)()
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    path = out / f"keys_{name}.json"
    path.write_text(json.dumps(layout, indent=0) + "\n")
    log(f"{path}: {len(layout)} tensors")
    return path


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every float tensor away from its init (norms, offsets, biases, embeddings), so
    that every weight matters; derived geometry (frustum, dx, bx, nx) is left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith(("frustum", ".dx", ".bx", ".nx")) or not v.is_floating_point():
                continue
            if k.endswith("running_var"):
                v.mul_(torch.empty(v.shape).uniform_(0.5, 1.5, generator=g))
            elif k.endswith(("relative_position_bias_table", "running_mean")) or v.ndim == 1:
                v.add_(0.1 * torch.randn(v.shape, generator=g))
            else:
                v.mul_(1 + 0.1 * torch.randn(v.shape, generator=g))
                v.add_(0.01 * torch.randn(v.shape, generator=g))


def cameras(n: int, image_size, seed: int):
    """``n`` surround cameras on a ring (nuScenes-like intrinsics scaled to ``image_size``):
    intrinsics n x 3 x 3 and camera->ego n x 4 x 4 (camera axes x right, y down, z forward)."""
    import math

    h, w = image_size
    g = torch.Generator().manual_seed(seed)
    f = 1266.0 * w / 1600
    intr = torch.tensor([[f, 0, w / 2 + 3.0], [0, f, h / 2 + 5.0], [0, 0, 1]])
    axes = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # cam x,y,z -> ego -y,-z,x
    ks, ts = [], []
    for i in range(n):
        yaw = 2 * math.pi * i / n + 0.1 * float(torch.randn(1, generator=g))
        c, s = math.cos(yaw), math.sin(yaw)
        rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ axes
        m = torch.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = torch.tensor([1.0 * c, 1.0 * s, 1.6])
        ks.append(intr.clone())
        ts.append(m)
    return torch.stack(ks), torch.stack(ts)


class SeededNoise:
    """``torch.randn`` while the official sampler runs: the start noise (R, C, h, w) is drawn
    from ``torch.Generator().manual_seed(seed)`` as densediff's ``seeds=[seed]``."""

    def __init__(self, seed: int):
        self.seed, self.drawn = seed, []

    def __enter__(self):
        self._orig = orig = torch.randn

        def randn(*shape, **kw):
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
            t = orig(tuple(shape), generator=torch.Generator().manual_seed(self.seed))
            self.drawn.append(t.clone())
            return t

        torch.randn = randn
        return self

    def __exit__(self, *exc):
        torch.randn = self._orig


class HeadRecorder:
    """Record every map-head call of the official sampler (its sigmoid output)."""

    def __init__(self, head):
        self.head, self.out = head, []

    def __enter__(self):
        orig = self.head.forward

        def rec(*a, **kw):
            y = orig(*a, **kw)
            self.out.append(y.detach().clone())
            return y

        self.head.forward = rec
        return self

    def __exit__(self, *exc):
        del self.head.forward


@torch.no_grad()
def dump(out: Path, size=(64, 176), seed: int = 0, ncam: int = 2, randsteps: int = 2) -> Path:
    """Random perturbed weights, ``ncam`` cameras at ``size``: every stage's output."""
    t0 = time.time()
    model = build(size, seed)
    perturb(model, seed + 1)
    model.randsteps = randsteps
    official_state = {k: v.clone() for k, v in model.state_dict().items()}
    h, w = size
    g = torch.Generator().manual_seed(seed + 2)
    img = torch.randn(1, ncam, 3, h, w, generator=g)
    intr, cam2ego = cameras(ncam, size, seed)
    eye = torch.eye(4).expand(1, ncam, 4, 4)
    k4 = torch.eye(4).repeat(1, ncam, 1, 1)
    k4[..., :3, :3] = intr
    cam = model.encoders["camera"]
    d: dict = {"img": img, "intrinsics": intr[None], "cam2ego": cam2ego[None]}
    x = img.view(ncam, 3, h, w)
    feats = cam["backbone"](x)
    d["backbone"] = [f.clone() for f in feats]
    neck = cam["neck"](feats)
    d["neck"] = neck[0]
    # the vtransform: ego = the BEV frame here (camera2lidar := camera2ego, lidar2ego = I,
    # no image / BEV augmentation)
    vt = cam["vtransform"]
    args = (neck[0].view(1, ncam, *neck[0].shape[1:]), None, cam2ego[None], torch.eye(4)[None],
            None, None, k4, cam2ego[None], eye.clone(), torch.eye(4)[None], [{}])
    geom = vt.get_geometry(cam2ego[None][..., :3, :3], cam2ego[None][..., :3, 3], intr[None],
                           eye[..., :3, :3], eye[..., :3, 3])
    d["geometry"] = geom
    lifted = vt.bev_pool(geom, vt.get_cam_feats(args[0]))
    d["lifted"] = lifted
    bev = vt(*args)
    d["bev"] = bev
    dec = model.decoder["neck"](model.decoder["backbone"](bev))
    d["decoder"] = dec
    d.update(head_call(model, dec, g))
    head = model.heads["map"]
    # the sampler (ddim_sample) with densediff's seeded start noise
    with SeededNoise(seed) as noise, HeadRecorder(head) as rec:
        sample = model.ddim_sample([dec], head)
    d["noise"] = noise.drawn[0]
    d["step_probs"] = torch.stack(rec.out)  # S x R x K x X x Y
    d["sample"] = sample  # 1 x K x X x Y: mean over steps and starts
    # the whole model from the images (forward_single, eval)
    with SeededNoise(seed):
        res = model.forward_single(img, None, cam2ego[None], torch.eye(4)[None], None, None, k4,
                                   cam2ego[None], eye.clone(), torch.eye(4)[None], [{}],
                                   gt_masks_bev=torch.zeros(1, 6, 200, 200))
    d["masks_bev"] = res[0]["masks_bev"]
    d["info"] = dict(name=NAME, size=[h, w], cameras=ncam, seed=seed, steps=int(model.timesteps),
                     randsteps=randsteps, td=model.time_difference, bit_scale=model.bit_scale,
                     bev_pool_check=check_bev_pool(), seconds=round(time.time() - t0, 1))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {}, "state_dict": official_state}, out / f"{NAME}.pth")
    path = out / f"{NAME}_{h}x{w}.pt"
    torch.save(d, path)
    log(f"{path}: bev {tuple(bev.shape)}, decoder {tuple(dec.shape)}, sample "
        f"{tuple(sample.shape)}, {time.time() - t0:.1f} s; bev_pool check "
        f"{d['info']['bev_pool_check']:.1e}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["keys", "dump", "check"])
    p.add_argument("out", type=Path, nargs="?", default=Path("."))
    p.add_argument("--size", type=int, nargs=2, default=[64, 176])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--randsteps", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.command == "check":
        log(f"bev_pool reference vs loop: {check_bev_pool():.1e}")
    elif a.command == "keys":
        record_keys(a.out)
    else:
        dump(a.out, tuple(a.size), a.seed, a.cameras, a.randsteps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
