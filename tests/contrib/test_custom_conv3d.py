"""contrib/custom_conv3d: a Conv3d LoRA variant that overrides the LoRA plugin's own."""

import subprocess
import sys

import pytest
import torch
from _contrib import CONTRIB, load
from torch import nn

import peft_kernel
from peft_kernel.testing import Case, MethodConformance
from peft_plugin_lora import Conv3d as BuiltinConv3d
from peft_plugin_lora import LoraConfig

separable = load("custom_conv3d/separable_conv3d.py", "contrib_separable_conv3d")
example = load("custom_conv3d/example.py", "contrib_conv3d_example")
SeparableLoraConv3d = separable.SeparableLoraConv3d


@pytest.fixture
def conv3d_mapping():
    peft_kernel.register_layer_mapping(nn.Conv3d, SeparableLoraConv3d, method="LORA")
    try:
        yield
    finally:
        peft_kernel.unregister_layer_mapping(nn.Conv3d, method="LORA")


def video():
    return example.VideoNet()


def clip():
    return torch.randn(2, 3, 4, 8, 8)


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 5, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1), dilation=(1, 2, 1))

    def forward(self, x):
        return self.conv(x)


@pytest.mark.usefixtures("conv3d_mapping")
class TestSeparableConv3dConformance(MethodConformance):
    cases = [
        Case("video", video, lambda: LoraConfig(target_modules=["conv"], r=4), clip),
        Case("strided-dilated", Strided, lambda: LoraConfig(target_modules=["conv"], r=3, lora_alpha=6),
             lambda: torch.randn(2, 2, 7, 9, 9)),
    ]


def test_both_registrations_override_the_builtin_layer(conv3d_mapping):
    model = peft_kernel.get_peft_model(video(), LoraConfig(target_modules=["conv"]))
    assert type(model.base_model.model.conv) is SeparableLoraConv3d
    peft_kernel.unregister_layer_mapping(nn.Conv3d, method="LORA")
    plain = peft_kernel.get_peft_model(video(), LoraConfig(target_modules=["conv"]))
    assert type(plain.base_model.model.conv) is BuiltinConv3d
    config = LoraConfig(target_modules=["conv"])
    config.register_custom_module({nn.Conv3d: SeparableLoraConv3d})
    assert "_custom_modules" not in config.to_dict()
    per_config = peft_kernel.get_peft_model(video(), config)
    assert type(per_config.base_model.model.conv) is SeparableLoraConv3d


def test_delta_is_the_separable_composition(conv3d_mapping):
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(Strided(), LoraConfig(target_modules=["conv"], r=3, init_lora_weights=False))
    layer = model.base_model.model.conv
    x = torch.randn(2, 2, 7, 9, 9)
    with torch.no_grad():
        update = layer(x) - layer.base_layer(x)
        conv = layer.base_layer
        direct = nn.functional.conv3d(x, layer.delta_weight("default"), None, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(update, direct, atol=1e-5, rtol=1e-4)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (3, 2, 3, 1, 1) and B.shape == (5, 3, 1, 2, 3)


def test_example(tmp_path):
    result = example.main(str(tmp_path))
    assert result["builtin_layer"] == "Conv3d"
    assert result["config_layer"] == result["process_layer"] == "SeparableLoraConv3d"
    assert result["separable_params"] < result["builtin_params"]
    assert result["max_merge_diff"] <= 1e-5 and result["max_reload_diff"] <= 1e-6


def test_example_script_runs():
    result = subprocess.run([sys.executable, str(CONTRIB / "custom_conv3d" / "example.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "process_layer: SeparableLoraConv3d" in result.stdout
