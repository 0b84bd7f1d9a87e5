"""The conformance kit catches what it promises to catch: each check is run on a deliberately
broken method and must fail there (and pass on the fixed one)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_kernel
from peft_kernel import AdapterLayer, TunerConfig, get_peft_model, hookimpl
from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance, tiny_models


@dataclass
class KitConfig(TunerConfig):
    layer: str = "fresh"

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "KITPROBE"


class DeltaLayer(AdapterLayer):
    """``y = base(x) + x kitp_w[name]ᵀ`` on nn.Linear; ``layer`` picks how it caches."""

    adapter_layer_names = ("kitp_w",)

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        super().__init__(base_layer, adapter_name=adapter_name)
        self.register_containers("kitp_w", container=nn.ParameterDict)
        self.set_plain_attributes(cache={})
        self.update_layer(adapter_name, config=config)

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.kitp_w[adapter_name] = nn.Parameter(torch.zeros(self.out_features, self.in_features))

    def delta(self, adapter_name):
        return self.kitp_w[adapter_name]

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        return result + x @ self.delta(adapter_name).T

    def delta_weight(self, adapter_name):
        return self.kitp_w[adapter_name].detach()


class NeverDroppedCache(DeltaLayer):
    """Caches each adapter's delta forever (in-place edits and state changes go unseen)."""

    def delta(self, adapter_name):
        if adapter_name not in self.cache:
            self.cache[adapter_name] = self.kitp_w[adapter_name].detach().clone()
        return self.cache[adapter_name]


class VersionCheckedCache(DeltaLayer):
    """Notices in-place edits (tensor version counters) but keeps the cache across state
    changes, so a deleted and re-added adapter can be served the old one's delta."""

    def delta(self, adapter_name):
        weight = self.kitp_w[adapter_name]
        cached = self.cache.get(adapter_name)
        if cached is None or cached[0] != weight._version:
            self.cache[adapter_name] = cached = (weight._version, weight.detach().clone())
        return cached[1]


class DroppedOnStateChange(VersionCheckedCache):
    """The same cache, dropped whenever the kernel reports a state change: correct."""

    def adapter_state_changed(self):
        self.cache.clear()
        super().adapter_state_changed()


class BilinearDelta(AdapterLayer):
    """A two-input layer (nn.Bilinear) that leaves ``supports_mixed_batch`` at its default."""

    adapter_layer_names = ("kitp_w",)

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        super().__init__(base_layer, adapter_name=adapter_name)
        self.register_containers("kitp_w", container=nn.ParameterDict)
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.kitp_w[adapter_name] = nn.Parameter(torch.zeros_like(self.get_base_layer().weight))

    def adapter_forward(self, x, result, adapter_name, x2, **kwargs):
        return result + F.bilinear(x, x2, self.kitp_w[adapter_name])


LAYERS = {"fresh": DeltaLayer, "never-dropped": NeverDroppedCache, "version-checked": VersionCheckedCache,
          "dropped-on-change": DroppedOnStateChange}


class KitModel(peft_kernel.BaseTuner):
    prefix = "kitp_"


class KitProbe:
    @hookimpl
    def peft_kernel_register_methods(self, register):
        register(name="kitprobe", config_cls=KitConfig, model_cls=KitModel, prefix="kitp_")

    @hookimpl(trylast=True)
    def peft_kernel_dispatch_layer(self, target, target_name, adapter_name, config):
        if config.peft_type != "KITPROBE":
            return None
        if isinstance(target, nn.Bilinear):
            return BilinearDelta(target, adapter_name)
        if isinstance(target, nn.Linear):
            return LAYERS[config.layer](target, adapter_name, config=config)
        return None


@pytest.fixture(autouse=True, scope="module")
def probe_method():
    name = manager().register(KitProbe(), name="conformance-kit-probe")
    yield
    manager().unregister(name)


MLP = functools.partial(tiny_models.MLP, (6, 8, 3))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 4)

    def forward(self, x):
        return self.bil(x[:, :3], x[:, 3:])


def _case(layer: str) -> Case:
    return Case(layer, MLP, lambda: KitConfig(target_modules=["lin0", "lin1"], layer=layer), lambda: torch.randn(4, 6))


KIT = MethodConformance()


@pytest.mark.parametrize("layer", ["fresh", "dropped-on-change"])
def test_caching_done_right_passes(layer):
    KIT.test_no_stale_state(_case(layer))
    KIT.test_two_adapters(_case(layer))


def test_a_cache_blind_to_in_place_edits_fails():
    with pytest.raises(AssertionError, match="stale cache"):
        KIT.test_no_stale_state(_case("never-dropped"))


def test_a_cache_kept_across_state_changes_fails():
    """This cache notices edits (the first half of the check passes) but not state changes."""
    with pytest.raises(AssertionError, match="re-added adapter"):
        KIT.test_no_stale_state(_case("version-checked"))


def test_mixed_batch_with_a_second_batched_input_is_a_clear_error():
    model = get_peft_model(TwoInputs(), KitConfig(target_modules=["bil"]))
    model.add_adapter("other", KitConfig(target_modules=["bil"]))
    model.eval()
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match=r"BilinearDelta was called with 2 inputs .* supports_mixed_batch = False"):
        model(x, adapter_names=["default", "other", "__base__", "other"])
    case = Case("two-inputs", TwoInputs, lambda: KitConfig(target_modules=["bil"]), lambda: torch.randn(4, 6))
    KIT.test_mixed_batch(case)  # a clear refusal passes the kit


def test_the_kit_fails_a_mixed_batch_that_ends_in_a_shape_error(monkeypatch):
    monkeypatch.setattr(AdapterLayer, "_check_single_batched_input", lambda self, *args: None)
    case = Case("two-inputs", TwoInputs, lambda: KitConfig(target_modules=["bil"]), lambda: torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="bilinear"):
        KIT.test_mixed_batch(case)
