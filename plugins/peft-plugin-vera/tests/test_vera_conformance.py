"""The kernel's conformance kit, run against the VeRA plugin."""

from __future__ import annotations

import functools

import pytest

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_vera import VeraConfig

pytestmark = [pytest.mark.conformance, pytest.mark.filterwarnings("ignore")]


def _case(name: str, model: str, **config):
    return Case(name, model_fn=functools.partial(M.build, model),
                config_fn=lambda: VeraConfig(**config), input_fn=functools.partial(M.inputs, model))


class TestVeraConformance(MethodConformance):
    cases = [
        _case("mlp_wide", "mlp_wide", target_modules=["lin0", "lin1"], r=4),
        _case("mlp-no-projection", "mlp_wide", target_modules=["lin0", "lin1", "lin2"], r=4, save_projection=False),
        _case("mlp-bias", "mlp_wide", target_modules=["lin0", "lin1"], r=8, bias="vera_only"),
        _case("gpt2-conv1d", "gpt2", target_modules=["c_attn", "c_proj"], r=8),
        _case("llama-defaults", "llama", r=8),
    ]
