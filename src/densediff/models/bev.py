"""BEV map segmentation: DDP over a multi-label bird's-eye-view map (paper §4.3, App. B.2), and
its non-diffusion twin.

The image encoder + neck run once per camera; :class:`~densediff.encoders.bev.BEVEncoder`
lifts the camera features into the BEV feature grid (and fuses LiDAR pillars for ``C+L``).
Then DDP's machinery (:mod:`densediff.models.ddp`) is used unchanged, with what the official
BEV code changes (reference notes §1.12):

- the map encoding is :class:`~densediff.diffusion.encodings.MultiLabelEmbedding` (each class
  mask embedded, the K embeddings averaged; scale 0.01), on the feature grid: the GT is
  nearest-resized from the output grid (200 -> 128 in the paper's setting);
- the map decoder first resamples the fused features onto the output grid
  (:class:`~densediff.decoders.bev.BEVGridTransform`), then runs its deformable layers (5 in the
  paper's config) and a 1x1 conv to K logits;
- the loss is the per-class sigmoid focal loss (one term per class, as BEVFusion);
- x0_hat is the prediction thresholded at 0.5 and re-encoded; the output averages the sigmoid
  probabilities of all steps and of all ``randsteps`` starts (``diffusion.accumulation``, which
  the BEV configs turn on: the official BEV sampler always does this).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import BEVDataConfig, ModelConfig
from densediff.criteria.bev import sigmoid_focal_loss
from densediff.decoders.bev import BEVGridTransform, Resampled
from densediff.diffusion.encodings import MultiLabelEmbedding
from densediff.encoders.bev import BEVEncoder
from densediff.encoders.bevfusion import BEVFusionView, CameraFPN, DepthLift, UpFuse, residual_stages
from densediff.encoders.bevfusion_lidar import SECOND, SECONDFPN, ConvFuser, LidarEncoder
from densediff.encoders.lss import camera_features
from densediff.errors import ConfigError
from densediff.models.ddp import DDP
from densediff.models.interface import Trajectory
from densediff.models.segmentor import FeatureSegmentor, build_head
from densediff.utils.grid import feature_grid, output_grid

__all__ = ["BEVDDP", "BEVSegmentor"]

POINT_FEATURES = 5
"""Features per LiDAR point in the BEV inputs: x, y, z, intensity, time lag."""


def _bevfusion_view(model_cfg: ModelConfig, bev: BEVDataConfig) -> BEVFusionView:
    """``arch: bevfusion``: the official camera stream [+ LiDAR branch and fuser] and BEV
    decoder (``model.bev.bev_decoder``)."""
    bm, grid = model_cfg.bev, feature_grid(bev)
    lift = DepthLift(model_cfg.neck.channels, bm.camera_channels, tuple(bev.dbound),
                     tuple(bev.zbound), grid, bm.lift_downsample)
    lidar = fuser = None
    channels = bm.camera_channels
    if bev.lidar:
        lidar = LidarEncoder(POINT_FEATURES, bm.point_range, bm.voxel_size, bm.voxel_points,
                             bm.max_voxels, bm.sparse_channels, bm.sparse_paddings,
                             bm.sparse_out_channels)
        if min(lidar.backbone.bev_shape) < 1:
            raise ConfigError(f"model.bev.point_range / voxel_size / sparse_paddings leave a "
                              f"{list(lidar.backbone.bev_shape)} LiDAR grid after the sparse "
                              "encoder's strides: use more height voxels (official 40)")
        extent = (bm.point_range[0], bm.point_range[3], bm.point_range[1], bm.point_range[4])
        if (tuple(lidar.bev_shape) != tuple(grid.shape) or max(
                abs(a - b) for a, b in zip(extent, (*grid.xbound[:2], *grid.ybound[:2]))) > 1e-6):
            raise ConfigError(
                f"model.bev.point_range / voxel_size give LiDAR BEV features of "
                f"{list(lidar.bev_shape)} cells over x, y {list(extent)}, but the feature grid "
                f"(data.bev.feat_xbound / feat_ybound) is {list(grid.shape)} over "
                f"{[*grid.xbound[:2], *grid.ybound[:2]]}: they must be the same")
        fuser = ConvFuser(channels + lidar.out_channels, bm.fused_channels)
        channels = bm.fused_channels
    if bm.bev_decoder == "second":
        backbone = SECOND(channels, bm.decoder_channels, bm.decoder_strides, bm.bev_blocks)
        ups = [math.prod(bm.decoder_strides[:i + 1]) for i in range(len(bm.decoder_strides))]
        neck = SECONDFPN(bm.decoder_channels, bm.fpn_channels, ups)
        out = neck.out_channels
    else:
        backbone = residual_stages(channels, bm.decoder_channels, bm.decoder_strides,
                                   bm.bev_blocks)
        neck = UpFuse((bm.decoder_channels[-1], bm.decoder_channels[0]), bm.fused_channels,
                      bm.decoder_strides[0])
        out = bm.fused_channels
    return BEVFusionView(lift, backbone, neck, out, lidar, fuser)


class _BEVModel:
    """What both BEV models share: the camera (+ LiDAR) to BEV features, the output grid and the
    loss. ``extract`` takes the input dict of :class:`~densediff.data.bev.BEVDataset`."""

    output_kind = "multilabel"

    @staticmethod
    def bev_view(model_cfg: ModelConfig, bev: BEVDataConfig) -> Callable[[], nn.Module]:
        """Builds the camera (+ LiDAR) to BEV encoder, the ``view`` of
        :class:`~densediff.models.segmentor.FeatureSegmentor`."""
        bm = model_cfg.bev
        if bm.arch == "bevfusion":
            return lambda: _bevfusion_view(model_cfg, bev)
        return lambda: BEVEncoder(model_cfg.neck.channels, bm.camera_channels,
                                  bm.lidar_channels if bev.lidar else None, bm.fused_channels,
                                  bm.bev_blocks, feature_grid(bev), tuple(bev.dbound),
                                  tuple(bev.zbound))

    def _setup_bev(self, model_cfg: ModelConfig, bev: BEVDataConfig) -> None:
        """Store the BEV settings: camera stride, class names, focal loss, the two grids."""
        bm = model_cfg.bev
        if bm.arch == "bevfusion":
            self._official_camera_neck(model_cfg, bev)
        self.camera_stride = bm.camera_stride
        self.class_names = list(bev.classes)
        self.focal = (bm.focal_gamma, bm.focal_alpha)
        self.grids = (feature_grid(bev), output_grid(bev))

    def _official_camera_neck(self, model_cfg: ModelConfig, bev: BEVDataConfig) -> None:
        """``arch: bevfusion``: the neck is :class:`~densediff.encoders.bevfusion.CameraFPN` on
        encoder levels 2-4 (the official Swin has ``out_indices`` 1, 2, 3), so the first
        level's output norm is not used: it is removed (no parameter without a gradient)."""
        self.neck = CameraFPN(self.encoder.out_channels[1:], model_cfg.neck.channels, stride=8)
        norms = getattr(getattr(self.encoder, "model", None), "hidden_states_norms", None)
        if norms is not None and "stage1" in norms:
            norms["stage1"] = nn.Identity()

    def resampled(self, head: nn.Module) -> nn.Module:
        """A map decoder that first resamples the feature grid onto the output grid."""
        return Resampled(BEVGridTransform(*self.grids), head)

    def extract(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """B x C x X x Y fused BEV features on the feature grid (the encoder and neck run once
        per camera image)."""
        imgs = inputs["images"]
        feat = camera_features(self.neck(self.encoder(imgs.flatten(0, 1))), self.camera_stride,
                               getattr(self.neck, "stride", 4))
        return self.view(feat, tuple(imgs.shape[-2:]), inputs["intrinsics"], inputs["cam2ego"],
                         inputs.get("points"), inputs.get("points_mask"))

    def bev_losses(self, logits: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """One focal-loss term per class, ``loss_<class>`` (BEVFusion's map head)."""
        per_class = sigmoid_focal_loss(logits, label, *self.focal)
        return {f"loss_{n}": v for n, v in zip(self.class_names, per_class)}

    def resize_output(self, out: torch.Tensor, inputs) -> torch.Tensor:
        """BEV maps stay on the output grid."""
        return out


class BEVSegmentor(_BEVModel, FeatureSegmentor):
    """Discriminative BEV model: BEV features -> resample -> head (the deformable twin of
    :class:`BEVDDP`, or a conv head) -> K logits; the same focal loss.

    Args:
        model_cfg: the model section (as :class:`~densediff.models.segmentor.Segmentor`, and
            ``model.bev``).
        num_classes: the map classes K.
        bev: the BEV data section (``data.bev``: classes, grids, depth bins, LiDAR).
        kwargs: ``mean``, ``std`` (and ``ignore_index``) of
            :class:`~densediff.models.segmentor.FeatureSegmentor`.
    """

    def __init__(self, model_cfg: ModelConfig, num_classes: int, *, bev: BEVDataConfig,
                 **kwargs):
        super().__init__(model_cfg, num_classes, view=self.bev_view(model_cfg, bev), **kwargs)
        self._setup_bev(model_cfg, bev)
        self.head = self.resampled(build_head(model_cfg.head, self.feat_channels, num_classes))

    def forward_train(self, inputs: dict[str, torch.Tensor], label: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
        feat = self.extract(inputs)
        return self.add_aux_loss(self.bev_losses(self.head(feat), label), feat, label)

    def sample_steps(self, feat: torch.Tensor, steps: int = 0, **settings) -> Trajectory:
        """The head's per-class logits on the output grid as a one-step trajectory."""
        return self.one_call(self.head(feat), steps)


class BEVDDP(_BEVModel, DDP):
    """DDP for BEV maps (see the module docstring). Training is :meth:`DDP.forward_train`
    (Alg. 1 / Alg. 4) with the hooks below; sampling is :meth:`DDP.sample_steps` (Alg. 2),
    returning a multilabel :class:`Trajectory`.

    Arguments: those of :class:`BEVSegmentor` (``model.diffusion`` is read too); the map
    encoding is :class:`~densediff.diffusion.encodings.MultiLabelEmbedding`."""

    def __init__(self, model_cfg: ModelConfig, num_classes: int, *, bev: BEVDataConfig,
                 **kwargs):
        diff_cfg = model_cfg.diffusion
        super().__init__(model_cfg, num_classes, view=self.bev_view(model_cfg, bev),
                         map_encoding=lambda: MultiLabelEmbedding(
                             num_classes, diff_cfg.embed_channels, diff_cfg.scale), **kwargs)
        self._setup_bev(model_cfg, bev)
        self.decoder = self.resampled(self.decoder)

    def encode_target(self, label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """K x X x Y masks on the output grid -> y_0 on the ``size`` feature grid (nearest)."""
        return self.map_encoding(F.interpolate(label.float(), size=size, mode="nearest"))

    def encode_prediction(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits on the output grid -> masks (probability >= 0.5) -> y_0 on the feature grid."""
        masks = (logits >= 0).float()
        return self.map_encoding(F.interpolate(masks, size=self.grids[0].shape, mode="nearest"))

    def task_losses(self, pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.bev_losses(pred, label)
