"""(IA)³ specifics that need no oracle: bad input, registration, mixed batches, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import PeftWarning, get_peft_model
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_ia3 import IA3Config, IA3Model


def _model(**config):
    torch.manual_seed(0)
    return get_peft_model(M.build("mlp_wide"), IA3Config(**config))


# -- registration -------------------------------------------------------------------------


def test_registered_through_entry_point():
    spec = manager().method("IA3")
    assert spec.config_cls is IA3Config and spec.model_cls is IA3Model and spec.prefix == "ia3_"
    assert spec.is_mixed_compatible
    records = {r.name: r for r in manager().plugin_info()}
    assert records["ia3"].methods == ["IA3"] and records["ia3"].error is None
    assert isinstance(peft_kernel.get_peft_config({"peft_type": "IA3", "target_modules": ["x"]}), IA3Config)


# -- bad input ----------------------------------------------------------------------------


def test_feedforward_must_be_subset_of_targets():
    with pytest.raises(ValueError, match="subset of `target_modules`"):
        IA3Config(target_modules=["lin0"], feedforward_modules=["lin1"])


def test_feedforward_subset_checked_after_model_defaults():
    with pytest.raises(ValueError, match="subset of `target_modules`"):
        get_peft_model(M.build("llama"), IA3Config(feedforward_modules=["up_proj"]))


def test_missing_feedforward_default_for_custom_model():
    with pytest.raises(ValueError, match="feedforward_modules"):
        get_peft_model(M.build("mlp_wide"), IA3Config(target_modules=["lin0"]))


def test_missing_target_default_for_custom_model():
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(M.build("mlp_wide"), IA3Config(feedforward_modules=[]))


def test_fields_hf_does_not_have_are_rejected():
    with pytest.raises(TypeError):
        IA3Config(target_modules=["lin0"], layers_to_transform=[0])
    assert "layers_to_transform" not in IA3Config(target_modules=["lin0"]).to_dict()


def test_unknown_config_keys_warn():
    with pytest.warns(PeftWarning, match="from_the_future"):
        config = IA3Config.from_dict({"peft_type": "IA3", "target_modules": ["lin0"], "from_the_future": 1})
    assert config.target_modules == {"lin0"}


def test_unsupported_layer_names_module_type_and_supported():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x):
            return self.emb(x)

    with pytest.raises(ValueError) as info:
        get_peft_model(WithEmbedding(), IA3Config(target_modules=["emb"], feedforward_modules=[]))
    message = str(info.value)
    assert "'emb'" in message and "torch.nn.modules.sparse.Embedding" in message and "torch.nn.Linear" in message


def test_no_target_list_compression():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(25))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    targets = [f"layers.{i}" for i in range(25)]
    model = get_peft_model(Wide(), IA3Config(target_modules=targets, feedforward_modules=targets[:3]))
    assert model.peft_config["default"].target_modules == set(targets)


def test_add_weighted_adapter_errors():
    model = _model(target_modules=["lin0", "lin1"], feedforward_modules=[], modules_to_save=["lin2"])
    model.add_adapter("b", IA3Config(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin2"]))
    model.add_adapter("c", IA3Config(target_modules=r"lin0", feedforward_modules=[]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default"], [1.0], "b")
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="same kind"):
        model.add_weighted_adapter(["default", "c"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="do not exist"):
        model.add_weighted_adapter(["default", "nope"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default"], [0.5, 0.5], "mix")
    assert "mix" not in model.peft_config


def test_add_weighted_adapter_uses_single_source_modules_to_save():
    model = _model(target_modules=["lin0"], feedforward_modules=[], modules_to_save=["lin2"])
    model.add_adapter("b", IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    with torch.no_grad():
        model.base_model.model.lin2.modules_to_save["default"].weight.add_(1.0)
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    wrapper = model.base_model.model.lin2
    assert torch.equal(wrapper.modules_to_save["mix"].weight, wrapper.modules_to_save["default"].weight)
    # lin1 is adapted only by "b": half of its vector
    lin1 = model.base_model.model.lin1
    assert torch.allclose(lin1.ia3_l["mix"], 0.5 * lin1.ia3_l["b"])


# -- behaviour ----------------------------------------------------------------------------


def test_mixed_batch_equals_separate_runs():
    config = dict(target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin1"])
    model = _model(**config)
    model.add_adapter("b", IA3Config(**config))
    model.base_model.set_adapter(["default", "b"])
    D.perturb(model)
    model.set_adapter("default")
    model.eval()  # mixed adapter batches are an inference feature
    x = M.inputs("mlp_wide", batch=3)
    names = ["default", "b", "__base__"]
    mixed = D.run(model, x, adapter_names=names)
    expected = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(D.run(model, x[i : i + 1]))
        else:
            model.set_adapter(name)
            expected.append(D.run(model, x[i : i + 1]))
    D.assert_close(mixed, torch.cat(expected), "mixed batch")


def test_feedforward_role_is_per_layer():
    model = _model(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"])
    with pytest.warns(PeftWarning, match="one role per layer"):
        model.add_adapter("b", IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=[]))
    assert model.base_model.model.lin1.ia3_l["b"].shape == (1, 20)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_dtype(dtype):
    torch.manual_seed(0)
    base = M.build("mlp_wide").to(dtype)
    model = get_peft_model(base, IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    assert model.base_model.model.lin0.ia3_l["default"].dtype == torch.float32
    D.perturb(model)
    x = M.inputs("mlp_wide").to(dtype)
    out = D.run(model, x)
    assert out.dtype == dtype
    model.merge_adapter()
    assert model.base_model.model.lin0.base_layer.weight.dtype == dtype
    merged = D.run(model, x)
    assert merged.dtype == dtype
    D.assert_close(merged.float(), out.float(), "half-precision merge", atol=5e-2)
    model.unmerge_adapter()


def test_unmerge_warns_when_vector_has_zeros():
    model = _model(target_modules=["lin0"], feedforward_modules=[])
    with torch.no_grad():
        model.base_model.model.lin0.ia3_l["default"][0] = 0.0
    model.merge_adapter()
    with pytest.warns(PeftWarning, match="zero entries"):
        model.unmerge_adapter()


def test_safe_merge_rejects_non_finite():
    model = _model(target_modules=["lin0"], feedforward_modules=[])
    weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.base_model.model.lin0.ia3_l["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaN|inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, weight)


# -- quantized bases (a toy backend, registered at run time) -------------------------------


@pytest.fixture
def toy_backend():
    from peft_kernel.plugins import reset_manager

    reset_manager()
    manager().register(ToyBackendPlugin(), name="toy-backend")
    yield
    reset_manager()


def _quantized_mlp():
    model = M.build("mlp_wide")
    model.lin0, model.lin1 = ToyInt8Linear(model.lin0), ToyInt8Linear(model.lin1)
    return model


def test_quantized_base_forward_and_merge(toy_backend):
    model = get_peft_model(_quantized_mlp(), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    D.perturb(model)
    layer0, layer1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert isinstance(layer0.get_base_layer(), ToyInt8Linear)
    x = M.inputs("mlp_wide")
    h0 = layer0.get_base_layer()(x) * layer0.ia3_l["default"].flatten()
    h1 = layer1.get_base_layer()(torch.relu(h0) * layer1.ia3_l["default"].flatten())
    expected = model.base_model.model.lin2(torch.relu(h1))
    D.assert_close(D.run(model, x), expected.detach(), "quantized forward")
    model.merge_adapter()
    D.assert_close(D.run(model, x), expected.detach(), "quantized merge (requantization error)", atol=0.05)
