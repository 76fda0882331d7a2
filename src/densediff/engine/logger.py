"""Run logging: ``metrics.csv``, TensorBoard (``tb/``) and ``train.log`` in the run folder.

Only the main process creates a :class:`RunLogger`; other ranks log nothing.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from densediff.utils.checkpoint import atomic_write


class CSVLog:
    """Append-only CSV of rows (dicts); the header grows when a row brings new keys.

    Rows need not share keys (training rows hold losses, evaluation rows metrics); missing
    cells are empty. On resume, :meth:`truncate` drops rows logged after the checkpoint.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fields: list[str] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.fields = list(csv.DictReader(f).fieldnames or [])

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)
        atomic_write(self.path, write)

    def truncate(self, after_iter: int) -> None:
        """Drop the rows whose ``iter`` is larger than ``after_iter``."""
        if self.path.is_file():
            self._rewrite([r for r in self._read() if int(r.get("iter") or 0) <= after_iter])

    def log(self, row: Mapping[str, object]) -> None:
        new = [k for k in row if k not in self.fields]
        if new or not self.path.is_file():
            old = self._read()
            self.fields += new
            self._rewrite(old + [dict(row)])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(dict(row))


class RunLogger:
    """Text lines (stdout + ``train.log``), ``metrics.csv`` rows and TensorBoard scalars.

    Args:
        work_dir: the run folder.
        start_iter: iteration the run (re)starts from; later CSV rows and TensorBoard events
            of an interrupted earlier attempt are discarded.
        bar: the tqdm bar in use, if any (text lines are printed through it).
    """

    def __init__(self, work_dir: str | os.PathLike, start_iter: int = 0, bar: tqdm | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.work_dir = Path(work_dir)
        self.bar = bar
        self.csv = CSVLog(self.work_dir / "metrics.csv")
        self.csv.truncate(start_iter)
        self.tb = SummaryWriter(str(self.work_dir / "tb"), purge_step=start_iter + 1)
        self._text = open(self.work_dir / "train.log", "a")

    def info(self, msg: str) -> None:
        (self.bar.write if self.bar is not None and not self.bar.disable else print)(msg)
        self._text.write(msg + "\n")
        self._text.flush()

    def scalars(self, it: int, values: Mapping[str, float], prefix: str) -> None:
        """One CSV row ``{iter, **values}`` and TensorBoard scalars ``<prefix>/<key>``."""
        self.csv.log({"iter": it, **{k: _fmt(v) for k, v in values.items()}})
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, it)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        self._text.close()


def _fmt(v: object) -> object:
    return f"{v:.6g}" if isinstance(v, float) else v
