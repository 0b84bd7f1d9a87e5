"""P-tuning specifics: config validation, the two prompt encoders, the loaded layout, training."""

from __future__ import annotations

import pytest
import torch

import peft_kernel
from peft_kernel import PeftModel, PeftWarning, get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_plugin_p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType

pytest.importorskip("transformers")


def test_registered_and_validated():
    spec = peft_kernel.plugins.manager().method("P_TUNING")
    assert spec.config_cls is PromptEncoderConfig and spec.model_cls is PromptEncoder and spec.is_prompt_learning
    config = PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="LSTM")
    assert config.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM
    with pytest.raises(ValueError, match="MLP, LSTM"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_num_layers"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=0)


def test_encoders_and_their_sizes():
    with pytest.warns(PeftWarning, match="encoder_num_layers=3 is ignored"):
        mlp = get_peft_model(M.llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                            encoder_num_layers=3))
    encoder = mlp.prompt_encoder["default"]
    assert mlp.peft_config["default"].encoder_hidden_size == 32  # defaults to token_dim
    assert [m.out_features for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)] == [32, 32, 32]
    lstm = get_peft_model(M.t5(), PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4,
                                                      encoder_reparameterization_type="LSTM", encoder_hidden_size=8,
                                                      encoder_num_layers=3, encoder_dropout=0.1))
    head = lstm.prompt_encoder["default"].lstm_head
    assert (head.num_layers, head.hidden_size, head.dropout, head.bidirectional) == (3, 8, 0.1, True)
    assert lstm.get_prompt(2).shape == (2, 8, 32)  # both stacks' virtual tokens, as in HF's table


def test_a_loaded_adapter_is_its_table_of_virtual_tokens(tmp_path):
    model = get_peft_model(M.llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(M.llama(), tmp_path)
    encoder = loaded.prompt_encoder["default"]
    assert encoder.mlp_head is None and encoder.lstm_head is None
    torch.testing.assert_close(encoder.embedding.weight, model.get_prompt_embedding_to_save("default"))
    x = M.ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
