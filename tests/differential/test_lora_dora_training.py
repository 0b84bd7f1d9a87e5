"""DoRA in training mode against HF PEFT: the norm is computed without forming W + sBA and
nothing is kept between calls, so outputs and gradients must still match HF's, step after
step (the eval-mode outputs and gradients are compared in test_lora_models.py)."""

from __future__ import annotations

import pytest
import torch
from _models import assert_close, assert_state_dicts_close, make_inputs, pair_copy

CASES = [
    ("mlp", {"use_dora": True}),  # nn.Linear: the fast forward
    ("gpt2", {"use_dora": True, "target_modules": ["c_attn", "c_fc"]}),  # transformers Conv1D: the general path
]


def _loss(model, inputs):
    out = model(inputs["x"]) if list(inputs) == ["x"] else model(**inputs)
    out = out.logits if hasattr(out, "logits") else out
    return (out.float() ** 2).mean()


@pytest.mark.parametrize("model_name, overrides", CASES, ids=[c[0] for c in CASES])
def test_training_steps_match_hf(model_name, overrides):
    hf, ours = pair_copy(model_name, **overrides)
    inputs = make_inputs(model_name)
    optimizers = {}
    for name, model in (("hf", hf), ("ours", ours)):
        model.train()
        optimizers[name] = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):  # the second step runs on adapters the first one changed
        losses, grads = {}, {}
        for name, model in (("hf", hf), ("ours", ours)):
            torch.manual_seed(step)  # the same dropout masks in the base model
            loss = _loss(model, inputs)
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizers[name].step()
            optimizers[name].zero_grad()
        assert_close(losses["ours"], losses["hf"], f"loss at step {step}")
        assert grads["ours"].keys() == grads["hf"].keys()
        assert_state_dicts_close(grads["ours"], grads["hf"], f"gradients at step {step}", atol=1e-5, rtol=1e-4)
