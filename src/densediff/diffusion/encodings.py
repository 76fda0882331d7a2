"""Map encodings: labels -> a continuous map in [-scale, scale] that diffusion can noise.

DDP paper §3.3 "Label Encoding" and Table 5a compare three encodings of discrete labels; all are
brought to [-scale, scale] (Alg. 1: ``(sigmoid(enc) * 2 - 1) * scale`` for the embedding), and
``scale`` sets the signal-to-noise ratio (Table 5b). Each encoding is a module
``forward(labels: B x h x w long) -> B x C x h x w``; ignore pixels (``ignore_index``) get a
code of their own, as in the official code (embedding row K).

Depth and BEV maps (continuous, multi-label) plug in their own encodings with the same
contract; the DDP model only needs ``channels`` and ``forward``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AnalogBits", "ClassEmbedding", "DepthEncoding", "MultiLabelEmbedding", "OneHot",
           "build_label_encoding"]


class _LabelEncoding(nn.Module):
    def __init__(self, num_classes: int, ignore_index: int, scale: float):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.scale = scale

    def _index(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with ignore pixels (and anything out of range) mapped to K."""
        labels = labels.long()
        bad = (labels < 0) | (labels >= self.num_classes) | (labels == self.ignore_index)
        return labels.masked_fill(bad, self.num_classes)


class ClassEmbedding(_LabelEncoding):
    """Learned ``nn.Embedding(K + 1, C)`` (row K = ignore) -> sigmoid -> x2-1 -> x scale.
    The default of DDP (official: C = 256, scale 0.01)."""

    def __init__(self, num_classes: int, channels: int = 256, scale: float = 0.01,
                 ignore_index: int = 255):
        super().__init__(num_classes, ignore_index, scale)
        self.channels = channels
        self.embedding = nn.Embedding(num_classes + 1, channels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(self._index(labels)).permute(0, 3, 1, 2)
        return (emb.sigmoid() * 2 - 1) * self.scale


class OneHot(_LabelEncoding):
    """One-hot vectors (K channels; ignore pixels all zero) -> x2-1 -> x scale."""

    def __init__(self, num_classes: int, scale: float = 0.1, ignore_index: int = 255):
        super().__init__(num_classes, ignore_index, scale)
        self.channels = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(self._index(labels), self.num_classes + 1)[..., :-1]
        return (onehot.permute(0, 3, 1, 2).float() * 2 - 1) * self.scale


class AnalogBits(_LabelEncoding):
    """Analog bits (Chen et al., ICLR 2023): the label in ceil(log2(K + 1)) binary digits (most
    significant first; ignore pixels get the code of K) -> x2-1 -> x scale."""

    def __init__(self, num_classes: int, scale: float = 0.1, ignore_index: int = 255):
        super().__init__(num_classes, ignore_index, scale)
        self.channels = max(1, math.ceil(math.log2(num_classes + 1)))
        self.register_buffer("powers", 2 ** torch.arange(self.channels - 1, -1, -1),
                             persistent=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        idx = self._index(labels)
        bits = (idx[:, None] // self.powers[None, :, None, None]) % 2
        return (bits.float() * 2 - 1) * self.scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Bits (any sign-coded map) -> integer labels (K = ignore/out of range)."""
        bits = (x > 0).long()
        idx = (bits * self.powers[None, :, None, None]).sum(1)
        return idx.clamp(max=self.num_classes)


class DepthEncoding(nn.Module):
    """A depth map (metres) -> one channel in [-scale, scale] (DDP depth; official
    ``bit_scale`` 0.1): ``((d - min) / (max - min) * 2 - 1) * scale``; :meth:`decode` inverts it.
    Depths outside [min, max] map outside [-scale, scale]; callers clamp where needed."""

    channels = 1

    def __init__(self, min_depth: float, max_depth: float, scale: float = 0.1):
        super().__init__()
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth, self.max_depth, self.scale = min_depth, max_depth, scale

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        """B x h x w or B x 1 x h x w depths -> B x 1 x h x w codes."""
        if depth.dim() == 3:
            depth = depth[:, None]
        return ((depth - self.min_depth) / (self.max_depth - self.min_depth) * 2 - 1) * self.scale

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Codes -> depths (the inverse of :meth:`forward`)."""
        return (code / self.scale + 1) / 2 * (self.max_depth - self.min_depth) + self.min_depth


class MultiLabelEmbedding(nn.Module):
    """Multi-label maps (BEV: a cell can be in several classes) -> C channels in
    [-scale, scale], as the official DDP BEV code: class mask c (1..K) is multiplied by its index,
    so channel c holds 0 or c; each channel is looked up in a learned ``nn.Embedding(K + 1, C)``
    and the K embeddings are averaged; then sigmoid -> x2-1 -> x scale (scale 0.01).
    """

    def __init__(self, num_classes: int, channels: int = 256, scale: float = 0.01):
        super().__init__()
        self.num_classes, self.channels, self.scale = num_classes, channels, scale
        self.embedding = nn.Embedding(num_classes + 1, channels)
        self.register_buffer("index", torch.arange(1, num_classes + 1), persistent=False)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """B x K x h x w {0, 1} masks -> B x C x h x w codes."""
        ids = (masks > 0).long() * self.index[None, :, None, None]
        emb = self.embedding(ids).mean(1)  # B x h x w x C: the mean over the K class channels
        return (emb.permute(0, 3, 1, 2).sigmoid() * 2 - 1) * self.scale


def build_label_encoding(name: str, num_classes: int, channels: int, scale: float,
                         ignore_index: int) -> nn.Module:
    """``embedding`` | ``onehot`` | ``analog_bits`` (``channels`` is used by the embedding)."""
    if name == "embedding":
        return ClassEmbedding(num_classes, channels, scale, ignore_index)
    if name == "onehot":
        return OneHot(num_classes, scale, ignore_index)
    if name == "analog_bits":
        return AnalogBits(num_classes, scale, ignore_index)
    raise ValueError(f"unknown map encoding {name!r}")
