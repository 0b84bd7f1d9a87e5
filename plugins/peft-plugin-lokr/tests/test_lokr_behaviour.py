"""LoKr beyond the oracle: registration, bad input, and layers HF PEFT's LoKr does not adapt."""

import pytest
import torch

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_lokr import LoKrConfig, LoKrLayer, LoKrModel


def test_registered_through_the_entry_point():
    spec = manager().method("LOKR")
    assert spec.config_cls is LoKrConfig and spec.model_cls is LoKrModel and spec.prefix == "lokr_"
    assert spec.is_mixed_compatible and spec.source == "lokr"
    assert isinstance(peft_kernel.get_peft_config({"peft_type": "LOKR", "target_modules": ["x"]}), LoKrConfig)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        peft_kernel.get_peft_model(M.build("mlp"), LoKrConfig(target_modules=["lin0"], r=0))


def test_unsupported_layer_names_what_is_supported():
    with pytest.raises(ValueError, match=r"not supported by LOKR.*torch\.nn\.Conv2d.*register_layer_mapping"):
        peft_kernel.get_peft_model(M.build("embedding"), LoKrConfig(target_modules=["emb"]))


def test_decompose_factor_splits_the_dimensions():
    """Linear 16 -> 12 with decompose_factor 4: W1 (4, 4) of (out, in) = (4·3, 4·4), W2 (3, 4)."""
    model = peft_kernel.get_peft_model(M.build("mlp"), LoKrConfig(target_modules=["lin1"], r=8, decompose_factor=4))
    layer = model.base_model.model.lin1
    assert layer.lokr_w1["default"].shape == (4, 4) and layer.lokr_w2["default"].shape == (3, 4)


def test_transformers_conv1d_layers_keep_the_linear_layout():
    """GPT-2's Conv1D stores its weight as (in, out); LoKr's factors are those of the linear map
    (out, in) = (96, 32) and the kernel handles the layout, in forward and merge."""
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(M.build("gpt2"), LoKrConfig(target_modules=["c_attn"], r=2, decompose_both=True))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoKrLayer) and layer.lokr_w1_a["default"].shape == (8, 2)  # 96 = 8·12, 32 = 4·8
    assert layer.lokr_w2_b["default"].shape == (2, 8)
    D.perturb(model)
    x = M.inputs("gpt2")
    unmerged = D.run(model, x)
    model.merge_adapter()
    D.assert_close(D.run(model, x), unmerged, "merged Conv1D", atol=1e-4)


def test_identity_at_init_for_every_init():
    """True zeroes W1, "lycoris" zeroes W2: both start as the base model; False does not."""
    x = M.inputs("conv2d")
    base = D.run(M.build("conv2d"), x)
    for init in (True, "lycoris", False):
        config = LoKrConfig(target_modules=["conv0", "conv1"], r=1, use_effective_conv2d=True, init_weights=init)
        out = D.run(peft_kernel.get_peft_model(M.build("conv2d"), config), x)
        if init:
            assert torch.equal(out, base), init
        else:
            D.assert_differs(out, base, "random init")

