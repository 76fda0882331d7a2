"""Decoders: discriminative heads (``heads``); diffusion map decoders live alongside."""

from densediff.decoders.heads import ConvHead, FCNHead

__all__ = ["ConvHead", "FCNHead"]
