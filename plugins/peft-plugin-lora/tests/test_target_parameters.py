"""LoRA on bare nn.Parameters (``target_parameters``): MoE expert stacks, several parameters of
one module, against HF PEFT and against the math."""

from __future__ import annotations

import copy

import _lora_models as M
import pytest
import torch

from peft_kernel import NoMatchingPeftModuleError, PeftModel, get_peft_model, inject_adapter_in_model
from peft_kernel.testing import perturb
from peft_plugin_lora import LoraConfig, ParamWrapper

hf_peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore")

PARAMS = ["experts.gate_up_proj", "experts.down_proj", "router.weight"]


def both(model_fn, **config):
    torch.manual_seed(1)
    ours = get_peft_model(model_fn(), LoraConfig(init_lora_weights=False, **config))
    torch.manual_seed(1)
    theirs = hf_peft.get_peft_model(model_fn(), hf_peft.LoraConfig(init_lora_weights=False, **config))
    return ours.eval(), theirs.eval()


def lora_state(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_same_factors_keys_and_outputs_as_hf(transposed):
    """Two parameters of one module (nested wrappers) and a 2-D one elsewhere: the same random
    draws, state-dict keys and outputs as HF PEFT, unmerged and merged."""
    ours, theirs = both(lambda: M.moe(transposed), target_parameters=PARAMS, r=2, lora_alpha=6,
                        rank_pattern={"down_proj": 3})
    mine, hf = lora_state(ours), lora_state(theirs)
    assert sorted(mine) == sorted(hf)
    for key in mine:
        torch.testing.assert_close(mine[key], hf[key], atol=0, rtol=0)
    x = torch.randn(2, 5, 8)
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_delta_is_the_math():
    """ΔW_e = s·B_e A_e per expert, with A_e = rows e·r..e·r+r-1 of lora_A and B_e = columns
    e, E+e, ... of lora_B; written out by hand here, compared with the merged parameter."""
    model = get_peft_model(M.moe(), LoraConfig(target_parameters=["experts.gate_up_proj"], r=2, lora_alpha=3,
                                               init_lora_weights=False))
    layer = model.base_model.model.experts
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    E, r, s = 3, 2, 3 / 2
    before = layer.parameter().detach().clone()
    model.merge_adapter()
    for e in range(E):
        A_e = A[e * r:(e + 1) * r]
        B_e = B[:, [j * E + e for j in range(r)]]
        torch.testing.assert_close(layer.parameter()[e] - before[e], s * B_e @ A_e)


def test_checkpoints_load_both_ways(tmp_path):
    ours, theirs = both(M.moe, target_parameters=PARAMS, r=2)
    perturb(ours, seed=3)
    perturb(theirs, seed=4)
    x = torch.randn(3, 8)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "hf")
    from_ours = hf_peft.PeftModel.from_pretrained(M.moe(), str(tmp_path / "ours")).eval()
    from_hf = PeftModel.from_pretrained(M.moe(), str(tmp_path / "hf")).eval()
    torch.testing.assert_close(from_ours(x), ours(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_hf(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert set(from_hf.peft_config["default"].target_parameters) == set(PARAMS)


def test_training_reaches_the_factors_and_leaves_the_parameter():
    model = get_peft_model(M.moe(), LoraConfig(target_parameters=PARAMS[:2], r=2))
    experts = model.base_model.model.experts.get_base_layer()
    weight = experts.gate_up_proj
    model(torch.randn(2, 8)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None for n, g in grads.items() if "lora_B" in n)  # B is zero at init: A gets none yet
    assert experts.gate_up_proj is weight and weight.grad is None  # the registered parameter is back, frozen


def test_unload_and_merge_and_unload():
    model = get_peft_model(M.moe(), LoraConfig(target_parameters=PARAMS, r=2, init_lora_weights=False))
    x = torch.randn(3, 8)
    base = M.moe()(x)
    adapted = model(x)
    assert (adapted - base).abs().max() > 1e-3
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.experts) is M.Experts
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
    plain = model.unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(x), base)


def test_second_adapter_reuses_the_wrappers_and_matches_hf():
    ours, theirs = both(M.moe, target_parameters=PARAMS[:2], r=2)
    torch.manual_seed(5)
    ours.add_adapter("other", LoraConfig(target_parameters=PARAMS[:2], r=3, init_lora_weights=False))
    torch.manual_seed(5)
    theirs.add_adapter("other", hf_peft.LoraConfig(target_parameters=PARAMS[:2], r=3, init_lora_weights=False))
    wrappers = [m for m in ours.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 2 and all(w.has_adapter("other") for w in wrappers)
    ours.set_adapter("other")
    theirs.set_adapter("other")
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_bad_configurations_are_refused_before_any_change():
    model = get_peft_model(M.moe(), LoraConfig(target_parameters=PARAMS[:1]))
    before = str(model)
    with pytest.raises(ValueError, match="same ones"):
        model.add_adapter("other", LoraConfig(target_parameters=PARAMS[1:2]))
    assert str(model) == before and "other" not in model.peft_config
    refused = [
        (ValueError, "adapts as a module", dict(target_modules=["router"], target_parameters=["router.weight"])),
        (NoMatchingPeftModuleError, "matched no parameter", dict(target_parameters=["experts.nothing"])),
    ]
    for error, message, config in refused:
        base = M.moe()
        with pytest.raises(error, match=message):
            get_peft_model(base, LoraConfig(**config))
        assert not any(isinstance(m, ParamWrapper) for m in base.modules()), message
    with pytest.raises(ValueError, match="lora_dropout, use_dora"):
        LoraConfig(target_parameters=PARAMS, lora_dropout=0.1, use_dora=True)
    with pytest.raises(ValueError, match="state_dict"):
        inject_adapter_in_model(LoraConfig(target_parameters=PARAMS), M.moe(), state_dict={"a.lora_A.weight": None})
    with pytest.raises(TypeError, match="mixed adapter batches"):
        model = get_peft_model(M.moe(), LoraConfig(target_parameters=PARAMS)).eval()
        model(x=torch.randn(2, 8), adapter_names=["default", "__base__"])
