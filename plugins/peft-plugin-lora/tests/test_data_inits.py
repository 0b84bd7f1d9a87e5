"""EVA and CorDA: configuration and the errors a user meets (the results themselves are
compared with HF PEFT in tests/differential/test_lora_data_inits.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from peft_kernel import PeftWarning, get_peft_model
from peft_kernel.testing import tiny_models
from peft_plugin_lora import (
    CordaConfig,
    EvaConfig,
    LoraConfig,
    get_eva_state_dict,
    initialize_lora_eva_weights,
    preprocess_corda,
)

MLP = functools.partial(tiny_models.MLP, (10, 20, 4))


def _mlp():
    torch.manual_seed(0)
    return MLP()


PLAIN = {"forward_fn": lambda m, x: m(x), "prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None,
         "show_progress_bar": False}
DATA = [torch.randn(16, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("make, error", [
    (lambda: EvaConfig(rho=0.5), "rho must be >= 1"),
    (lambda: EvaConfig(tau=1.5), "tau must lie in"),
    (lambda: CordaConfig(corda_method="svd"), "'ipm' or 'kpm'"),
    (lambda: LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.1}), "rho must be >= 1"),
    (lambda: LoraConfig(init_lora_weights="eva", eva_config=3), "must be a EvaConfig, a dict or None"),
])
def test_sub_config_errors(make, error):
    with pytest.raises((ValueError, TypeError), match=error):
        make()


@pytest.mark.parametrize("init, field, cls", [("eva", "eva_config", EvaConfig), ("corda", "corda_config", CordaConfig)])
def test_missing_sub_config_is_defaulted_and_stray_one_warned(init, field, cls):
    with pytest.warns(PeftWarning, match=f"without {field}"):
        config = LoraConfig(init_lora_weights=init)
    assert getattr(config, field) == cls()
    with pytest.warns(PeftWarning, match=f"{field} is ignored"):
        LoraConfig(**{field: cls()})


def test_sub_configs_round_trip_through_json():
    config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.5, whiten=True))
    data = config.to_dict()
    assert data["eva_config"] == {"rho": 1.5, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                  "whiten": True, "adjust_scaling_factors": True}
    assert LoraConfig.from_dict(data).eva_config == EvaConfig(rho=1.5, whiten=True)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_only_linear_layers(init):
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="supports linear layers only, not Embedding"):
        get_peft_model(model, LoraConfig(target_modules=["0"], init_lora_weights=init))


def _eva_model(**eva):
    torch.manual_seed(1)
    return get_peft_model(_mlp(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="eva",
                                             eva_config=EvaConfig(**eva)))


def test_initialize_needs_an_eva_adapter_and_data():
    plain = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="was not created with init_lora_weights='eva'"):
        initialize_lora_eva_weights(plain, DATA, **PLAIN)
    with pytest.raises(ValueError, match="needs a dataloader or an eva_state_dict"):
        initialize_lora_eva_weights(_eva_model())
    with pytest.raises(ValueError, match="needs a PEFT model"):
        initialize_lora_eva_weights(_mlp(), DATA, **PLAIN)
    with pytest.raises(ValueError, match="needs peft_config"):
        get_eva_state_dict(_mlp(), DATA, **PLAIN)
    with pytest.raises(ValueError, match="dataloader is empty"):
        initialize_lora_eva_weights(_eva_model(), [], **PLAIN)


def test_eva_refuses_batches_too_small_for_its_components():
    model = _eva_model(rho=2.0)  # up to 4 components per layer: a batch needs at least 4 rows
    tiny = [torch.randn(3, 10) for _ in range(2)]
    with pytest.raises(ValueError, match="never saw a batch with at least as many rows"):
        initialize_lora_eva_weights(model, tiny, **PLAIN)
    assert not any(m._forward_hooks for m in model.modules()), "EVA must remove its hooks after an error"


def test_eva_refuses_layers_the_forward_never_reaches():
    model = _eva_model()
    with pytest.raises(ValueError, match="never called layer"):
        initialize_lora_eva_weights(model, DATA, **{**PLAIN, "forward_fn": lambda m, x: m.base_model.model.lin0(x)})


def test_eva_warns_about_unknown_layers_in_the_state_dict():
    model = _eva_model()
    state = get_eva_state_dict(model, DATA, **PLAIN)
    state["nowhere"] = torch.zeros(2, 10)
    with pytest.warns(PeftWarning, match="nowhere"):
        initialize_lora_eva_weights(model, eva_state_dict=state)


def test_corda_needs_preprocessing():
    with pytest.raises(ValueError, match="needs preprocess_corda"):
        get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights="corda",
                                          corda_config=CordaConfig()))


def test_corda_errors(tmp_path):
    config = LoraConfig(r=4, target_modules=["lin0"], init_lora_weights="corda", corda_config=CordaConfig())
    with pytest.raises(ValueError, match="needs run_model"):
        preprocess_corda(_mlp(), config)
    model = _mlp()
    with pytest.raises(ValueError, match="never called the target layer"):
        preprocess_corda(model, config, run_model=lambda: model.lin1(torch.randn(4, 20)))
    # a cache built for rank 4 does not fit an adapter of rank 2
    config.corda_config.cache_file = str(tmp_path / "cache.pt")
    model = _mlp()
    preprocess_corda(model, config, run_model=lambda: model(torch.randn(32, 10)))
    rank2 = LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="corda",
                       corda_config=CordaConfig(cache_file=str(tmp_path / "cache.pt")))
    model = _mlp()
    preprocess_corda(model, rank2)
    with pytest.raises(ValueError, match=r"CorDA U has shape \(20, 4\) but this layer needs \(20, 2\)"):
        get_peft_model(model, rank2)
