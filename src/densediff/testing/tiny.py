"""Dotted overrides that shrink each shipped ``configs/generated`` config to a run that trains
in seconds on a CPU. Shared by the tests (one place instead of copies per test module)."""

from __future__ import annotations

__all__ = ["BEV_WORLD", "DDP_HEAD", "DDPS_UNET", "QUICK_BASELINE", "SMALL_DDP", "TINY", "TOY_DDP"]

RUN = ["train.iters=4", "train.warmup_iters=1", "train.eval_interval=4", "train.ckpt_interval=2",
       "train.log_interval=2", "train.progress=false"]

DDP_HEAD = ["model.head.num_layers=1", "model.head.channels=16", "model.head.num_heads=4",
            "model.head.ffn_channels=32", "model.diffusion.embed_channels=16"]
"""The paper's map decoder at its smallest (one layer, 16 channels)."""

DDPS_UNET = ["model.ddps.unet.dim=16", "model.ddps.unet.heads=2", "model.ddps.unet.dim_head=8",
             "model.ddps.unet.out_channels=16", "model.ddps.timesteps=10", "model.ddps.steps=3",
             "train.ema.every=2"]
"""DDPS's UNet denoiser at its smallest, 10 timesteps."""

BEV_WORLD = [
    "data.bev.gen_image_size=[32,88]", "data.bev.image_size=[32,88]",
    "data.bev.xbound=[-12,12,0.5]", "data.bev.ybound=[-12,12,0.5]",
    "data.bev.feat_xbound=[-12.8,12.8,0.8]", "data.bev.feat_ybound=[-12.8,12.8,0.8]",
    "data.bev.dbound=[1,17,1]",
]
"""A 48 x 48 BEV grid (24 m at 0.5 m) seen by 32 x 88 cameras."""

_SEG = ["data.gen_size=[32,32]", "data.gen_num_train=16", "data.gen_num_val=4",
        "data.gen_num_test=4", "data.train_pipeline.scale=[32,32]",
        "data.train_pipeline.crop_size=[32,32]", "data.batch_size=2",
        "model.encoder.variant=tiny", "model.neck.channels=16", "model.neck.num_groups=4",
        "model.head.channels=16", "model.aux_head.channels=16"]
_DEPTH = ["data.gen_size=[32,48]", "data.gen_num_train=16", "data.gen_num_val=3",
          "data.gen_num_test=3", "data.train_pipeline.crop_size=[32,48]", "data.batch_size=2",
          "model.encoder.variant=tiny", "model.neck.channels=16", "model.neck.num_groups=4",
          "model.head.channels=16", "model.head.num_layers=1", "model.head.num_heads=4",
          "model.head.ffn_channels=32"]
_BEV = BEV_WORLD + [
    "data.gen_num_train=8", "data.gen_num_val=2", "data.gen_num_test=2", "data.batch_size=2",
    "data.num_workers=0", "model.encoder.variant=tiny", "model.neck.channels=16",
    "model.neck.num_groups=4", "model.head.channels=16", "model.head.num_layers=1",
    "model.head.num_heads=4", "model.head.ffn_channels=32", "model.diffusion.embed_channels=16",
    "model.bev.camera_channels=8", "model.bev.lidar_channels=8", "model.bev.fused_channels=16",
    "model.bev.bev_blocks=1"]

TINY: dict[str, list[str]] = {
    "generated/baseline.yaml": _SEG + RUN,
    "generated/ddp.yaml": _SEG + DDP_HEAD + RUN,
    "generated/ddps.yaml": _SEG + DDPS_UNET + RUN,
    "generated/depth_twin.yaml": _DEPTH + RUN,
    "generated/depth_ddp.yaml": _DEPTH + RUN,
    "generated/bev_twin.yaml": _BEV + RUN,
    "generated/bev_ddp.yaml": _BEV + RUN,
}
"""Config (relative to ``configs/``) -> the overrides of its tiny run (4 iterations)."""

QUICK_BASELINE = [
    "data.gen_size=[32,32]", "data.train_pipeline.scale=[32,32]",
    "data.train_pipeline.crop_size=[32,32]", "data.gen_num_train=8", "data.gen_num_val=4",
    "data.batch_size=2", "data.num_workers=0",
    "model.neck.channels=16", "model.neck.num_groups=4", "model.head.channels=16",
    "model.aux_head.channels=16", "train.progress=false",
]
"""Overrides of the shipped generated baseline that make a run take about a second (the run's
length left to the caller: ``train.iters`` and the intervals)."""

SMALL_DDP = ["model.type=ddp", "model.head.type=deformable", "model.encoder.variant=tiny",
             "model.neck.channels=32", "model.neck.num_groups=8", "model.head.channels=32",
             "model.head.num_layers=2", "model.head.ffn_channels=64", "model.aux_head.channels=32",
             "model.diffusion.embed_channels=32"]
"""A small DDP model (32 channels, two deformable layers) on the default config."""

TOY_DDP = [
    "data.gen_size=[32,32]", "data.train_pipeline.scale=[32,32]",
    "data.train_pipeline.crop_size=[32,32]", "data.gen_num_train=64", "data.gen_num_val=8",
    "data.batch_size=4", "data.num_workers=0", "model.neck.channels=32",
    "model.neck.num_groups=8", "model.aux_head.channels=32", "model.type=ddp",
    "model.head.type=deformable", "model.head.channels=32", "model.head.num_layers=2",
    "model.head.ffn_channels=64", "model.head.dropout=0", "model.diffusion.embed_channels=32",
    "train.iters=150", "train.warmup_iters=10", "train.lr=3e-3", "train.log_interval=1",
    "train.eval_interval=150", "train.ckpt_interval=150", "train.progress=false",
]
"""A DDP that learns the generated-scene task of ``generated/baseline.yaml`` (150 iterations,
mIoU well above chance): for claims that need a trained model."""
