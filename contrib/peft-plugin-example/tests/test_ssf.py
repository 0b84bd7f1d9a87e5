"""What the example plugin adds on top of the kit: discovery and its own math."""

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel.plugins import manager
from peft_plugin_example import SSFConfig, SSFLayer


def test_found_through_the_entry_point():
    spec = manager().method("SSF")
    assert spec.config_cls is SSFConfig and spec.source == "example"
    info = {p.name: p for p in manager().plugin_info()}
    assert info["example"].distribution == "peft-plugin-example" and info["example"].error is None


def test_scale_and_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    base = model(x).detach()
    peft_model = peft_kernel.get_peft_model(model, SSFConfig(target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    assert isinstance(layer, SSFLayer)
    with torch.no_grad():
        layer.ssf_scale["default"].copy_(torch.tensor([1.0, 2.0, -1.0]))
        layer.ssf_shift["default"].copy_(torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(peft_model(x), base * torch.tensor([1.0, 2.0, -1.0]) + torch.tensor([0.5, 0.0, 1.0]))


def test_merge_needs_a_bias():
    model = peft_kernel.get_peft_model(nn.Sequential(nn.Linear(4, 3, bias=False)), SSFConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="bias"):
        model.merge_and_unload()
