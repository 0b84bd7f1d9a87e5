"""LoHa passes the kernel's conformance kit: for linear layers, Conv1d and the CP form of Conv2d,
and on a quantized base (the kit's toy int8 backend)."""

import _loha_models as M
import pytest

from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_loha import LoHaConfig


class TestLoHaConformance(MethodConformance):
    cases = [
        Case("linear", M.MLP, lambda: LoHaConfig(target_modules=["lin0", "lin1"], r=4), lambda: M.inputs("mlp")),
        Case("conv1d", M.Conv1dNet,
             lambda: LoHaConfig(target_modules=["conv0", "conv1"], r=2, modules_to_save=["head"]),
             lambda: M.inputs("conv1d")),
        Case("conv2d-cp", M.Conv2dNet,
             lambda: LoHaConfig(target_modules=["conv0", "conv1", "conv2"], r=2, use_effective_conv2d=True),
             lambda: M.inputs("conv2d")),
    ]


@pytest.fixture(scope="class")
def toy_backend():
    name = manager().register(ToyBackendPlugin(), name="loha-toy-backend")
    yield
    manager().unregister(name)


@pytest.mark.usefixtures("toy_backend")
class TestLoHaOnQuantizedBase(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoHaConfig(target_modules=targets, r=4))
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]
