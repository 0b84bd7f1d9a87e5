"""TRL's SFTTrainer with peft-kernel: given a LoraConfig (TRL wraps the model) or an already
wrapped model; the adapter it saves loads in HF PEFT and computes the same."""

from __future__ import annotations

import os

import datasets
import pytest
import torch
from _ecosystem import hf_peft_causal_logits, load_llama, logits, token_dataset, tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from trl import SFTConfig, SFTTrainer


def sft_config(out) -> SFTConfig:
    return SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                     bf16=False, save_strategy="no")


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("how", ["peft_config", "wrapped_model"])
def test_sft_trainer_saves_an_adapter_hf_peft_loads(llama_dir, tmp_path, hf_peft, how):
    text = datasets.Dataset.from_dict({"text": token_dataset()["text"]})
    torch.manual_seed(0)
    if how == "peft_config":
        trainer = SFTTrainer(model=load_llama(llama_dir), args=sft_config(tmp_path / "out"), train_dataset=text,
                             processing_class=tokenizer(), peft_config=lora_config())
    else:
        model = get_peft_model(load_llama(llama_dir), lora_config())
        trainer = SFTTrainer(model=model, args=sft_config(tmp_path / "out"), train_dataset=text,
                             processing_class=tokenizer())
    assert isinstance(trainer.model, PeftModel)
    before = logits(trainer.model)
    trainer.train()
    after = logits(trainer.model)
    assert not torch.allclose(before, after)
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert "model.safetensors" not in files
    assert "trl" in (tmp_path / "adapter" / "README.md").read_text()  # TRL's tags reach the card
    theirs = hf_peft_causal_logits(hf_peft, llama_dir, str(tmp_path / "adapter"), str(tmp_path / "hf.pt"))
    torch.testing.assert_close(theirs, after, atol=1e-5, rtol=0)
