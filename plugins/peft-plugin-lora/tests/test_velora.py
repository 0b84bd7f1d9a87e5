"""VeLoRA (``velora_config``): plain LoRA forward; in training, A's weight gradient uses the
input rebuilt from rank-1 projections of its sub-tokens. Against HF PEFT (outputs, merged and
unmerged; training outputs, gradients and projection vectors; checkpoints both ways) and
against the math (A's gradient from the rebuilt input; exact where the rebuild is exact)."""

from __future__ import annotations

import copy

import _lora_models as M
import pytest
import torch

from peft_kernel import get_peft_model
from peft_kernel.testing.differential import (
    assert_checkpoints_load_both_ways,
    assert_matches_oracle,
    assert_same_initial_state,
    assert_same_training,
    perturb,
    run,
)
from peft_plugin_lora import LoraConfig, VeloraConfig

hf_peft = pytest.importorskip("peft")

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
CONFIG = M.QO_CONFIG
net = M.qo


def pair(**velora):
    hf, ours = M.variant_pair("velora_config", VeloraConfig(**velora))
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    return hf.eval(), ours.eval()


def test_same_seed_gives_hf_random_projection_and_checkpoint(tmp_path):
    hf, ours = pair(num_groups=5, init_type="random")  # 16 features: groups of 4, the last one padded
    assert_same_initial_state(hf, ours)
    assert ours.base_model.model.q.lora_velora_embed["default"].shape == (4,)
    assert_checkpoints_load_both_ways(hf, ours, net, X, tmp_path)


def test_same_outputs_as_hf_merged_and_unmerged():
    hf, ours = pair(num_groups=4)
    assert_matches_oracle(hf, ours, X, run(net(), X))


@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once"])
def test_training_matches_hf(init_type):
    hf, ours = pair(num_groups=3, scale=0.7, init_type=init_type)
    assert_same_training(hf, ours, X[:, :3] * torch.arange(1, 4.0)[:, None, None], steps=3)
    for name in ("q", "o"):
        theirs = getattr(hf.base_model.model, name).lora_velora_embed["default"]
        mine = getattr(ours.base_model.model, name).lora_velora_embed["default"]
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(mine, theirs)


def grads(model, x):
    model.train()
    x = x.clone().requires_grad_()
    model(x).square().sum().backward()
    layer = model.base_model.model.q
    return layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad, x.grad


def test_a_gradient_uses_the_rebuilt_input_and_the_rest_is_exact():
    _, ours = pair(num_groups=4, scale=1.5, init_type="random")
    plain = get_peft_model(net(), LoraConfig(**CONFIG))
    plain.load_state_dict(ours.state_dict(), strict=False)
    grad_A, grad_B, grad_x = grads(ours, X)
    exact_A, exact_B, exact_x = grads(plain, X)
    torch.testing.assert_close(grad_B, exact_B)
    torch.testing.assert_close(grad_x, exact_x)
    # the math: A's gradient is gᵀ x̃, x̃ the sub-tokens' projections on v times v, times scale
    layer = ours.base_model.model.q
    v = layer.lora_velora_embed["default"]
    tokens = X.reshape(-1, 16)
    rebuilt = ((tokens.reshape(-1, 4, 4) @ v)[:, :, None] * v).reshape(-1, 16) * 1.5
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.enable_grad():
        after_A = (tokens @ A.T).detach().requires_grad_()
        out = ours.base_model.model.o(torch.relu(layer.get_base_layer()(tokens) + 2.0 * after_A @ B.T))
        (g,) = torch.autograd.grad(out.square().sum(), after_A)
    torch.testing.assert_close(grad_A, g.T @ rebuilt)
    assert (grad_A - exact_A).abs().max() > 1e-3  # a real approximation on this input


def test_a_gradient_is_exact_when_sub_tokens_are_multiples_of_the_projection():
    _, ours = pair(num_groups=4, scale=1.0)  # batch_average: v = the mean sub-token, direction u
    plain = get_peft_model(net(), LoraConfig(**CONFIG))
    plain.load_state_dict(ours.state_dict(), strict=False)
    u = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = (torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(2))[..., None] + 0.1) * u  # (…, 4 groups, 4)
    x = x.reshape(3, 5, 16)
    torch.testing.assert_close(grads(ours, x)[0], grads(plain, x)[0], atol=1e-5, rtol=1e-5)


def test_projection_changes_only_in_training_with_gradients():
    _, ours = pair(num_groups=4)
    before = copy.deepcopy(ours.base_model.model.q.lora_velora_embed["default"])
    run(ours, X)  # eval
    ours.train()
    with torch.no_grad():
        ours(X)
    assert torch.equal(ours.base_model.model.q.lora_velora_embed["default"], before)
    ours(X)
    assert not torch.equal(ours.base_model.model.q.lora_velora_embed["default"], before)


def test_gradcheck_b_and_input():
    _, ours = pair(num_groups=4, init_type="random")
    layer = ours.base_model.model.q.double().train()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()

    def out(weight, x):
        return torch.func.functional_call(layer, {"lora_B.default.weight": weight}, (x,))

    assert torch.autograd.gradcheck(out, (B, X[0].double().requires_grad_()))
