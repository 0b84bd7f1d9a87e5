"""Gradients of HRA, checked numerically (torch.autograd.gradcheck, float64) with respect to the
reflection vectors and the input, for linear layers and convolutions, with and without
Gram-Schmidt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_plugin_hra import HRAConfig, HRALayer

LAYERS = {
    "linear": (lambda: nn.Linear(6, 3), (2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 2), (1, 2, 3, 3)),
}


@pytest.mark.parametrize("gram_schmidt", [False, True], ids=["plain", "gram-schmidt"])
@pytest.mark.parametrize("kind", LAYERS)
def test_gradcheck_vectors_and_input(kind, gram_schmidt):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = HRALayer(make(), "default", config=HRAConfig(r=3, apply_GS=gram_schmidt, init_weights=False)).double()
    vectors = layer.hra_u["default"].detach().clone().requires_grad_()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def forward(x, vectors):
        return torch.func.functional_call(layer, {"hra_u.default": vectors}, (x,))

    assert torch.autograd.gradcheck(forward, (x, vectors), fast_mode=True)
