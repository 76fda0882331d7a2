from pathlib import Path

import pytest
import yaml

from densediff.config import apply_overrides, parse_override
from densediff.errors import ConfigError
from densediff.tasks import load_config, spec_for


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_and_override_order(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "a.yaml", {"train": {"iters": 10, "lr": 0.1}, "seed": 1})
    write(tmp_path / "base" / "b.yaml", {"train": {"lr": 0.2}})
    cfg_path = write(tmp_path / "run.yaml",
                     {"_base_": ["base/a.yaml", "base/b.yaml"], "train": {"warmup_iters": 3}})
    cfg = load_config(cfg_path, ["train.iters=20"])
    assert cfg.train.iters == 20          # CLI override wins
    assert cfg.train.lr == 0.2            # later base wins over earlier base
    assert cfg.train.warmup_iters == 3    # the file itself
    assert cfg.seed == 1                  # untouched base key survives
    assert cfg.work_dir == "runs/run"


def test_override_value_types():
    assert parse_override("model.encoder.name=swin") == (["model", "encoder", "name"], "swin")
    assert parse_override("data.train_pipeline.crop_size=[64, 32]")[1] == [64, 32]
    cfg = load_config(None, ["data.train_pipeline.crop_size=[64,32]", "train.grad_clip=0.1"])
    assert cfg.data.train_pipeline.crop_size == (64, 32)
    assert cfg.train.grad_clip == 0.1


