"""Prompt-tuning specifics: config validation, the three initialisations, training."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import peft_kernel
from peft_kernel import PeftModel, PeftWarning, get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_plugin_prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["answer the question politely", "the answer is yes", "no it is not"],
                                  trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    root = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(root / "sub")
    return root


def text_config(tokenizer_dir, **kw):
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text="answer the question politely",
                              tokenizer_name_or_path=str(tokenizer_dir), tokenizer_kwargs={"subfolder": "sub"}, **kw)


def test_registered_through_the_entry_point():
    spec = peft_kernel.plugins.manager().method("PROMPT_TUNING")
    assert spec.config_cls is PromptTuningConfig and spec.model_cls is PromptEmbedding
    assert spec.is_prompt_learning
    assert peft_kernel.get_peft_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}).num_virtual_tokens == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "tokenizer_name_or_path"),
    ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "x"}, "prompt_tuning_init_text"),
    ({"tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
    ({"prompt_tuning_init": "SAMPLE_VOCAB", "tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
    ({"prompt_tuning_init": "GLOVE"}, "prompt_tuning_init must be one of"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuningConfig(num_virtual_tokens=2, **kwargs)


def test_config_round_trip(tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB")
    assert config.prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["prompt_tuning_init"] == "SAMPLE_VOCAB" and data["peft_type"] == "PROMPT_TUNING"
    loaded = peft_kernel.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PromptTuningConfig) and loaded.prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB


def test_text_init_forwards_tokenizer_kwargs(tokenizer_dir):
    model = get_peft_model(M.llama(), text_config(tokenizer_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, subfolder="sub")
    ids = tokenizer("answer the question politely")["input_ids"]
    assert len(ids) == 4
    expected = model.word_embeddings.weight[ids + ids[:1]]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)
    broken = text_config(tokenizer_dir)
    broken.tokenizer_kwargs = None  # the tokenizer lives in a subfolder: without the kwargs it is not found
    with pytest.raises((OSError, ValueError)):
        get_peft_model(M.llama(), broken)


def test_trust_remote_code_is_never_forwarded(tokenizer_dir):
    config = text_config(tokenizer_dir)
    config.tokenizer_kwargs = {"subfolder": "sub", "trust_remote_code": True}
    with pytest.warns(PeftWarning, match="trust_remote_code"):
        get_peft_model(M.llama(), config)
    assert config.tokenizer_kwargs == {"subfolder": "sub", "trust_remote_code": True}, "config must not be mutated"


def test_loading_a_text_initialised_adapter_needs_no_tokenizer(tokenizer_dir, tmp_path):
    source = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, source)
    model = get_peft_model(M.llama(), text_config(source))
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(source)
    loaded = PeftModel.from_pretrained(M.llama(), tmp_path / "adapter")
    assert torch.equal(
        loaded.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].embedding.weight
    )


def test_sample_vocab_uses_vocabulary_rows():
    model = get_peft_model(M.llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                         prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.prompt_encoder["default"].embedding.weight
    vocab = model.word_embeddings.weight
    for row in table:
        assert (vocab == row).all(dim=1).any()


def test_seq2seq_table_holds_both_stacks():
    model = get_peft_model(M.t5(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    assert model.prompt_encoder["default"].embedding.weight.shape == (6, 32)
    out = model(input_ids=M.ids(), labels=M.ids(length=4, seed=1))
    assert out.logits.shape == (2, 4, M.VOCAB) and out.encoder_last_hidden_state.shape[1] == 9


def test_only_the_table_trains():
    """(Training itself: the kernel's training-path kit, test_training.py.)"""
    model = get_peft_model(M.llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 4 * 32 and total == trainable + sum(p.numel() for p in M.llama().parameters())


def test_word_embeddings_are_exposed_like_hf():
    model = get_peft_model(M.bert_cls(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    assert model.word_embeddings is model.base_model.bert.embeddings.word_embeddings
    assert model.modules_to_save == {"classifier", "score"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu(tokenizer_dir, tmp_path):
    model = get_peft_model(M.llama().cuda(), text_config(tokenizer_dir))
    table = model.prompt_encoder["default"].embedding.weight
    assert table.device.type == "cuda" and table.dtype == torch.float32
    x = M.ids().cuda()
    out = model.generate(input_ids=x, max_new_tokens=3, do_sample=False)
    assert out.device.type == "cuda" and out.shape == (2, 9)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(M.llama().cuda(), tmp_path, low_cpu_mem_usage=True)
    assert loaded.prompt_encoder["default"].embedding.weight.device.type == "cuda"
    assert torch.equal(loaded.generate(input_ids=x, max_new_tokens=3, do_sample=False), out)
    half = get_peft_model(M.llama().cuda().half(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert half.prompt_encoder["default"].embedding.weight.dtype == torch.float32  # fp32 table, cast at use
    assert half(input_ids=x).logits.dtype == torch.float16


def test_seq2seq_decoding_by_hand_with_encoder_outputs():
    model = get_peft_model(M.t5(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    x, mask = M.ids(), torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    decoder_ids = M.ids(length=2, seed=4)
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask, decoder_input_ids=decoder_ids)
        encoded = (full.encoder_last_hidden_state,)
        by_hand = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(by_hand.logits, full.logits)
