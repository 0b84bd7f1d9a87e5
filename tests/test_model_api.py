"""The PeftModel API as a user drives it."""

import functools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import (
    PeftModel,
    get_layer_status,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    register_layer_mapping,
    unregister_layer_mapping,
)
from peft_kernel.testing import perturb, tiny_models
from peft_plugin_lora import LoraConfig
from peft_plugin_lora.layer import Linear as LoraLinear

MLP = functools.partial(tiny_models.MLP, (6, 8, 3))


def fresh():
    torch.manual_seed(0)
    return MLP()


def two_adapter_model():
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False))
    return model


def test_mixed_batch_equals_per_adapter_runs():
    model = two_adapter_model().eval()
    x = torch.randn(5, 6)
    names = ["default", "b", "__base__", "b", "default"]
    mixed = model(x, adapter_names=names)
    model.set_adapter("default")
    out_a = model(x)
    model.set_adapter("b")
    out_b = model(x)
    with model.disable_adapter():
        out_base = model(x)
        torch.testing.assert_close(model(x, adapter_names=names), out_base)  # disabled: all base
    expected = torch.stack([{"default": out_a, "b": out_b, "__base__": out_base}[n][i] for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, expected)


def test_load_adapter_neither_activates_nor_unfreezes(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "b" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path))
    result = loaded.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert loaded.active_adapters == ["default"]
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 6)
    loaded.set_adapter("b")
    model.set_adapter("b")
    torch.testing.assert_close(loaded(x), model(x))


def test_selected_adapters(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "b" / "adapter_config.json").exists()


def test_is_trainable_and_set_requires_grad(tmp_path):
    two_adapter_model().save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(fresh(), str(tmp_path), is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in model.parameters())


def test_delete_adapter_picks_next_deterministically():
    model = two_adapter_model()
    model.delete_adapter("default")
    assert model.active_adapters == ["b"] and list(model.peft_config) == ["b"]
    assert all(not hasattr(m, "lora_A") or "default" not in m.lora_A for m in model.modules())


def test_status_reports():
    model = two_adapter_model()
    status = get_model_status(model)
    assert status.num_adapter_layers == 2 and status.available_adapters == ["b", "default"]
    assert status.active_adapters == ["default"] and status.merged_adapters == []
    assert status.requires_grad == {"default": True, "b": False}
    layers = {s.name: s for s in get_layer_status(model)}
    assert layers["lin1"].available_adapters == ["default"]
    model.base_model.model.lin0.merge(adapter_names=["default"])
    assert get_model_status(model).merged_adapters == "irregular"
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_print_trainable_parameters(capsys):
    get_peft_model(fresh(), LoraConfig(target_modules=["lin0"], r=2)).print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.startswith("trainable params: 28 || all params:") and "trainable%: " in out


def test_modules_to_save_round_trip(tmp_path):
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.lin1.weight", "base_model.model.lin1.bias"} <= keys
    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path))
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_inject_adapter_in_model_with_state_dict():
    source = get_peft_model(fresh(), LoraConfig(target_modules=["lin1"]))
    state = get_peft_model_state_dict(source)
    model = fresh()
    with pytest.warns(peft_kernel.PeftWarning, match="state_dict keys decide"):
        inject_adapter_in_model(LoraConfig(target_modules=["lin0"]), model, state_dict=state)
    assert isinstance(model.lin1, LoraLinear) and isinstance(model.lin0, nn.Linear)


def test_low_cpu_mem_usage_creates_meta_adapters():
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0"]), low_cpu_mem_usage=True)
    assert model.base_model.model.lin0.lora_A["default"].weight.device.type == "meta"
    assert model.base_model.model.lin0.base_layer.weight.device.type == "cpu"


class Doubler(LoraLinear):
    """A user layer that overrides the built-in Linear mapping."""

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        return super().adapter_forward(x, result, adapter_name) * 2


