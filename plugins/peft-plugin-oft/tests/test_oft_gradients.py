"""Gradients of OFT, checked numerically (torch.autograd.gradcheck, float64) with respect to the
rotation parameters and the input, for each layer kind and each way of building the blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_plugin_oft import OFTConfig, OFTLayer

LAYERS = {
    "linear": (lambda: nn.Linear(6, 3), lambda: torch.randn(2, 6, dtype=torch.float64, requires_grad=True)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 2, groups=1), lambda: torch.randn(1, 2, 3, 3, dtype=torch.float64,
                                                                           requires_grad=True)),
    "embedding": (lambda: nn.Embedding(5, 6), lambda: torch.tensor([[1, 4, 2]])),
}
BLOCKS = {"neumann": {}, "exact": {"use_cayley_neumann": False}, "shared": {"block_share": True}}


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("kind", LAYERS)
def test_gradcheck_rotation_and_input(kind, blocks):
    make, make_input = LAYERS[kind]
    torch.manual_seed(0)
    config = OFTConfig(r=2, oft_block_size=0, init_weights=False, **BLOCKS[blocks])
    layer = OFTLayer(make(), "default", config=config).double()
    name = "oft_embedding_R.default.weight" if kind == "embedding" else "oft_R.default.weight"
    entries = layer.get_parameter(name).detach().clone().requires_grad_()
    x = make_input()

    def forward(entries, *x_or_nothing):
        return torch.func.functional_call(layer, {name: entries}, (x_or_nothing or (x,))[0])

    inputs = (entries, x) if x.is_floating_point() else (entries,)
    assert torch.autograd.gradcheck(forward, inputs, fast_mode=True)
