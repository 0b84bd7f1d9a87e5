"""LoHa beyond the oracle: registration, bad input, and layers HF PEFT's LoHa does not adapt."""

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_loha import LoHaConfig, LoHaLayer, LoHaModel


def test_registered_through_the_entry_point():
    spec = manager().method("LOHA")
    assert spec.config_cls is LoHaConfig and spec.model_cls is LoHaModel and spec.prefix == "hada_"
    assert spec.is_mixed_compatible and spec.source == "loha"
    assert isinstance(peft_kernel.get_peft_config({"peft_type": "LOHA", "target_modules": ["x"]}), LoHaConfig)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        peft_kernel.get_peft_model(M.build("mlp"), LoHaConfig(target_modules=["lin0"], r=0))


def test_unsupported_layer_names_what_is_supported():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match=r"not supported by LOHA.*torch\.nn\.Conv2d.*register_layer_mapping"):
        peft_kernel.get_peft_model(model, LoHaConfig(target_modules=["0"]))


def test_transformers_conv1d_layers_keep_the_linear_layout():
    """GPT-2's Conv1D stores its weight as (in, out); LoHa's factors are those of the linear map
    (out, r) x (r, in) and the kernel handles the layout, in forward and merge."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(M.gpt2(), LoHaConfig(target_modules=["c_attn"], r=2))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoHaLayer) and layer.hada_w1_a["default"].shape == (96, 2)
    assert layer.hada_w1_b["default"].shape == (2, 32)
    D.perturb(model)
    x = M.inputs("gpt2")
    unmerged = D.run(model, x)
    model.merge_adapter()
    D.assert_close(D.run(model, x), unmerged, "merged Conv1D", atol=1e-4)
