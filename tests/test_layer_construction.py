"""The shortcuts injection takes to build thousands of layers quickly must build exactly
what the ordinary constructors build."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from peft_kernel import NoMatchingPeftModuleError, get_peft_model
from peft_kernel.layer import bare_module, empty_module
from peft_plugin_lora import LoraConfig


@pytest.mark.parametrize("cls", [nn.Module, nn.ModuleDict, nn.ParameterDict, nn.Identity])
def test_empty_module_has_the_state_of_a_constructed_one(cls):
    made, reference = empty_module(cls), cls()
    assert type(made) is cls
    assert made.__dict__.keys() == reference.__dict__.keys()
    for key, value in reference.__dict__.items():
        assert type(made.__dict__[key]) is type(value), key
        assert made.__dict__[key] == value, key


def test_empty_modules_share_no_state():
    first, second = empty_module(nn.ModuleDict), empty_module(nn.ModuleDict)
    first["a"] = nn.Linear(2, 2)
    first.register_forward_hook(lambda *args: None)
    assert len(second) == 0 and not second._forward_hooks
    assert list(first.state_dict()) == ["a.weight", "a.bias"]


def test_empty_module_constructs_classes_with_other_state():
    class WithList(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = []

    first, second = empty_module(WithList), empty_module(WithList)
    first.items.append(1)
    assert second.items == []


def test_bare_module_is_a_working_module_of_the_class():
    layer = bare_module(nn.Linear)
    assert type(layer) is nn.Linear and not layer._parameters
    layer.in_features, layer.out_features = 3, 2
    layer.weight = nn.Parameter(torch.ones(2, 3))
    layer.register_parameter("bias", None)
    torch.testing.assert_close(layer(torch.ones(1, 3)), torch.full((1, 2), 3.0))
    assert list(layer.state_dict()) == ["weight"]


def test_lora_factors_are_ordinary_linear_layers():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), LoraConfig(r=3, target_modules=["0"], lora_bias=True))
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert (A.in_features, A.out_features, A.bias) == (6, 3, None)
    assert (B.in_features, B.out_features) == (3, 5)
    assert repr(A) == repr(nn.Linear(6, 3, bias=False)) and repr(B) == repr(nn.Linear(3, 5))
    assert A.weight.requires_grad and B.weight.requires_grad and B.bias.requires_grad
    assert torch.count_nonzero(B.weight) == 0 and torch.count_nonzero(A.weight) == A.weight.numel()


@pytest.mark.parametrize("fails", [False, True])
def test_injection_leaves_the_garbage_collector_as_it_found_it(fails):
    assert gc.isenabled()
    config = LoraConfig(r=2, target_modules=["missing"] if fails else ["0"])
    if fails:
        with pytest.raises(NoMatchingPeftModuleError):
            get_peft_model(nn.Sequential(nn.Linear(2, 2)), config)
    else:
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), config)
    assert gc.isenabled()
    gc.disable()
    try:
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(r=2, target_modules=["0"]))
        assert not gc.isenabled()
    finally:
        gc.enable()
