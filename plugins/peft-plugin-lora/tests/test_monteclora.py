"""MonteCLoRA (``monteclora_config``): in training, A is a learned mixture of noisy copies;
outside training plain LoRA. Against HF PEFT (same seed: same priors and noise draws, so the
same training outputs and gradients; eval outputs merged and unmerged; checkpoints both ways)
and against the math (the Dirichlet KL is torch's; gradients of the priors)."""

from __future__ import annotations

import math

import _lora_models as M
import pytest
import torch

from peft_kernel.testing.differential import (
    assert_checkpoints_load_both_ways,
    assert_matches_oracle,
    assert_same_initial_state,
    assert_same_training,
    perturb,
    run,
)
from peft_plugin_lora import MontecloraConfig

hf_peft = pytest.importorskip("peft")

X = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
SETTINGS = dict(num_samples=3, buffer_size=2, sample_scaler=0.05)  # refills within a few steps
net = M.qo


def pair(perturbed: bool = True, **settings):
    hf, ours = M.variant_pair("monteclora_config", MontecloraConfig(**{**SETTINGS, **settings}))
    if perturbed:
        perturb(hf)
        ours.load_state_dict(hf.state_dict())
    return hf.eval(), ours.eval()


def test_same_seed_gives_hf_priors_and_checkpoint(tmp_path):
    hf, ours = pair(perturbed=False)
    assert_same_initial_state(hf, ours)
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    assert_checkpoints_load_both_ways(hf, ours, net, X, tmp_path)


def test_eval_is_plain_lora_as_in_hf_merged_and_unmerged():
    hf, ours = pair()
    assert_matches_oracle(hf, ours, X, run(net(), X))


def test_training_draws_outputs_and_gradients_match_hf():
    hf, ours = pair()
    assert_same_training(hf, ours, X, steps=5)  # five steps: two refills of the two-step noise buffer


def test_training_is_a_mixture_of_noisy_copies_of_a():
    _, ours = pair()
    layer = ours.base_model.model.q.train()
    sampler = layer.lora_monteclora_sampler["default"]
    draw = sampler.next_draw()
    sampler._next -= 1  # the layer takes the same draw next
    noise, weights = sampler(draw)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mixed = sum(w * (A + n.T) for w, n in zip(weights, noise, strict=True))
    expected = layer.get_base_layer()(X) + 2.0 * X @ mixed.T @ B.T
    torch.testing.assert_close(layer(X), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert (mixed - A).abs().max() > 0


def test_variational_loss_uses_the_true_dirichlet_kl():
    _, ours = pair()
    ours.train()
    ours(X)
    sampler = ours.base_model.model.q.lora_monteclora_sampler["default"]
    alpha = sampler.expert_weights_prior.exp()
    dirichlet = torch.distributions.Dirichlet
    kl = torch.distributions.kl_divergence(dirichlet(alpha), dirichlet(torch.full((3,), 0.1)))
    assert kl > 0
    with torch.no_grad():  # the same sampler with the Dirichlet prior as its own: only the KL term goes
        saved = sampler.expert_weights_prior.clone()
        full = sampler.variational_loss()
        sampler.expert_weights_prior.fill_(math.log(0.1))
        without = sampler.variational_loss()
        sampler.expert_weights_prior.copy_(saved)
    torch.testing.assert_close(full - without, 1e-5 * kl)
    ours.eval()
    assert ours._get_monteclora_loss() == 0.0


def hf_and_ours_losses(**settings):
    hf, ours = pair(**settings)
    for model in (hf, ours):
        model.train()
        torch.manual_seed(0)
        model(X)
    return hf.base_model._get_monteclora_loss(), ours._get_monteclora_loss()


def test_loss_matches_hf_where_the_dirichlet_term_vanishes():
    hf, ours = pair(use_entropy=True)
    with torch.no_grad():
        for model in (hf, ours):
            for module in model.modules():
                if hasattr(module, "expert_weights_prior"):
                    module.expert_weights_prior.fill_(math.log(0.1))  # α = the prior: both KLs are 0
    for model in (hf, ours):
        model.train()
        torch.manual_seed(0)
        model(X)
    torch.testing.assert_close(ours._get_monteclora_loss(), hf.base_model._get_monteclora_loss())


@pytest.mark.xfail(strict=True, reason="HF PEFT 0.21.2's MontecloraSampler.dirichlet_kl adds Σ log Γ(α_i) − "
                                       "Σ log Γ(β_i) where KL(Dir(α) ‖ Dir(β)) subtracts it, so its 'KL' can be "
                                       "negative (−10.2 for α = (0.5, 1.2, 2), β = 0.1; the true value is 2.34)")
def test_loss_matches_hf():
    theirs, mine = hf_and_ours_losses()
    torch.testing.assert_close(mine, theirs)


def test_gradcheck_priors():
    _, ours = pair()
    sampler = ours.base_model.model.q.lora_monteclora_sampler["default"].double()
    draw = tuple(t.double() for t in sampler.next_draw())

    def out(std_prior, expert_prior):
        return torch.func.functional_call(sampler, {"std_prior": std_prior, "expert_weights_prior": expert_prior},
                                          (draw,), strict=False)

    params = (sampler.std_prior.detach().clone().requires_grad_(),
              sampler.expert_weights_prior.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(out, params)
