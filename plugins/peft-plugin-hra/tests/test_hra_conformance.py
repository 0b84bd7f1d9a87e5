"""HRA passes the kernel's conformance kit: on linear layers, on convolutions (incl. those HF
PEFT's HRA cannot run: non-square kernels, grouped, dilated, reflect-padded, Conv1d), and on a
quantized base (the kit's toy int8 backend)."""

import pytest

from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_hra import HRAConfig


class TestHRAConformance(MethodConformance):
    cases = [
        Case("linear", M.MODELS["mlp8"], lambda: HRAConfig(target_modules=["lin0", "lin1"], r=4),
             lambda: M.inputs("mlp8")),
        Case("conv", M.OddConvNet, lambda: HRAConfig(target_modules=["conv0", "conv1", "conv2"], r=2,
                                                     modules_to_save=["head"]), lambda: M.inputs("odd-conv3")),
    ]


@pytest.fixture(scope="class")
def toy_backend():
    name = manager().register(ToyBackendPlugin(), name="hra-toy-backend")
    yield
    manager().unregister(name)


@pytest.mark.usefixtures("toy_backend")
class TestHRAOnQuantizedBase(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: HRAConfig(target_modules=targets, r=8))
    identity_atol = 1e-5  # pairs of equal reflections cancel within rounding
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]
