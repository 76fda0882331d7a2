"""Every bound on user input, in one torch-free module at the bottom layer (the CLI, the
config schema and the library's checks all read these)."""

from __future__ import annotations

# -- sampling
MAX_SEED = 2**63 - 1
"""Seeds are 0 .. 2^63 - 1 (what torch, numpy and Python's RNGs all accept)."""
MAX_SAMPLING_STEPS = 1000
"""Upper bound on sampling step counts (config, ``--steps``): DDIM gains nothing past a few
dozen steps, and 1000 decoder calls of the paper's decoder take about half an hour on a CPU."""
MAX_STARTS = 100
"""Upper bound on random starts per input (``model.diffusion.randsteps``, ``predict(starts=)``)."""

# -- the config schema
MIN_TRAIN_SIDE = 32
"""The encoders' deepest stride: a training batch must leave BatchNorm more than one value per
channel at this stride (ceil(h / 32) * ceil(w / 32) * batch >= 2)."""
MAX_CHANNELS = 8192
"""Upper bound on every channel count / width of the config (the paper's widest is 1024)."""
MAX_LAYERS = 64
"""Upper bound on layer, block, head, point and level counts."""
MAX_CLASSES = 4096
"""Upper bound on the number of classes."""
MAX_COUNT = 10**9
"""Upper bound on iteration counts, intervals and dataset sizes."""
MAX_BATCH = 4096
"""Upper bound on batch sizes and accumulation steps."""
MAX_GRID_CELLS = 4096
"""Upper bound on the cells of a BEV grid along one axis (and on depth bins)."""

# -- input sizes
MIN_SIDE = 32
"""Smallest model input side (the encoders' deepest stride)."""
MAX_SIDE = 8192
"""Largest model input side (``--size``)."""
MAX_INPUT_PIXELS = 4096 * 4096
"""Largest model input (``--size`` H x W)."""
MAX_PIXELS_ENV = "DENSEDIFF_MAX_IMAGE_PIXELS"
"""Environment variable that sets the largest image read (pixels; 0 = no limit)."""
MAX_PIXELS_LIMIT = 2**40
"""Upper bound on that variable's value."""

# -- files read
MAX_NESTING = 32
"""Deepest JSON / YAML nesting read."""
MAX_NODES = 1_000_000
"""Most JSON / YAML nodes read."""
MAX_TEXT_BYTES = 64 * 2**20
"""Largest text file read (configs, class lists, JSON)."""
MAX_MODEL_BYTES = 16 * 2**30
"""Largest safetensors checkpoint read."""
MAX_OFFICIAL_BYTES = 8 << 30
"""Largest official ``.pth`` checkpoint read."""
MAX_CLASSES_META = 1000
"""Most class names read from an official checkpoint's metadata."""
MAX_DEPLOY_BYTES = 16 * 2**20
"""Largest ``deploy.json`` read (its config and class names take a few kB)."""

# -- names the CLI offers before anything heavy is imported
DATA_CHECK_FORMATS = ("camvid", "ade20k", "cityscapes", "folder", "kitti", "nyu", "sunrgbd",
                      "depth_folder", "nuscenes")
"""The dataset formats ``densediff data check --format`` takes (``data.check.CHECK_FORMATS``
is this tuple)."""

# -- commands
BENCH_MAX_BATCH = 256
"""Largest ``bench --batch`` / ``--batches`` entry."""
BENCH_MAX_REPEATS = 1000
"""Most ``bench --repeats``."""
MAX_DEMO_ITERS = 100_000
"""Most ``demo --iters``."""
