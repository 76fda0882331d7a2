"""Shared utilities below every other layer (they import nothing of densediff but
:mod:`densediff.errors` and, for types, :mod:`densediff.config`):

- :mod:`~densediff.utils.checks`: validators of untrusted input (bounds, finite floats,
  environment variables, nesting depth, path kinds, UTF-8 text, exclusive temporary files).
- :mod:`~densediff.utils.checkpoint`: safetensors weights + training state, atomic writes.
- :mod:`~densediff.utils.distributed`: process groups, all-reduce helpers.
- :mod:`~densediff.utils.fs`: output folders checked writable before work; ``RunLock``.
- :mod:`~densediff.utils.signals`: SIGTERM handled like SIGINT, saves a signal cannot cut.
- :mod:`~densediff.utils.grid`: :class:`~densediff.utils.grid.BEVGrid` and the BEV grids of a
  config.
"""
