"""Image encoders: ``build_encoder(enc_cfg)`` -> an :class:`Encoder` with 4 levels at strides
4, 8, 16, 32 (``out_channels``), plus the FPN merging neck (:mod:`densediff.encoders.neck`).

Backbones: ``simple_cnn`` (built in, CPU-friendly), transformers ``swin``, ``convnext``,
``segformer`` (MiT), ``resnet``, ``mobilenetv2`` (:mod:`densediff.encoders.hf`), and
``efficientnet_lite`` (:mod:`densediff.encoders.efficientnet_lite`). Optional dependencies are
imported only when their backbone is built.
"""

from __future__ import annotations

from collections.abc import Sequence

from densediff.config import EncoderConfig
from densediff.encoders.base import IMAGENET_MEAN, IMAGENET_STD, STRIDES, Encoder
from densediff.errors import ConfigError

HF_BACKBONES = ("swin", "convnext", "segformer", "resnet", "mobilenetv2")

__all__ = ["Encoder", "STRIDES", "build_encoder"]


def build_encoder(enc_cfg: EncoderConfig, data_mean: Sequence[float] = IMAGENET_MEAN,
                  data_std: Sequence[float] = IMAGENET_STD) -> Encoder:
    """Build the image encoder described by ``enc_cfg``.

    Args:
        enc_cfg: ``cfg.model.encoder``.
        data_mean, data_std: the normalisation the data pipeline applies (``cfg.data.mean``,
            ``cfg.data.std``, 0-255 scale). Backbones whose weights expect another one
            (EfficientNet-Lite, MobileNetV2) convert their input exactly; others ignore it.

    Returns:
        An :class:`Encoder`: ``out_channels`` (4 ints), ``forward(x) -> [4 maps]``.

    Raises:
        ConfigError: unknown variant, unsupported drop_path, missing optional package.
        CheckpointError: ``enc_cfg.pretrained`` is missing or does not fit.
    """
    name = enc_cfg.name
    if name == "simple_cnn":
        from densediff.encoders.simple_cnn import build_simple_cnn as build
    elif name in HF_BACKBONES:
        from densediff.encoders.hf import build_hf_encoder as build
    elif name == "efficientnet_lite":
        from densediff.encoders.efficientnet_lite import build_efficientnet_lite as build
    else:
        raise ConfigError(f"model.encoder.name: unknown encoder {name!r}")
    encoder = build(enc_cfg, data_mean=data_mean, data_std=data_std)
    if enc_cfg.frozen:
        encoder.freeze()
    return encoder
