"""LoRA-GA (``init_lora_weights="lora_ga"``, ``preprocess_loraga``) against HF PEFT 0.21.2: the same
gradients, the same seeded factors and residual base for every direction and scale, the model
unchanged at the start, checkpoints both ways, the gradient cache; and the math on its own."""

from __future__ import annotations

import copy

import _lora_models as M
import pytest
import torch

from peft_kernel import PeftModel, get_base_model_state_dict, get_peft_model
from peft_kernel.testing.differential import assert_close, run
from peft_plugin_lora import LoraConfig, LoraGAConfig, preprocess_loraga

hf_peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def batch():
    ids = torch.randint(0, M.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def steps(model, count=2):
    def train_step():
        for _ in range(count):
            model(**batch()).loss.backward()
    return train_step


def config_kwargs(**ga):
    return dict(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=ga)


def build(library, **ga):
    """A LoRA-GA model of ``library`` (HF PEFT's ``peft`` module or None for ours), seeded alike."""
    kw = config_kwargs(**ga)
    torch.manual_seed(0)
    base = M.llama(1).eval()
    if library is None:
        config = LoraConfig(**copy.deepcopy(kw))
        preprocess_loraga(base, config, steps(base))
        return get_peft_model(base, config)
    config = library.LoraConfig(**{**kw, "lora_ga_config": library.LoraGAConfig(**ga)})
    library.preprocess_loraga(base, config, steps(base))
    return library.get_peft_model(base, config)


@pytest.mark.parametrize("ga", [
    {}, {"direction": "ArBr", "scale": "unit"}, {"direction": "A2rBr", "scale": "weight_svd"},
    {"direction": "random", "scale": "gd_scale"}, {"scale": "stable", "stable_gamma": 4},
], ids=["default", "ArBr-unit", "A2rBr-weight_svd", "random-gd_scale", "stable-gamma4"])
def test_same_factors_and_residual_base_as_hf(ga):
    torch.manual_seed(42)
    hf = build(hf_peft, **ga)
    torch.manual_seed(42)
    ours = build(None, **ga)
    theirs = hf.state_dict()
    for key, value in ours.state_dict().items():
        assert_close(value, theirs[key], key, atol=1e-5)
    with torch.no_grad():
        assert_close(run(ours, batch()["input_ids"]), run(hf, batch()["input_ids"]), "forward")


def test_starts_as_the_base_model_and_trains_along_the_gradient():
    torch.manual_seed(0)
    base = M.llama(1).eval()
    with torch.no_grad():
        expected = run(base, batch()["input_ids"])
    config = LoraConfig(**config_kwargs(scale="unit"))
    preprocess_loraga(base, config, steps(base, count=1))
    layer_grad = base.model.layers[0].self_attn.q_proj.loraga_grad.clone()
    model = get_peft_model(base, config)
    with torch.no_grad():
        assert_close(run(model, batch()["input_ids"]), expected, "output at the start", atol=1e-4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not hasattr(layer.base_layer, "loraga_grad")  # consumed
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    U, S, Vh = torch.linalg.svd(layer_grad)
    # the default direction ArB2r: A spans the top r right singular vectors, B the next r left ones (up to sign)
    assert_close((A @ Vh[:2].T).abs(), torch.eye(2), "A = top right singular vectors", atol=1e-3)
    assert_close((U[:, 2:4].T @ B).abs(), torch.diag(S[2:4]), "B = next left singular vectors · S", atol=1e-3)


def test_checkpoints_load_both_ways(tmp_path):
    torch.manual_seed(1)
    hf = build(hf_peft)
    torch.manual_seed(1)
    ours = build(None)
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    residual = get_base_model_state_dict(ours)  # LoRA-GA changed the base: the adapter applies to this one

    def base():
        model = M.llama(1).eval()
        model.load_state_dict(residual)
        return model

    x = batch()["input_ids"]
    with torch.no_grad():
        expected = run(hf, x)
        assert_close(run(PeftModel.from_pretrained(base(), tmp_path / "hf"), x), expected, "ours loading HF's")
        assert_close(run(hf_peft.PeftModel.from_pretrained(base(), tmp_path / "ours"), x), expected, "HF loading ours")


def test_gradient_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    base = M.llama(1).eval()
    config = LoraConfig(**config_kwargs())
    preprocess_loraga(base, config, steps(base), cache_file=tmp_path / "grads.pt")
    first = base.model.layers[0].mlp.up_proj.loraga_grad.clone()
    fresh = M.llama(1).eval()
    preprocess_loraga(fresh, config, lambda: pytest.fail("the cache should be read"), cache_file=tmp_path / "grads.pt")
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.loraga_grad, first)
    hf_base = M.llama(1).eval()  # HF PEFT reads our cache file too
    hf_config = hf_peft.LoraConfig(**{**config_kwargs(), "lora_ga_config": hf_peft.LoraGAConfig()})
    hf_peft.preprocess_loraga(hf_base, hf_config, lambda: None, cache_file=str(tmp_path / "grads.pt"))
    assert torch.equal(hf_base.model.layers[0].mlp.up_proj._peft_loraga_grad, first)


def test_preprocessing_restores_flags_and_mode():
    base = M.llama(1)
    base.eval()
    base.lm_head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    preprocess_loraga(base, LoraConfig(**config_kwargs()), steps(base))
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags
    assert not base.training
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(lora_ga_config={"direction": "sideways"}), "direction"),
    (dict(lora_ga_config={"scale": "huge"}), "scale"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{**config_kwargs(), **kwargs})


def test_a_train_step_without_backward_is_refused():
    base = M.llama(1)
    with pytest.raises(ValueError, match="never back-propagated"):
        preprocess_loraga(base, LoraConfig(**config_kwargs()), lambda: base(**batch()))


def test_without_preprocessing_the_plain_init_is_used():
    torch.manual_seed(0)
    model = get_peft_model(M.llama(1), LoraConfig(**config_kwargs()))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() == 0
    assert isinstance(model.peft_config["default"].lora_ga_config, LoraGAConfig)


def test_saved_relative_to_the_original_base_as_plain_lora(tmp_path):
    torch.manual_seed(0)
    original = M.llama(1).eval()
    base = copy.deepcopy(original)
    config = LoraConfig(**config_kwargs())
    preprocess_loraga(base, config, steps(base))
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    x = batch()["input_ids"]
    expected = run(model, x)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    converted = PeftModel.from_pretrained(original, tmp_path / "converted")
    assert converted.peft_config["default"].init_lora_weights is True
    assert_close(run(converted, x), expected, "plain LoRA on the original base", atol=1e-4)


def test_a_rank_beyond_half_the_layer_is_refused():
    base = M.llama(1)
    config = LoraConfig(**{**config_kwargs(), "r": 12, "target_modules": ["v_proj"]})  # v_proj is 16 × 32
    preprocess_loraga(base, config, steps(base, count=1))
    with pytest.raises(ValueError, match="lower r"):
        get_peft_model(base, config)
