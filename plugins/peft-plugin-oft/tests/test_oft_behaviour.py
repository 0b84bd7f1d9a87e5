"""OFT beyond the oracle: registration, bad input, and layers HF PEFT's OFT does not adapt. (Its
``peft-kernel finetune`` run is in tests/cli/test_cli_finetune.py.)"""

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_oft import OFTConfig, OFTLayer, OFTModel


def test_registered_through_the_entry_point():
    spec = manager().method("OFT")
    assert spec.config_cls is OFTConfig and spec.model_cls is OFTModel and spec.prefix == "oft_"
    assert spec.is_mixed_compatible and spec.source == "oft"


def test_r_and_block_size_are_exclusive():
    for r, block in ((4, 8), (0, 0)):
        with pytest.raises(ValueError, match="exactly one of `r`.*`oft_block_size`"):
            OFTConfig(r=r, oft_block_size=block)


def test_a_block_size_that_does_not_divide_becomes_the_nearest_divisor():
    with pytest.warns(peft_kernel.PeftWarning, match=r"Invalid `oft_block_size` \(5\).*Adjusted.*\(4\)"):
        model = peft_kernel.get_peft_model(M.build("mlp8"), OFTConfig(target_modules=["lin0"], oft_block_size=5))
    assert model.base_model.model.lin0.oft_block_size["default"] == 4


def test_unsupported_layer_names_what_is_supported():
    with pytest.raises(ValueError, match=r"not supported by OFT.*torch\.nn\.Embedding.*register_layer_mapping"):
        peft_kernel.get_peft_model(nn.Sequential(nn.LSTM(4, 4)), OFTConfig(target_modules=["0"]))


def test_transformers_conv1d_rotates_the_input_of_the_linear_map():
    """GPT-2's Conv1D stores (in, out); the rotation acts on the 32 inputs either way."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(M.gpt2(), OFTConfig(target_modules=["c_attn", "c_fc"], oft_block_size=8))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, OFTLayer) and layer.r["default"] == 4
    D.perturb(model, scale=0.05)
    D.assert_merge_keeps_outputs(model, M.inputs("gpt2"))
