"""The kernel's conformance kit, run against the (IA)³ plugin."""

from __future__ import annotations

import functools

import pytest

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_ia3 import IA3Config

pytestmark = [pytest.mark.conformance, pytest.mark.filterwarnings("ignore")]


def _case(name: str, model: str, **config):
    return Case(name, model_fn=functools.partial(M.build, model),
                config_fn=lambda: IA3Config(**config), input_fn=functools.partial(M.inputs, model))


class TestIA3Conformance(MethodConformance):
    cases = [
        _case("mlp-output", "mlp_wide", target_modules=["lin0", "lin1"], feedforward_modules=[]),
        _case("mlp-feedforward", "mlp_wide", target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin1"]),
        _case("conv2d-groups-ff", "conv2d", target_modules=["conv0", "conv1"], feedforward_modules=["conv1"]),
        _case("conv3d", "conv3d", target_modules=["conv0"], feedforward_modules=[]),
        _case("gpt2-conv1d", "gpt2", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
        _case("llama-defaults", "llama"),
    ]
