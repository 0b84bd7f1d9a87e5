"""The task classes name their inputs as HF PEFT's do, so that tools reading ``forward``'s
signature work with peft-kernel even where the name ``peft`` is HF PEFT (as here): transformers'
Trainer keeps the dataset columns the model takes and finds the label names."""

from __future__ import annotations

import inspect

import peft as hf_peft
import pytest
import torch
import transformers

import peft_kernel
from peft_kernel import get_peft_model
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoraConfig

TASK_CLASSES = ["PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
                "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction"]


@pytest.mark.parametrize("name", TASK_CLASSES)
def test_forward_signature_is_hf_peft_s(name):
    ours = inspect.signature(getattr(peft_kernel, name).forward)
    theirs = inspect.signature(getattr(hf_peft, name).forward)
    assert list(ours.parameters) == list(theirs.parameters)
    assert transformers.utils.find_labels(getattr(peft_kernel, name)) == transformers.utils.find_labels(
        getattr(hf_peft, name))


def tiny_llama():
    return tiny_models.llama(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)


def test_named_inputs_reach_the_base_model():
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1]])
    with torch.no_grad():
        expected = model.get_base_model()(ids, attention_mask=mask, labels=ids)
        for out in (model(ids, mask, labels=ids), model(input_ids=ids, attention_mask=mask, labels=ids)):
            torch.testing.assert_close(out.logits, expected.logits)
            torch.testing.assert_close(out.loss, expected.loss)
        hidden = model(input_ids=ids, output_hidden_states=True, return_dict=True).hidden_states
    assert len(hidden) == 2


def test_trainer_keeps_the_columns_the_model_takes(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    rows = [{"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "labels": [1, 2, 3, 4], "text": "a b c d"}] * 4
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          save_strategy="no", report_to=[])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    assert trainer.label_names == ["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert trainer.train().training_loss > 0
