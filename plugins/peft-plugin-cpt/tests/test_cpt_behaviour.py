"""CPT specifics: config validation, the projection bound, which rows train, the loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import peft_kernel
from peft_kernel import get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_plugin_cpt import CPTConfig, CPTEmbedding

pytest.importorskip("transformers")


def cpt(**kw):
    kw = {"task_type": "CAUSAL_LM", "cpt_token_ids": [5, 6, 7, 8, 9], "cpt_tokens_type_mask": [1, 2, 3, 4, 0], **kw}
    return get_peft_model(M.llama(), CPTConfig(**kw))


def test_registered_and_validated():
    spec = peft_kernel.plugins.manager().method("CPT")
    assert spec.config_cls is CPTConfig and spec.model_cls is CPTEmbedding and spec.is_prompt_learning
    config = CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[4, 5, 6], num_virtual_tokens=10)
    assert config.num_virtual_tokens == 3 and config.cpt_mask == [1, 1, 1] and config.cpt_tokens_type_mask == [1, 1, 1]
    for kwargs, message in [({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
                            ({"cpt_token_ids": [1, 2], "cpt_mask": [1]}, "same length"),
                            ({"opt_weighted_loss_type": "linear"}, "opt_weighted_loss_type")]:
        with pytest.raises(ValueError, match=message):
            CPTConfig(**{"task_type": "CAUSAL_LM", **kwargs})


def test_corrections_stay_within_their_bounds_and_label_rows_never_train():
    model = cpt(opt_projection_epsilon=0.4, opt_projection_format_epsilon=0.2)
    encoder = model.prompt_encoder["default"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.delta_embedding.weight"]
    with torch.no_grad():
        encoder.delta_embedding.weight.copy_(torch.randn(5, 32) * 3)
        encoder.delta_embedding.weight[0] *= 1e-3  # inside its ball: left alone
        small = encoder.delta_embedding.weight[0].clone()
    model.train()
    loss = model(input_ids=M.ids(), labels=M.ids(seed=3)).loss
    scale = math.sqrt(32 / 2048)
    norms = encoder.delta_embedding.weight.norm(dim=1)
    # types 2 (input), 3 (template), 4 (label) and 0: radii 0.4·s, 0.2·s and 1e-10
    torch.testing.assert_close(norms[1:], torch.tensor([0.4 * scale, 0.2 * scale, 1e-10, 1e-10]))
    torch.testing.assert_close(encoder.delta_embedding.weight[0], small)
    loss.backward()
    grad = encoder.delta_embedding.weight.grad
    assert grad[:3].abs().sum(dim=1).gt(0).all() and not grad[3:].any()  # types 4 (label) and 0 do not train


def test_loss_by_hand():
    """Targets: the prompt's label token (type 4) and the input (type 4 + 4 = 8, the last example);
    with decay 0.5 the prompt's label weighs half as much."""
    model = cpt(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    x, labels = M.ids(1, 4), M.ids(1, 4, seed=3)
    with torch.no_grad():
        out = model(input_ids=x, labels=labels)
    logits = out.logits[0]
    terms = [(3 - 1, 8, 0.5)] + [(5 + i - 1, int(labels[0, i]), 1.0) for i in range(4)]  # (position, target, weight)
    expected = torch.stack([w * F.cross_entropy(logits[p], torch.tensor(t)) for p, t, w in terms]).mean()
    torch.testing.assert_close(out.loss, expected)
    with torch.no_grad():  # input_type_mask 0 for the first two input tokens: not targets
        masked = model(input_ids=x, labels=labels, input_type_mask=torch.tensor([[0, 0, 4, 4]])).loss
    expected = torch.stack([w * F.cross_entropy(logits[p], torch.tensor(t)) for p, t, w in terms[:1] + terms[3:]])
    torch.testing.assert_close(masked, expected.mean())
