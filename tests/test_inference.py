"""Test-time inference: whole vs sliding window, multi-scale + flip, output contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import AugTestConfig, EvalConfig
from densediff.errors import ConfigError
from densediff.pipelines.inference import predict_probs, slide_logits

K = 4


class PointwiseModel(nn.Module):
    """1x1 conv: translation- and flip-equivariant, so windows and flips change nothing."""

    def __init__(self, crop_size: tuple[int, int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)
        self.crop_size = crop_size  # if set, insist on crop-sized inputs
        self.calls: list[tuple[int, int]] = []
        self.kwargs: list[dict] = []

    def predict_map(self, img, **kwargs):
        self.calls.append(tuple(img.shape[-2:]))
        self.kwargs.append(kwargs)
        if self.crop_size is not None:
            assert tuple(img.shape[-2:]) == self.crop_size
        return self.conv(img)


class ContextModel(nn.Module):
    """3x3 conv with zero padding: its output depends on where the image ends."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)

    def predict_map(self, img):
        return self.conv(img)


class RampModel(nn.Module):
    """Ignores the image: logits rise left to right for class 0, fall for class 1."""

    def predict_map(self, img):
        b, _, h, w = img.shape
        ramp = torch.linspace(-2, 2, w).expand(b, 1, h, w)
        return torch.cat([ramp, -ramp], 1)


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(**kw)


def test_whole_returns_softmax_at_ori_size():
    model = PointwiseModel()
    img = torch.randn(2, 3, 12, 16)
    probs = predict_probs(model, img, _cfg(), ori_size=(24, 30))
    assert probs.shape == (2, K, 24, 30)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 24, 30))
    expected = F.interpolate(model.conv(img), size=(24, 30), mode="bilinear",
                             align_corners=False).softmax(1)
    torch.testing.assert_close(probs, expected)
    assert predict_probs(model, img, _cfg()).shape == (2, K, 12, 16)


def test_slide_with_crop_equal_to_image_is_whole():
    model = ContextModel()
    img = torch.randn(1, 3, 10, 14)
    whole = predict_probs(model, img, _cfg())
    slide = predict_probs(model, img, _cfg(mode="slide", crop_size=(10, 14), stride=(5, 7)))
    torch.testing.assert_close(slide, whole)


@pytest.mark.parametrize("size", [(20, 27), (16, 16), (7, 30)])
def test_slide_equals_whole_for_pointwise_model(size):
    model = PointwiseModel(crop_size=(8, 10))
    img = torch.randn(2, 3, *size)
    whole = model.conv(img)
    torch.testing.assert_close(slide_logits(model, img, (8, 10), (5, 6)), whole)


def test_slide_grid_matches_mmseg():
    model = PointwiseModel()
    slide_logits(model, torch.randn(1, 3, 20, 27), (8, 10), (5, 6))
    # h_grids = ceil((20 - 8) / 5) + 1 = 4, w_grids = ceil((27 - 10) / 6) + 1 = 4
    assert len(model.calls) == 16 and set(model.calls) == {(8, 10)}


def test_slide_pads_images_smaller_than_crop():
    model = PointwiseModel(crop_size=(16, 16))
    img = torch.randn(1, 3, 9, 12)
    out = slide_logits(model, img, (16, 16), (8, 8))
    assert out.shape == (1, K, 9, 12) and model.calls == [(16, 16)]
    torch.testing.assert_close(out, model.conv(img))


def test_slide_overlap_is_averaged():
    class CountModel(nn.Module):
        def predict_map(self, img):  # constant 1: the average must stay 1 everywhere
            return img.new_ones(img.shape[0], K, *img.shape[-2:])

    out = slide_logits(CountModel(), torch.randn(1, 3, 13, 13), (6, 6), (4, 4))
    torch.testing.assert_close(out, torch.ones(1, K, 13, 13))


def test_slide_config_errors():
    img = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="eval.crop_size"):
        predict_probs(PointwiseModel(), img, _cfg(mode="slide"))
    with pytest.raises(ConfigError, match="eval.stride"):
        predict_probs(PointwiseModel(), img, _cfg(mode="slide", crop_size=(4, 4),
                                                   stride=(5, 4)))


def test_flip_only_aug_is_identity_for_flip_equivariant_model():
    model = PointwiseModel()
    img = torch.randn(2, 3, 9, 11)
    cfg = _cfg(aug=AugTestConfig(scales=[1.0], flip=True))
    torch.testing.assert_close(predict_probs(model, img, cfg, aug=True),
                               predict_probs(model, img, cfg))
    assert len(model.calls) == 3  # 2 aug passes + 1 plain


def test_flip_pass_is_flipped_back():
    # The ramp ignores the image, so the flipped pass (flipped back) gives the mirrored ramp:
    # the average is softmax(ramp) and its mirror image, symmetric left-right.
    img = torch.randn(1, 3, 4, 9)
    cfg = _cfg(aug=AugTestConfig(scales=[1.0], flip=True))
    probs = predict_probs(RampModel(), img, cfg, aug=True)
    p = RampModel().predict_map(img).softmax(1)
    torch.testing.assert_close(probs, (p + p.flip(-1)) / 2)
    assert not torch.allclose(probs, p)


def test_multiscale_averages_probabilities_of_all_passes():
    model = ContextModel()
    img = torch.randn(1, 3, 8, 12)
    cfg = _cfg(aug=AugTestConfig(scales=[0.5, 1.5], flip=True))
    probs = predict_probs(model, img, cfg, ori_size=(10, 15), aug=True)
    expected = 0
    for size in [(4, 6), (12, 18)]:
        x = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = model.predict_map(x.flip(-1) if flip else x)
            p = F.interpolate(logits, size=(10, 15), mode="bilinear",
                              align_corners=False).softmax(1)
            expected = expected + (p.flip(-1) if flip else p) / 4
    assert probs.shape == (1, K, 10, 15)
    torch.testing.assert_close(probs, expected)


def test_kwargs_are_forwarded_in_every_mode():
    model = PointwiseModel()
    img = torch.randn(1, 3, 8, 8)
    predict_probs(model, img, _cfg(), steps=3)
    predict_probs(model, img, _cfg(mode="slide", crop_size=(4, 4), stride=(4, 4)), steps=5)
    predict_probs(model, img, _cfg(aug=AugTestConfig(scales=[1.0], flip=True)), aug=True,
                   steps=7)
    assert [kw["steps"] for kw in model.kwargs] == [3] + [5] * 4 + [7] * 2
