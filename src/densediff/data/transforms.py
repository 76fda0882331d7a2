"""mmsegmentation-style augmentation as pure functions on numpy arrays.

Images are ``uint8`` H x W x 3 RGB until :func:`normalize` (then ``float32``); labels are
``int64`` H x W holding class ids and the ignore index. Every random function takes an explicit
``numpy.random.Generator`` so a sample is a pure function of its seed. Geometric transforms are
applied to the image and the label together; labels are resized with nearest neighbour and
padded with the ignore index, so ignored pixels stay ignored.

The numerics follow mmseg 0.x / mmcv (``Resize(keep_ratio=True, ratio_range)``, ``RandomCrop``
with ``cat_max_ratio``, ``RandomFlip``, ``PhotoMetricDistortion``, ``Normalize``, ``Pad``):
bilinear image resize bit-exact with cv2 ``INTER_LINEAR`` on uint8 (as mmcv),
nearest label resize (cv2 ``INTER_NEAREST``), sizes rounded as in ``mmcv.imrescale``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from densediff.config import Config, DataConfig

Size = tuple[int, int]


# --------------------------------------------------------------------------------------------
# resizing


def rescale_size(size: Size, scale: Size) -> Size:
    """Keep-ratio output size (h, w) of an image of ``size`` resized to fit ``scale``.

    As ``mmcv.imrescale``: the long side becomes at most ``max(scale)`` and the short side at
    most ``min(scale)``, whichever is tighter (the scale is orientation-free, so (512, 2048)
    and (2048, 512) mean the same). May enlarge as well as shrink.
    """
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


RESIZE_COEF_SCALE = 2048
"""cv2's fixed-point bilinear weights are integers in units of 1/2048 (11 bits)."""


def _linear_taps(n_in: int, n_out: int, clamp: bool):
    """Source indices and fixed-point weights of cv2's ``INTER_LINEAR`` along one axis.

    Half-pixel centres: ``f = (i + 0.5) * (n_in / n_out) - 0.5`` (the ratio in double, ``f`` in
    float32); taps ``floor(f)`` and ``floor(f) + 1`` weighted ``round((1 - frac) * 2048)`` and
    ``round(frac * 2048)``. Along x, positions before the first or past the last pixel take the
    edge pixel with full weight (``clamp``); along y only the indices are clipped.
    """
    scale = 1.0 / (n_out / n_in)
    f = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0).astype(np.float32)
    if clamp:
        low, high = i0 < 0, i0 >= n_in - 1
        frac[low | high] = 0
        i0[low], i0[high] = 0, n_in - 1
    w1 = np.rint(frac * np.float32(RESIZE_COEF_SCALE)).astype(np.int64)
    w0 = np.rint((np.float32(1) - frac) * np.float32(RESIZE_COEF_SCALE)).astype(np.int64)
    return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), w0, w1


def resize_image(img: np.ndarray, size: Size) -> np.ndarray:
    """Bilinear resize of a uint8 H x W x C image to ``size`` (h, w), bit-exact with cv2's
    ``INTER_LINEAR`` on uint8 (what mmcv's ``imresize`` / mmseg's ``Resize`` run): half-pixel
    centres, 11-bit fixed-point weights, a horizontal pass in integers, then cv2's vertical
    rounding ``(((r0 >> 4) * w0 >> 16) + ((r1 >> 4) * w1 >> 16) + 2) >> 2``. Equality with
    cv2 is tested on recorded cv2 outputs (``tests/fixtures/official/cv2_resize.npz``)."""
    if img.shape[:2] == tuple(size):
        return img
    (h_in, w_in), (h, w) = img.shape[:2], size
    x0, x1, a0, a1 = _linear_taps(w_in, w, clamp=True)
    y0, y1, b0, b1 = _linear_taps(h_in, h, clamp=False)
    src = img.astype(np.int64).reshape(h_in, w_in, -1)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # x 2048
    out = (((rows[y0] >> 4) * b0[:, None, None]) >> 16) + (((rows[y1] >> 4) * b1[:, None, None])
                                                         >> 16)
    out = np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    return out.reshape(h, w, *img.shape[2:])


