"""The parts of ``densediff.bench``: option checks, the interleaved rounds, the per-variant
report, the compiled variant's model copy (fakes and tiny modules; no timing assertions). The
whole command runs in tests/test_cli_ddp.py and the other CLI tests."""

from __future__ import annotations

import pytest
import torch

from densediff import bench as b
from densediff.errors import UserError
from densediff.models import DDP


def _setup(**kw) -> b._Setup:
    fields = dict(cfg=None, dev=torch.device("cpu"), model=None, pipe=None, diffusion=True,
                  img="x", hw=(32, 32), steps=[1, 3], batch=1, batches=[1], size=None,
                  repeats=3, warmup=1)
    return b._Setup(**{**fields, **kw})


def test_rounds_rotate_the_order_and_skip_the_warmup():
    rounds = list(b._rounds(["a", "b", "c"], warmup=2, repeats=3))
    assert rounds == [(False, ["a", "b", "c"]), (False, ["b", "c", "a"]),
                      (True, ["c", "a", "b"]), (True, ["a", "b", "c"]),
                      (True, ["b", "c", "a"])]


def test_timing_rounds_interleave_the_variants_and_keep_only_timed_rounds():
    calls = []

    class Model:
        def __init__(self, name):
            self.name = name

        def extract(self, img):
            calls.append(("encoder", self.name))

        def decoder_step(self, feats):
            calls.append(("decoder_step", self.name))

        def predict_map(self, x, steps):
            calls.append((f"total{steps}", self.name))

    class Pipe:
        pass

    runs = [b._Variant(n, Model(n), "fp32", "grid_sample", False) for n in ("p", "q")]
    s = _setup(pipe=Pipe(), repeats=3, warmup=1)
    times, faults, mm = b._timing_rounds(s, runs, {"fp32": (torch.ones(2, 2),
                                                            torch.ones(2, 2))})
    assert list(times["p"]) == ["encoder", "decoder_step", "total1", "total3"]
    assert all(len(ts) == 3 for v in times.values() for ts in v.values())  # warmup dropped
    assert len(faults["q"]) == 3 and len(mm["fp32"]) == 3
    assert len(calls) == 4 * 4 * 2  # (warmup + repeats) x measurements x variants
    # each measurement once per variant, the variants in the round's rotation
    assert calls[:4] == [("encoder", "p"), ("encoder", "q"), ("decoder_step", "p"),
                         ("decoder_step", "q")]
    assert calls[8:10] == [("encoder", "q"), ("encoder", "p")]


def test_entry_pairs_the_rounds_and_noise_is_the_spread_over_the_median():
    e = b._entry([1.0, 5.0, 2.0], ref=[1.0, 10.0, 1.0])
    # per-round ratios 1, 2, 0.5 -> median 1 (the ratio of medians would be 0.5)
    assert e == {"median": 2.0, "min": 1.0, "max": 5.0, "speedup": 1.0}
    assert b._is_noisy([1.0, 1.2]) and not b._is_noisy([1.0, 1.1])
    assert not b._is_noisy([1.0]) and not b._is_noisy([0.0, 0.0])


def _measured(names, step_flops=2e9) -> b._Measured:
    def ts(x):
        return [x, x]

    times = {n: {"encoder": ts(1.0), "decoder_step": ts(0.5), "total1": ts(2.0),
                 "total3": ts(3.0)} for n in names}
    times[names[0]]["encoder"] = [1.0, 2.0]  # noisy
    return b._Measured(times=times, faults={n: [4, 6, 100] for n in names},
                       throughput={n: {1: [10.0, 30.0, 20.0]} for n in names},
                       peaks={n: 12.5 for n in names},
                       predict_faults={n: 7 for n in names},
                       matmul_gflops={"fp32": 40.0, "bf16": 80.0}, step_flops=step_flops)


def test_variant_report():
    m = _measured(["eager", "fast"])
    fast = b._Variant("fast", None, "bf16", "auto", True)
    r, noisy = b._variant_report(fast, "eager", m, diffusion=True)
    assert list(r) == ["precision", "msda", "malloc", "encoder", "decoder_step", "total",
                       "extra_step_ratio", "step_gflops", "floor_fraction",
                       "step_minor_faults", "predict_minor_faults", "throughput",
                       "peak_memory_MiB"]
    assert (r["precision"], r["msda"], r["malloc"]) == ("bf16", "auto", "no-mmap")
    assert list(r["total"]) == [1, 3] and r["extra_step_ratio"] == pytest.approx(0.25)
    assert r["encoder"]["speedup"] == pytest.approx(1.5)  # rounds 1/1 and 2/1
    assert r["step_gflops"] == pytest.approx(4.0)  # 2 GFLOP in 0.5 s
    assert r["floor_fraction"] == pytest.approx(4.0 / 80.0)  # bf16 against the bf16 floor
    assert r["step_minor_faults"] == 6 and r["throughput"] == {1: 20.0}
    assert r["predict_minor_faults"] == 7
    assert noisy == []
    eager = b._Variant("eager", None, "fp32", "grid_sample", False)
    eager.compile_s = 3.0
    r, noisy = b._variant_report(eager, "eager", _measured(["eager"], None), diffusion=False)
    assert noisy == ["eager encoder"] and r["compile_s"] == 3.0
    assert "extra_step_ratio" not in r and "step_gflops" not in r
    assert r["malloc"] == "glibc default"
    onnx = b._Variant("onnx", None, "fp32", "auto", True)
    assert onnx.labels() == {"precision": "fp32", "msda": "GridSample",
                             "malloc": "onnxruntime arena"}


