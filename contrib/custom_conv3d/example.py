"""Override LoRA's built-in ``nn.Conv3d`` layer, per config and process-wide.

    python contrib/custom_conv3d/example.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from separable_conv3d import SeparableLoraConv3d  # noqa: E402

import peft_kernel  # noqa: E402
from peft_kernel import PeftModel, get_peft_model  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


class VideoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, (3, 3, 3), stride=(1, 2, 2), padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def base_model() -> VideoNet:
    torch.manual_seed(0)
    return VideoNet()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(output_dir: str) -> dict:
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    builtin = get_peft_model(base_model(), LoraConfig(target_modules=["conv"], r=4))

    # 1. for one config only (HF PEFT's private API, kept for compatibility)
    config = LoraConfig(target_modules=["conv"], r=4, init_lora_weights=False)
    config.register_custom_module({nn.Conv3d: SeparableLoraConv3d})
    model = get_peft_model(base_model(), config)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
        model.unmerge_adapter()
    model.save_pretrained(output_dir)
    # the mapping is not saved: pass a config that has it again
    reload_config = LoraConfig.from_pretrained(output_dir)
    reload_config.register_custom_module({nn.Conv3d: SeparableLoraConv3d})
    loaded = PeftModel.from_pretrained(base_model(), output_dir, config=reload_config)

    # 2. for every LoRA config in the process
    peft_kernel.register_layer_mapping(nn.Conv3d, SeparableLoraConv3d, method="LORA")
    try:
        everywhere = get_peft_model(base_model(), LoraConfig(target_modules=["conv"], r=4))
    finally:
        peft_kernel.unregister_layer_mapping(nn.Conv3d, method="LORA")

    with torch.no_grad():
        reloaded = loaded(x)
    return {
        "builtin_layer": type(builtin.base_model.model.conv).__name__,
        "config_layer": type(model.base_model.model.conv).__name__,
        "process_layer": type(everywhere.base_model.model.conv).__name__,
        "builtin_params": count(builtin), "separable_params": count(everywhere),
        "max_merge_diff": (merged - unmerged).abs().max().item(),
        "max_reload_diff": (reloaded - unmerged).abs().max().item(),
    }


if __name__ == "__main__":
    result = main(tempfile.mkdtemp(prefix="conv3d-"))
    for key, value in result.items():
        print(f"{key}: {value}")
