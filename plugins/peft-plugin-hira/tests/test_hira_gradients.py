"""Gradients of HiRA, checked numerically (torch.autograd.gradcheck, float64) with respect to both
factors and the input, for each layer kind."""

import pytest
import torch
from torch import nn

from peft_kernel.testing import assert_gradcheck
from peft_plugin_hira import HiraConfig, HiraLayer

LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), torch.randn(2, 5, dtype=torch.float64)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), torch.randn(1, 3, 5, dtype=torch.float64)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 4, 4, dtype=torch.float64)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)),
    "embedding": (lambda: nn.Embedding(6, 4), torch.tensor([[0, 5, 2], [1, 1, 3]])),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_gradcheck_both_factors_and_the_input(kind):
    make, x = LAYERS[kind]
    torch.manual_seed(0)
    layer = HiraLayer(make(), "default", config=HiraConfig(init_weights=False), r=2).double()
    names = {name.split(".")[0] for name in assert_gradcheck(layer, x)}
    assert names == ({"hira_embedding_A", "hira_embedding_B"} if kind == "embedding" else {"hira_A", "hira_B"})
