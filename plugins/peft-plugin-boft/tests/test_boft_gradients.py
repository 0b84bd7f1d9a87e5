"""Gradients of BOFT, checked numerically (torch.autograd.gradcheck, float64) with respect to the
rotation blocks, the scales and the input, for linear layers and convolutions, with one and with
several butterfly factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_plugin_boft import BOFTConfig, BOFTLayer

LAYERS = {
    "linear": (lambda: nn.Linear(8, 3), (2, 8)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 2), (1, 2, 3, 3)),
}


@pytest.mark.parametrize("factors", [1, 2])
@pytest.mark.parametrize("kind", LAYERS)
def test_gradcheck_blocks_scales_and_input(kind, factors):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    config = BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=factors, init_weights=False)
    layer = BOFTLayer(make(), "default", config=config).double()
    names = ["boft_R.default", "boft_s.default"]
    tensors = [layer.get_parameter(name).detach().clone().requires_grad_() for name in names]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors, strict=True)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *tensors), fast_mode=True)
