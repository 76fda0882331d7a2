"""A fourth task added from the task table alone: single-channel edge maps of the generated
scenes. Everything task-specific is below (its dataset, map encoding, model, metric, pipeline,
result type and one :class:`~densediff.tasks.TaskSpec`); it joins ``densediff.tasks.TASKS``
and then trains, evaluates at several step counts, loads, predicts and saves through the
library's own trainer, evaluation, API and CLI, and passes the task contract. This proves the
"how to add a task" list of ``docs/architecture.md``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

import densediff
from densediff.cli.main import main
from densediff.data.worlds.shapes import GeneratedDataset
from densediff.engine.evaluate import evaluate_steps
from densediff.engine.trainer import train
from densediff.models import DDP
from densediff.pipelines.base import Pipeline, is_diffusion, resolve_steps, write_files
from densediff.tasks import TASKS, TaskSpec, load_config
from densediff.testing.contract import check_task_contract
from densediff.testing.tiny import TINY

IGNORE = 255


# -- data: the generated scenes, labels turned into edge maps ------------------------------
class EdgeDataset(GeneratedDataset):
    """1 where a pixel's class differs from its right or lower neighbour's, else 0."""

    def load(self, index):
        img, label, name = super().load(index)
        edge = np.zeros(label.shape, np.uint8)
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        edge[:-1, :] |= label[:-1, :] != label[1:, :]
        return img, edge, name


def build_edge_dataset(cfg, split, train):
    ds = EdgeDataset(cfg.data, split, train, seed=cfg.seed)
    ds.class_names, ds.palette = ["edge"], np.array([[255, 255, 255]], np.uint8)
    return ds


def edge_class_info(cfg):
    return ["edge"], np.array([[255, 255, 255]], np.uint8)


# -- model: DDP over a one-channel {-s, s} map --------------------------------------------
class EdgeEncoding(nn.Module):
    channels = 1

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:  # B x h x w in {0, 1}
        return (mask[:, None].float() * 2 - 1) * self.scale


class EdgeDDP(DDP):
    output_kind = "multilabel"

    def encode_target(self, label, size):
        small = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0]
        return self.map_encoding((small == 1).float())

    def encode_prediction(self, logits):
        return self.map_encoding((logits[:, 0] >= 0).float())

    def task_losses(self, pred, label):
        up = F.interpolate(pred, size=label.shape[-2:], mode="bilinear", align_corners=False)
        valid = label != IGNORE
        loss = F.binary_cross_entropy_with_logits(up[:, 0][valid], label[valid].float())
        return {"loss_bce": loss}


def build_edge_model(cfg, num_classes):
    scale = cfg.model.diffusion.scale
    return EdgeDDP(cfg.model, 1, map_encoding=lambda: EdgeEncoding(scale),
                   ignore_index=IGNORE, mean=cfg.data.mean, std=cfg.data.std)


# -- metric, result type, pipeline ----------------------------------------------------------
class EdgeIoU(Metric):
    def __init__(self):
        super().__init__()
        self.add_state("inter", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs, label):  # B x 1 x H x W probabilities, B x H x W labels
        valid = label != IGNORE
        pred, true = (probs[:, 0] >= 0.5) & valid, (label == 1) & valid
        self.inter += (pred & true).sum()
        self.union += (pred | true).sum()

    def reduce(self):
        pass

    def compute(self):
        return {"IoU": float(100 * self.inter / self.union.clamp(min=1))}


@dataclass
class EdgePrediction:
    probs: np.ndarray
    steps: int | None = None
    extra: dict = field(default_factory=dict)

    def save(self, out_dir, stem, **options):
        mask = ((self.probs >= 0.5) * 255).astype(np.uint8)
        return write_files(out_dir, stem, {"edges.png": mask})


class EdgePipeline(Pipeline):
    name = "edge"
    has_aug = False
    aug_name = "none"

    def metric(self, dataset, cfg, device, boundary=True):
        return EdgeIoU()

    def uncertainty_metrics(self, model, cfg, steps, shared, device):
        return {}

    def image_outputs(self, model, cfg, feat, img, size, steps, seeds, aug, scale_input=None):
        kw = {"steps": steps, "seeds": seeds} if is_diffusion(model) else {}
        out = model.predict_map(img, **kw)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False), {}

    def update_metrics(self, metric, unc, pred, maps, label, dataset):
        metric.update(pred, label)

    def score_trajectory(self, model, metric, traj, label):
        out = traj.output(model.accumulation)
        metric.update(F.interpolate(out, size=label.shape[-2:], mode="bilinear"), label)

    def change_rates(self, traj):
        m = traj.step_outputs() >= 0.5
        return [float((m[s] != m[s - 1]).float().mean()) for s in range(1, len(m))]

    def format_metrics(self, metrics, class_names):
        return f"edge IoU {metrics['IoU']:.2f}"

    def output_names(self, predictor, uncertainty, trajectory, save_probs):
        return ["edges.png"]

    @torch.no_grad()
    def predict(self, predictor, item, *, aug=False, steps=None, seed=0):
        rgb, x = self.image_tensor(predictor, item)
        n = resolve_steps(predictor.model, steps, "this checkpoint")[0]
        out = predictor.model.predict_map(x, steps=n, seeds=[seed])
        up = F.interpolate(out, size=rgb.shape[:2], mode="bilinear", align_corners=False)
        return EdgePrediction(up[0, 0].cpu().numpy(), steps=n)


EDGES = TaskSpec(
    name="edges", datasets=("generated",), metrics=("IoU",), headline="IoU",
    lower_is_better=frozenset(), model_types=("ddp",), output_kind="multilabel",
    build_model=build_edge_model, build_dataset=build_edge_dataset, class_info=edge_class_info,
    pipeline=EdgePipeline(), export_refusal="the toy edge task is not exported",
    check=lambda cfg: None)

OVERRIDES = [*TINY["generated/ddp.yaml"], "task=edges", "model.aux_head.enabled=false"]


@pytest.fixture
def edges(monkeypatch):
    monkeypatch.setitem(TASKS, "edges", EDGES)  # the one place a task is added


def test_unknown_task_is_one_config_error():
    with pytest.raises(densediff.errors.ConfigError, match="task 'edges': not a task"):
        load_config("generated/ddp.yaml", ["task=edges"])


def test_toy_task_trains_evaluates_predicts_through_the_library(edges, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = load_config("generated/ddp.yaml", [*OVERRIDES, f"work_dir={tmp_path / 'run'}"])
    metrics = train(cfg)
    assert 0 <= metrics["IoU"] <= 100 and metrics["best_iter"] == 4
    predictor = densediff.load(tmp_path / "run")
    assert isinstance(predictor.model, EdgeDDP) and predictor.class_names == ["edge"]
    per_step = evaluate_steps(predictor.model, predictor.dataset("val"), predictor.cfg,
                              steps=[1, 2], progress=False)
    assert set(per_step) == {1, 2} and all("IoU" in m for m in per_step.values())
    image = predictor.dataset("val").load(0)[0]
    a, b = predictor.predict(image, steps=2, seed=3), predictor.predict(image, steps=2, seed=3)
    assert a.probs.shape == image.shape[:2] and np.array_equal(a.probs, b.probs)
    assert a.save(tmp_path / "out", "x") == ["edges.png"]
    assert (tmp_path / "out" / "x_edges.png").is_file()
    # the CLI: eval at two step counts, and export refused in one line (the table says so)
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "run"), "--steps", "1,2", "--quiet",
                 "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["steps"]) == {"1", "2"}
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 2
    assert "toy edge task is not exported" in capsys.readouterr().err


def test_toy_task_passes_the_contract(edges, tmp_path):
    check_task_contract("generated/ddp.yaml", OVERRIDES, tmp_path)