@pytest.mark.parametrize("override, key", [
    ("train.iterz=5", "train.iterz: unknown key"),
    ("model.encoder.name=vgg", "model.encoder.name"),
    ("train.lr=-1", "train.lr"),
    ("data.batch_size=many", "data.batch_size"),
    ("train.best_metric=miou", "train.best_metric"),  # checked up front, not after training
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


@pytest.mark.parametrize("override, key", [
    ("data.gen_size=[0,5]", "data.gen_size.0"),
    ("data.train_pipeline.crop_size=[0,0]", "data.train_pipeline.crop_size"),
    ("data.train_pipeline.scale=[-1,8]", "data.train_pipeline.scale"),
    ("data.train_pipeline.ratio_range=[2.0,0.5]", "low <= high"),
    ("data.test_scale=[0,0]", "data.test_scale"),
    ("data.std=[0,1,1]", "data.std.0"),
    ("eval.stride=[0,4]", "eval.stride"),
    ("eval.aug.scales=[]", "eval.aug.scales"),
    ("eval.aug.scales=[1.0,0]", "eval.aug.scales.1"),
])
def test_sizes_and_scales_must_be_positive(override, key):
    # such values used to pass validation and crash deep inside numpy/torch
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_bad_base_entry_and_unreadable_file(tmp_path):
    write(tmp_path / "b.yaml", {"_base_": 3})
    with pytest.raises(ConfigError, match="b.yaml: _base_ must be a path or a list of paths"):
        load_config(tmp_path / "b.yaml")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x00\xb3\xff" * 50)
    with pytest.raises(ConfigError, match="weights.yaml: cannot read as a UTF-8 YAML file"):
        load_config(binary)


def test_override_into_non_section_is_error():
    with pytest.raises(ConfigError, match="seed is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_missing_file_bad_yaml_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    write(tmp_path / "x.yaml", {"_base_": "y.yaml"})
    write(tmp_path / "y.yaml", {"_base_": "x.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")


def test_resolved_config_round_trips():
    cfg = load_config(None, ["model.encoder.name=convnext", "data.class_names=[a, b]"])
    again = type(cfg).model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_shipped_config_validates():
    from densediff.config import PACKAGED_CONFIGS

    files = [p for p in PACKAGED_CONFIGS.rglob("*.yaml") if "_base_" not in p.parts]
    assert len(files) >= 12
    for p in files:
        cfg = load_config(p)
        assert cfg.work_dir == f"runs/{p.stem}"


def test_paper_recipe_values():
    ade = load_config("ade20k/baseline_swin_t.yaml")
    assert (ade.train.lr, ade.train.weight_decay, ade.train.iters) == (6e-5, 0.01, 160000)
    assert ade.train.warmup_iters == 1500 and ade.train.grad_clip == 0.1
    assert ade.data.train_pipeline.crop_size == (512, 512) and ade.data.batch_size * 8 == 16
    city = load_config("cityscapes/baseline_convnext_t.yaml")
    assert city.data.train_pipeline.crop_size == (512, 1024) and city.data.batch_size * 4 == 16
    assert city.model.encoder.drop_path == 0.4 and city.train.grad_clip is None


# --------------------------------------------------------------------------------------------
# DDP paper configs: ddp / twin / self-aligned / Table 5 ablations


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _dict(cfg, drop=()):
    """Flattened resolved config without work_dir and without keys under ``drop`` prefixes."""
    flat = _flat(cfg.to_dict())
    flat.pop("work_dir")
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in drop)}


DDP_ADE = [f"ade20k/ddp_swin_{v}.yaml" for v in "tsbl"]
DDP_CITY = ([f"cityscapes/ddp_convnext_{v}.yaml" for v in "tsbl"]
            + [f"cityscapes/ddp_swin_{v}.yaml" for v in "tsbl"])
ALIGNED = ["cityscapes/ddp_convnext_t_aligned.yaml", "cityscapes/ddp_convnext_l_aligned.yaml"]
TWINS = ([(f"ade20k/twin_swin_{v}.yaml", f"ade20k/ddp_swin_{v}.yaml") for v in "tsbl"]
         + [(f"cityscapes/twin_convnext_{v}.yaml", f"cityscapes/ddp_convnext_{v}.yaml")
            for v in "tsbl"])
ABLATIONS = {
    "encoding_onehot": {"model.diffusion.encoding": "onehot", "model.diffusion.scale": 0.1},
    "encoding_analog_bits": {"model.diffusion.encoding": "analog_bits",
                             "model.diffusion.scale": 0.1},
    "scale_0.001": {"model.diffusion.scale": 0.001},
    "scale_0.02": {"model.diffusion.scale": 0.02},
    "scale_0.04": {"model.diffusion.scale": 0.04},
    "scale_0.1": {"model.diffusion.scale": 0.1},
    "schedule_linear": {"model.diffusion.schedule": "linear"},
    "depth_1": {"model.head.num_layers": 1},
    "depth_2": {"model.head.num_layers": 2},
    "depth_4": {"model.head.num_layers": 4},
    "depth_12": {"model.head.num_layers": 12},
}


def test_paper_configs_are_shipped_and_globbed():
    from densediff.config import PACKAGED_CONFIGS

    globbed = {p.relative_to(PACKAGED_CONFIGS).as_posix() for p in PACKAGED_CONFIGS.rglob("*.yaml")
               if "_base_" not in p.parts}
    wanted = set(DDP_ADE + DDP_CITY + ALIGNED + [t for t, _ in TWINS]
                 + [f"ade20k/ablations/{s}.yaml" for s in ABLATIONS])
    assert wanted <= globbed  # so test_every_shipped_config_validates loads them (ablations/ too)
    assert (PACKAGED_CONFIGS / "_base_" / "ddp.yaml").is_file()
    assert (PACKAGED_CONFIGS / "_base_" / "twin.yaml").is_file()
    for p in sorted(wanted):  # every file opens with a comment saying what it is
        assert (PACKAGED_CONFIGS / p).read_text().startswith("# "), p


def _assert_official_decoder(cfg):
    m = cfg.model
    assert m.type == "ddp"
    assert (m.neck.channels, m.neck.num_groups) == (256, 32)
    h = m.head
    assert (h.type, h.channels, h.num_layers, h.num_heads, h.num_points, h.num_levels,
            h.ffn_channels, h.dropout) == ("deformable", 256, 6, 8, 4, 1, 1024, 0.0)
    assert (m.aux_head.enabled, m.aux_head.weight, m.aux_head.channels) == (True, 0.4, 256)
    d = m.diffusion
    assert (d.encoding, d.embed_channels, d.scale, d.schedule) == ("embedding", 256, 0.01, "cosine")
    assert d.sample_range == (0.0, 0.999)
    assert (d.td, d.sampler, d.randsteps) == (1.0, "ddim", 1)


@pytest.mark.parametrize("path", DDP_ADE + DDP_CITY)
def test_ddp_configs_have_the_official_decoder(path):
    cfg = load_config(path)
    _assert_official_decoder(cfg)
    d = cfg.model.diffusion
    assert d.steps == 3 and not d.self_aligned and cfg.train.load_from is None
    assert (cfg.train.lr, cfg.train.iters, cfg.train.warmup_iters) == (6e-5, 160000, 1500)
    if path.startswith("ade20k/"):
        assert d.accumulation is True and cfg.train.grad_clip == 0.1
        assert cfg.model.encoder.name == "swin" and cfg.model.encoder.drop_path == 0.3
        assert cfg.data.dataset == "ade20k"
    else:
        assert d.accumulation is False and cfg.train.grad_clip is None
        assert cfg.data.dataset == "cityscapes"
        expected_dp = {"ddp_convnext_t": 0.4, "ddp_convnext_s": 0.3, "ddp_convnext_b": 0.4,
                       "ddp_convnext_l": 0.4}.get(path.split("/")[1][:-5], 0.3)
        assert cfg.model.encoder.drop_path == expected_dp


@pytest.mark.parametrize("twin, ddp", TWINS)
def test_twin_differs_from_ddp_only_in_model_type(twin, ddp):
    t, d = load_config(twin), load_config(ddp)
    assert (t.model.type, d.model.type) == ("segmentor", "ddp")
    drop = ("model.type", "model.diffusion")
    assert _dict(t, drop) == _dict(d, drop)


@pytest.mark.parametrize("variant", "tsbl")
def test_ddp_keeps_the_baseline_recipe(variant):
    # data and schedule of ddp_* are those of the existing conv-head baseline_* configs
    for ddp, base in [(f"ade20k/ddp_swin_{variant}.yaml", f"ade20k/baseline_swin_{variant}.yaml"),
                      (f"cityscapes/ddp_convnext_{variant}.yaml",
                       f"cityscapes/baseline_convnext_{variant}.yaml")]:
        a, b = load_config(ddp), load_config(base)
        assert a.data == b.data and a.train == b.train and a.model.encoder == b.model.encoder


@pytest.mark.parametrize("stem", sorted(ABLATIONS))
def test_ablation_differs_from_ddp_swin_t_in_the_documented_keys(stem):
    base = _dict(load_config("ade20k/ddp_swin_t.yaml"))
    abl = load_config(f"ade20k/ablations/{stem}.yaml")
    assert abl.work_dir == f"runs/{stem}"
    flat = _dict(abl)
    assert flat.keys() == base.keys()
    diff = {k: flat[k] for k in flat if flat[k] != base[k]}
    assert diff == ABLATIONS[stem]


@pytest.mark.parametrize("path", ALIGNED)
def test_self_aligned_finetune(path):
    cfg = load_config(path)
    base = load_config(path.replace("_aligned", ""))
    _assert_official_decoder(cfg)
    assert cfg.model.diffusion.self_aligned is True and cfg.model.diffusion.steps == 10
    assert cfg.train.lr == pytest.approx(0.1 * base.train.lr) and cfg.train.lr == 6e-6
    assert cfg.train.load_from == f"runs/{Path(path).stem.replace('_aligned', '')}"
    assert (cfg.train.iters, cfg.train.warmup_iters, cfg.train.warmup_ratio) == (5000, 1500, 1e-6)
    assert cfg.train.eval_interval == cfg.train.ckpt_interval == 500
    changed = {k for k, v in _dict(cfg).items() if v != _dict(base)[k]}
    assert changed == {"model.diffusion.self_aligned", "model.diffusion.steps", "train.load_from",
                       "train.iters", "train.lr", "train.eval_interval", "train.ckpt_interval"}


# --------------------------------------------------------------------------------------------
# depth paper configs (DDP §4.4, official depth configs: reference notes §1.11)

DEPTH = [f"{ds}/ddp_swin_{v}.yaml" for ds in ("nyu", "kitti") for v in "tsbl"]


@pytest.mark.parametrize("path", DEPTH)
def test_depth_configs_follow_the_official_recipe(path):
    cfg = load_config(path)
    assert cfg.task == "depth" and cfg.model.type == "ddp"
    assert spec_for(cfg).best_metric(cfg) == "abs_rel"
    m, d, t = cfg.model, cfg.model.diffusion, cfg.train
    assert (m.head.type, m.head.channels, m.head.num_layers, m.head.out_kernel) == \
        ("deformable", 256, 6, 3)
    assert not m.aux_head.enabled and m.depth_loss.variance_focus == 0.15
    assert (d.scale, d.schedule, d.time_input, d.steps, d.td, d.sample_range) == \
        (0.1, "cosine_unclamped", "none", 3, 1.0, (0.0, 0.999))
    assert (t.lr_schedule, t.iters, t.warmup_iters, t.warmup_ratio, t.grad_clip) == \
        ("cosine", 38400, 12800, 1e-3, 35.0)
    assert (t.betas, t.weight_decay, cfg.data.batch_size * 8) == ((0.9, 0.999), 0.01, 16)
    dd, p = cfg.data.depth, cfg.data.train_pipeline
    if path.startswith("nyu"):
        assert (t.lr, dd.max_depth, p.crop_size, dd.eval_crop) == (6e-5, 10.0, (416, 544),
                                                                   "nyu_eigen")
        assert dd.train_border == (45, 472, 43, 608) and not dd.kb_crop
    else:
        assert (t.lr, dd.max_depth, p.crop_size, dd.eval_crop) == (1e-4, 80.0, (352, 704), "garg")
        assert dd.kb_crop and dd.brightness_range == (0.9, 1.1)
    assert p.scale is None and cfg.model.encoder.name == "swin"


@pytest.mark.parametrize("ds", ["nyu", "kitti", "generated"])
def test_depth_twin_differs_from_ddp_only_in_model_type(ds):
    prefix = "depth_" if ds == "generated" else ""
    stem = "" if ds == "generated" else "_swin_t"
    twin = load_config(f"{ds}/{prefix}twin{stem}.yaml")
    ddp = load_config(f"{ds}/{prefix}ddp{stem}.yaml")
    assert _dict(twin, ("model.type",)) == _dict(ddp, ("model.type",))
    assert (twin.model.type, ddp.model.type) == ("segmentor", "ddp")
