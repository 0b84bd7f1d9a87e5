"""AutoPeftModel and its task classes: ``from_pretrained(adapter_dir)`` builds the base model the
adapter names (``base_model_name_or_path``) and loads the adapter; differential against HF PEFT's
classes on the same directories."""

from __future__ import annotations

import peft as hf_peft
import pytest
import torch
import transformers

import peft_kernel
from peft_kernel import get_peft_model
from peft_plugin_lora import LoraConfig

LLAMA = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, pad_token_id=0)
T5 = dict(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0)
IDS = torch.tensor([[1, 5, 9, 3], [2, 2, 7, 11]])

# auto class, task type, base model class, its config
TASKS = {
    "AutoPeftModelForCausalLM": ("CAUSAL_LM", transformers.LlamaForCausalLM, LLAMA),
    "AutoPeftModelForSequenceClassification": ("SEQ_CLS", transformers.LlamaForSequenceClassification, LLAMA),
    "AutoPeftModelForTokenClassification": ("TOKEN_CLS", transformers.LlamaForTokenClassification, LLAMA),
    "AutoPeftModelForQuestionAnswering": ("QUESTION_ANS", transformers.LlamaForQuestionAnswering, LLAMA),
    "AutoPeftModelForFeatureExtraction": ("FEATURE_EXTRACTION", transformers.LlamaModel, LLAMA),
    "AutoPeftModelForSeq2SeqLM": ("SEQ_2_SEQ_LM", transformers.T5ForConditionalGeneration, T5),
}


def save_adapter(tmp_path, model_cls, config: dict, task_type) -> str:
    torch.manual_seed(0)
    model_cls(model_cls.config_class(**config)).save_pretrained(tmp_path / "base")
    base = model_cls.from_pretrained(tmp_path / "base")
    targets = ["q"] if model_cls is transformers.T5ForConditionalGeneration else ["q_proj"]
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(task_type=task_type, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


def first_output(model) -> torch.Tensor:
    model.eval()
    seq2seq = model.get_base_model().config.is_encoder_decoder
    with torch.no_grad():
        return model(input_ids=IDS, **({"decoder_input_ids": IDS} if seq2seq else {}))[0]


@pytest.mark.parametrize("auto_name", list(TASKS))
def test_task_classes_build_the_base_and_load_the_adapter(tmp_path, auto_name):
    task_type, model_cls, config = TASKS[auto_name]
    adapter = save_adapter(tmp_path, model_cls, config, task_type)
    ours = getattr(peft_kernel, auto_name).from_pretrained(adapter)
    theirs = getattr(hf_peft, auto_name).from_pretrained(adapter)
    assert type(ours).__name__ == type(theirs).__name__
    assert isinstance(ours.get_base_model(), model_cls)
    assert not any(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(first_output(ours), first_output(theirs), atol=1e-5, rtol=0)
    trainable = peft_kernel.AutoPeftModelForCausalLM if task_type == "CAUSAL_LM" else None
    if trainable is not None:
        model = trainable.from_pretrained(adapter, is_trainable=True)
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_auto_peft_model_reads_the_base_class_from_auto_mapping(tmp_path):
    adapter = save_adapter(tmp_path, transformers.LlamaForCausalLM, LLAMA, None)
    ours = peft_kernel.AutoPeftModel.from_pretrained(adapter)
    theirs = hf_peft.AutoPeftModel.from_pretrained(adapter)
    assert type(ours.get_base_model()) is transformers.LlamaForCausalLM
    torch.testing.assert_close(first_output(ours), first_output(theirs), atol=1e-5, rtol=0)


def test_wrong_class_for_the_task_is_refused_with_the_right_one_named(tmp_path):
    adapter = save_adapter(tmp_path, transformers.LlamaForCausalLM, LLAMA, "CAUSAL_LM")
    with pytest.raises(ValueError, match="load it with AutoPeftModelForCausalLM"):
        peft_kernel.AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    with pytest.raises(ValueError, match="AutoPeftModelFor"):
        peft_kernel.AutoPeftModel.from_pretrained(adapter)


def test_embeddings_grow_to_the_tokenizer_saved_with_the_adapter(tmp_path):
    from tokenizers import Tokenizer, models

    adapter = save_adapter(tmp_path, transformers.LlamaForCausalLM, LLAMA, "CAUSAL_LM")
    words = {f"w{i}": i for i in range(20)}  # 20 tokens for a 16-token base
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "w0")),
                                                     unk_token="w0")
    tokenizer.save_pretrained(adapter)
    ours = peft_kernel.AutoPeftModelForCausalLM.from_pretrained(adapter)
    theirs = hf_peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert ours.get_base_model().get_input_embeddings().weight.shape[0] == 20
    torch.testing.assert_close(first_output(ours), first_output(theirs), atol=1e-5, rtol=0)