def test_register_layer_mapping_overrides_builtin():
    register_layer_mapping(nn.Linear, Doubler, method="LORA")
    try:
        model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0"]))
        assert type(model.base_model.model.lin0) is Doubler
    finally:
        unregister_layer_mapping(nn.Linear, method="LORA")
    config = LoraConfig(target_modules=["lin0"])
    config._register_custom_module({nn.Linear: Doubler})
    model = get_peft_model(fresh(), config)
    assert type(model.base_model.model.lin0) is Doubler
    assert "_custom_modules" not in config.to_dict()


def test_trace_env_var_prints_dispatch_decisions():
    code = ("import torch; from torch import nn; from peft_kernel import get_peft_model; "
            "from peft_plugin_lora import LoraConfig; "
            "get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=['0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PEFT_KERNEL_TRACE="1"))
    assert "layer `0` (Linear) -> LORA -> Linear" in result.stderr


def test_merge_and_unload_and_unload_return_plain_modules():
    model = two_adapter_model()
    x = torch.randn(2, 6)
    expected = model(x)
    plain = model.merge_and_unload()
    assert type(plain.lin0) is nn.Linear and not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)


def test_half_precision_base_keeps_fp32_adapters_and_base_dtype():
    model = fresh().to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    layer = peft_model.base_model.model.lin0
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = peft_model(torch.randn(2, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    peft_model.merge_adapter()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    peft_model.unmerge_adapter()
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_training_step_reduces_loss():
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0", "lin1"]))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


def test_peft_type_is_a_string_that_reads_like_hf_peft_s_enum():
    import json
    import pickle

    import peft as hf_peft

    config = LoraConfig(target_modules=["lin0"])
    assert config.peft_type == "LORA" and config.peft_type.value == "LORA"
    assert config.peft_type == peft_kernel.PeftType.LORA == hf_peft.PeftType.LORA
    assert peft_kernel.PeftType.ANY_REGISTERED_NAME == "ANY_REGISTERED_NAME"  # the set of ids stays open
    assert json.loads(config.to_json_string())["peft_type"] == "LORA"
    assert pickle.loads(pickle.dumps(config)).peft_type.value == "LORA"


def test_state_dict_of_a_model_adapted_in_place_uses_its_own_paths(tmp_path):
    """What transformers' and diffusers' adapter APIs rely on: no PeftModel, no base_model.model. prefix."""
    torch.manual_seed(0)
    wrapped = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    torch.manual_seed(0)
    bare = inject_adapter_in_model(LoraConfig(target_modules=["lin0"], init_lora_weights=False), MLP())
    state = get_peft_model_state_dict(bare)
    assert sorted(state) == ["lin0.lora_A.weight", "lin0.lora_B.weight"]
    torch.testing.assert_close(state["lin0.lora_A.weight"], wrapped.base_model.model.lin0.lora_A["default"].weight)
    fresh = inject_adapter_in_model(LoraConfig(target_modules=["lin0"]), MLP())
    peft_kernel.set_peft_model_state_dict(fresh, get_peft_model_state_dict(wrapped))  # a PeftModel's keys fit too
    trained_b = wrapped.base_model.model.lin0.lora_B["default"].weight
    torch.testing.assert_close(fresh.lin0.lora_B["default"].weight, trained_b)


def test_fields_a_method_lacks_in_hf_peft_are_written_only_when_set(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class NarrowConfig(peft_kernel.TunerConfig):
        fields_written_when_set = ("exclude_modules", "layers_to_transform")

    written = NarrowConfig(target_modules=["a"]).to_dict()
    assert "exclude_modules" not in written and "layers_to_transform" not in written and "layers_pattern" in written
    config = NarrowConfig(target_modules=["a"], exclude_modules=["b"])
    config.save_pretrained(tmp_path)
    assert NarrowConfig.from_pretrained(tmp_path).exclude_modules == {"b"}
