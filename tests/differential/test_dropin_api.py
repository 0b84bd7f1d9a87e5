"""Drop-in API and validation: HF PEFT's names, arguments, checks, warnings and exception types.

Like ``test_dropin.py``, each scenario runs on HF PEFT and on ours (``lib``) where both
libraries have it, so the expected behaviour is HF PEFT's own.
"""

from __future__ import annotations

import json

import pytest
import torch
from _dropin import LIBS, X, hf_bug_and_ours, lora, perturb
from _models import HF, OURS, assert_close, build_base, trainable_names
from torch import nn


def _vera(lib):
    if lib is HF:
        from peft import VeraConfig
    else:
        from peft_plugin_vera import VeraConfig
    return VeraConfig


def _conversion(lib):
    if lib is HF:
        from peft import convert_to_lora, save_as_lora
    else:
        from peft_plugin_lora import convert_to_lora, save_as_lora
    return convert_to_lora, save_as_lora


# -- arguments and names ----------------------------------------------------------------


@LIBS
def test_add_adapter_autocast_and_set_adapter_inference_mode(lib):
    model = lib.get_peft_model(build_base("mlp").to(torch.bfloat16), lora(lib))
    model.add_adapter("kept", lora(lib), autocast_adapter_dtype=False)
    model.add_adapter("upcast", lora(lib))
    layer = model.base_model.model.lin0
    assert layer.lora_A["kept"].weight.dtype == torch.bfloat16
    assert layer.lora_A["upcast"].weight.dtype == torch.float32
    model.set_adapter("kept", inference_mode=True)
    assert trainable_names(model) == []
    model.set_adapter("upcast")
    assert trainable_names(model) == ["base_model.model.lin0.lora_A.upcast.weight",
                                      "base_model.model.lin0.lora_B.upcast.weight",
                                      "base_model.model.lin1.lora_A.upcast.weight",
                                      "base_model.model.lin1.lora_B.upcast.weight"]


@LIBS
def test_enum_spelling_of_peft_and_task_types(lib):
    config = lib.LoraConfig(task_type=lib.kernel.TaskType.CAUSAL_LM)
    assert config.peft_type == lib.kernel.PeftType.LORA == "LORA"
    assert config.peft_type.value == "LORA" and config.peft_type.name == "LORA"
    assert config.task_type == "CAUSAL_LM" and config.task_type.value == "CAUSAL_LM"
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "LORA"


@LIBS
def test_prepare_and_cast_for_mixed_precision(lib):
    model = lib.kernel.prepare_model_for_kbit_training(build_base("mlp"), use_gradient_checkpointing=False,
                                                       auto_clear_cache=False)
    peft_model = lib.get_peft_model(model, lora(lib))
    lib.kernel.cast_mixed_precision_params(peft_model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in peft_model.named_parameters()}
    assert dtypes["base_model.model.lin0.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.lin0.lora_A.default.weight"] == torch.float32


@LIBS
def test_base_model_state_dict(lib):
    plain = build_base("mlp")
    model = lib.get_peft_model(build_base("mlp"), lora(lib, modules_to_save=["lin2"]))
    state = lib.kernel.get_base_model_state_dict(model)
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    new = {k: v + 1 for k, v in state.items()}
    result = lib.kernel.set_base_model_state_dict(model, new)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, new["lin0.weight"])
    with pytest.raises(RuntimeError, match="(?i)missing.*lin1.weight"):
        lib.kernel.set_base_model_state_dict(model, {"lin0.weight": new["lin0.weight"]})


def test_delta_weight_alias_matches_hf():
    torch.manual_seed(0)
    hf = HF.get_peft_model(build_base("mlp"), lora(HF, init_lora_weights=False))
    torch.manual_seed(0)
    ours = OURS.get_peft_model(build_base("mlp"), lora(OURS, init_lora_weights=False))
    assert_close(ours.base_model.model.lin0.get_delta_weight("default"),
                 hf.base_model.model.lin0.get_delta_weight("default"), "get_delta_weight")


@LIBS
def test_has_active_enabled_adapter(lib):
    model = lib.get_peft_model(build_base("mlp"), lora(lib))
    assert model.has_active_enabled_adapter
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
    assert model.has_active_enabled_adapter


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)


