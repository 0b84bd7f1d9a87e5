"""Mixed adapter types (``get_peft_model(..., mixed=True)``), tested against the math.

The mixing is the kernel's: any method registered with ``is_mixed_compatible=True`` joins,
including the toy methods registered here from plain code on ``WeightDeltaLayer``: a rank-one
weight delta, and a weight transform ``W ↦ W·diag(s)`` with (``INSCALE``) and without
(``WSCALE``) its activation form. The differential tests against HF PEFT are in
``tests/differential/test_mixed_adapters.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import BaseTuner, TunerConfig, WeightDeltaLayer, get_peft_model, register_layer_mapping
from peft_kernel.layer import BASE_ADAPTER, unwrap_base_layer
from peft_kernel.mixed import PeftMixedModel
from peft_kernel.plugins import register_peft_method, reset_manager
from peft_plugin_ia3 import IA3Config
from peft_plugin_loha import LoHaConfig
from peft_plugin_lora import LoraConfig

# -- toy methods, registered from plain code -----------------------------------------------


def _config(peft_type: str) -> type:
    @dataclass
    class Config(TunerConfig):
        def __post_init__(self):
            super().__post_init__()
            self.peft_type = peft_type

    Config.__name__ = Config.__qualname__ = f"{peft_type.title()}Config"
    return Config


class RankOneLayer(WeightDeltaLayer):
    """ΔW = u vᵀ."""

    adapter_layer_names = ("rankone_u", "rankone_v")

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.rankone_u[adapter_name] = nn.Parameter(torch.randn(self.out_features))
        self.rankone_v[adapter_name] = nn.Parameter(torch.randn(self.in_features))

    def get_delta(self, adapter_name):
        return torch.outer(self.rankone_u[adapter_name], self.rankone_v[adapter_name])


class WScaleLayer(WeightDeltaLayer):
    """T(W) = W·diag(s): scales the weight's input columns (a transform without its input form)."""

    adapter_layer_names = ("wscale_s",)

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.wscale_s[adapter_name] = nn.Parameter(1 + 0.5 * torch.rand(self.in_features))

    def transform_weight(self, weight, adapter_name):
        return weight * self.wscale_s[adapter_name]

    def untransform_weight(self, weight, adapter_name):
        return weight / self.wscale_s[adapter_name]


class InScaleLayer(WScaleLayer):
    """The same transform, also in its activation form: W·diag(s)·x = W·(s ⊙ x)."""

    adapter_layer_names = ("inscale_s",)
    wscale_s = property(lambda self: self.inscale_s)
    transforms_activations = True

    def transform_input(self, x, adapter_name):
        return x * self.inscale_s[adapter_name]


TOYS = {"RANKONE": RankOneLayer, "WSCALE": WScaleLayer, "INSCALE": InScaleLayer}
CONFIGS = {name: _config(name) for name in [*TOYS, "UNMIXABLE"]}


@pytest.fixture(autouse=True, scope="module")
def toy_methods():
    reset_manager()
    for name, layer_cls in TOYS.items():
        tuner = type(f"{name.title()}Model", (BaseTuner,), {"prefix": f"{name.lower()}_", "layer_cls": layer_cls})
        register_peft_method(name=name.lower(), config_cls=CONFIGS[name], model_cls=tuner, is_mixed_compatible=True)
        register_layer_mapping(nn.Linear, layer_cls, method=name)
    unmixable = type("UnmixableModel", (BaseTuner,), {"prefix": "unmixable_", "layer_cls": RankOneLayer})
    register_peft_method(name="unmixable", config_cls=CONFIGS["UNMIXABLE"], model_cls=unmixable)  # flag left off
    yield
    for name in TOYS:
        peft_kernel.unregister_layer_mapping(nn.Linear, method=name)
    reset_manager()


def toy(name: str, targets=("lin0", "lin1")):
    return CONFIGS[name](target_modules=list(targets))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def mixed(*adapters: tuple[str, object]) -> PeftMixedModel:
    """A mixed model with ``(name, config)`` adapters added in order, all active."""
    torch.manual_seed(2)
    (first, config), *rest = adapters
    model = get_peft_model(mlp(), config, first, mixed=True)
    for name, config in rest:
        model.add_adapter(name, config)
    model.set_adapter([name for name, _ in adapters])
    return model.eval()


def lora(targets=("lin0", "lin1")):
    return LoraConfig(target_modules=list(targets), r=2, lora_alpha=4, init_lora_weights=False)


def run(model, x=X, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs)


def lora_delta(layer, name):
    return layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]


# -- the mixing comes from the layers: outputs against the math ---------------------------


