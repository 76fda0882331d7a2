"""The contract every task passes: built from the task table, the model satisfies the one
model interface; it trains a step, samples at its minimum, default and maximum step counts,
scores a trajectory with the task's metric, predicts through the API, saves its files, and
exports where the table says it can. A new task proves itself by joining ``CASES``."""

from __future__ import annotations

import pytest

from densediff.tasks import TASKS
from densediff.testing.contract import check_task_contract
from densediff.testing.tiny import TINY

CASES = {
    "segmentation/segmentor": ("generated/baseline.yaml", []),
    "segmentation/ddp": ("generated/ddp.yaml", []),
    "depth/ddp": ("generated/depth_ddp.yaml", []),
    "depth/segmentor": ("generated/depth_twin.yaml", []),
    "bev/ddp": ("generated/bev_ddp.yaml", []),
    "bev/segmentor": ("generated/bev_twin.yaml", []),
}


def test_every_task_has_a_contract_case():
    assert {case.split("/")[0] for case in CASES} == set(TASKS)


@pytest.mark.parametrize("case", list(CASES))
def test_task_contract(case, tmp_path):
    config, extra = CASES[case]
    check_task_contract(config, [*TINY[config], *extra], tmp_path)