@LIBS
def test_multihead_attention_wrapper_attributes(lib):
    layer = lib.get_peft_model(_Attention(), lib.LoraConfig(target_modules=["mha"])).base_model.model.mha
    assert (layer.embed_dim, layer.num_heads, layer.batch_first, layer.head_dim) == (16, 2, True, 8)
    mask, kind = layer.merge_masks(None, None, torch.zeros(2, 3, 16))
    assert mask is None and kind is None


@LIBS
def test_modules_to_save_wrapper(lib):
    model = lib.get_peft_model(build_base("mlp"), lora(lib, modules_to_save=["lin2"]))
    wrapper = model.base_model.model.lin2
    x = torch.randn(2, 20)
    assert torch.equal(wrapper(input=x), wrapper.modules_to_save["default"](x))
    model.add_adapter("other", lora(lib))
    model.set_adapter("other")
    assert wrapper.active_adapters == []
    assert torch.equal(wrapper(x), wrapper.original_module(x))


def test_peft_type_stays_open_to_plugins():
    from peft_kernel import PeftType

    assert PeftType.SOMETHING_NEW.value == "SOMETHING_NEW"  # ids are not a closed list
    assert "LORA" in PeftType and "SOMETHING_NEW" not in PeftType  # membership: the registered methods
    assert PeftType.LORA in list(PeftType)


# -- conversion to LoRA -----------------------------------------------------------------


def test_convert_to_lora_matches_hf(tmp_path):
    results = {}
    for lib in (HF, OURS):
        convert_to_lora, save_as_lora = _conversion(lib)
        torch.manual_seed(0)
        model = lib.get_peft_model(build_base("mlp"), _vera(lib)(target_modules=["lin0", "lin1"], r=8,
                                                                 init_weights=False)).eval()
        config, state = convert_to_lora(model, 0.9)
        products = {k: state[k.replace("lora_A", "lora_B")] @ v for k, v in state.items() if "lora_A" in k}
        save_as_lora(tmp_path / lib.name, model, 10)  # full rank: exact
        loaded = OURS.PeftModel.from_pretrained(build_base("mlp"), tmp_path / lib.name)
        assert torch.allclose(loaded(X), model(X), atol=1e-5)
        results[lib.name] = config.rank_pattern, sorted(config.target_modules), products
    assert results["ours"][:2] == results["hf"][:2]
    for key, value in results["hf"][2].items():
        assert_close(results["ours"][2][key], value, key)


