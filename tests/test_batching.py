"""``batch_invariant``: a batch's outputs bit-identical to each image's alone (issue #25), for
every model family the library ships (tiny sizes), and the context manager's own contract."""

import numpy as np
import pytest
import torch
from torch import nn

from densediff.api import Predictor
from densediff.tasks import build_model, class_info, load_config
from densediff.testing.tiny import TINY
from densediff.utils.batching import ALIGNMENT, batch_invariant


class _CountingLinear(nn.Linear):
    calls: list

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


def test_layers_run_per_image_and_are_restored_also_after_an_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), _CountingLinear(4 * 25, 2))
    net[2].calls = []
    x = torch.randn(3, 3, 5, 5)
    with batch_invariant(net, 3):
        y = net(x)
        assert "forward" in vars(net[0]) and "forward" in vars(net[2])
    assert net[2].calls == [1, 1, 1]  # one image at a time
    assert "forward" not in vars(net[0]) and "forward" not in vars(net[2])  # restored
    assert torch.allclose(y, net(x), atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), batch_invariant(net, 3):
        raise RuntimeError("boom")
    assert "forward" not in vars(net[0])
    own = net[2].forward = lambda t: t  # an instance forward set by someone else survives
    with batch_invariant(net, 3):
        pass
    assert net[2].forward is own


def test_per_image_parts_inputs_not_a_multiple_and_batch_one():
    lin = nn.Linear(5, 2)
    seen = []
    real = nn.Linear.forward

    def spy(self, t):
        seen.append((tuple(t.shape), t.data_ptr() % ALIGNMENT))
        return real(self, t)

    lin.forward = spy.__get__(lin)
    x = torch.randn(6, 3, 5)[:, :, :]  # 2 rows per image of a batch of 3
    with batch_invariant(lin, 3):
        out = lin(x)
        lin(torch.randn(1, 5))  # one row shared by the batch: whole
        lin(torch.randn(4, 5))  # not a multiple of 3: whole
    assert [s for s, _ in seen] == [(2, 3, 5)] * 3 + [(1, 5), (4, 5)]
    assert all(a == 0 for _, a in seen)  # parts start aligned (copied where not), as new tensors
    assert out.shape == (6, 3, 2)
    with batch_invariant(lin, 1):  # batch of one: nothing patched
        assert "forward" in vars(lin) and vars(lin)["forward"].__name__ == "spy"
    assert batch_invariant(object(), 4).__enter__() is not None  # not a module: left alone


def _pred(config, *extra):
    torch.manual_seed(0)
    cfg = load_config(f"configs/{config}", [*TINY.get(config, []), *extra])
    names, palette = class_info(cfg)
    return Predictor(build_model(cfg, len(names)).eval(), cfg, names, palette)


@pytest.mark.parametrize("config,extra", [
    ("generated/bev_ddp.yaml", ()),
    ("generated/bev_ddp_lidar.yaml", TINY["generated/bev_ddp.yaml"]),
])
def test_bev_batch_is_bit_identical_to_one_sample_at_a_time(config, extra, tmp_path):
    pred = _pred(config, *extra, f"data.root={tmp_path}")
    ds = pred.dataset("val")
    items = [ds[0], ds[1], ds[0]]  # LiDAR: two point counts, padded in the batch
    one = [pred.predict(it, steps=2, seed=s) for it, s in zip(items, (1, 2, 3))]
    many = pred.predict(items, steps=2, seed=[1, 2, 3], batch_size=3)
    for a, b in zip(one, many):
        for k in ("probs", "uncertainty", "entropy", "masks", "trajectory"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert not np.array_equal(many[0].probs, many[2].probs)  # same sample, other seed


@pytest.mark.parametrize("config,extra,size", [
    ("ade20k/ddp_swin_t.yaml", ("data.test_scale=[64,64]", "model.neck.channels=16",
                                "model.neck.num_groups=4",
                                "model.head.channels=16",
                                "model.head.num_layers=1", "model.head.num_heads=4",
                                "model.head.ffn_channels=32", "model.aux_head.channels=16",
                                "model.diffusion.embed_channels=16"), (64, 64)),
    ("camvid/ddp_effnet_lite0.yaml", ("model.encoder.pretrained=null", "model.head.num_layers=1",
                                      "model.neck.channels=16",
                                      "model.head.channels=16", "model.head.ffn_channels=32",
                                      "model.aux_head.channels=16",
                                      "model.diffusion.embed_channels=16"), (64, 96)),
])
def test_paper_backbones_batch_bit_identical(config, extra, size):
    """The shipped paper configs' encoders (Swin windows, EfficientNet depthwise convs) with a
    small map decoder: a batch of three equals each image alone, bit for bit."""
    pred = _pred(config, *extra)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(3)]
    one = [pred.predict(im, steps=2, seed=4) for im in images]
    many = pred.predict(images, steps=2, seed=4, batch_size=3)
    for a, b in zip(one, many):
        assert np.array_equal(a.probs, b.probs) and np.array_equal(a.uncertainty, b.uncertainty)
