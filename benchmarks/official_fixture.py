"""Record the official backbones' outputs for tests/test_official.py (run in the oracle venv).

The official DDP code runs on this CPU as a test oracle (see benchmarks/official_parity.sh and
the shared oracle README). This script builds two tiny backbones with the official classes,
mmseg's ``SwinTransformer`` (as the DDP ADE20K configs use it) and mmcls' ``ConvNeXt`` (as the
Cityscapes configs), perturbs every weight away from its init, and saves their state dicts and
their four output maps for inputs whose sides are and are not multiples of 32. The test loads
the weights through densediff's key mapping and compares, without needing the oracle. It also
records the tensor names and shapes of every released segmentation architecture
(``keys_<name>.json``), so that strict conversion of each layout is tested without the oracle.

    ORACLE=/work/oracle $ORACLE/venv/bin/python benchmarks/official_fixture.py tests/fixtures/official
"""

import os
import sys

import torch

ORACLE = os.environ.get("ORACLE", "/work/oracle")
sys.path[:0] = [f"{ORACLE}/DDP/segmentation", f"{ORACLE}/shims"]
import mmcv_lite_ops_shim  # noqa: E402,F401  (before mmseg.models)
from mmcls.models.backbones import ConvNeXt  # noqa: E402
from mmseg.models.backbones import SwinTransformer  # noqa: E402

SIZES = [(76, 116), (64, 96)]  # 76 x 116: not multiples of 32 (stage 4 is 3 x 4, below the window)


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():
                v.add_(0.1 * torch.randn(v.shape, generator=g))


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nets = {
        "swin": SwinTransformer(embed_dims=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2],
                                window_size=7, strides=(4, 2, 2, 2), out_indices=(0, 1, 2, 3),
                                qkv_bias=True, patch_norm=True, drop_path_rate=0.0,
                                use_abs_pos_embed=False),
        "convnext": ConvNeXt(arch={"depths": [2, 2, 2, 2], "channels": [8, 16, 16, 32]},
                             out_indices=[0, 1, 2, 3], gap_before_final_norm=False,
                             layer_scale_init_value=1.0),
    }
    g = torch.Generator().manual_seed(1)
    for seed, (name, net) in enumerate(nets.items()):
        net.init_weights()
        perturb(net, seed + 10)
        net.eval()
        record = {"state_dict": {f"backbone.{k}": v.clone() for k, v in net.state_dict().items()}}
        for h, w in SIZES:
            x = torch.randn(1, 3, h, w, generator=g)
            with torch.no_grad():
                record[f"{h}x{w}"] = {"input": x, "features": [f.clone() for f in net(x)]}
        torch.save(record, os.path.join(out, f"{name}_tiny.pt"))
        print(name, {k: [tuple(f.shape) for f in v["features"]] for k, v in record.items()
                     if k != "state_dict"})


RELEASED_LAYOUTS = [f"ddp_swin_{s}_2x8_512x512_160k_ade20k" for s in "tsbl"] + [
    f"ddp_convnext_{s}_4x4_512x1024_160k_cityscapes" for s in "tsbl"]
"""The aligned fine-tunes have the layout of their 160k models."""


def record_layouts(out: str) -> None:
    import json

    import mmcls.models  # noqa: F401  (registers mmcls.ConvNeXt)
    from mmcv import Config
    from mmseg.models import build_segmentor

    for name in RELEASED_LAYOUTS:
        sub = "ade" if "ade" in name else "cityscapes"
        cfg = Config.fromfile(f"{ORACLE}/DDP/segmentation/configs/{sub}/{name}.py")
        cfg.model.pretrained = None
        cfg.model.backbone.init_cfg = None
        state = build_segmentor(cfg.model).state_dict()
        with open(os.path.join(out, f"keys_{name}.json"), "w") as f:
            json.dump({k: list(v.shape) for k, v in state.items()}, f, separators=(",", ":"))


def record_cv2_resize(out: str) -> None:
    """cv2 INTER_LINEAR on uint8 (mmcv's imresize) for small random images, up and down."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    pairs = [(13, 17, 40, 52), (40, 52, 13, 17), (30, 40, 64, 85), (64, 85, 30, 40), (9, 31, 9, 7),
             (50, 37, 23, 61), (7, 7, 50, 50), (33, 65, 16, 32)]
    arrays = {}
    for i, (h, w, oh, ow) in enumerate(pairs):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arrays[f"in{i}"], arrays[f"out{i}"] = img, cv2.resize(img, (ow, oh),
                                                               interpolation=cv2.INTER_LINEAR)
    np.savez_compressed(os.path.join(out, "cv2_resize.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
    record_layouts(sys.argv[1])
    record_cv2_resize(sys.argv[1])