def test_convert_to_lora_refuses_what_is_not_a_weight_delta():
    convert_to_lora, _ = _conversion(OURS)
    model = OURS.get_peft_model(build_base("mlp"), lora(OURS, use_dora=True))
    with pytest.raises(TypeError, match="weight delta"):
        convert_to_lora(model, 4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_relative_to_the_initial_weights(tmp_path, init):
    outputs = {}
    for lib in (HF, OURS):
        torch.manual_seed(0)
        model = lib.get_peft_model(build_base("mlp"), lora(lib, init_lora_weights=init, r=4))
        initial = tmp_path / lib.name / "initial"
        model.save_pretrained(initial)
        perturb(model)
        model.eval()
        trained = model(X)
        model.save_pretrained(tmp_path / lib.name / "lora", path_initial_model_for_weight_conversion=str(initial))
        assert sorted(model.peft_config) == ["default"]
        config = json.loads((tmp_path / lib.name / "lora" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
        on_original = OURS.PeftModel.from_pretrained(build_base("mlp"), tmp_path / lib.name / "lora")
        assert torch.allclose(on_original(X), trained, atol=1e-5)
        outputs[lib.name] = trained
    assert_close(outputs["ours"], outputs["hf"], "trained outputs")


def _pissa_with_a_trained_head(lib, tmp_path):
    """A PiSSA adapter with a modules_to_save head, trained, saved relative to its initial weights;
    returns its outputs and the outputs of the conversion loaded onto the original base."""
    torch.manual_seed(0)
    model = lib.get_peft_model(build_base("mlp"), lora(lib, init_lora_weights="pissa", r=4,
                                                        modules_to_save=["lin2"]))
    model.save_pretrained(tmp_path / "initial")
    perturb(model)
    with torch.no_grad():
        model.base_model.model.lin2.modules_to_save["default"].weight.add_(1.0)
    model.eval()
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    return model(X), lib.PeftModel.from_pretrained(build_base("mlp"), tmp_path / "lora")(X)


@hf_bug_and_ours("HF PEFT leaves the modules_to_save copies out of a PiSSA/OLoRA adapter converted on save, and "
                 "then cannot load the converted adapter (KeyError)", raises=KeyError)
def test_save_relative_to_the_initial_weights_keeps_modules_to_save(lib, tmp_path):
    trained, converted = _pissa_with_a_trained_head(lib, tmp_path)
    assert torch.allclose(converted, trained, atol=1e-5)


# -- validation HF PEFT does ------------------------------------------------------------


@LIBS
@pytest.mark.parametrize("kwargs", [{"use_dora": True}, {"init_lora_weights": "pissa"},
                                    {"init_lora_weights": "gaussian"}, {"init_lora_weights": "orthogonal"}])
def test_lora_bias_combinations_are_refused(lib, kwargs):
    with pytest.raises(ValueError, match="lora_bias"):
        lib.LoraConfig(lora_bias=True, **kwargs)


@LIBS
def test_lora_bias_on_embeddings_and_biasless_layers(lib):
    with pytest.raises(ValueError, match="lora_bias"):
        lib.get_peft_model(build_base("emb"), lib.LoraConfig(target_modules=["emb"], lora_bias=True))
    with pytest.warns(UserWarning, match="lora_bias"):
        lib.get_peft_model(build_base("mlp_nobias"), lora(lib, lora_bias=True))


@LIBS
def test_only_one_adapter_trains_biases(lib):
    model = lib.get_peft_model(build_base("mlp"), lora(lib, bias="all"))
    with pytest.raises(ValueError, match="bias"):
        model.add_adapter("b", lora(lib, bias="lora_only"))
    assert sorted(model.peft_config) == ["default"]


class _WithContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 4)
        self.table = nn.ParameterDict({"a": nn.Parameter(torch.zeros(2))})
        self.stack = nn.ParameterList([nn.Parameter(torch.zeros(2))])


@LIBS
@pytest.mark.parametrize("name", ["table", "stack"])
def test_parameter_containers_in_modules_to_save_are_refused(lib, name):
    with pytest.raises(TypeError, match="modules_to_save"):
        lib.get_peft_model(_WithContainers(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=[name]))


@LIBS
@pytest.mark.parametrize("data", [{"model_type": "llama", "hidden_size": 8}, [1, 2], {"peft_type": None}])
def test_a_json_that_is_no_adapter_config_is_refused(lib, tmp_path, data):
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises((ValueError, KeyError, TypeError)) as info:
        lib.PeftModel.from_pretrained(build_base("mlp"), tmp_path)
    if lib is OURS:
        assert isinstance(info.value, ValueError) and "adapter" in str(info.value)


@LIBS
def test_init_names_are_matched_as_in_hf(lib):
    lib.get_peft_model(build_base("mlp"), lora(lib, init_lora_weights="OLoRA"))
    lib.get_peft_model(build_base("mlp"), lora(lib, init_lora_weights="Gaussian"))
    with pytest.raises(ValueError, match="PiSSA"):
        lib.get_peft_model(build_base("mlp"), lora(lib, init_lora_weights="PiSSA"))


@LIBS
def test_warnings_hf_gives(lib):
    with pytest.warns(Warning, match="rank_pattern"):
        lib.get_peft_model(build_base("mlp"), lora(lib, rank_pattern={"lin9": 2}))
    model = build_base("mlp")
    model.name_or_path = "model-a"
    with pytest.warns(Warning, match="model-a"):
        lib.get_peft_model(model, lora(lib, base_model_name_or_path="model-b"))


class _Custom(nn.Module):
    """A module type no plugin knows, without in_features / out_features."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 10))


def _custom_lora_layer(lib):
    if lib is HF:
        from peft.tuners.lora import LoraLayer

        class CustomLora(nn.Module, LoraLayer):
            def __init__(self, base_layer, adapter_name):
                nn.Module.__init__(self)
                LoraLayer.__init__(self, base_layer)
    else:
        from peft_plugin_lora import LoraLayer

        class CustomLora(LoraLayer):
            def __init__(self, base_layer, adapter_name):
                super().__init__(base_layer, adapter_name=adapter_name)
    return CustomLora


@LIBS
def test_custom_layer_of_unknown_size_warns(lib):
    with pytest.warns(Warning, match="(?i)unsupported layer type"):
        _custom_lora_layer(lib)(_Custom(), "default")


@LIBS
def test_vera_adapters_share_one_projection(lib):
    VeraConfig = _vera(lib)
    model = lib.get_peft_model(build_base("mlp"), VeraConfig(target_modules=["lin0", "lin1"], r=8))
    model.add_adapter("b", VeraConfig(target_modules=["lin0", "lin1"], r=8))
    projections = model.base_model.vera_A
    assert projections["default"].data_ptr() == projections["b"].data_ptr()


# -- exception types --------------------------------------------------------------------


@LIBS
def test_runtime_errors_where_hf_raises_them(lib):
    small = lib.get_peft_model(build_base("mlp"), lora(lib, r=4))
    large = lib.get_peft_model(build_base("mlp"), lora(lib, r=8))
    with pytest.raises(RuntimeError, match="(?i)size mismatch"):
        lib.set_peft_model_state_dict(large, lib.get_peft_model_state_dict(small))

    model = lib.get_peft_model(build_base("mlp"), lora(lib, init_lora_weights=False))
    model.add_adapter("b", lora(lib, init_lora_weights=False))
    with pytest.raises(RuntimeError, match="foo"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c", combination_type="ties", density=0.5,
                                   majority_sign_method="foo")

    unmergeable = lib.get_peft_model(build_base("mlp_nobias"), lora(lib, lora_bias=True))
    with pytest.raises(RuntimeError, match="bias"):
        unmergeable.merge_adapter()

    grouped = lib.get_peft_model(build_base("conv2d_groups"), lib.LoraConfig(target_modules=["conv"], r=4))
    with pytest.raises(NotImplementedError, match="groups"):
        grouped.merge_and_unload()


# -- DoRA on grouped convolutions; DoRA in mixed batches ---------------------------------


def _dora_conv(lib, init):
    torch.manual_seed(0)
    model = lib.get_peft_model(build_base("conv2d_groups"), lib.LoraConfig(target_modules=["conv"], r=4,
                                                                           use_dora=True, init_lora_weights=init))
    return model.eval()


def _grouped_dora_reference(layer, x):
    """W' = m · (W + s·BA) / ‖W + s·BA‖ with the grouped W as its dense block-diagonal matrix."""
    conv = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out, per_group = conv.weight.shape[:2]
    groups, rows, r_per_group = conv.groups, conv.weight.shape[0] // conv.groups, A.shape[0] // conv.groups
    dense = torch.zeros((out, per_group * groups) + conv.weight.shape[2:])
    delta = torch.zeros_like(dense)
    for o in range(out):
        g = o // rows
        dense[o, g * per_group:(g + 1) * per_group] = conv.weight[o]
        for c in range(r_per_group):
            delta[o] += B[o, c, 0, 0] * A[g * r_per_group + c]
    combined = dense + layer.scaling["default"] * delta
    magnitude = layer.lora_magnitude_vector["default"].weight.reshape(-1)
    weight = combined * (magnitude / combined.reshape(out, -1).norm(dim=1)).view(-1, 1, 1, 1)
    return torch.nn.functional.conv2d(x, weight, conv.bias)


X_CONV = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))


