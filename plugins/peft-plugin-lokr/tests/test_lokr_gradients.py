"""Gradients of LoKr, checked numerically (torch.autograd.gradcheck, float64) with respect to
every factor and the input, for each layer kind and every form of the factors. (HF PEFT's LoKr
CP form is plain autograd too: its gradients equal ours, test_lokr_differential.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernel.testing import assert_gradcheck
from peft_plugin_lokr import LoKrConfig, LoKrLayer

# (base layer, input shape, config, the factors that form must have)
FORMS = {
    "linear-full": (lambda: nn.Linear(6, 4), (2, 6), {"r": 4}, {"lokr_w1", "lokr_w2"}),
    "linear-low-rank": (lambda: nn.Linear(16, 8), (2, 16), {"r": 1, "decompose_both": True},
                        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    "conv1d-full": (lambda: nn.Conv1d(4, 6, 3, padding=1), (1, 4, 5), {"r": 4}, {"lokr_w1", "lokr_w2"}),
    "conv1d-cp": (lambda: nn.Conv1d(16, 16, 3), (1, 16, 4), {"r": 1, "use_effective_conv2d": True},
                  {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "conv2d-grouped-low-rank": (lambda: nn.Conv2d(8, 16, 3, groups=2), (1, 8, 4, 4), {"r": 1},
                                {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv2d-cp": (lambda: nn.Conv2d(16, 16, 3), (1, 16, 4, 4), {"r": 1, "use_effective_conv2d": True},
                  {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
}


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_every_factor_and_the_input(form):
    make, shape, kwargs, factors = FORMS[form]
    torch.manual_seed(0)
    config = LoKrConfig(init_weights=False, rank_dropout_scale=True, **kwargs)
    layer = LoKrLayer(make(), "default", config=config, r=config.r, alpha=3).double()
    checked = assert_gradcheck(layer, torch.randn(shape, dtype=torch.float64))
    assert {name.split(".")[0] for name in checked} == factors
