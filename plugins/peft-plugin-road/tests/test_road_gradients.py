"""Gradients of RoAd, checked numerically (torch.autograd.gradcheck, float64) with respect to the
angles, the scales and the input, for each variant."""

import pytest
import torch
from torch import nn

from peft_kernel.testing import assert_gradcheck
from peft_plugin_road import RoadConfig, RoadLayer


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_gradcheck_angles_scales_and_input(variant):
    torch.manual_seed(0)
    config = RoadConfig(variant=variant, group_size=4, init_weights=False)
    layer = RoadLayer(nn.Linear(5, 8), "default", config=config).double()
    checked = assert_gradcheck(layer, torch.randn(2, 5, dtype=torch.float64))
    assert checked == ["road_theta.default", "road_alpha.default"]