@LIBS
def test_grouped_conv_dora_starts_as_the_base(lib):
    model = _dora_conv(lib, True)
    with model.disable_adapter():
        base = model(X_CONV)
    assert torch.allclose(model(X_CONV), base, atol=1e-6)


@hf_bug_and_ours("HF PEFT reshapes the grouped lora_B weight as if it were dense when it computes DoRA's weight "
                 "norm, so trained grouped-conv DoRA adapters get a wrong norm")
def test_grouped_conv_dora_follows_the_math(lib):
    model = _dora_conv(lib, False)
    perturb(model)
    layer = model.base_model.model.conv
    with torch.no_grad():
        assert torch.allclose(layer(X_CONV), _grouped_dora_reference(layer, X_CONV), atol=1e-5)


def test_dora_in_a_mixed_batch_equals_each_adapter_alone():
    """HF PEFT refuses DoRA adapters in a mixed batch; ours routes them like any adapter."""
    model = OURS.get_peft_model(build_base("mlp"), lora(OURS, use_dora=True))
    model.add_adapter("b", lora(OURS, use_dora=True, r=4))
    perturb(model)
    model.eval()
    names = ["default", "b", "__base__", "b", "default"]
    with torch.no_grad():
        mixed = model(X, adapter_names=names)
        expected = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected.append(model(X[i:i + 1]))
            else:
                model.set_adapter(name)
                expected.append(model(X[i:i + 1]))
    assert torch.allclose(mixed, torch.cat(expected), atol=1e-6)