def resize_label(label: np.ndarray, size: Size) -> np.ndarray:
    """Nearest-neighbour resize of a label map (source pixel ``floor(i * in / out)``)."""
    h, w = label.shape
    if (h, w) == tuple(size):
        return label
    rows = np.minimum((np.arange(size[0]) * (h / size[0])).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(size[1]) * (w / size[1])).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def resize_to_scale(img: np.ndarray, scale: Size | None) -> np.ndarray:
    """Keep-ratio bilinear resize of an image into the ``scale`` box (see :func:`rescale_size`);
    ``None`` returns the image unchanged."""
    if scale is None:
        return img
    return resize_image(img, rescale_size(img.shape[:2], scale))


def random_resize(img: np.ndarray, label: np.ndarray, scale: Size,
                  ratio_range: tuple[float, float] | None,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``Resize(img_scale=scale, ratio_range, keep_ratio=True)``.

    The box ``scale`` is multiplied by a ratio drawn uniformly from ``ratio_range`` (None: 1),
    then image and label are resized into it with the aspect ratio kept.
    """
    if ratio_range is not None:
        lo, hi = ratio_range
        ratio = rng.random() * (hi - lo) + lo
        scale = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(img.shape[:2], scale)
    return resize_image(img, size), resize_label(label, size)


# --------------------------------------------------------------------------------------------
# crop / flip / pad


def _crop_box(shape: Size, crop_size: Size, rng: np.random.Generator) -> tuple[int, int]:
    top = int(rng.integers(0, max(shape[0] - crop_size[0], 0) + 1))
    left = int(rng.integers(0, max(shape[1] - crop_size[1], 0) + 1))
    return top, left


def random_crop(img: np.ndarray, label: np.ndarray, crop_size: Size, cat_max_ratio: float,
                ignore_index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """mmseg ``RandomCrop``: a random ``crop_size`` window (clipped to the image).

    With ``cat_max_ratio < 1`` the window is re-drawn, up to 10 times, until it holds at least
    two classes and no class covers ``cat_max_ratio`` or more of its non-ignored pixels (after
    10 failed tries the last window drawn is used, as in mmseg).
    """
    ch, cw = crop_size
    top, left = _crop_box(label.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = label[top:top + ch, left:left + cw]
            classes, counts = np.unique(window, return_counts=True)
            counts = counts[classes != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = _crop_box(label.shape, crop_size, rng)
    return img[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


def random_flip(img: np.ndarray, label: np.ndarray, prob: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and label together with probability ``prob``."""
    if rng.random() < prob:
        return img[:, ::-1], label[:, ::-1]
    return img, label


def pad(img: np.ndarray, label: np.ndarray | None, size: Size | None = None,
        size_divisor: int | None = None, ignore_index: int = 255
        ) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad at the bottom/right to at least ``size`` and to multiples of ``size_divisor``.

    The image is padded with 0 (after :func:`normalize` that is the mean colour) and the label
    with ``ignore_index``. Images larger than ``size`` are not cropped.
    """
    h, w = img.shape[:2]
    th, tw = (max(h, size[0]), max(w, size[1])) if size is not None else (h, w)
    if size_divisor and size_divisor > 1:
        th = -(-th // size_divisor) * size_divisor
        tw = -(-tw // size_divisor) * size_divisor
    if (th, tw) == (h, w):
        return img, label
    out = np.zeros((th, tw) + img.shape[2:], img.dtype)
    out[:h, :w] = img
    if label is not None:
        lab = np.full((th, tw), ignore_index, label.dtype)
        lab[:h, :w] = label
        label = lab
    return out, label


# --------------------------------------------------------------------------------------------
# photometric


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_op(img: np.ndarray, fn) -> np.ndarray:
    hsv = np.array(Image.fromarray(img, "RGB").convert("HSV"))
    fn(hsv)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def photometric_distortion(img: np.ndarray, rng: np.random.Generator,
                           brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB image.

    In order, each step with probability 0.5: brightness (add ``U(-32, 32)``), contrast
    (multiply by ``U(0.5, 1.5)``) either here or last (chosen at random), saturation (scale S by
    ``U(0.5, 1.5)``), hue (shift by an integer in ``[-18, 18)`` in OpenCV units of 2 degrees).
    Values are clipped to 0..255 after each step.
    """
    img = np.ascontiguousarray(img)
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))

    def contrast(im: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            return _convert(im, alpha=rng.uniform(*contrast_range))
        return im

    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        alpha = rng.uniform(*saturation_range)

        def _sat(hsv: np.ndarray) -> None:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)

        img = _hsv_op(img, _sat)
    if rng.integers(2):
        # OpenCV hue units (180 per turn) -> Pillow units (256 per turn)
        shift = round(int(rng.integers(-hue_delta, hue_delta)) * 256 / 180)

        def _hue(hsv: np.ndarray) -> None:
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256

        img = _hsv_op(img, _hue)
    if not contrast_first:
        img = contrast(img)
    return img


