"""DDP: conditional diffusion over an encoded label map (Ji et al., ICCV 2023).

The image encoder + neck run once; the light map decoder is applied once per sampling step to
``fuse(concat[features, y_t])`` with the time (log-SNR) as FiLM conditioning, and predicts class
logits directly ("x0 as classes", trained with CE). Pieces, kept separate:

- map encoding: :mod:`densediff.diffusion.encodings` (labels -> [-scale, scale]);
- noise schedule and time embedding: :mod:`densediff.diffusion.schedules`;
- sampler (Alg. 2/3): :mod:`densediff.diffusion.samplers`;
- map decoder: :class:`densediff.decoders.deformable.DeformableDecoder`.

Training is :meth:`DDP.forward_train` (Alg. 1, or Alg. 4 when ``diffusion.self_aligned``);
sampling is :meth:`DDP.sample_steps` (:class:`MapSampling`, shared with the onnxruntime model),
which returns every step so that callers can form the final map (last step or accumulated
mean), uncertainty maps and trajectories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import ModelConfig
from densediff.diffusion.encodings import build_label_encoding
from densediff.diffusion.noise import add_noise
from densediff.diffusion.samplers import sample_map
from densediff.diffusion.schedules import TimeEmbedding, alpha_sigma, get_schedule, schedule_time
from densediff.models.interface import Trajectory
from densediff.models.segmentor import FeatureSegmentor, build_head

__all__ = ["DDP", "MapSampling"]


class MapSampling:
    """DDP's sampling (Alg. 2/3) as a model provides it: :meth:`sample_steps` runs
    :func:`~densediff.diffusion.samplers.sample_map` around the model's ``denoise_step``. The
    one sampling path of :class:`DDP` and of the onnxruntime model
    (:class:`densediff.deploy.runtime.OnnxDDP`).

    A subclass provides ``denoise_step(features, x_t, log_snr, x0_prev) -> (prediction, x0)``
    (:data:`~densediff.diffusion.samplers.MapStep`), ``diffusion_cfg`` (a
    :class:`~densediff.config.DiffusionConfig`: the sampling settings), ``schedule``
    (``t -> log_snr``), ``map_channels`` and ``output_kind``.
    """

    min_steps = 1
    max_steps = None
    default_steps = property(lambda self: self.diffusion_cfg.steps)
    accumulation = property(lambda self: self.diffusion_cfg.accumulation)

    @torch.no_grad()
    def sample_steps(self, feat: torch.Tensor, steps: int, *, td: float | None = None,
                     sampler: str | None = None, randsteps: int | None = None,
                     seeds: Sequence[int] | None = None) -> Trajectory:
        """Algorithm 2 on precomputed features: ``randsteps`` noise starts per image, every
        step's prediction (B x R x C x h x w) in the trajectory.

        Args:
            feat: B x C x h x w features from ``extract`` (reuse them for several step
                counts: the encoder runs once).
            steps: decoder evaluations.
            td, sampler, randsteps: default to ``diffusion_cfg``.
            seeds: one seed per image: the image's noise then does not depend on the batch it
                is in. None: the global RNG.
        """
        d = self.diffusion_cfg
        preds: list[torch.Tensor] = []
        sample_map(self.denoise_step, feat, self.map_channels, self.schedule, steps,
                   sampler=d.sampler if sampler is None else sampler,
                   td=d.td if td is None else td,
                   randsteps=d.randsteps if randsteps is None else randsteps, seeds=seeds,
                   start=d.sample_start, self_condition=d.self_condition,
                   callback=lambda _step, pred: preds.append(pred))
        return Trajectory(preds, self.output_kind)


class DDP(MapSampling, FeatureSegmentor):
    """DDP for semantic segmentation.

    Arguments: those of :class:`~densediff.models.segmentor.FeatureSegmentor` (``model.head``
    and ``model.diffusion`` are read too), and ``map_encoding``, which builds the map encoding
    (labels -> y_0; it needs ``channels`` and ``scale``; a task passes its own); None: the
    label encoding of ``model.diffusion.encoding``.

    Modules (official names in brackets): ``map_encoding`` [embedding_table], ``fuse``
    [transform: 1x1 conv over concat(features, noisy map)], ``time_mlp``, ``decoder``
    [DeformableHeadWithTime], ``aux_head`` [FCNHead on the image features].
    """

    def __init__(self, model_cfg: ModelConfig, num_classes: int, *,
                 map_encoding: Callable[[], nn.Module] | None = None, **kwargs):
        super().__init__(model_cfg, num_classes, **kwargs)
        m, diff_cfg = model_cfg, model_cfg.diffusion
        self.diffusion_cfg = diff_cfg
        self.schedule = get_schedule(diff_cfg.schedule)
        self.map_encoding = (map_encoding() if map_encoding is not None else
                             build_label_encoding(diff_cfg.encoding, num_classes,
                                                  diff_cfg.embed_channels, diff_cfg.scale,
                                                  self.ignore_index))
        c = m.head.channels
        map_in = self.map_encoding.channels * (2 if diff_cfg.self_condition else 1)
        self.fuse = nn.Conv2d(self.feat_channels + map_in, c, 1)
        nn.init.kaiming_normal_(self.fuse.weight, nonlinearity="relu")  # mmcv ConvModule init
        nn.init.zeros_(self.fuse.bias)
        # diffusion.time_input none: no time input at all (the official depth decoder)
        timed = diff_cfg.time_input != "none"
        self.time_mlp = TimeEmbedding(diff_cfg.time_frequencies, 4 * c) if timed else None
        self.decoder = build_head(m.head, c, num_classes, time_channels=4 * c if timed else None)

    output_kind = "classes"
    map_channels = property(lambda self: self.map_encoding.channels)

    # ---------------------------------------------------------------------------- the decoder

    def denoise(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """The map decoder f_theta(y_t, features, t): class logits on the feature grid.

        The time MLP is fed ``log_snr``, or the time t it stands for when
        ``diffusion.time_input`` is ``t``; with ``none`` the decoder gets no time input (the
        official depth model). With
        ``diffusion.precondition`` y_t is first scaled by c_in(t); with
        ``diffusion.self_condition`` the previous x0 estimate ``x0_prev`` (None: zeros) is a
        further input."""
        diff_cfg = self.diffusion_cfg
        time_emb = None
        if self.time_mlp is not None:
            time = (log_snr if diff_cfg.time_input == "log_snr"
                    else schedule_time(diff_cfg.schedule, log_snr))
            time_emb = self.time_mlp(time)
        maps = [self.precondition(x_t, log_snr)]
        if diff_cfg.self_condition:
            prev = torch.zeros_like(x_t) if x0_prev is None else x0_prev
            maps.append(prev / self.map_encoding.scale if diff_cfg.precondition else prev)
        return self.decoder(self.fuse(torch.cat([feat, *maps], 1)), time_emb)

    def denoise_step(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                     x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step of the network (what ``step.onnx`` holds): the prediction of
        :meth:`denoise`, in at least float32 (also when the network runs in bf16), and its
        re-encoding as the x0 estimate (:meth:`encode_prediction`). ``x0_prev`` (the
        previous estimate, self-conditioning only) is passed on when given."""
        pred = (self.denoise(feat, x_t, log_snr) if x0_prev is None
                else self.denoise(feat, x_t, log_snr, x0_prev))
        pred = pred.to(torch.promote_types(feat.dtype, torch.float32))
        return pred, self.encode_prediction(pred)

    def precondition(self, x_t: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        """c_in(t) y_t with c_in = 1 / sqrt(alpha^2 s^2 + sigma^2), s = the code scale (the
        standard deviation bound of y_0): y_t at about unit size for every t (Karras et al.
        2022, Table 1, in variance-preserving form); the identity unless
        ``diffusion.precondition``."""
        if not self.diffusion_cfg.precondition:
            return x_t
        a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(log_snr))
        scale = self.map_encoding.scale
        return x_t / (a.square() * scale**2 + s.square()).sqrt()

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B x h x w) -> the encoded map y_0 in [-scale, scale]."""
        return self.map_encoding(labels)

    def encode_target(self, label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The GT at full resolution -> y_0 on the ``size`` feature grid (labels are
        nearest-resized, as the official)."""
        small = F.interpolate(label[:, None].float(), size=size, mode="nearest")
        return self.encode_labels(small[:, 0].long())

    def task_losses(self, pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """The task loss of a decoder output against the full-resolution GT: CE."""
        return {"loss_ce": self.ce(pred, label)}

    def encode_prediction(self, logits: torch.Tensor) -> torch.Tensor:
        """A prediction -> y_0: argmax, then the map encoding (hard re-quantisation, as the
        official sampler does at every step)."""
        return self.map_encoding(logits.argmax(1))

    # ---------------------------------------------------------------------------- training

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1 (DDP training), or Algorithm 4 (self-aligned denoising).

        The GT is resized to the feature grid and encoded (:meth:`encode_target`); t ~
        U(sample_range) per image; ``y_t = alpha(t) y_0 + sigma(t) eps``; the decoder's output is
        scored against the full-resolution GT (:meth:`task_losses`: CE on upsampled logits),
        plus the aux loss (weight 0.4).
        Self-aligned: ``y_0`` is instead the encoding of the model's own prediction from pure
        noise at t = 1 (the prediction without gradient, its encoding with: the map embedding
        is trained through it, as in the official code), noised with the same ``eps``.
        """
        diff_cfg = self.diffusion_cfg
        feat = self.extract(img)
        b = feat.shape[0]
        y0 = self.encode_target(label, feat.shape[-2:])
        eps = torch.randn_like(y0)
        if diff_cfg.self_aligned:
            with torch.no_grad():
                ls1 = self.schedule(torch.ones(b, device=feat.device))
                pred = self.denoise(feat, eps, ls1)
            # re-encoded outside no_grad, as the official: the map embedding still gets
            # gradients through y_0 (only the prediction itself is detached)
            y0 = self.encode_prediction(pred.detach())
        lo, hi = diff_cfg.sample_range
        if diff_cfg.train_time_power == 1.0:
            t = torch.empty(b, device=feat.device).uniform_(lo, hi)  # the official
        else:  # more weight near t = 0 for p > 1
            t = lo + (hi - lo) * torch.rand(b, device=feat.device).pow(diff_cfg.train_time_power)
        log_snr = self.schedule(t)
        y_t = add_noise(y0, log_snr, eps)
        x0_prev = None
        if diff_cfg.self_condition and bool(torch.rand(()) < 0.5):  # Chen et al. 2022, Alg. 1
            with torch.no_grad():
                x0_prev = self.encode_prediction(self.denoise(feat, y_t, log_snr))
        pred = (self.denoise(feat, y_t, log_snr) if x0_prev is None
                else self.denoise(feat, y_t, log_snr, x0_prev))
        return self.add_aux_loss(self.task_losses(pred, label), feat, label)

    # ---------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def decoder_step(self, feat: torch.Tensor) -> torch.Tensor:
        """One map-decoder call at t = 0.5 on random input (for ``densediff bench``)."""
        b, _, h, w = feat.shape
        x_t = torch.randn(b, self.map_encoding.channels, h, w, device=feat.device)
        return self.denoise(feat, x_t, self.schedule(torch.full((b,), 0.5, device=feat.device)))
