"""RoAd beyond the oracle: the rotation's math, its closed-form inverse, registration and bad input."""

import math

import pytest
import torch

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_road import RoadConfig, RoadModel


def test_registered_through_the_entry_point():
    spec = manager().method("ROAD")
    assert spec.config_cls is RoadConfig and spec.model_cls is RoadModel and spec.prefix == "road_"
    assert isinstance(peft_kernel.get_peft_config({"peft_type": "ROAD", "target_modules": ["x"]}), RoadConfig)


def test_pairs_rotate_by_their_angle():
    """road_2, group_size 4 on lin1 (12 outputs): features (0, 2) and (1, 3) of each group are pairs;
    θ = π/2 on both members of a pair with α = 1 maps (u, v) to (−v, u)."""
    model = peft_kernel.get_peft_model(M.build("mlp"), RoadConfig(target_modules=["lin1"], variant="road_2",
                                                                   group_size=4))
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.road_theta["default"].fill_(math.pi / 2)
        layer.road_alpha["default"].fill_(2.0)
    h = torch.randn(3, 16)
    y = layer.get_base_layer()(h).detach()
    out = layer(h).detach()
    for group in range(3):
        for j in range(2):
            u, v = 4 * group + j, 4 * group + j + 2
            torch.testing.assert_close(out[:, u], -2 * y[:, v], atol=1e-5, rtol=0)
            torch.testing.assert_close(out[:, v], 2 * y[:, u], atol=1e-5, rtol=0)


def test_unmerge_inverts_each_pair_exactly():
    model = peft_kernel.get_peft_model(M.build("mlp"), RoadConfig(target_modules=["lin0"], variant="road_4",
                                                                   group_size=8, init_weights=False))
    base = model.base_model.model.lin0.get_base_layer()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model.merge_adapter()
    assert not torch.allclose(base.weight, before["weight"])
    model.unmerge_adapter()
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6)


def test_group_size_must_divide_the_outputs():
    model = M.build("mlp")
    with pytest.raises(ValueError, match=r"group_size \(8\), which must divide out_features \(12\)"):
        peft_kernel.get_peft_model(model, RoadConfig(target_modules=["lin1"], group_size=8))
    assert type(model.lin1) is torch.nn.Linear


@pytest.mark.parametrize("kwargs,message", [({"variant": "road_3"}, "Invalid variant 'road_3'"),
                                            ({"group_size": 5}, "positive even number")])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoadConfig(**kwargs)


def test_transformers_conv1d_layers_rotate_their_outputs():
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(M.build("gpt2"), RoadConfig(target_modules=["c_attn", "c_proj"], group_size=8,
                                                                    variant="road_4"))
    D.perturb(model)
    x = M.inputs("gpt2")
    unmerged = D.run(model, x)
    D.assert_differs(unmerged, D.run(M.build("gpt2"), x), "adapter")
    model.merge_adapter()
    D.assert_close(D.run(model, x), unmerged, "merged Conv1D", atol=1e-4)
