"""Gradients of MiSS, checked numerically (torch.autograd.gradcheck, float64) with respect to the
shard and the input, for each variant, on a layer whose input features are not a multiple of r."""

import pytest
import torch
from torch import nn

from peft_kernel.testing import assert_gradcheck
from peft_plugin_miss import MissBatLayer, MissConfig, MissLayer


@pytest.mark.parametrize("variant,r", [(False, 3), ("mini", 2), ("bat", 2)])
def test_gradcheck_the_shard_and_the_input(variant, r):
    torch.manual_seed(0)
    config = MissConfig(r=r, mini_r=2, init_weights=variant)
    layer_cls = MissBatLayer if variant == "bat" else MissLayer
    layer = layer_cls(nn.Linear(8 if variant == "bat" else 7, 4), "default", config=config).double()
    with torch.no_grad():
        layer.miss_block["default"].normal_(0, 0.3)
    assert assert_gradcheck(layer, torch.randn(2, layer.in_features, dtype=torch.float64)) == ["miss_block.default"]
