"""Iteration-based training (mmseg ``IterBasedRunner`` semantics) with exact resume.

One call of :func:`train` runs a whole schedule, in one process or under ``torchrun``
(DistributedDataParallel; gloo on CPU, NCCL on GPU with SyncBatchNorm). Per iteration:

1. set the learning rate (:func:`densediff.engine.optim.scheduled_lr`: ``train.lr_schedule``
   with linear warmup);
2. :func:`train_step`: ``train.accum_steps`` micro-batches of ``data.batch_size`` images per
   process, gradients summed (no DDP all-reduce until the last one), clipped, AdamW step;
3. EMA update every ``train.ema.every`` steps (if enabled);
4. every ``log_interval`` / ``eval_interval`` / ``ckpt_interval`` iterations (and after the
   last one): log, evaluate on the val split (EMA weights when enabled) and keep the best
   checkpoint, save ``last``.

Run folder (``cfg.work_dir``)::

    config.yaml                      resolved config (class names and palette filled in)
    checkpoints/last.safetensors     raw weights, kind "model"
    checkpoints/last_ema.safetensors EMA weights, kind "ema" (EMA runs only)
    checkpoints/last.state.pt        optimizer, iteration, best score, per-rank RNG states
    checkpoints/best.safetensors     weights (EMA when enabled) of the best evaluation
    metrics.csv, tb/, train.log

Exact resume: the data order is a pure function of (seed, samples consumed)
(:class:`~densediff.engine.sampler.InfiniteSampler`, augmentation seeded per sample), and the
checkpoint holds every RNG state, so ``train(cfg, resume=True)`` after a crash ends with the
same weights as an uninterrupted run (same machine, world size and thread count).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from densediff.config import Config
from densediff.data.datasets import to_device
from densediff.engine.ema import EMA
from densediff.engine.logger import RunLogger
from densediff.engine.optim import build_optimizer, set_lr
from densediff.engine.sampler import InfiniteSampler
from densediff.errors import CheckpointError, ConfigError, DivergenceError, UserError, one_line
from densediff.utils import distributed as du
from densediff.utils.checkpoint import (
    first_nonfinite,
    load_into,
    load_metadata,
    load_train_state,
    load_weights,
    resolve_weights,
    save_checkpoint,
    save_train_state,
)
from densediff.utils.fs import RunLock, atomic_write, check_writable_dir, remove_stale_temps
from densediff.utils.precision import autocast, resolve_train_precision
from densediff.utils.signals import critical, graceful

CKPT_DIR = "checkpoints"
CHECKPOINT_FILES = ("last.safetensors", "last_ema.safetensors", "last.state.pt",
                    "best.safetensors")
LAST_FILES = ("last.safetensors", "last_ema.safetensors", "last.state.pt")
"""Written in this order; ``last.state.pt`` is the commit point."""
PENDING_DIR = ".pending"
"""``checkpoints/.pending/``: a ``last`` checkpoint waiting for its weights' first training
loss; moved onto ``checkpoints/last.*`` once that loss is sound (see ``train.divergence_factor``)."""
RUN_FILES = ("config.yaml", "metrics.csv", "train.log", "tb", CKPT_DIR)
"""What a training writes into its run folder: any of them means an earlier run is there."""
LOSS_HISTORY = 50


# --------------------------------------------------------------------------------------------
# one optimizer step


def train_precision(t, device: torch.device) -> str:
    """``train.precision`` resolved on ``device`` to fp32, bf16 or fp16
    (:func:`~densediff.utils.precision.resolve_train_precision`; ``auto``: bf16 on a CUDA card
    with bf16, fp16 on one without, the CPU's native-bf16 rule on the CPU). When None (old
    configs): ``auto`` on CUDA with ``train.amp``, else fp32. ConfigError for bf16 on a CUDA
    card without it."""
    precision = t.precision
    if precision is None:
        precision = "auto" if t.amp and device.type == "cuda" else "fp32"
    try:
        return resolve_train_precision(precision, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


MAX_OVERFLOW_STEPS = 40
"""fp16 training: this many overflow steps in a row (the loss scale backed off by 2^40) stop
the run as diverged."""


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler of fp16 training (``torch.amp.GradScaler`` on ``device``'s type); None
    for fp32 and bf16 (bf16 has fp32's exponent range: nothing to scale)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict],
               accum_steps: int = 1, grad_clip: float | None = None, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None
               ) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step over ``accum_steps`` micro-batches drawn from ``batches``.

    Each micro-batch loss is divided by ``accum_steps`` so the summed gradient equals the
    gradient of the mean loss over all micro-batches (the same as one batch of
    ``accum_steps`` x the size, for per-pixel mean losses and batch-independent layers).
    Under DDP the gradient all-reduce runs only on the last micro-batch (``no_sync``).

    Args:
        model: has ``forward(img, label) -> dict`` of losses with key ``loss`` (may be DDP).
        optimizer: its gradients are zeroed after the step.
        batches: yields dicts with ``image`` and ``label`` tensors.
        accum_steps: micro-batches per step.
        grad_clip: max global L2 norm of the gradients (None: no clipping).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast on the model's device type).
        scaler: fp16: the loss scaler (:func:`grad_scaler`). The loss is scaled before the
            backward pass and the gradients unscaled before clipping; a step whose gradients
            overflow (norm inf/NaN) is skipped by the scaler and the scale backs off.

    Returns:
        ``(losses, grad_norm)``: each loss averaged over the micro-batches (detached tensors),
        and the global gradient norm before clipping. When the norm is NaN/inf the optimizer
        step is skipped (the caller decides what to do).
    """
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    for i in range(accum_steps):
        batch = next(batches)
        img = to_device(batch["image"], device)
        label = batch["label"].to(device, non_blocking=True)
        last = i == accum_steps - 1
        no_sync = not last and isinstance(model, nn.parallel.DistributedDataParallel)
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(precision, device):
                losses = model(img, label)
            loss = losses["loss"] / accum_steps
            (loss if scaler is None else scaler.scale(loss)).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.detach().float() / accum_steps
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        params, grad_clip if grad_clip is not None else math.inf))
    if scaler is not None:
        scaler.step(optimizer)  # skipped when unscale_ found inf/NaN gradients
        scaler.update()         # ... and then the scale backs off
    elif math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


