"""KaSA (``kasa_config``): the base loses its r smallest singular components when the adapter
is added, and the update is s·B diag(d) A. Against HF PEFT (same seed: same truncated base
and same d; same weights: same outputs, merged and unmerged; checkpoints both ways) and
against the math."""

from __future__ import annotations

import _lora_models as M
import pytest
import torch
from torch import nn

from peft_kernel import get_peft_model
from peft_kernel.testing.differential import (
    assert_checkpoints_load_both_ways,
    assert_matches_oracle,
    assert_same_initial_state,
    perturb,
    run,
)
from peft_plugin_lora import KasaConfig, LoraConfig

hf_peft = pytest.importorskip("peft")

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
CONFIG = M.QO_CONFIG
net = M.qo


def pair():
    return M.variant_pair("kasa_config", KasaConfig())


def test_same_seed_gives_hf_initial_state_and_checkpoint(tmp_path):
    hf, ours = pair()
    assert_same_initial_state(hf, ours)  # truncated base weights and lora_diag included
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    assert_checkpoints_load_both_ways(hf, ours, net, X, tmp_path)


def test_same_outputs_as_hf_merged_and_unmerged():
    hf, ours = pair()
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    with hf.disable_adapter():
        truncated_base = run(hf, X)
    assert_matches_oracle(hf, ours, X, truncated_base)


def test_base_is_truncated_and_forward_is_the_math():
    model = get_peft_model(net(), LoraConfig(**CONFIG, kasa_config=KasaConfig()))
    perturb(model)
    layer, original = model.base_model.model.q, net().q.weight.detach()
    U, S, Vh = torch.linalg.svd(original, full_matrices=False)
    truncated = (U[:, :8] * S[:8]) @ Vh[:8]  # k = 12, r = 4
    torch.testing.assert_close(layer.get_base_layer().weight, truncated, atol=1e-5, rtol=0)
    A, B, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
    x = X[0]
    expected = x @ truncated.T + layer.get_base_layer().bias + 2.0 * x @ (B @ torch.diag(d) @ A).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_transformers_conv1d_is_truncated_in_out_in_orientation():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(12, 16))  # weight (in, out) = (16, 12)
    original = base[0].weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], fan_in_fan_out=True, kasa_config=KasaConfig()))
    perturb(model)
    S = torch.linalg.svdvals(original)
    assert torch.linalg.matrix_rank(model.base_model.model[0].get_base_layer().weight, atol=1e-4) == 8
    torch.testing.assert_close(torch.linalg.svdvals(model.base_model.model[0].get_base_layer().weight)[:8], S[:8])
    unmerged = run(model, X)
    model.merge_adapter()
    torch.testing.assert_close(run(model, X), unmerged, atol=1e-5, rtol=0)


def test_starts_as_the_truncated_base_and_lora_diag_trains():
    model = get_peft_model(net(), LoraConfig(**CONFIG, kasa_config=KasaConfig()))
    with model.disable_adapter():
        base = run(model, X)
    assert torch.equal(run(model, X), base)  # B = 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
        "base_model.model.q.lora_diag.default", "base_model.model.o.lora_diag.default"}


def test_gradcheck_lora_diag():
    model = get_peft_model(net(), LoraConfig(**CONFIG, kasa_config=KasaConfig())).double()
    perturb(model)
    layer = model.base_model.model.q
    d = layer.lora_diag["default"]

    def out(diag):
        return torch.func.functional_call(layer, {"lora_diag.default": diag}, (X[0].double(),))

    assert torch.autograd.gradcheck(out, (d.detach().clone().requires_grad_(),))


def test_kasa_loss_is_the_regularisers_and_matches_hf():
    hf, ours = pair()
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    expected = 0.0
    for layer in (ours.base_model.model.q, ours.base_model.model.o):
        A, B, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
        eye = torch.eye(4)
        expected = expected + 1e-4 * (d**2).sum() + 1e-3 * (torch.norm(B.T @ B - eye) + torch.norm(A @ A.T - eye))
    torch.testing.assert_close(ours._get_kasa_loss(), expected)
    torch.testing.assert_close(ours._get_kasa_loss(), hf.base_model._get_kasa_loss())
    ours._get_kasa_loss().backward()
    assert ours.base_model.model.q.lora_diag["default"].grad is not None


def test_refusals_leave_the_model_unchanged():
    with pytest.raises(ValueError, match="r < min"):
        get_peft_model(net(), LoraConfig(r=12, target_modules=["q"], kasa_config=KasaConfig()))
    with pytest.raises(ValueError, match="linear layers only"):
        get_peft_model(net(), LoraConfig(r=2, target_modules=["emb"], kasa_config=KasaConfig()))
    with pytest.raises(ValueError, match="cannot be combined"):
        LoraConfig(r=2, kasa_config=KasaConfig(), use_dora=True)
    model = get_peft_model(net(), LoraConfig(**CONFIG, kasa_config=KasaConfig()))
    with pytest.raises(ValueError, match="KaSA adapters cannot share"):
        model.add_adapter("plain", LoraConfig(**CONFIG))
    assert set(model.peft_config) == {"default"}
    model.add_adapter("other", LoraConfig(**CONFIG, kasa_config={"beta": 0.5}))
    assert model.peft_config["other"].kasa_config == KasaConfig(beta=0.5)
    with pytest.raises(ValueError, match="cannot combine KaSA"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="linear")
