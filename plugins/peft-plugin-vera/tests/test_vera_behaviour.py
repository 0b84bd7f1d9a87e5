"""VeRA specifics that need no oracle: bad input, shared projections, loading rules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import PeftModel, PeftWarning, get_peft_model
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_vera import VeraConfig, VeraModel

pytestmark = pytest.mark.filterwarnings("ignore:save_projection=False")


def _model(**config):
    torch.manual_seed(0)
    config.setdefault("r", 4)
    return get_peft_model(M.build("mlp_wide"), VeraConfig(**config))


def _save(model, path, **kwargs):
    model.save_pretrained(str(path), **kwargs)
    return str(path)


# -- registration -------------------------------------------------------------------------


def test_registered_through_entry_point():
    spec = manager().method("VERA")
    assert spec.config_cls is VeraConfig and spec.model_cls is VeraModel and spec.prefix == "vera_lambda_"
    assert not spec.is_mixed_compatible
    records = {r.name: r for r in manager().plugin_info()}
    assert records["vera"].methods == ["VERA"] and records["vera"].error is None


# -- shared projections -------------------------------------------------------------------


def test_projections_sized_to_largest_layer_and_shared():
    model = _model(target_modules=["lin0", "lin1", "lin2"], r=5)
    tuner = model.base_model
    assert tuner.vera_A["default"].shape == (5, 30)  # r × max in (10, 20, 30)
    assert tuner.vera_B["default"].shape == (30, 5)  # max out (20, 30, 4) × r
    for name in ("lin0", "lin1", "lin2"):
        layer = getattr(tuner.model, name)
        assert layer.vera_A is tuner.vera_A and layer.vera_B is tuner.vera_B
    A, B = tuner.model.lin0.projections("default")
    assert torch.equal(A, tuner.vera_A["default"][:, :10]) and torch.equal(B, tuner.vera_B["default"][:20])


def test_only_lambdas_train():
    model = _model(target_modules=["lin0", "lin1"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".vera_lambda_b." in n or ".vera_lambda_d." in n for n in trainable)
    assert not any(b.requires_grad for b in model.buffers())


@pytest.mark.parametrize("second, what", [
    ({"target_modules": ["lin1", "lin2"], "r": 4}, "largest layer input is 30"),  # bigger layers
    ({"target_modules": ["lin0"], "r": 8}, "r=8"),  # larger r
])
def test_second_adapter_too_big_raises_at_creation(second, what):
    model = _model(target_modules=["lin0"], r=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=what):
        model.add_adapter("big", VeraConfig(**second))
    assert "big" not in model.peft_config
    assert "big" not in model.base_model.vera_A and "big" not in model.base_model.vera_B
    assert set(model.state_dict()) == set(before)
    model.add_adapter("big", VeraConfig(target_modules=["lin0"], r=4))  # the name is free again


@pytest.mark.parametrize("second, what", [
    ({"projection_prng_key": 1}, "projection_prng_key"),
    ({"save_projection": False}, "save_projection"),
])
def test_second_adapter_must_share_key_and_save_projection(second, what):
    model = _model(target_modules=["lin0"])
    with pytest.raises(ValueError, match=what):
        model.add_adapter("b", VeraConfig(target_modules=["lin0"], r=4, **second))
    assert set(model.base_model.vera_A) == {"default"}


def test_delete_adapter_removes_its_projections():
    model = _model(target_modules=["lin0", "lin1"])
    model.add_adapter("b", VeraConfig(target_modules=["lin0"], r=4))
    assert set(model.base_model.vera_A) == {"default", "b"}
    model.delete_adapter("b")
    assert set(model.base_model.vera_A) == set(model.base_model.vera_B) == {"default"}
    assert not any("b" in k.split(".") for k in model.state_dict())


def test_inject_adapter_in_model_carries_projections():
    torch.manual_seed(0)
    base = M.build("mlp_wide")
    reference = D.run(M.build("mlp_wide"), M.inputs("mlp_wide"))
    model = peft_kernel.inject_adapter_in_model(VeraConfig(target_modules=["lin0", "lin1"], r=4), base)
    assert "lin0.vera_A.default" in model.state_dict()
    D.assert_close(D.run(model, M.inputs("mlp_wide")), reference, "identity at init")


def test_unsupported_layer_names_module_type_and_supported():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError) as info:
        get_peft_model(WithConv(), VeraConfig(target_modules=["conv", "lin"], r=4))
    message = str(info.value)
    assert "'conv'" in message and "Conv2d" in message and "torch.nn.Linear" in message


def test_no_adaptable_layer_raises():
    class OnlyConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    with pytest.raises(ValueError, match="No layer that VeRA can adapt"):
        get_peft_model(OnlyConv(), VeraConfig(target_modules=["conv"], r=4))


def test_fields_hf_does_not_have_are_rejected():
    with pytest.raises(TypeError):
        VeraConfig(target_modules=["lin0"], exclude_modules=["lin1"])
    assert "exclude_modules" not in VeraConfig(target_modules=["lin0"]).to_dict()
    with pytest.raises(ValueError, match="bias"):
        VeraConfig(target_modules=["lin0"], bias="lora_only")
    with pytest.raises(ValueError, match="positive"):
        VeraConfig(target_modules=["lin0"], r=0)


def test_save_projection_false_warns_at_config():
    with pytest.warns(PeftWarning, match="save_projection=False"):
        VeraConfig(target_modules=["lin0"], save_projection=False)


# -- loading rules ------------------------------------------------------------------------


def test_missing_projections_when_expected_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(target_modules=["lin0", "lin1"])
    path = _save(model, tmp_path)
    tensors = load_file(f"{path}/adapter_model.safetensors")
    del tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    save_file(tensors, f"{path}/adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks"):
        PeftModel.from_pretrained(M.build("mlp_wide"), path)


def test_regenerated_projections_warn_and_match(tmp_path):
    model = _model(target_modules=["lin0", "lin1"], save_projection=False)
    D.perturb(model)
    x = M.inputs("mlp_wide")
    expected = D.run(model, x)
    path = _save(model, tmp_path)
    from safetensors.torch import load_file

    assert not any("vera_A" in k or "vera_B" in k for k in load_file(f"{path}/adapter_model.safetensors"))
    with pytest.warns(PeftWarning, match="regenerated"):
        loaded = PeftModel.from_pretrained(M.build("mlp_wide"), path)
    D.assert_close(D.run(loaded, x), expected, "regenerated projections")


def test_present_projections_with_save_projection_false_are_ignored(tmp_path):
    model = _model(target_modules=["lin0", "lin1"])
    D.perturb(model)
    x = M.inputs("mlp_wide")
    expected = D.run(model, x)
    path = _save(model, tmp_path)
    with open(f"{path}/adapter_config.json") as fh:
        config = json.load(fh)
    config["save_projection"] = False
    with open(f"{path}/adapter_config.json", "w") as fh:
        json.dump(config, fh)
    with pytest.warns(PeftWarning, match="ignored"):
        loaded = PeftModel.from_pretrained(M.build("mlp_wide"), path)
    D.assert_close(D.run(loaded, x), expected, "same key, same projections")


def test_projections_load_from_checkpoint_not_key(tmp_path):
    """With save_projection=True the stored projections win over the key."""
    model = _model(target_modules=["lin0", "lin1"])
    with torch.no_grad():
        model.base_model.vera_A["default"].mul_(2.0)
    D.perturb(model)
    x = M.inputs("mlp_wide")
    expected = D.run(model, x)
    loaded = PeftModel.from_pretrained(M.build("mlp_wide"), _save(model, tmp_path))
    D.assert_close(D.run(loaded, x), expected, "stored projections")


def test_low_cpu_mem_usage_without_stored_projections(tmp_path):
    model = _model(target_modules=["lin0", "lin1"], save_projection=False)
    D.perturb(model)
    x = M.inputs("mlp_wide")
    expected = D.run(model, x)
    loaded = PeftModel.from_pretrained(M.build("mlp_wide"), _save(model, tmp_path), low_cpu_mem_usage=True)
    assert not any(t.device.type == "meta" for t in list(loaded.parameters()) + list(loaded.buffers()))
    D.assert_close(D.run(loaded, x), expected, "low_cpu_mem_usage")


# -- forward ------------------------------------------------------------------------------


def test_mixed_batch_equals_separate_runs():
    model = _model(target_modules=["lin0", "lin1"])
    model.add_adapter("b", VeraConfig(target_modules=["lin0", "lin1"], r=4))
    model.base_model.set_adapter(["default", "b"])
    D.perturb(model)
    model.set_adapter("default")
    model.eval()  # mixed adapter batches are an inference feature
    x = M.inputs("mlp_wide", batch=3)
    names = ["b", "__base__", "default"]
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_dtype(dtype):
    torch.manual_seed(0)
    model = get_peft_model(M.build("mlp_wide").to(dtype), VeraConfig(target_modules=["lin0", "lin1"], r=4))
    assert model.base_model.model.lin0.vera_lambda_b["default"].dtype == torch.float32
    D.perturb(model)
    x = M.inputs("mlp_wide").to(dtype)
    out = D.run(model, x)
    assert out.dtype == dtype
    model.merge_adapter()
    assert model.base_model.model.lin0.base_layer.weight.dtype == dtype
    D.assert_close(D.run(model, x).float(), out.float(), "half-precision merge", atol=5e-2)


def test_state_dict_injection_sizes_projections_from_the_keys():
    source = _model(target_modules=["lin0", "lin1"])
    state = peft_kernel.get_peft_model_state_dict(source)
    with pytest.warns(PeftWarning, match="state_dict keys decide"):
        model = peft_kernel.inject_adapter_in_model(VeraConfig(target_modules=["lin2"], r=4), M.build("mlp_wide"),
                                                    state_dict=state)
    assert hasattr(model.lin0, "vera_lambda_b") and hasattr(model.lin1, "vera_lambda_b")
    assert not hasattr(model.lin2, "vera_lambda_b")
    assert model.lin0.vera_A["default"].shape == source.base_model.vera_A["default"].shape


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
    model = get_peft_model(_quantized_mlp(), VeraConfig(target_modules=["lin0", "lin1"], r=4))
    assert model.base_model.vera_A["default"].shape == (4, 20)
    D.perturb(model)
    layer0 = model.base_model.model.lin0
    assert isinstance(layer0.get_base_layer(), ToyInt8Linear)
    x = M.inputs("mlp_wide")
    base0 = layer0.get_base_layer()
    expected0 = nn.functional.linear(x, base0.dequantize() + layer0.delta_weight("default"), base0.bias)
    D.assert_close(layer0(x).detach(), expected0.detach(), "quantized forward")
    out = D.run(model, x)
    model.merge_adapter()
    D.assert_close(D.run(model, x), out, "quantized merge (requantization error)", atol=0.05)