def test_layers_of_different_methods_nest_and_apply_together():
    model = mixed(("r1", toy("RANKONE")), ("lo", lora(["lin0"])), ("r2", toy("RANKONE", ["lin0"])))
    outer = model.base_model.model.lin0  # r2 wraps LoRA, which wraps r1: one layer per method and turn
    middle, inner = outer.base_layer, outer.base_layer.base_layer
    assert (isinstance(outer, RankOneLayer), isinstance(middle, RankOneLayer), isinstance(inner, RankOneLayer)) == (
        True, False, True)
    assert (outer.has_adapter("r2"), middle.has_adapter("lo"), inner.has_adapter("r1")) == (True, True, True)
    base, lin1 = unwrap_base_layer(outer), model.base_model.model.lin1
    assert isinstance(lin1, RankOneLayer) and not isinstance(lin1.base_layer, peft_kernel.AdapterLayer)

    def expected(lin0_weight, lin1_weight):
        hidden = torch.tanh(X @ lin0_weight.T + base.bias)
        return (hidden @ lin1_weight.T + lin1.base_layer.bias).detach()

    all_active = expected(base.weight + inner.get_delta("r1") + lora_delta(middle, "lo") + outer.get_delta("r2"),
                          lin1.base_layer.weight + lin1.get_delta("r1"))
    torch.testing.assert_close(run(model), all_active)
    model.set_adapter(["lo", "r2"])
    torch.testing.assert_close(run(model), expected(base.weight + lora_delta(middle, "lo") + outer.get_delta("r2"),
                                                    lin1.base_layer.weight))


def test_an_input_side_transform_acts_through_the_layers_inside_it():
    """INSCALE around LoRA: lin0(x) = (W + ΔW)·diag(s)·x + b; merged, the weight is exactly
    (W + ΔW)·diag(s): the inner layer folds in first."""
    model = mixed(("lo", lora(["lin0"])), ("sc", toy("INSCALE", ["lin0"])))
    lin0 = model.base_model.model.lin0
    assert isinstance(lin0, InScaleLayer) and not isinstance(lin0.base_layer, InScaleLayer)
    base, s = lin0.get_base_layer(), lin0.inscale_s["sc"]
    adapted = ((base.weight + lora_delta(lin0.base_layer, "lo")) * s).detach()
    lin1 = model.base_model.model.lin1
    expected = torch.tanh(X @ adapted.T + base.bias) @ lin1.weight.T + lin1.bias
    torch.testing.assert_close(run(model), expected)
    original = base.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(base.weight.detach(), adapted)
    torch.testing.assert_close(run(model), expected)
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), original)
    unloaded = model.merge_and_unload()
    assert type(unloaded.lin0) is nn.Linear
    torch.testing.assert_close(unloaded.lin0.weight.detach(), adapted)


def test_an_additive_layer_around_a_transform_adds_to_the_transformed_weight():
    model = mixed(("sc", toy("WSCALE", ["lin0"])), ("lo", lora(["lin0"])))
    lin0 = model.base_model.model.lin0
    base = lin0.get_base_layer()
    adapted = (base.weight * lin0.base_layer.wscale_s["sc"] + lora_delta(lin0, "lo")).detach()
    lin1 = model.base_model.model.lin1
    expected = torch.tanh(X @ adapted.T + base.bias) @ lin1.weight.T + lin1.bias
    torch.testing.assert_close(run(model), expected)
    torch.testing.assert_close(model.merge_and_unload().lin0.weight.detach(), adapted)


