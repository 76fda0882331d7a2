"""``densediff bench``: where inference time goes (encoder once, decoder per step).

DDP's efficiency argument (paper §3.2, Table 5e) is that the encoder runs once and every extra
sampling step only costs one pass of the light map decoder. This measures, for a config with
random weights (the weights do not change the cost):

- ``encoder``: image encoder + neck, one forward (DDPS: the whole frozen base segmentor; BEV:
  every camera through the encoder and neck, the view transform and the BEV fuser);
- ``decoder_step``: one map-decoder evaluation on precomputed features (DDP: fusion + time
  MLP + decoder; DDPS: the UNet denoiser and classifier, twice with guidance; a segmentor:
  its head);
- ``total[n]``: a whole prediction with ``n`` steps (encoder, ``n`` decoder steps and the
  sampler's updates, upsampling to the input size);
- ``extra_step_ratio`` r = (total[3] - total[1]) / (2 total[1]): the relative cost of each
  step beyond the first;
- peak memory: CUDA ``max_memory_allocated`` on GPU; on CPU the peak resident set size of the
  process (an upper bound that includes Python and libraries).

Times are medians over ``repeats`` runs after warm-up runs; compare configurations as ratios
measured in one run, absolute CPU times mean little.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from densediff.config import Config, config_from_dict

__all__ = ["bench", "format_bench"]


def _median_time(fn: Callable[[], object], repeats: int, device: torch.device,
                 warmup: int = 2) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


_DEFAULT_STEPS = (1, 3, 5)


@torch.no_grad()
def bench(cfg: Config, size: tuple[int, int] | None = None, batch: int = 1,
          steps: Sequence[int] | None = None, device: str | torch.device = "cpu",
          repeats: int = 10) -> dict:
    """Median latencies (seconds) and peak memory of ``cfg``'s model; see the module doc.
    ``steps``: the whole-prediction step counts (diffusion models; checked against the
    model's range); None: those of 1, 3, 5 the model can take."""
    from densediff.api import resolve_device
    from densediff.data import class_info
    from densediff.errors import UserError
    from densediff.info import count_params
    from densediff.models import build_model
    from densediff.pipelines import check_steps, is_diffusion, pipeline_for

    if batch < 1 or repeats < 1:
        raise UserError("--batch and --repeats: must be at least 1")
    dev = resolve_device(device)
    names, _ = class_info(cfg)
    model = build_model(cfg, len(names)).to(dev).eval()
    pipe = pipeline_for(cfg)
    # BEV: several cameras (+ points); --size sets each camera image
    img, (h, w) = pipe.example_input(cfg, size, batch, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if is_diffusion(model):
        if steps is None:
            top = model.max_steps or max(_DEFAULT_STEPS)
            steps = [n for n in _DEFAULT_STEPS if model.min_steps <= n <= top]
        check_steps(model, list(steps), "the model", "--steps")
    feat = model.extract(img)
    enc = cfg.model.encoder
    if cfg.model.type == "ddps":  # the base segmentor's encoder (config filled in by build_model)
        enc = config_from_dict(cfg.model.ddps.base_config).model.encoder
    out: dict = {"config_model": cfg.model.type, "encoder_name": enc.name,
                 "encoder_variant": enc.variant, "size": [h, w], "batch": batch,
                 "device": str(dev), "threads": torch.get_num_threads(), "repeats": repeats,
                 "params_M": count_params(model) / 1e6,
           "tokens_per_step": int(getattr(feat, "features", feat)[0, 0].numel())}
    out["encoder"] = _median_time(lambda: model.extract(img), repeats, dev)
    predict = pipe.predict_fn(model)
    if is_diffusion(model):
        out["decoder_step"] = _median_time(lambda: model.decoder_step(feat), repeats, dev)
        out["total"] = {int(n): _median_time(lambda n=n: predict(img, steps=n),
                                             repeats, dev) for n in steps}
        if 1 in out["total"] and 3 in out["total"]:
            t1, t3 = out["total"][1], out["total"][3]
            out["extra_step_ratio"] = (t3 - t1) / (2 * t1)
    else:
        out["decoder_step"] = _median_time(lambda: model.head(feat), repeats, dev)
        out["total"] = {1: _median_time(lambda: predict(img), repeats, dev)}
    if dev.type == "cuda":
        out["peak_memory_MiB"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_memory_MiB"] = _peak_rss_mib()
        out["peak_memory_kind"] = "process peak RSS"
    return out


def format_bench(r: dict) -> str:
    lines = [f"model {r['config_model']} ({r['encoder_name']} {r['encoder_variant']}), "
             f"{r['params_M']:.2f} M params, input {r['batch']}x3x{r['size'][0]}x{r['size'][1]} "
             f"on {r['device']} ({r['threads']} threads), {r['tokens_per_step']} tokens/step, "
             f"median of {r['repeats']}",
             f"  encoder        {r['encoder'] * 1e3:10.2f} ms",
             f"  decoder step   {r['decoder_step'] * 1e3:10.2f} ms"]
    for n, t in r["total"].items():
        lines.append(f"  total {int(n):>2} step{'s' if int(n) > 1 else ' '} {t * 1e3:10.2f} ms")
    if "extra_step_ratio" in r:
        lines.append(f"  extra-step ratio r = (t3 - t1) / (2 t1) = {r['extra_step_ratio']:.3f}")
    lines.append(f"  peak memory    {r['peak_memory_MiB']:10.1f} MiB ({r['peak_memory_kind']})")
    return "\n".join(lines)
