"""Prefix-tuning specifics: config, the key/value layout on grouped-query models, inputs given
as embeddings, positions, decoding by hand, a refused gradient checkpointing. (Gradient
checkpointing, heads in modules_to_save and training: the training-path kit, test_training.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_plugin_prefix_tuning import PrefixEncoder, PrefixTuningConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def prefixed(model_fn=M.llama, **kw):
    kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, **kw}
    torch.manual_seed(1)
    model = get_peft_model(model_fn(), PrefixTuningConfig(**kw))
    with torch.no_grad():  # a trained prefix, not the initial one
        for param in model.prompt_encoder.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def test_registered_through_the_entry_point():
    spec = peft_kernel.plugins.manager().method("PREFIX_TUNING")
    assert spec.config_cls is PrefixTuningConfig and spec.model_cls is PrefixEncoder and spec.is_prompt_learning
    with pytest.raises(ValueError, match="init_weights"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")


def test_grouped_query_prefixes_fill_every_layer_of_the_cache():
    model = prefixed()
    cache = model.get_prompt(batch_size=2)
    assert isinstance(cache, transformers.Cache) and cache.get_seq_length() == 3
    assert len(cache.layers) == 2
    assert cache.layers[0].keys.shape == (2, 2, 3, 8)  # batch, key/value heads, virtual tokens, head dim
    config = model.peft_config["default"]
    assert config.encoder_hidden_size == config.token_dim == 16
    table = model.get_prompt_embedding_to_save("default")
    assert table.shape == (3, 2 * 2 * 16)
    torch.testing.assert_close(cache.layers[1].values[0, 1], table[:, 48:64].view(3, 2, 8)[:, 1])


def test_zero_init_and_missing_dimensions():
    model = get_peft_model(M.llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         init_weights="zero", prefix_projection=True))
    assert not model.get_prompt_embedding_to_save("default").any()
    with pytest.raises(ValueError, match="num_layers"):
        get_peft_model(nn.Sequential(nn.Embedding(10, 4)), PrefixTuningConfig(num_virtual_tokens=2, token_dim=4))


def test_outputs_keep_their_length_and_positions_move_past_the_prefixes():
    model = prefixed()
    x = M.ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        assert expected.shape == (2, 6, M.VOCAB)  # no extra positions: the prefixes are keys and values
        torch.testing.assert_close(model(inputs_embeds=model.word_embeddings(x)).logits, expected)
        # positions of the real tokens, as a caller counts them, move past the prefixes
        torch.testing.assert_close(model(input_ids=x, position_ids=torch.arange(6).unsqueeze(0)).logits, expected)
        shifted = model(input_ids=x, position_ids=torch.arange(1, 7).unsqueeze(0)).logits
    assert (shifted - expected).abs().max() > 1e-4


def test_decoding_by_hand_continues_from_the_returned_cache():
    model = prefixed()
    x, nxt = M.ids(length=4), M.ids(length=1, seed=2)
    with torch.no_grad():
        full = model(input_ids=torch.cat([x, nxt], dim=1)).logits[:, -1]
        first = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
        assert first.past_key_values.get_seq_length() == 3 + 4
        step = model(input_ids=nxt, attention_mask=torch.ones(2, 5, dtype=torch.long),
                     past_key_values=first.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full)


def test_gradient_checkpointing_without_cache_support_is_refused(monkeypatch):
    from transformers.modeling_layers import GradientCheckpointingLayer

    monkeypatch.delattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache", raising=False)
    model = prefixed()
    model.train()
    model.base_model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="Gradient checkpointing drops the key/value cache"):
        model(input_ids=M.ids(), labels=M.ids())


def test_a_model_without_a_cache_is_refused_clearly():
    class Plain(nn.Module):
        config = {"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 4}

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids=None):
            return self.embed(input_ids)

    model = get_peft_model(Plain(), PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="takes no key/value cache"):
        model(input_ids=torch.tensor([[1, 2]]))

