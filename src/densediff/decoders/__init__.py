"""Decoders: discriminative heads (``heads``) and the DDP map decoder (``deformable``, built on
the pure-PyTorch multi-scale deformable attention in ``msda``)."""

from densediff.decoders.deformable import DeformableDecoder, SinePositionalEncoding
from densediff.decoders.heads import ConvHead, FCNHead
from densediff.decoders.msda import MSDeformAttn, ms_deform_attn, msda_impl

__all__ = ["ConvHead", "DeformableDecoder", "FCNHead", "MSDeformAttn", "SinePositionalEncoding",
           "ms_deform_attn", "msda_impl"]
