"""The recorded layouts of the authors' released checkpoints (``tests/fixtures/official``):
tensor names and shapes, as empty ``meta`` tensors, and the densediff model each converts to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densediff.errors import CheckpointError
from densediff.official.catalog import find_released
from densediff.tasks import build_model, load_config

__all__ = ["FIXTURES", "assert_not_strict", "official_layout", "released_state"]

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "official"


def official_layout(name: str) -> dict[str, torch.Tensor]:
    """Released model ``name``'s state dict as empty ``meta`` tensors of the recorded shapes."""
    shapes = json.loads((FIXTURES / f"keys_{name}.json").read_text())
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def released_state(name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict (``meta`` tensors) of the densediff model of released model ``name``
    (built from its shipped config)."""
    with torch.device("meta"):
        model = build_model(load_config(find_released(name).config), num_classes)
    return model.state_dict()


def assert_not_strict(convert, state: dict, own_state: dict, parts) -> None:
    """``convert(state, own_state, "x.pth")`` refuses in one line that names every one of
    ``parts`` (the keys that did not match)."""
    with pytest.raises(CheckpointError) as e:
        convert(state, own_state, "x.pth")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x.pth: does not convert strictly")
    for part in parts:
        assert part in msg, part
