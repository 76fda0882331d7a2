import pytest
import yaml

from densediff.config import apply_overrides, load_config, parse_override
from densediff.errors import ConfigError


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
