"""Bad input gets a clear error (or a documented warning) and leaves model and files unchanged."""

import copy
import json
import os
import pickle

import pytest
import torch
from torch import nn

from peft_kernel import PeftConfig, PeftModel, PeftWarning, get_peft_model
from peft_plugin_lora import LoraConfig


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.lin1(torch.relu(self.lin0(x))))


def fresh():
    torch.manual_seed(0)
    return MLP()


def trained(**kw):
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, **kw))
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def test_unknown_target_modules():
    with pytest.raises(ValueError, match=r"Target modules \['nope'\] not found"):
        get_peft_model(fresh(), LoraConfig(target_modules=["nope"]))


def test_unsupported_layer_type_names_module_type_and_supported():
    with pytest.raises(ValueError) as info:
        get_peft_model(fresh(), LoraConfig(target_modules=["norm"]))
    message = str(info.value)
    assert "'norm'" in message and "torch.nn.modules.normalization.LayerNorm" in message
    assert "torch.nn.Linear" in message and "register_layer_mapping" in message


def test_shape_mismatch_raises_and_changes_nothing(tmp_path):
    trained(r=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False))
    before = snapshot(model)
    with pytest.raises(ValueError, match="Size mismatch.*lin0.lora_A.weight"):
        model.load_adapter(str(tmp_path), adapter_name="default", _created=True)
    assert_unchanged(model, before)
    assert config["r"] == 4


def test_ignore_mismatched_sizes_skips_with_warning(tmp_path):
    trained(r=4).save_pretrained(tmp_path)
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0", "lin1"], r=2))
    with pytest.warns(PeftWarning, match="mismatched size"):
        model.load_adapter(str(tmp_path), "default", _created=True, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_safetensors_file(tmp_path, damage):
    trained().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(fresh(), str(tmp_path))


def test_missing_directory():
    with pytest.raises(ValueError, match="Can't find adapter_config.json"):
        PeftModel.from_pretrained(fresh(), "/nonexistent/adapter")


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_checkpoints_load_only_weights(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path))
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded(x), model(x))
    with open(tmp_path / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": Boom()}, fh)
    with pytest.raises(ValueError, match="weights_only=True"):
        PeftModel.from_pretrained(fresh(), str(tmp_path))


def test_merging_twice_applies_once_and_warns():
    model = trained()
    x = torch.randn(3, 6)
    expected = model(x)
    model.merge_adapter()
    with pytest.warns(PeftWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_unmerge_without_merge_warns_and_changes_nothing():
    model = trained()
    before = snapshot(model)
    with pytest.warns(PeftWarning, match="nothing to unmerge"):
        model.unmerge_adapter()
    assert_unchanged(model, before)


def test_adapter_names_with_dots_or_prefix():
    model = trained()
    with pytest.raises(ValueError, match="must not contain '.'"):
        model.add_adapter("a.b", LoraConfig(target_modules=["lin0"]))
    with pytest.warns(PeftWarning, match="contains the prefix"):
        model.add_adapter("lora", LoraConfig(target_modules=["lin0"]))


def test_add_adapter_failure_rolls_back():
    model = trained()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not found"):
        model.add_adapter("second", LoraConfig(target_modules=["missing"]))
    assert "second" not in model.peft_config
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["lin0"]))


def test_add_adapter_of_another_method_is_refused():
    model = trained()
    other = copy.copy(LoraConfig(target_modules=["lin0"]))
    other.peft_type = "SOMETHING_ELSE"
    with pytest.raises(ValueError, match="Cannot add a SOMETHING_ELSE adapter"):
        model.add_adapter("x", other)


def test_unknown_config_keys_are_dropped_with_warning(tmp_path):
    trained().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["from_the_future"] = 3
    path.write_text(json.dumps(data))
    with pytest.warns(PeftWarning, match="from_the_future"):
        config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, LoraConfig) and not hasattr(config, "from_the_future")


def test_invalid_rank():
    with pytest.raises(ValueError, match="positive"):
        LoraConfig(r=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = trained()
    model.save_pretrained(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    perturbed = trained(r=2)
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        perturbed.save_pretrained(tmp_path)
    after = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    assert after == before  # nothing half-written, no temp files left


def test_save_to_a_file_path(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="should be a directory"):
        trained().save_pretrained(str(target))


def test_mixed_batch_errors():
    model = trained()
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="for inference"):
        model(x, adapter_names=["default", "default"])
    model.eval()
    with pytest.raises(ValueError, match="2 samples"):
        model(x, adapter_names=["default"])
    with pytest.raises(ValueError, match="Unknown adapter names"):
        model(x, adapter_names=["default", "nope"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(x, adapter_names=["default", "default"])


def test_set_adapter_unknown_and_several():
    model = trained()
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="one adapter name"):
        model.set_adapter(["default"])


def test_merge_blocked_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["0"], lora_bias=True))
    before = snapshot(peft_model)
    with pytest.raises(ValueError, match="lora_bias"):
        peft_model.merge_adapter()
    assert_unchanged(peft_model, before)