# --------------------------------------------------------------------------------------------
# normalisation and the two pipelines


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """``(img - mean) / std`` per RGB channel, as float32 H x W x 3."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (img.astype(np.float32) - mean) / std


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """float32 H x W x 3 array -> contiguous 3 x H x W tensor."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def train_transform(img: np.ndarray, label: np.ndarray, data: DataConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The training pipeline: random resize, random crop, flip, photometric, normalize, pad.

    Returns the normalised float32 image (H x W x 3) and the int64 label, both padded to
    ``crop_size`` (if set) and to multiples of ``size_divisor``.
    """
    p = data.train_pipeline
    if p.scale is not None:
        img, label = random_resize(img, label, p.scale, p.ratio_range, rng)
    if p.crop_size is not None:
        img, label = random_crop(img, label, p.crop_size, p.cat_max_ratio, data.ignore_index, rng)
    img, label = random_flip(img, label, p.flip_prob, rng)
    if p.photometric:
        img = photometric_distortion(img, rng)
    img = normalize(img, data.mean, data.std)
    img, label = pad(img, label, p.crop_size, data.size_divisor, data.ignore_index)
    return img, np.ascontiguousarray(label)


def test_transform(img: np.ndarray, data: DataConfig) -> np.ndarray:
    """The test pipeline: keep-ratio resize into ``data.test_scale`` (if set), normalize.

    No padding: the label stays at the original size and the caller maps predictions back.
    """
    return normalize(resize_to_scale(img, data.test_scale), data.mean, data.std)


def aug_input(img: np.ndarray, data: DataConfig, ratio: float) -> torch.Tensor:
    """The network input of one multi-scale test pass (mmseg ``MultiScaleFlipAug`` with
    ``img_ratios``): the ORIGINAL uint8 image resized (keep ratio) into the box
    ``int(s * ratio)`` of ``data.test_scale`` (no test scale: to ``ratio`` x its size), then
    normalized; ``1 x 3 x h x w``. Resizing the original, not the test-resized image, is what
    makes multi-scale results equal mmseg's."""
    if data.test_scale is not None:
        img = resize_to_scale(img, tuple(int(s * ratio) for s in data.test_scale))
    else:
        h, w = img.shape[:2]
        img = resize_image(img, (max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))))
    return to_tensor(normalize(img, data.mean, data.std))[None]


def preprocess_image(img: np.ndarray, cfg: Config | DataConfig) -> torch.Tensor:
    """A new uint8 RGB image (H x W x 3, e.g. from :func:`densediff.data.io.read_image`) as a
    1 x 3 x h x w float tensor ready for the model (test-time resize + normalize)."""
    data = getattr(cfg, "data", cfg)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {img.dtype} {img.shape}")
    return to_tensor(test_transform(img, data))[None]