# --------------------------------------------------------------------------------------------
# RNG state (saved per rank for exact resume)


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(*key: int) -> None:
    """Seed python, numpy and torch from the integers ``key`` (e.g. seed, rank)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# the run


def train(cfg: Config, resume: bool = False) -> dict:
    """Train ``cfg``'s model on its train split, evaluating on its val split.

    Runs in one process, or in each process under ``torchrun`` (``RANK``/``WORLD_SIZE``).

    Args:
        cfg: the resolved run config; ``cfg.work_dir`` must be set.
        resume: continue the run in ``cfg.work_dir`` from ``checkpoints/last`` exactly.
            Without it, a work_dir that already holds checkpoints is refused.

    Returns:
        The final evaluation (``evaluate()``'s dict: aAcc, mIoU, mAcc, mBIoU, per_class) of
        the final weights (EMA when enabled), plus ``iter``, ``best_<metric>`` and
        ``best_iter``.

    Raises:
        ConfigError: no work_dir, or it holds another run's checkpoints and resume is False.
        CheckpointError: resume without (consistent) checkpoints.
        DivergenceError: NaN/inf gradients; the last good checkpoint stays.
    """
    info = du.init_distributed()
    run = None
    try:
        with graceful():  # SIGTERM as SIGINT: stop at a safe point, keep the sound checkpoints
            run = _Run(cfg, info, resume)
            return run.fit()
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        du.cleanup_distributed(info)


class _Run:
    """State of one training run; see :func:`train`."""

    def __init__(self, cfg: Config, info: du.DistInfo, resume: bool):
        from densediff.tasks import spec_for

        if cfg.work_dir is None:
            raise ConfigError("work_dir: must be set for training (the run folder)")
        self.spec = spec = spec_for(cfg)
        self.cfg = cfg = cfg.model_copy(deep=True)
        self.t = cfg.train
        self.metric = spec.best_metric(cfg)
        self.info = info
        self.device = info.device
        self.precision = train_precision(self.t, self.device)  # bad choices: before any work
        self.work_dir = Path(cfg.work_dir)
        self.ckpt_dir = self.work_dir / CKPT_DIR
        self.lock: RunLock | None = None
        self._check_work_dir(resume)

        names, palette = spec.class_info(cfg)
        cfg.data.class_names = list(names)
        cfg.data.palette = [tuple(int(c) for c in rgb) for rgb in np.asarray(palette)]
        self.num_classes = len(names)

        _seed_everything(cfg.seed)  # the same initial weights on every rank
        self.train_set = spec.build_dataset(cfg, cfg.data.train_split, train=True)
        self.val_set = spec.build_dataset(cfg, cfg.data.val_split, train=False)
        model = spec.build_model(cfg, self.num_classes).to(self.device)
        if info.distributed and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.module = model
        self.optimizer = build_optimizer(model, self.t)
        self.scaler = grad_scaler(self.precision, self.device)
        self.overflows = 0  # fp16: overflow steps in a row
        self.ema = EMA(model, self.t.ema.decay) if self.t.ema.enabled else None
        _seed_everything(cfg.seed, info.rank, 1)  # dropout etc.: one stream per rank
        self.iter = 0
        self.samples = 0  # items of this rank's sample stream consumed so far
        self.best: float | None = None
        self.best_iter = 0
        self.losses: deque[float] = deque(maxlen=LOSS_HISTORY)  # recent sound training losses
        self.pending: int | None = None  # rank 0: iteration of checkpoints/.pending
        self.committed: tuple[int, float] | None = None  # (iteration, first loss) of last
        self.notes: list[str] = []  # resume warnings, logged once the logger exists
        if self.ema is not None:
            init_share = ema_init_share(self.t.iters, self.t.ema.decay, self.t.ema.every)
            if init_share > 0.05:
                self.notes.append(
                    f"warning: train.ema: after {self.t.iters} iterations {init_share:.0%} of the "
                    "EMA weights (used for evaluation and best) will still be the initial "
                    "weights; lower train.ema.decay or train.ema.every")
        if resume:
            self._load()
        elif self.t.load_from is not None:
            self._load_from(Path(self.t.load_from))
        self.model: nn.Module = model
        if info.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.last_metrics: dict | None = None
        self.logger: RunLogger | None = None  # rank 0 only, created by fit()

    # ---------------------------------------------------------------- folders and checkpoints

    def _check_work_dir(self, resume: bool) -> None:
        """Rank 0 checks the run folder (writable, not in use, no earlier run unless resuming)
        and takes its lock; every rank raises the same error, so none waits for the others."""
        error = None
        if self.info.is_main:
            try:
                self._check_work_dir_main(resume)
            except UserError as e:
                error = e
        if self.info.distributed:
            errors = du.all_gather_objects(None if error is None else (type(error), str(error)))
            if errors[0] is not None:
                raise errors[0][0](errors[0][1])
        elif error is not None:
            raise error

    def _check_work_dir_main(self, resume: bool) -> None:
        if self.work_dir.exists() and not self.work_dir.is_dir():
            from densediff.utils.checks import path_kind

            raise ConfigError(f"work_dir: {self.work_dir} is {path_kind(self.work_dir)}, not a "
                              "folder")
        check_writable_dir(self.work_dir, "work_dir")
        self.lock = RunLock(self.work_dir)
        try:
            pending = self.ckpt_dir / PENDING_DIR
            if pending.is_symlink() or (pending.exists() and not pending.is_dir()):
                raise ConfigError(f"work_dir: {pending} is not the run's own folder (a link or "
                                  "a file); remove it")
            if resume and not (self.ckpt_dir / "last.state.pt").is_file():
                raise CheckpointError(f"{self.ckpt_dir / 'last.state.pt'}: nothing to resume "
                                      "from (drop --resume to start a new run)")
            if not resume:
                if any((self.ckpt_dir / n).exists() for n in CHECKPOINT_FILES):
                    raise ConfigError(f"work_dir: {self.work_dir} already holds checkpoints of a "
                                      "run; pass --resume to continue it or choose another "
                                      "work_dir")
                earlier = [n for n in RUN_FILES if (self.work_dir / n).exists()]
                if earlier:
                    raise ConfigError(f"work_dir: {self.work_dir} already holds an earlier run "
                                      f"({', '.join(earlier)}); pass --resume to continue it, "
                                      "or choose another work_dir (nothing is overwritten)")
            shutil.rmtree(pending, ignore_errors=True)  # an unjudged save
            remove_stale_temps(self.ckpt_dir)  # temporary files of a save that was killed
        except UserError:
            self.lock.release()
            self.lock = None
            raise

    def _load(self) -> None:
        """Restore weights, EMA, optimizer, counters and RNG states from ``checkpoints/last``."""
        state_path = self.ckpt_dir / "last.state.pt"
        state = load_train_state(state_path)
        _check_train_state(state, state_path, self.t.iters)
        it = state.get("iteration")
        files = [(self.ckpt_dir / "last.safetensors", self.module)]
        if self.ema is not None:
            files.append((self.ckpt_dir / "last_ema.safetensors", self.ema.module))
        for path, module in files:
            if not path.is_file() and module is not self.module:
                self.notes.append(f"warning: {path} not found; the EMA restarts from the weights")
                self.ema = EMA(self.module, self.t.ema.decay)
                continue
            weights, saved_cfg = load_weights(path)
            if load_metadata(path).get("iteration") != it:
                raise CheckpointError(f"{path}: is not from iteration {it} like {state_path} "
                                      "(interrupted while saving?)")
            load_into(module, weights, source=path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{state_path}: optimizer state does not fit "
                                  f"({one_line(e, 120)})") from None
        if self.scaler is not None and isinstance(state.get("scaler"), dict):
            try:
                self.scaler.load_state_dict(state["scaler"])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"{state_path}: loss scaler state does not fit "
                                      f"({one_line(e, 120)})") from None
        self.iter, self.samples = int(it), int(state["samples"])
        self.committed = (self.iter, None)
        self.best, self.best_iter = state["best"], int(state["best_iter"])
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            try:
                _set_rng_state(rngs[self.info.rank], self.device)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                    RuntimeError) as e:
                raise CheckpointError(f"{state_path}: entry 'rng' is not a random state "
                                      f"({one_line(e, 100)})") from None
        else:
            self.notes.append(f"warning: {state_path} was written by {len(rngs)} processes, "
                              f"now {self.info.world_size}: random streams are not continued "
                              "exactly")
            _seed_everything(self.cfg.seed, self.info.rank, self.iter)
        changed = _diff(saved_cfg, self.cfg.to_dict())
        if changed:
            self.notes.append("resuming with changed settings: " + ", ".join(changed))

    def _load_from(self, path: Path) -> None:
        """Initialise the weights from another run (``train.load_from``): a checkpoint file, or
        a run folder (its ``checkpoints/best``, else ``last``). Optimizer and schedule start
        fresh, as mmseg's ``load_from``."""
        path = resolve_weights(path, "train.load_from")
        weights, _ = load_weights(path)
        load_into(self.module, weights, source=path)
        if self.ema is not None:
            load_into(self.ema.module, weights, source=path)
        self.notes.append(f"initialised from {path}")

    def _save(self, best: bool, last: bool) -> None:
        """Write the ``best`` and/or ``last`` checkpoints; every rank must call it. A SIGINT /
        SIGTERM during the save takes effect once it is complete."""
        with critical():
            self._save_now(best, last)

    def _save_now(self, best: bool, last: bool) -> None:
        for m in (self.module, self.ema.module if self.ema else None):
            if m is not None:
                du.broadcast_buffers(m)
        rngs = du.all_gather_objects(_rng_state(self.device))
        # Weights are identical on every rank, so every rank can refuse non-finite ones itself
        # (if only rank 0 raised, the others would wait in the next collective until timeout).
        for m in (self.module, self.ema.module if self.ema else None):
            bad = first_nonfinite(m.state_dict()) if m is not None else None
            if bad is not None:
                raise CheckpointError(f"{self.ckpt_dir}: not saving iteration {self.iter}: "
                                      f"weight {bad} holds NaN or inf")
        if not self.info.is_main:
            return
        meta = {"iteration": self.iter, "num_classes": self.num_classes}
        eval_module = self.ema.module if self.ema else self.module
        if best:
            save_checkpoint(self.ckpt_dir / "best.safetensors", eval_module.state_dict(), self.cfg,
                            {**meta, "kind": "ema" if self.ema else "model",
                             self.metric: self.best})
        if not last:
            return
        pending = self.ckpt_dir / PENDING_DIR
        shutil.rmtree(pending, ignore_errors=True)
        save_checkpoint(pending / "last.safetensors", self.module.state_dict(), self.cfg,
                        {**meta, "kind": "model"})
        if self.ema is not None:
            save_checkpoint(pending / "last_ema.safetensors", self.ema.state_dict(),
                            self.cfg, {**meta, "kind": "ema"})
        save_train_state(pending / "last.state.pt", {  # written last: the commit point
            "iteration": self.iter, "samples": self.samples,
            "optimizer": self.optimizer.state_dict(),
            "best": self.best, "best_iter": self.best_iter, "best_metric": self.metric,
            "rng": rngs, "world_size": self.info.world_size,
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        })
        self.pending = self.iter

    # ---------------------------------------------------------------- divergence guard

    def _loss_is_sound(self, loss: float) -> tuple[bool, str]:
        """Whether a training loss is finite and not a spike (> ``train.divergence_factor`` x
        the median of the recent sound losses); the reason when it is not."""
        if not math.isfinite(loss):
            return False, f"loss {loss}"
        factor = self.t.divergence_factor
        if factor is not None and self.losses:
            median = statistics.median(self.losses)
            if median > 0 and loss > factor * median:
                return False, (f"loss {loss:.4g} is {loss / median:.0f}x the median {median:.4g} "
                               f"of the previous {len(self.losses)} iterations")
        return True, ""

    def _judge_pending(self, loss: float) -> None:
        """After an iteration: commit a pending ``last`` checkpoint (rank 0 only has one) if
        this iteration's loss, the first computed with its weights, is sound; else drop it."""
        sound, why = self._loss_is_sound(loss)
        if sound:
            self.losses.append(loss)
        if self.pending is None:
            return
        if sound:
            self._commit_pending(loss)
            return
        shutil.rmtree(self.ckpt_dir / PENDING_DIR, ignore_errors=True)
        kept = (f"checkpoints/last stays at iteration {self.committed[0]}"
                if self.committed else "no checkpoints/last was kept")
        self.logger.info(f"warning: iteration {self.iter + 1}: {why}: the weights of iteration "
                         f"{self.pending} look diverged and are not kept as checkpoints/last; "
                         f"{kept}")
        self.pending = None

    def _commit_pending(self, loss: float | None = None) -> None:
        """Move the pending ``last`` checkpoint onto ``checkpoints/last.*`` (``loss``: the
        sound loss its weights gave, None when unjudged)."""
        with critical():
            self._commit_pending_now(loss)

    def _commit_pending_now(self, loss: float | None) -> None:
        pending = self.ckpt_dir / PENDING_DIR
        for name in LAST_FILES:  # the state file last: it is the commit point
            src = pending / name
            if src.is_file():
                os.replace(src, self.ckpt_dir / name)
        shutil.rmtree(pending, ignore_errors=True)
        self.committed, self.pending = (self.pending, loss), None

    def _kept_checkpoints(self) -> str:
        """Which checkpoints a diverged run leaves, for the error message."""
        parts = []
        if self.committed is not None:
            it, loss = self.committed
            evidence = f", its weights' next training loss {loss:.4g}" if loss is not None else ""
            parts.append(f"checkpoints/last is iteration {it} (sound{evidence})")
        if self.best is not None and self.best_iter:
            parts.append(f"checkpoints/best is iteration {self.best_iter} (val {self.metric} "
                         f"{self.best:.4g})")
        return "; ".join(parts) if parts else "no checkpoint was written"

    # ---------------------------------------------------------------- logging and evaluation

    def _log_train(self, lr: float, sums: dict[str, torch.Tensor], n: int, sec_per_iter: float,
                   bar: tqdm) -> None:
        """Log the losses averaged over the last ``n`` iterations and all ranks (collective)."""
        keys = sorted(sums)
        avg = du.all_reduce_mean(torch.stack([sums[k].to(self.device) for k in keys]) / n)
        if not self.info.is_main:
            return
        row = {"lr": lr, **dict(zip(keys, avg.tolist())), "time": sec_per_iter}
        if self.device.type == "cuda":
            row["mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.logger.scalars(self.iter, row, "train")
        eta = datetime.timedelta(seconds=round(sec_per_iter * (self.t.iters - self.iter)))
        self.logger.info(f"iter {self.iter}/{self.t.iters} lr {lr:.3g} "
                         + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                    if k not in ("lr", "time"))
                         + f" {sec_per_iter:.3f}s/it eta {eta}")
        bar.set_postfix(loss=f"{row['loss']:.4f}")

    def _evaluate(self, progress: bool) -> bool:
        """Evaluate on the val split (EMA weights when enabled), log; True if a new best."""
        from densediff.engine.evaluate import evaluate

        module = self.ema.module if self.ema else self.module
        du.broadcast_buffers(module)
        t0 = time.perf_counter()
        metrics = evaluate(module, self.val_set, self.cfg, progress=progress)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        value = scalars[self.metric]  # one of the task's metrics (TaskSpec.validate)
        lower = self.metric in self.spec.lower_is_better
        improved = math.isfinite(value) and (
            self.best is None or (value < self.best if lower else value > self.best))
        if improved:
            self.best, self.best_iter = value, self.iter
        if self.info.is_main:
            self.logger.scalars(self.iter, {**scalars, "eval_time": time.perf_counter() - t0},
                                "val")
            best = (f"  (best {self.metric} {self.best:.2f} @ {self.best_iter})"
                    if self.best is not None else "")
            self.logger.info(f"iter {self.iter} val ({len(self.val_set)} images): "
                             + "  ".join(f"{k} {v:.2f}" for k, v in scalars.items()) + best)
        self.last_metrics = metrics
        return improved

    # ---------------------------------------------------------------- loop

    def _check_step(self, losses: dict, grad_norm: float) -> float:
        """The gradient norm to log for a finished step: 0 for an fp16 overflow step (skipped
        by the scaler, the scale backed off; at most ``MAX_OVERFLOW_STEPS`` in a row);
        DivergenceError for NaN/inf loss or gradients otherwise."""
        overflow = (self.scaler is not None and not math.isfinite(grad_norm)
                    and math.isfinite(float(losses["loss"])))
        self.overflows = self.overflows + 1 if overflow else 0
        if overflow and self.overflows <= MAX_OVERFLOW_STEPS:
            return 0.0
        if not math.isfinite(grad_norm):
            raise DivergenceError(
                f"iteration {self.iter + 1}: loss/gradients are NaN or inf (loss "
                f"{float(losses['loss']):.4g}); stopped. {self._kept_checkpoints()}. "
                "Try a lower train.lr or set train.grad_clip")
        return grad_norm

    def fit(self) -> dict:
        from densediff.data import collate

        cfg, t, info = self.cfg, self.t, self.info
        bar = tqdm(total=t.iters, initial=self.iter, desc="train", dynamic_ncols=True,
                   disable=not (info.is_main and t.progress and sys.stderr.isatty()))
        if info.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            text = cfg.to_yaml()
            atomic_write(self.work_dir / "config.yaml", lambda tmp: tmp.write_text(text))
            self.logger = RunLogger(self.work_dir, self.iter, bar)
            self.logger.info(
                f"{'resuming at' if self.iter else 'training from'} iteration {self.iter}/"
                f"{t.iters}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                f"{info.world_size} process(es) x {cfg.data.batch_size} x {t.accum_steps} "
                f"accumulation, device {self.device}, work_dir {self.work_dir}")
            for note in self.notes:
                self.logger.info(note)
        loader = DataLoader(
            self.train_set, batch_size=cfg.data.batch_size,
            sampler=InfiniteSampler(len(self.train_set), cfg.seed, info.rank, info.world_size,
                                    start=self.samples),
            num_workers=cfg.data.num_workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator())  # keeps the global RNG untouched (exact resume)
        batches = iter(loader)
        sums: dict[str, torch.Tensor] = {}
        n_sum, t_log = 0, time.perf_counter()
        try:
            while self.iter < t.iters:
                lr = set_lr(self.optimizer, self.iter, t)
                self.model.train()
                self.module.set_iteration(self.iter)  # DDPS: its two-stage training
                losses, grad_norm = train_step(self.model, self.optimizer, batches,
                                               t.accum_steps, t.grad_clip, self.precision,
                                               self.scaler)
                self._judge_pending(float(losses["loss"]))
                grad_norm = self._check_step(losses, grad_norm)
                self.iter += 1
                self.samples += cfg.data.batch_size * t.accum_steps
                if self.ema is not None and self.iter % t.ema.every == 0:
                    self.ema.update(self.module)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v
                sums["grad_norm"] = sums.get("grad_norm", 0) + torch.tensor(grad_norm)
                n_sum += 1
                bar.update(1)
                final = self.iter == t.iters

                if self.iter % t.log_interval == 0 or final:
                    self._log_train(lr, sums, n_sum, (time.perf_counter() - t_log) / n_sum, bar)
                    sums, n_sum, t_log = {}, 0, time.perf_counter()

                t0 = time.perf_counter()
                best = (self.iter % t.eval_interval == 0 or final) and self._evaluate(
                    progress=not bar.disable)
                last = self.iter % t.ckpt_interval == 0 or final
                if best or last:
                    self._save(best, last)
                if final and self.pending is not None:
                    self._commit_pending()  # no later loss to judge the final weights by
                t_log += time.perf_counter() - t0  # s/it counts training only
            if self.last_metrics is None:  # resumed a finished run: just report
                self._evaluate(progress=not bar.disable)
            du.barrier()  # rank 0 has finished writing
        except KeyboardInterrupt:
            if self.pending is not None:  # keep the work of an interrupted run
                self._commit_pending()
            raise
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        return {**self.last_metrics, "iter": self.iter, f"best_{self.metric}": self.best,
                "best_iter": self.best_iter}


def _check_train_state(state: dict, path: Path, iters: int) -> None:
    """The entries :meth:`_Run._load` reads, of the right types and in range, before any of
    them is used: one CheckpointError line naming the file and the entry."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: entry {key!r} {what}; not a densediff training state "
                               "(or a damaged one)")
    for key in ("iteration", "samples", "optimizer", "best_iter", "rng"):
        if key not in state:
            raise bad(key, "is missing")
    for key in ("iteration", "samples", "best_iter"):
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2**62:
            raise bad(key, f"must be a whole number >= 0, got {type(v).__name__}")
    best = state.get("best")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise bad("best", f"must be a number or None, got {type(best).__name__}")
    if not isinstance(state["optimizer"], dict):
        raise bad("optimizer", "must be a mapping")
    rngs = state["rng"]
    if (not isinstance(rngs, (list, tuple)) or not 1 <= len(rngs) <= 65536
            or not all(isinstance(r, dict) for r in rngs)):
        raise bad("rng", "must be a list of random states, one per process")


def ema_init_share(iters: int, decay: float, every: int) -> float:
    """The weight of the initial weights in the EMA after ``iters`` iterations:
    ``decay ** (iters // every)``."""
    return decay ** (iters // every)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key (old -> new)`` for every leaf that differs between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return out

