"""transformers' Trainer with a peft-kernel model, as a PEFT user writes it: default
TrainingArguments (only the run's length and save interval set), checkpoints holding the adapter
alone, resuming, keeping the best checkpoint, gradient checkpointing."""

from __future__ import annotations

import os

import pytest
import torch
from _ecosystem import hf_peft_causal_logits, load_llama, logits, token_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import peft_kernel

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def lora(base):
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4))


def args(out, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=5e-2, **kwargs)


def test_the_peft_name_is_peft_kernel():
    import peft

    assert peft.PeftModel is peft_kernel.PeftModel
    assert peft.LoraConfig is __import__("peft_plugin_lora").LoraConfig
    from transformers.trainer_utils import _is_peft_model

    assert _is_peft_model(get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(target_modules=["0"])))
    # names HF PEFT has and this env lacks import, and refuse to be used, saying what to do
    with pytest.raises(NotImplementedError, match="pip install peft-plugin-prefix-tuning"):
        peft.PrefixTuningConfig(num_virtual_tokens=2)
    with pytest.raises(AttributeError, match="compatibility package"):
        _ = peft.LoKrConfig


def test_default_arguments_train_and_checkpoint_only_the_adapter(llama_dir, tmp_path, hf_peft):
    model = lora(load_llama(llama_dir))
    before = logits(model)
    trainer = Trainer(model=model, args=args(tmp_path / "out"), train_dataset=token_dataset())
    result = trainer.train()
    assert result.global_step == 4
    after = logits(model)
    assert not torch.allclose(before, after)  # the adapter learned something
    for step in (2, 4):
        files = set(os.listdir(tmp_path / "out" / f"checkpoint-{step}"))
        assert ADAPTER_FILES <= files
        assert not {"model.safetensors", "pytorch_model.bin"} & files
    final = tmp_path / "out" / "checkpoint-4"
    # HF PEFT loads the checkpoint and computes what the trained model computes
    theirs = hf_peft_causal_logits(hf_peft, llama_dir, str(final), str(tmp_path / "hf.pt"))
    torch.testing.assert_close(theirs, after, atol=1e-5, rtol=0)
    # ... and so does peft-kernel, in a fresh model
    again = PeftModel.from_pretrained(load_llama(llama_dir), str(final))
    torch.testing.assert_close(logits(again), after, atol=1e-5, rtol=0)


def test_resume_from_checkpoint_continues_where_it_stopped(llama_dir, tmp_path):
    straight = lora(load_llama(llama_dir))
    Trainer(model=straight, args=args(tmp_path / "a"), train_dataset=token_dataset()).train()

    first = lora(load_llama(llama_dir))
    Trainer(model=first, args=args(tmp_path / "b", save_only_model=False), train_dataset=token_dataset()).train()
    resumed = lora(load_llama(llama_dir))  # fresh adapter: everything must come from checkpoint-2
    trainer = Trainer(model=resumed, args=args(tmp_path / "b"), train_dataset=token_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    torch.testing.assert_close(logits(resumed), logits(straight), atol=1e-5, rtol=0)
    assert all(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)


def test_load_best_model_at_end(llama_dir, tmp_path):
    model = lora(load_llama(llama_dir))
    train_args = args(tmp_path / "out", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                      metric_for_best_model="loss", greater_is_better=True)  # "best" = the first checkpoint
    trainer = Trainer(model=model, args=train_args, train_dataset=token_dataset(), eval_dataset=token_dataset(8))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = PeftModel.from_pretrained(load_llama(llama_dir), trainer.state.best_model_checkpoint)
    torch.testing.assert_close(logits(model), logits(best), atol=1e-6, rtol=0)
    latest = PeftModel.from_pretrained(load_llama(llama_dir), str(tmp_path / "out" / "checkpoint-4"))
    assert not torch.allclose(logits(model), logits(latest))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(llama_dir, tmp_path, reentrant):
    plain = lora(load_llama(llama_dir))
    Trainer(model=plain, args=args(tmp_path / "a", save_strategy="no"), train_dataset=token_dataset()).train()
    checkpointed = lora(load_llama(llama_dir))
    train_args = args(tmp_path / "b", save_strategy="no", gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = Trainer(model=checkpointed, args=train_args, train_dataset=token_dataset())
    trainer.train()
    assert checkpointed.get_base_model().is_gradient_checkpointing
    torch.testing.assert_close(logits(checkpointed), logits(plain), atol=1e-5, rtol=0)


def test_labels_and_columns_come_from_the_named_forward(llama_dir, tmp_path):
    trainer = Trainer(model=lora(load_llama(llama_dir)), args=args(tmp_path / "out"), train_dataset=token_dataset())
    assert trainer.label_names == ["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "text" dropped, the rest kept
