"""Discriminative heads: shapes, layer structure, dropout, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densediff.decoders.heads import ConvHead, FCNHead


@pytest.mark.parametrize("num_convs", [0, 1, 2])
def test_conv_head_shape_and_layers(num_convs):
    head = ConvHead(in_channels=16, channels=8, num_convs=num_convs, num_classes=5, dropout=0.1)
    out = head(torch.randn(2, 16, 12, 20))
    assert out.shape == (2, 5, 12, 20)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == num_convs
    assert all(c.bias is None for c in convs)  # conv + BN: no conv bias (mmcv ConvModule)
    assert head.conv_seg.in_channels == (8 if num_convs else 16)


def test_fcn_head_is_one_conv_bn_relu_then_classifier():
    head = FCNHead(in_channels=16, channels=8, num_classes=3, dropout=0.1)
    assert head(torch.randn(1, 16, 8, 8)).shape == (1, 3, 8, 8)
    kinds = [type(m) for m in head.convs.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert isinstance(head.dropout, nn.Dropout2d)


def test_dropout_only_in_training():
    head = ConvHead(16, 8, 1, 4, dropout=0.5)
    x = torch.randn(2, 16, 8, 8)
    head.eval()
    assert torch.equal(head(x), head(x))
    head.train()
    torch.manual_seed(0)
    a = head(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, head(x))
    assert isinstance(ConvHead(16, 8, 1, 4, dropout=0.0).dropout, nn.Identity)


def test_classifier_init_is_small_normal_with_zero_bias():
    head = ConvHead(64, 64, 1, 150, dropout=0.1)
    std = head.conv_seg.weight.std().item()
    assert 0.007 < std < 0.013
    assert torch.count_nonzero(head.conv_seg.bias) == 0


def test_zero_weight_aux_head_is_not_built():
    # An aux head with loss weight 0 would leave parameters without gradients, which
    # DistributedDataParallel rejects; so it is not built at all.
    from densediff.tasks import build_model, load_config

    small = ["model.neck.channels=16", "model.neck.num_groups=4", "model.head.channels=16",
             "model.aux_head.channels=16"]
    assert build_model(load_config(None, small), 3).aux_head is not None
    model = build_model(load_config(None, [*small, "model.aux_head.weight=0"]), 3)
    assert model.aux_head is None
    losses = model.forward_train(torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    assert set(losses) == {"loss", "loss_ce"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
