"""transformers' adapter API on a PreTrainedModel, backed by peft-kernel: add_adapter, set_adapter,
disable_adapters / enable_adapters, active_adapters, load_adapter, save_pretrained, delete_adapter,
and AutoModelForCausalLM.from_pretrained(<adapter directory>)."""

from __future__ import annotations

import torch
from _ecosystem import hf_peft_causal_logits, load_llama, logits
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def random_lora(**kwargs) -> LoraConfig:
    return LoraConfig(r=4, init_lora_weights=False, **{"target_modules": ["q_proj", "v_proj"], **kwargs})


def test_add_set_disable_enable_delete(llama_dir):
    model = load_llama(llama_dir)
    base = logits(model)
    torch.manual_seed(0)
    model.add_adapter(random_lora(), adapter_name="a")
    assert model.active_adapters() == ["a"]
    with_a = logits(model)
    assert not torch.allclose(with_a, base)
    model.disable_adapters()
    torch.testing.assert_close(logits(model), base)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), with_a)

    model.add_adapter(random_lora(target_modules=["q_proj"]), adapter_name="b")
    assert model.active_adapters() == ["b"]  # add_adapter activates the new one
    with_b = logits(model)
    assert not torch.allclose(with_b, with_a)
    model.set_adapter("a")
    assert model.active_adapters() == ["a"]
    torch.testing.assert_close(logits(model), with_a)

    model.delete_adapter("a")
    assert set(model.peft_config) == {"b"}
    model.set_adapter("b")
    torch.testing.assert_close(logits(model), with_b)
    model.delete_adapter("b")
    torch.testing.assert_close(logits(model), base)


def test_save_pretrained_writes_an_adapter_hf_peft_loads(llama_dir, tmp_path, hf_peft):
    model = load_llama(llama_dir)
    torch.manual_seed(0)
    model.add_adapter(random_lora(), adapter_name="default")
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    theirs = hf_peft_causal_logits(hf_peft, llama_dir, str(tmp_path / "adapter"), str(tmp_path / "hf.pt"))
    torch.testing.assert_close(theirs, logits(model), atol=1e-5, rtol=0)


def test_load_adapter_and_auto_model_from_an_adapter_directory(llama_dir, tmp_path):
    torch.manual_seed(1)
    trained = get_peft_model(load_llama(llama_dir), random_lora())
    trained.save_pretrained(tmp_path / "adapter")
    expected = logits(trained)

    model = load_llama(llama_dir)
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="x")
    assert model.active_adapters() == ["x"]
    torch.testing.assert_close(logits(model), expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # inference by default

    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # base from base_model_name_or_path
    torch.testing.assert_close(logits(auto), expected, atol=1e-6, rtol=0)


def test_load_adapter_with_modules_to_save(llama_dir, tmp_path):
    torch.manual_seed(2)
    trained = get_peft_model(load_llama(llama_dir), random_lora(modules_to_save=["lm_head"]))
    with torch.no_grad():
        trained.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    trained.save_pretrained(tmp_path / "adapter")
    model = load_llama(llama_dir)
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="default")
    torch.testing.assert_close(logits(model), logits(trained), atol=1e-6, rtol=0)
