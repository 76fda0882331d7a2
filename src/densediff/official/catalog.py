"""The DDP models the authors released (Hugging Face ``yfji/DDP-Weight``, official README).

Each entry names the shipped densediff config that reproduces its architecture and test
settings, its file on the Hub, and the numbers the authors report for it. Those numbers are
**theirs**, copied from the official README / paper, not measured here; what densediff proved
about each model is in ``proven`` (see ``benchmarks/RESULTS.md``, "Official parity").
"""

from __future__ import annotations

from dataclasses import dataclass

HUB_REPO = "yfji/DDP-Weight"
"""The Hugging Face model repository holding the released ``.pth`` files."""


@dataclass(frozen=True)
class ReleasedModel:
    """One released checkpoint.

    Attributes:
        name: the official config / file stem (``<name>.pth`` on the Hub).
        config: the shipped densediff config with the same architecture and test settings.
        dataset: ``ade20k`` | ``cityscapes`` | ``nuscenes``.
        backbone: ``swin`` | ``convnext`` (BEV: the camera backbone).
        variant: ``tiny`` | ``small`` | ``base`` | ``large``.
        aligned: the self-aligned-denoising fine-tune (Alg. 4), 10 test steps.
        reported: the authors' numbers (label -> value), not measured here.
        proven: what densediff proved about this layout against the official code.
        lidar: a camera + LiDAR BEV model.
    """

    name: str
    config: str
    dataset: str
    backbone: str
    variant: str
    aligned: bool
    reported: str
    proven: str
    lidar: bool = False

    @property
    def hub_file(self) -> str:
        return f"{self.name}.pth"

    @property
    def hub_uri(self) -> str:
        return f"hf://{HUB_REPO}/{self.hub_file}"


_ADE_MIOU = {"tiny": "47.0 / 47.8", "small": "48.7 / 49.7", "base": "49.4 / 50.8",
             "large": "53.2 / 54.4"}
_CS_MIOU = {"tiny": "82.60 / 83.15", "small": "82.69 / 83.58", "base": "82.78 / 83.49",
            "large": "83.21 / 83.92"}
_ALIGNED_MIOU = {"tiny": "82.3 / 82.6 / 82.6", "large": "83.0 / 83.2 / 83.2"}
_SIZE = {"tiny": "t", "small": "s", "base": "b", "large": "l"}
_PROVEN_SEG = "oracle parity (random weights): see RESULTS, Official parity"
_PROVEN_SHARED = "converted strictly; same code paths as the proven T/L sizes"
_PROVEN_BEV_CAMERA = ("oracle parity (random weights; official camera modules on CPU, "
                      "model.bev.arch bevfusion): see RESULTS, Official parity, BEV")
_PROVEN_BEV_FUSION = ("oracle parity (random weights; official modules on CPU, the vendored "
                      "spconv 1.x and voxel ops built from their C++ sources for the CPU; "
                      "sparse conv vs a dense reference): see RESULTS, Official parity, BEV")


def _proven(variant: str) -> str:
    return _PROVEN_SEG if variant in ("tiny", "large") else _PROVEN_SHARED


RELEASED: tuple[ReleasedModel, ...] = (
    *(ReleasedModel(f"ddp_swin_{_SIZE[v]}_2x8_512x512_160k_ade20k",
                    f"ade20k/ddp_swin_{_SIZE[v]}.yaml", "ade20k", "swin", v, False,
                    f"ADE20K val mIoU {_ADE_MIOU[v]} (single / multi-scale, 3 steps)",
                    _proven(v))
      for v in _SIZE),
    *(ReleasedModel(f"ddp_convnext_{_SIZE[v]}_4x4_512x1024_160k_cityscapes",
                    f"cityscapes/ddp_convnext_{_SIZE[v]}.yaml", "cityscapes", "convnext", v,
                    False, f"Cityscapes val mIoU {_CS_MIOU[v]} (single / multi-scale, 3 steps)",
                    _proven(v))
      for v in _SIZE),
    *(ReleasedModel(f"ddp_convnext_{_SIZE[v]}_4x4_512x1024_5k_cityscapes_aligned",
                    f"cityscapes/ddp_convnext_{_SIZE[v]}_aligned.yaml", "cityscapes", "convnext",
                    v, True, f"Cityscapes val mIoU {_ALIGNED_MIOU[v]} (1 / 3 / 10 steps, "
                    "single scale)", _PROVEN_SEG)
      for v in ("tiny", "large")),
    ReleasedModel("ddp-camera-bev256d2-lss-scale001-d5-lr5e-5",
                  "nuscenes/ddp_c_swin_t_bevfusion.yaml", "nuscenes", "swin", "tiny", False,
                  "nuScenes val BEV map mIoU 59.4 (camera)", _PROVEN_BEV_CAMERA),
    ReleasedModel("ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5",
                  "nuscenes/ddp_cl_swin_t_bevfusion.yaml", "nuscenes", "swin", "tiny", False,
                  "nuScenes val BEV map mIoU 70.6 (camera + LiDAR)", _PROVEN_BEV_FUSION,
                  lidar=True),
)
"""Every released DDP checkpoint (no depth model was released: "TBA")."""


def find_released(name: str) -> ReleasedModel | None:
    """The entry whose ``name`` (or ``name.pth``) is ``name``, else None."""
    stem = name[:-4] if name.endswith(".pth") else name
    return next((m for m in RELEASED if m.name == stem), None)


def match_released(dataset: str, backbone: str, variant: str, aligned: bool,
                   lidar: bool = False) -> ReleasedModel | None:
    """The first entry with this dataset, backbone, size, fine-tune and sensors, else None."""
    return next((m for m in RELEASED if (m.dataset, m.backbone, m.variant, m.aligned, m.lidar)
                 == (dataset, backbone, variant, aligned, lidar)), None)
