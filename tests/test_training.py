"""prepare_model_for_kbit_training on a transformers model with quantized (toy) layers."""

import pytest
import torch

from peft_kernel import get_peft_model, prepare_model_for_kbit_training
from peft_kernel.plugins import manager, reset_manager
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoraConfig

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32):
    return tiny_models.llama(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1).to(dtype)


def test_freezes_everything_and_enables_checkpointing():
    model = prepare_model_for_kbit_training(tiny_llama())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.train()
    ids = torch.randint(0, 32, (2, 6))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()  # checkpointed blocks still reach the adapter
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_half_precision_non_quantized_params_are_upcast_only_for_quantized_models():
    from peft_kernel.testing.toy_quant import ToyBackendPlugin, quantize_linears

    reset_manager()
    try:
        manager().register(ToyBackendPlugin(), name="toy-backend")
        plain = prepare_model_for_kbit_training(tiny_llama(torch.bfloat16), use_gradient_checkpointing=False)
        assert plain.model.norm.weight.dtype == torch.bfloat16  # nothing quantized: left alone
        model = quantize_linears(tiny_llama(torch.bfloat16))
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        assert model.model.norm.weight.dtype == torch.float32
        assert model.model.layers[0].self_attn.q_proj.qweight.dtype == torch.int8
    finally:
        reset_manager()
