"""What every image encoder shares: the 4-level output contract, input re-normalisation,
size padding, freezing, and checked loading of plain state-dict files.

An encoder maps a normalised image batch ``B x 3 x H x W`` to four feature maps at strides
4, 8, 16 and 32 with ``out_channels[i]`` channels each. Any ``H, W`` works: the input is
zero-padded (bottom/right) to a multiple of 32 and every output is cropped back to
``ceil(H / stride) x ceil(W / stride)``, so all backbones agree on output sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from densediff.errors import CheckpointError, one_line

STRIDES: tuple[int, ...] = (4, 8, 16, 32)
"""Output strides of the four encoder levels."""

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
"""ImageNet RGB mean/std on the 0-255 scale: what the data pipeline uses by default and what
most ImageNet weights (Swin, ConvNeXt, MiT, ResNet) expect."""


class Encoder(nn.Module):
    """Base class: ``forward(x) -> [f4, f8, f16, f32]``; subclasses implement ``features``.

    Args:
        out_channels: channels of the four levels.
        frozen: no gradients for the encoder's parameters, and the encoder stays in eval mode
            (BatchNorm statistics fixed, no dropout / drop-path) even under ``.train()``.
        weights_mean, weights_std: the input normalisation (0-255 scale) the backbone's
            weights were trained with; None means the pipeline's own (no re-normalisation).
        data_mean, data_std: the normalisation the data pipeline applies (``cfg.data.mean/std``).
            When the two differ, the input is mapped exactly from one to the other by a fixed
            per-channel affine map before the backbone.
    """

    def __init__(
        self,
        out_channels: Sequence[int],
        frozen: bool = False,
        weights_mean: Sequence[float] | None = None,
        weights_std: Sequence[float] | None = None,
        data_mean: Sequence[float] = IMAGENET_MEAN,
        data_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.out_channels = [int(c) for c in out_channels]
        self.strides = list(STRIDES)
        self.frozen = frozen
        scale, shift = _renorm_affine(data_mean, data_std, weights_mean, weights_std)
        self.renorm = scale is not None
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("in_scale", scale if scale is not None else torch.ones(3, 1, 1),
                             persistent=False)
        self.register_buffer("in_shift", shift if shift is not None else torch.zeros(3, 1, 1),
                             persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone forward on an input whose sides divide 32; returns the 4 level maps."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x: B x 3 x H x W normalised images. Returns 4 maps, level i of size
        ceil(H / s_i) x ceil(W / s_i) for strides s = 4, 8, 16, 32."""
        h, w = x.shape[-2:]
        if self.renorm:
            x = x * self.in_scale + self.in_shift
        pad_h, pad_w = -h % STRIDES[-1], -w % STRIDES[-1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.features(x)
        if pad_h or pad_w:
            feats = [f[..., : math.ceil(h / s), : math.ceil(w / s)] for f, s in zip(feats, STRIDES)]
        return feats

    def freeze(self) -> None:
        """Stop gradients to all parameters and keep the module in eval mode from now on."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self.frozen)


def _renorm_affine(data_mean, data_std, weights_mean, weights_std):
    """(scale, shift) with ``x_weights = x_data * scale + shift``, or (None, None) if equal."""
    if weights_mean is None or weights_std is None:
        return None, None
    dm, ds, wm, ws = (torch.tensor(v, dtype=torch.float32, device="cpu").view(3, 1, 1)
                      for v in (data_mean, data_std, weights_mean, weights_std))
    if torch.allclose(dm, wm) and torch.allclose(ds, ws):
        return None, None
    # x_data = (raw - dm) / ds  and  x_weights = (raw - wm) / ws
    return ds / ws, (dm - wm) / ws


# ------------------------------------------------------------------------------------------
# plain state-dict files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` state dict (never unpickles); CheckpointError if unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights file not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors state dict "
                              "(or a save_pretrained folder for Hugging Face backbones)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path,
                 allowed_missing: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module``; extra keys are ignored only outside the module's own
    top-level children (classifier heads and the like).

    Raises:
        CheckpointError: a parameter/buffer is missing (except names starting with one of
            ``allowed_missing``), a shape differs, or a key belongs inside the module but
            matches nothing there (e.g. a deeper variant's extra blocks).
    """
    own = module.state_dict()
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise CheckpointError(f"{source}: shape of {k} is {tuple(state[k].shape)}, the model "
                              f"has {tuple(own[k].shape)} ({len(bad_shape)} mismatched tensors)")
    result = module.load_state_dict(state, strict=False)
    check_loading(module, source, result.missing_keys, result.unexpected_keys, allowed_missing)


def check_loading(module: nn.Module, source: str | Path, missing: Iterable[str],
                  unexpected: Iterable[str], allowed_missing: Iterable[str] = ()) -> None:
    """Raise CheckpointError when loading left weights that matter unset or unmatched."""
    allowed = tuple(allowed_missing)
    missing = sorted(k for k in missing if not k.startswith(allowed))
    children = {name for name, _ in module.named_children()}
    unexpected = sorted(k for k in unexpected if k.split(".", 1)[0] in children)
    if missing:
        raise CheckpointError(f"{source}: does not fit the model: {len(missing)} weights missing, "
                              f"e.g. {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{source}: does not fit the model: {len(unexpected)} weights have "
                              f"no place in it, e.g. {unexpected[0]}")