@pytest.mark.parametrize("kw,needle", [
    ({"batch": 0}, "--batch: must be between 1 and 256"),
    ({"repeats": 1001}, "--repeats: must be between 1 and 1000"),
    ({"warmup": -1}, "warmup"),
    ({"size": (16, 64)}, "--size: height and width must be at least 32"),
    ({"batches": [1, 300]}, "--batches: must be between 1 and 256, got 300"),
    ({"variants": ["eager", "turbo"]}, "--variants: unknown variant turbo"),
    ({"variants": []}, "--variants: unknown variant (none)"),
    ({"variants": ["eager"], "precision": "bf16"}, "--precision: applies to the fast and"),
])
def test_bench_checks_its_options_before_any_work(kw, needle):
    with pytest.raises(UserError) as e:
        b.bench(None, **kw)  # no config needed: the options are checked first
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_check_options_orders_and_dedups():
    asked, batches = b._check_options(None, 2, 1, 0, ["fast", "eager", "fast"], [8, 1, 8],
                                      "bf16")
    assert asked == ["fast", "eager"] and batches == [1, 8]
    assert b._check_options(None, 2, 1, 0, None, None, None) == (list(b.DEFAULT_VARIANTS), [2])


def test_default_steps_prefers_the_models_own():
    model = type("M", (), {"default_steps": 3})()
    assert _setup(model=model, steps=[1, 3, 5]).default_steps() == 3
    assert _setup(model=model, steps=[1, 2]).default_steps() == 2
    assert _setup(model=model, diffusion=False, steps=[1]).default_steps() == 1


class _Decoded(DDP):
    """A DDP with only an encoder and a map decoder (what the compiled variant touches)."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.encoder = torch.nn.Linear(2, 2)
        self.decoder = torch.nn.Linear(2, 2)


def test_compiled_variant_copies_the_model_and_leaves_it_unchanged(monkeypatch):
    model = _Decoded()
    original = model.decoder
    wrapped = torch.nn.Sequential(original)
    monkeypatch.setattr(torch, "compile", lambda m: wrapped if m is original else None)
    notes = []
    runs = b._build_variants(_setup(model=model), ["eager", "compiled"], "fp32", None, notes)
    eager, compiled = runs
    assert eager.model is model and model.decoder is original  # the model is not changed
    assert compiled.model is not model and compiled.model.decoder is wrapped
    assert compiled.model.encoder is model.encoder  # shared, not copied
    assert {id(p) for p in compiled.model.parameters()} == {id(p) for p in model.parameters()}
    assert notes == []


def test_no_applicable_variant_is_one_line():
    notes = []
    with pytest.raises(UserError, match="--variants: none of compiled applies") as e:
        b._build_variants(_setup(model=torch.nn.Linear(2, 2)), ["compiled"], "fp32", None, notes)
    assert "no map decoder" in str(e.value) and "\n" not in str(e.value)


def test_variant_report_says_none_not_zero_for_faults_that_were_not_counted():
    m = _measured(["eager"])
    m.faults["eager"] = []  # a kernel whose counter did not count (the probe failed)
    m.predict_faults["eager"] = None
    r, _ = b._variant_report(b._Variant("eager", None, "fp32", "grid_sample", False), "eager", m,
                             diffusion=True)
    assert r["step_minor_faults"] is None and r["predict_minor_faults"] is None


def test_format_names_the_cpu_and_a_missing_bf16_floor_and_blind_counters():
    m = _measured(["eager"])
    m.faults["eager"], m.peaks["eager"] = [], None
    r, _ = b._variant_report(b._Variant("eager", None, "fp32", "grid_sample", False), "eager", m,
                             diffusion=True)
    report = {"config_model": "ddp", "encoder_name": "e", "encoder_variant": "v", "params_M": 1.0,
              "batch": 1, "size": [32, 32], "device": "cpu", "threads": 2,
              "tokens_per_step": 64, "repeats": 2, "variants": {"eager": r},
              "base_variant": "eager", "step_gflop": 2.0, "matmul_shape": [1, 2, 3],
              "matmul_gflops": {"fp32": 40.0, "bf16": 8.0}, "peak_memory_kind": "rss",
              "cpu": "Some CPU", "cpu_flags": ["avx2"], "bf16_hardware": False}
    text = b.format_bench(report)
    assert "cpu: Some CPU (flags: avx2)" in text
    assert "bf16 none (no bf16 hardware; emulated 8.0)" in text
    assert "per timed decoder step: eager n/a" in text and "eager n/a (no working" in text
    report["bf16_hardware"] = True
    assert "bf16 8.0 GFLOP/s" in b.format_bench(report)