def test_a_transform_without_activation_form_cannot_wrap_other_layers_and_changes_nothing():
    model = mixed(("lo", lora(["lin1"])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(model)
    with pytest.raises(ValueError, match=r"WSCALE adapter 'sc' to 'lin1'.*from the base weight alone.*before the"):
        model.add_adapter("sc", toy("WSCALE"))  # lin0 gets its layer first, then lin1 fails
    assert type(model.base_model.model.lin0) is nn.Linear  # the new layer on lin0 was taken off again
    assert set(model.peft_config) == {"lo"} and set(model.state_dict()) == set(before)
    torch.testing.assert_close(run(model), out)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scaling", "input-scaling"])
@pytest.mark.parametrize("ia3_first", [False, True], ids=["lora-inside", "ia3-inside"])
def test_merged_equals_unmerged_with_a_multiplicative_method(feedforward, ia3_first):
    ia3 = ("ia3", IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin0"] if feedforward else []))
    adapters = [ia3, ("lo", lora())] if ia3_first else [("lo", lora()), ia3]
    model = mixed(*adapters)
    with torch.no_grad():
        for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
            ia3_layer = layer if hasattr(layer, "ia3_l") else layer.base_layer
            ia3_layer.ia3_l["ia3"].uniform_(0.5, 1.5)  # IA3 starts as an identity
    base_out = run(mlp())
    unmerged = run(model)
    assert (unmerged - base_out).abs().max() > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(run(model), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model), base_out)
    torch.testing.assert_close(run(model.merge_and_unload()), unmerged, atol=1e-5, rtol=0)


def test_mixed_adapter_batches_route_each_row_through_every_nested_layer():
    model = mixed(("lo", lora()), ("sc", toy("INSCALE")), ("lh", LoHaConfig(target_modules=["lin0"], r=2,
                                                                           init_weights=False)))
    names = ["lo", "sc", BASE_ADAPTER, "lh", "sc"]
    batch = run(model, adapter_names=names)
    for row, name in enumerate(names):
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                expected = run(model)
        else:
            model.set_adapter(name)
            expected = run(model)
        torch.testing.assert_close(batch[row], expected[row])


# -- the flag, the errors -----------------------------------------------------------------


def test_only_methods_declared_mixed_compatible_join():
    from peft_plugin_prompt_tuning import PromptTuningConfig
    from peft_plugin_vera import VeraConfig

    base = mlp()
    for config, reason in [(CONFIGS["UNMIXABLE"](target_modules=["lin0"]), "not registered as mixed-compatible"),
                           (VeraConfig(target_modules=["lin0"], r=2), "not registered as mixed-compatible"),
                           (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "a prompt-learning")]:
        with pytest.raises(ValueError, match=rf"{config.peft_type} adapters cannot join a mixed model: .*{reason}.*"
                                             r"is_mixed_compatible=True \(.*INSCALE.*LORA.*RANKONE"):
            get_peft_model(base, config, mixed=True)
        assert type(base.lin0) is nn.Linear and not hasattr(base, "peft_config")
    model = mixed(("lo", lora()))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="VERA adapters cannot join a mixed model"):
        model.add_adapter("ve", VeraConfig(target_modules=["lin0"], r=2))
    assert set(model.state_dict()) == keys and set(model.peft_config) == {"lo"}


def test_a_single_method_model_points_to_mixed_models():
    model = get_peft_model(mlp(), lora())
    with pytest.raises(ValueError, match=r"Cannot add a LOHA adapter to a LORA model.*mixed=True"):
        model.add_adapter("lh", LoHaConfig(target_modules=["lin0"]))


def test_delete_one_or_several_but_not_while_merged():
    model = mixed(("lo", lora()), ("lh", LoHaConfig(target_modules=["lin0"], r=2, init_weights=False)),
                  ("r1", toy("RANKONE")))
    model.set_adapter("lo")
    lora_only = run(model)
    model.merge_adapter(["lh"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['lh'\] while they are merged"):
        model.delete_adapter(["r1", "lh"])
    assert set(model.peft_config) == {"lo", "lh", "r1"}
    model.unmerge_adapter()
    with pytest.raises(ValueError, match=r"\['nope'\] do not exist"):
        model.delete_adapter(["r1", "nope"])
    with pytest.raises(ValueError, match=r"\['nope'\] not found"):
        model.set_adapter(["lo", "nope"])
    model.delete_adapter(["r1", "lh"])
    assert set(model.peft_config) == {"lo"} and model.active_adapters == ["lo"]
    assert model.targeted_module_names == ["lin0", "lin1"]
    torch.testing.assert_close(run(model), lora_only)


# -- training, saving, loading ------------------------------------------------------------


def test_all_active_adapters_train_and_nothing_else():
    model = mixed(("lo", lora()), ("lh", LoHaConfig(target_modules=["lin0"], r=2, init_weights=False)),
                  ("r1", toy("RANKONE", ["lin1"])))
    model.set_adapter(["lo", "r1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lo." in n or ".r1" in n for n in trainable)
    model.train()
    model(X).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_each_adapter_saves_in_its_own_format_and_loads_alone_or_mixed(tmp_path):
    model = mixed(("default", lora(["lin0"])), ("lh", LoHaConfig(target_modules=["lin0", "lin1"], r=2,
                                                                init_weights=False)), ("r1", toy("RANKONE")))
    expected = run(model)
    model.save_pretrained(str(tmp_path))
    saved = peft_kernel.load_peft_weights(str(tmp_path / "r1"))
    assert sorted(saved) == [f"base_model.model.lin{i}.rankone_{p}" for i in (0, 1) for p in "uv"]
    for name in ("lh", "r1"):  # a single-method model of each method loads its adapter
        alone = peft_kernel.PeftModel.from_pretrained(mlp(), str(tmp_path / name)).eval()
        model.set_adapter(name)
        torch.testing.assert_close(run(alone), run(model))
    loaded = PeftMixedModel.from_pretrained(mlp(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "lh"), "lh")
    loaded.load_adapter(str(tmp_path / "r1"), "r1")
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference: frozen
    loaded.set_adapter(["default", "lh", "r1"])
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(run(loaded.eval()), expected)
    loaded.set_adapter(["default", "lh"], inference_mode=False)
    assert {n.split(".")[-2] if "lora" in n else n.split(".")[-1] for n, p in loaded.named_parameters()
            if p.requires_grad} == {"default", "lh"}
    status = peft_kernel.get_model_status(loaded)
    assert status.peft_types == {"default": "LORA", "lh": "LOHA", "r1": "RANKONE"}


def test_loading_an_incompatible_checkpoint_is_refused(tmp_path):
    from peft_plugin_vera import VeraConfig

    get_peft_model(mlp(), VeraConfig(target_modules=["lin0"], r=2)).save_pretrained(str(tmp_path / "vera"))
    with pytest.raises(ValueError, match="VERA adapters cannot join a mixed model"):
        PeftMixedModel.from_pretrained(mlp(), str(tmp_path / "vera"))
    model = mixed(("lo", lora()))
    with pytest.raises(ValueError, match="VERA adapters cannot join a mixed model"):
        model.load_adapter(str(tmp_path / "vera"), "ve")
    assert set(model.peft_config) == {"lo"}
