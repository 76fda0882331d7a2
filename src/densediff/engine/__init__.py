"""Training and evaluation machinery.

- :mod:`~densediff.engine.trainer`: ``train(cfg, resume)``, the iteration-based loop.
- :mod:`~densediff.engine.evaluate`: ``evaluate(model, dataset, cfg)``, dataset metrics.
- :mod:`~densediff.pipelines.inference`: ``predict_logits``, whole/sliding/multi-scale inference.
- :mod:`~densediff.engine.optim`: parameter groups and the poly learning-rate schedule.
- :mod:`~densediff.engine.ema`, :mod:`~densediff.engine.sampler`,
  :mod:`~densediff.engine.logger`: helpers (checkpoint I/O and process groups live in
  :mod:`densediff.utils`).
"""
